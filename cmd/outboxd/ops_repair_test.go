package main

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
)

// The runbook's slot repair, end to end with the daemon: a slot dropped while
// outboxd was down is reported by status, `slot reset --yes` says how many
// rows will be read again, and the next run delivers every unprocessed row —
// those committed while there was no slot included — once, without
// re-delivering what was already processed.
func TestSlotResetThenRunDeliversEveryUnprocessedRow(t *testing.T) {
	t.Parallel()
	db := newOpsDB(t)
	daemonEnv := maps.Clone(db.env)
	daemonEnv["OUTBOXD_LOG_FORMAT"] = "json"
	daemonEnv["OUTBOXD_LOG_LEVEL"] = "info"
	orgOf := func(i int) int64 { return int64(i % 3) }

	d := e2e.StartDaemon(t, daemonEnv)
	first := e2e.Insert(t, db.pool, 10, 5, orgOf)
	db.recv.WaitAccepted(t, first, time.Minute)
	e2e.WaitFor(t, 30*time.Second, func() bool {
		code, out, _ := opsRun(t, db.env, "status", "--json")
		if code != 0 {
			return false
		}
		m := statusJSON(t, out)
		b := m["backlog"].(map[string]any)
		return m["slot"].(map[string]any)["active"] == true && b["unprocessed_rows"] == 0.0
	}, func() string { _, out, _ := opsRun(t, db.env, "status"); return "status not healthy:\n" + out })
	code, out, _ := opsRun(t, db.env, "status", "--json")
	require.Equal(t, 0, code)
	slot := statusJSON(t, out)["slot"].(map[string]any)
	require.NotNil(t, slot["active_pid"], "the daemon's walsender")
	require.Equal(t, 0, d.Stop(30*time.Second))

	// The slot is dropped behind outboxd's back; rows committed now are in no
	// slot's stream, only in the table.
	e2e.WaitFor(t, 10*time.Second, func() bool { return !db.slotActive(t) }, func() string { return "the walsender still holds the slot" })
	db.exec(t, `SELECT pg_drop_replication_slot($1)`, db.env["OUTBOXD_SLOT"])
	gap := e2e.Insert(t, db.pool, 6, 5, orgOf)
	code, out, _ = opsRun(t, db.env, "status")
	require.Equal(t, 1, code)
	require.Contains(t, out, "missing although a checkpoint exists")
	require.Contains(t, out, "slot reset --yes")

	refused := e2e.StartDaemon(t, daemonEnv)
	require.Equal(t, 1, refused.Wait(30*time.Second), "without OUTBOXD_SLOT_RECREATE the daemon must not guess")
	require.Contains(t, refused.Log(), "slot reset --yes")

	code, out, errOut := opsRun(t, db.env, "slot", "reset", "--dry-run")
	require.Equal(t, 0, code, errOut)
	require.Contains(t, out, fmt.Sprintf("reads %d unprocessed rows", len(gap)))
	_, exists := db.slotLSN(t)
	require.False(t, exists, "dry run")

	code, out, errOut = opsRun(t, db.env, "slot", "reset", "--yes")
	require.Equal(t, 0, code, out+errOut)
	require.Contains(t, out, fmt.Sprintf("%d unprocessed rows will be read again", len(gap)))
	late := e2e.Insert(t, db.pool, 2, 5, orgOf) // after the reset, before the run

	d = e2e.StartDaemon(t, daemonEnv)
	all := slices.Concat(first, gap, late)
	db.recv.WaitAccepted(t, all, time.Minute)
	e2e.WaitFor(t, 30*time.Second, func() bool {
		code, out, _ := opsRun(t, db.env, "status", "--json")
		return code == 0 && statusJSON(t, out)["checkpoint"].(map[string]any)["catchup_pending"] == false
	}, func() string { _, out, _ := opsRun(t, db.env, "status"); return "catch-up not finished:\n" + out })
	c := db.recv.Count(all)
	t.Logf("slot reset: %s", c)
	require.Zero(t, c.Lost)
	require.Zero(t, c.Duplicates, "processed rows are not delivered again; the catch-up reads each row once")
	require.Zero(t, c.Unexpected)
	require.Zero(t, c.BadSignatures)
	rows, _ := e2e.Processed(t, db.pool)
	require.EqualValues(t, len(all), rows)
	require.Equal(t, 0, d.Stop(30*time.Second))
	require.False(t, strings.Contains(d.Log(), `"level":"error"`), "daemon errors after the reset")
}

// A forced reset while an instance streams and inserts go on: the instance
// finds slot and checkpoint gone and starts over by itself (it used to stop,
// and a restart caught up), and nothing is lost — rows committed while there
// was no slot included.
func TestForcedResetWhileStreamingLosesNothing(t *testing.T) {
	t.Parallel()
	db := newOpsDB(t)
	daemonEnv := maps.Clone(db.env)
	daemonEnv["OUTBOXD_LOG_FORMAT"] = "json"
	daemonEnv["OUTBOXD_LOG_LEVEL"] = "info"
	orgOf := func(i int) int64 { return int64(i % 4) }

	d := e2e.StartDaemon(t, daemonEnv)
	ids := e2e.Insert(t, db.pool, 10, 3, orgOf)
	db.recv.WaitAccepted(t, ids, time.Minute)

	// Inserts keep coming while the slot is reset under the instance.
	stop := e2e.InsertUntilStopped(db.pool, 2, orgOf)
	e2e.WaitFor(t, 10*time.Second, func() bool { return len(db.recv.Accepted()) >= len(ids)+20 }, func() string { return "no deliveries while inserting" })
	code, out, errOut := opsRun(t, db.env, "slot", "reset", "--yes", "--force")
	require.Equal(t, 0, code, out+errOut)
	require.Contains(t, out, "terminated process")
	require.Contains(t, out, "left it dropped")
	ids = append(ids, stop()...)
	// The interrupted instance finds slot and checkpoint gone and starts
	// over as a first start: it recreates the slot and catches up.
	db.recv.WaitAccepted(t, ids, time.Minute)
	require.Contains(t, d.Log(), "slot reset by an operator; starting over with a catch-up from the table")
	require.False(t, d.Exited(), "no exit")
	c := db.recv.Count(ids)
	t.Logf("forced reset while streaming: %s", c)
	require.Zero(t, c.Lost)
	require.Zero(t, c.Unexpected)
	require.Equal(t, 0, d.Stop(30*time.Second))
}
