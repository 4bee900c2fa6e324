package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/pgtest"
)

// TestSmoke runs the whole benchmark in its smoke mode (tiny sizes, every
// measurement) against Postgres: a server it starts itself, or the one of
// OUTBOXD_TEST_DATABASE_URL. run fails when any measurement lost an event or
// left a row unprocessed, so passing means every event of every measurement
// arrived and was marked. Figures are printed, never asserted.
func TestSmoke(t *testing.T) {
	out := filepath.Join(t.TempDir(), "smoke.json")
	args := []string{"-smoke", "-json", out}
	if url := os.Getenv(pgtest.EnvDatabaseURL); url != "" {
		args = append(args, "-database-url", url)
	}
	var stdout, stderr bytes.Buffer
	err := run(t.Context(), args, &stdout, &stderr)
	t.Logf("progress:\n%s", stderr.String())
	t.Logf("results:\n%s", stdout.String())
	require.NoError(t, err)

	raw, err := os.ReadFile(out)
	require.NoError(t, err)
	var res results
	require.NoError(t, json.Unmarshal(raw, &res))
	require.Empty(t, res.Failures)
	require.Equal(t, "2000", res.Flags["n"])
	// Every measurement produced its row, over the whole backlog.
	want := map[string]int{"pg_recvlogical": 0, "outboxd per-event": 0, "outboxd batched": 0, "poller (": 0,
		"outboxd latency": 0, "poller latency": 0, "outboxd one": 0, "outboxd tenants": 0, "outboxd parked": 0,
		"floor: the least Go consumer, no guarantees, per-event": 0, "floor: the least Go consumer, no guarantees, batched": 0,
		"floor latency": 0}
	for _, r := range res.Rows {
		for prefix := range want {
			if strings.HasPrefix(r.Mode, prefix) {
				want[prefix]++
			}
		}
		require.Positive(t, r.Events, r.Mode)
		switch {
		case strings.HasPrefix(r.Mode, "outboxd tenants"):
			require.EqualValues(t, 200, r.Events, "%s delivers one event per organization", r.Mode)
			require.Zero(t, r.VsRecvlogical, "no ratio against another backlog")
		case strings.HasPrefix(r.Mode, "outboxd parked"):
			require.EqualValues(t, 1000, r.Events, "%s retries every parked delivery", r.Mode)
		case r.P50ms == 0 && !strings.Contains(r.Mode, "latency") && !strings.HasPrefix(r.Mode, "outboxd one"):
			require.EqualValues(t, 2000, r.Events, "%s drains the whole backlog", r.Mode)
		}
	}
	for prefix, n := range want {
		require.Positive(t, n, "a row for %q", prefix)
	}
	require.Equal(t, 2, want["outboxd batched"], "one per transaction size")
	require.Equal(t, 2, want["outboxd tenants"], "one per subscription count")
	require.Equal(t, 2, want["floor: the least Go consumer, no guarantees, batched"], "one per transaction size")
	require.Equal(t, 2, want["floor latency"], "one per rate")
}

func TestEachID(t *testing.T) {
	collect := func(body string) ([]int64, bool) {
		var ids []int64
		ok := eachID([]byte(body), func(id int64) { ids = append(ids, id) })
		return ids, ok
	}
	for _, tc := range []struct {
		body string
		ids  []int64
		ok   bool
	}{
		{`{"id":42,"event_name":"x","properties":{"id":7,"s":"{\"id\":9}"}}`, []int64{42}, true},
		{`[{"id":1,"p":[{"id":5}]},{"properties":{},"id":2}]`, []int64{1, 2}, true},
		{` [ ] `, nil, true},
		{`{"event_name":"no id"}`, nil, false},
		{`{"id":"1"}`, nil, false},
		{`[{"id":1},]`, []int64{1}, false},
		{`{"id":1`, nil, false},
		{`{"id":1} x`, nil, false},
		{`null`, nil, false},
	} {
		ids, ok := collect(tc.body)
		require.Equal(t, tc.ok, ok, tc.body)
		if tc.ok {
			require.Equal(t, tc.ids, ids, tc.body)
		}
	}
}
