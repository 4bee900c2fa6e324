package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// insertContractEvent inserts one inventory_adjusted event of organization
// 7 (its own transaction); valid or with delta of the wrong type.
func insertContractEvent(t *testing.T, pool *pgxpool.Pool, valid bool) int64 {
	t.Helper()
	props := `{"sku":"SKU-1","delta":-2,"reason":"sale"}`
	if !valid {
		props = `{"sku":"SKU-1","delta":"two","reason":"sale"}`
	}
	var id int64
	require.NoError(t, pool.QueryRow(context.Background(), `INSERT INTO domain_event (event_name, organization_id, entity_type, entity_id, properties)
VALUES ('inventory_adjusted', 7, 'sku', 'SKU-1', $1::jsonb) RETURNING id`, props).Scan(&id))
	return id
}

// contractDeadLetters returns the dead letters' reasons by event id, of
// one target.
func contractDeadLetters(t *testing.T, pool *pgxpool.Pool, target string) map[int64]string {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT event_id, last_error FROM outboxd_dead_letter WHERE sink = $1`, target)
	require.NoError(t, err)
	defer rows.Close()
	out := map[int64]string{}
	for rows.Next() {
		var id int64
		var reason string
		require.NoError(t, rows.Scan(&id, &reason))
		out[id] = reason
	}
	require.NoError(t, rows.Err())
	return out
}

// The daemon validates events against the tracking plan in commit order,
// per target policy: the default webhook delivers everything
// (OUTBOXD_WEBHOOK_CONTRACT=deliver), the subscription dead-letters what
// breaks the plan (OUTBOXD_SUBSCRIPTION_CONTRACT=dead-letter) with a reason
// naming the rule. An event committed before the plan is not validated
// against it; the plan in force survives a kill -9: events committed while
// the daemon was down, before the plan was removed, are still checked
// against it, and those after the removal are not.
func TestContractPoliciesInCommitOrder(t *testing.T) {
	t.Parallel()
	b := newBundle(t, pgtest.Shared(t), map[string]string{
		"OUTBOXD_WEBHOOK_CONTRACT": "deliver", "OUTBOXD_SUBSCRIPTION_CONTRACT": "dead-letter",
	})
	ctx := context.Background()
	sub := e2e.NewReceiver(t)
	subID := addSubscription(t, b.pool, nil, sub.URL+"/hook", nil, nil)
	subTarget := "subscription:" + strconv.FormatInt(subID, 10)
	d := e2e.StartDaemon(t, b.env)
	waitStreaming(t, d)

	// No plan: nothing is validated; both get the invalid event.
	before := insertContractEvent(t, b.pool, false)
	b.recv.WaitAccepted(t, []int64{before}, time.Minute)
	sub.WaitAccepted(t, []int64{before}, time.Minute)

	// The plan applied mid-stream (record mode: the trigger lets rows in).
	code, out := e2e.RunCommand(t, b.env, "plan", "apply", examplePlanFile, "--trigger", "record")
	require.Equal(t, 0, code, out)
	bad1 := insertContractEvent(t, b.pool, false)
	good1 := insertContractEvent(t, b.pool, true)
	b.recv.WaitAccepted(t, []int64{bad1, good1}, time.Minute)
	sub.WaitAccepted(t, []int64{good1}, time.Minute)
	// before and good1 are marked processed; bad1, dead-lettered for the
	// subscription, is not.
	b.waitProcessed(t, 2, time.Minute)
	e2e.WaitFor(t, time.Minute, func() bool { return len(contractDeadLetters(t, b.pool, subTarget)) == 1 },
		func() string { return "no dead letter: " + d.Log() })

	// Killed mid-stream (a burst of valid and invalid events in flight);
	// while it is down an invalid event commits under the plan, then the
	// plan is removed, then another invalid event.
	var burstValid, burstInvalid []int64
	for i := range 20 {
		if i%3 == 0 {
			burstInvalid = append(burstInvalid, insertContractEvent(t, b.pool, false))
		} else {
			burstValid = append(burstValid, insertContractEvent(t, b.pool, true))
		}
	}
	d.Kill()
	bad2 := insertContractEvent(t, b.pool, false)
	_, err := b.pool.Exec(ctx, "DELETE FROM outboxd_plan")
	require.NoError(t, err)
	after := insertContractEvent(t, b.pool, false)
	d = e2e.StartDaemon(t, b.env)
	b.recv.WaitAccepted(t, append(append([]int64{bad2, after}, burstValid...), burstInvalid...), time.Minute)
	sub.WaitAccepted(t, append([]int64{after}, burstValid...), time.Minute)

	invalid := append(append([]int64{bad1}, burstInvalid...), bad2)
	e2e.WaitFor(t, time.Minute, func() bool { return len(contractDeadLetters(t, b.pool, subTarget)) == len(invalid) },
		func() string { return "dead letters: " + d.Log() })
	dead := contractDeadLetters(t, b.pool, subTarget)
	require.Equal(t, invalid, deadIDs(dead))
	var rows int
	require.NoError(t, b.pool.QueryRow(ctx, "SELECT count(*) FROM outboxd_dead_letter").Scan(&rows))
	require.Equal(t, len(invalid), rows, "one dead letter per invalid event, none written twice across the kill")
	for _, reason := range dead {
		require.Equal(t, "contract: properties.delta: got string, want number", reason)
	}
	require.Empty(t, contractDeadLetters(t, b.pool, "webhook"), "the webhook delivers invalid events")
	for _, id := range sub.Accepted() {
		require.NotContains(t, invalid, id, "the subscription never got an invalid event")
	}
	// The record-mode trigger recorded the rows that broke the plan while
	// it was stored.
	var recorded int
	require.NoError(t, b.pool.QueryRow(ctx, "SELECT count(DISTINCT event_id) FROM outboxd_plan_violation").Scan(&recorded))
	require.Equal(t, len(invalid), recorded)

	// outboxd dlq shows the reason.
	code, out = e2e.RunCommand(t, b.env, "dlq", "list", "--target", subTarget)
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "contract: properties.delta")

	// dlq retry keeps the dead letters of events that still break the
	// plan stored now: retried, they would be sent as they are.
	code, out = e2e.RunCommand(t, b.env, "plan", "apply", examplePlanFile)
	require.Equal(t, 0, code, out)
	code, out = e2e.RunCommand(t, b.env, "dlq", "retry", "--target", subTarget, "--dry-run")
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "would retry 0 dead letter(s)", "a dry run counts what a retry would move")
	code, out = e2e.RunCommand(t, b.env, "dlq", "retry", "--target", subTarget)
	require.Equal(t, 0, code, out)
	require.Contains(t, out, fmt.Sprintf("%d dead letter(s) kept: their events still break the tracking plan (event %d: properties.delta: got string, want number)", len(invalid), bad1))
	require.Contains(t, out, "0 dead letter(s) moved back to the retry schedule")
	require.Len(t, contractDeadLetters(t, b.pool, subTarget), len(invalid))
	// --force retries one as it is.
	code, out = e2e.RunCommand(t, b.env, "dlq", "retry", "--target", subTarget, "--force", "--event-id", strconv.FormatInt(bad1, 10))
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "1 dead letter(s) moved back to the retry schedule")
	sub.WaitAccepted(t, []int64{bad1}, time.Minute)
	// A plan under which they are valid: the rest are retried.
	relaxed, err := os.ReadFile(examplePlanFile)
	require.NoError(t, err)
	require.Contains(t, string(relaxed), "delta: {type: number}")
	relaxedFile := filepath.Join(t.TempDir(), "plan.yaml")
	require.NoError(t, os.WriteFile(relaxedFile, bytes.Replace(relaxed, []byte("delta: {type: number}"), []byte("delta: {type: [number, string]}"), 1), 0o600))
	code, out = e2e.RunCommand(t, b.env, "plan", "apply", relaxedFile)
	require.Equal(t, 0, code, out)
	code, out = e2e.RunCommand(t, b.env, "dlq", "retry", "--target", subTarget)
	require.Equal(t, 0, code, out)
	require.NotContains(t, out, "kept")
	require.Contains(t, out, fmt.Sprintf("%d dead letter(s) moved back to the retry schedule", len(invalid)-1))
	sub.WaitAccepted(t, invalid, time.Minute)
	e2e.WaitFor(t, time.Minute, func() bool { return len(contractDeadLetters(t, b.pool, subTarget)) == 0 },
		func() string { return "dead letters left: " + d.Log() })
}

func deadIDs(m map[int64]string) []int64 {
	var out []int64
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// A plan stored before the first start: the catch-up checks the rows it
// reads against the plan of its snapshot. The webhook's policy is skip: it
// gets only the valid event, and every row is marked processed (a skip is
// settled as acknowledged). The metrics count each event under its plan
// labels, an unknown name under "other".
func TestContractCatchUpSkipAndMetrics(t *testing.T) {
	t.Parallel()
	b := newBundle(t, pgtest.Shared(t), map[string]string{"OUTBOXD_WEBHOOK_CONTRACT": "skip"})
	code, out := e2e.RunCommand(t, b.env, "plan", "apply", examplePlanFile)
	require.Equal(t, 0, code, out)
	bad := insertContractEvent(t, b.pool, false)
	good := insertContractEvent(t, b.pool, true)
	var unknown int64
	require.NoError(t, b.pool.QueryRow(context.Background(), `INSERT INTO domain_event (event_name, organization_id, entity_type, entity_id, properties)
VALUES ('made_up', 7, 'sku', 'SKU-1', '{}') RETURNING id`).Scan(&unknown))

	d := startWatched(t, b.env)
	b.waitProcessed(t, 3, time.Minute)
	b.recv.WaitAccepted(t, []int64{good}, time.Minute)
	require.Equal(t, []int64{good}, b.recv.Accepted(), "the webhook skipped %d and %d", bad, unknown)
	for series, want := range map[string]float64{
		`outboxd_contract_events_total{event_name="inventory_adjusted",result="valid",schema_version="1"}`:   1,
		`outboxd_contract_events_total{event_name="inventory_adjusted",result="invalid",schema_version="1"}`: 1,
		`outboxd_contract_events_total{event_name="other",result="invalid",schema_version="other"}`:          1,
		`outboxd_contract_settled_total{policy="skip",sink="webhook"}`:                                       2,
		`outboxd_contract_validation_seconds_count`:                                                          3,
	} {
		require.Equal(t, want, d.mustMetric(t, series), series)
	}
	require.Empty(t, contractDeadLetters(t, b.pool, "webhook"))

	// A replay sends the webhook what run sent it: its skip policy
	// withholds the two invalid events; --as-is sends them too.
	span := []string{"--from-id", strconv.FormatInt(bad, 10), "--to-id", strconv.FormatInt(unknown, 10)}
	before := len(b.recv.Deliveries())
	code, out = e2e.RunCommand(t, b.env, append([]string{"replay"}, span...)...)
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "replayed 1, failed 0, skipped 0, withheld 0 (property filter) and 2 (contract policy)")
	require.Equal(t, []int64{good}, deliveredIDs(b.recv.Deliveries()[before:]))
	before = len(b.recv.Deliveries())
	code, out = e2e.RunCommand(t, b.env, append([]string{"replay", "--as-is"}, span...)...)
	require.Equal(t, 0, code, out)
	require.Equal(t, []int64{bad, good, unknown}, deliveredIDs(b.recv.Deliveries()[before:]))

	// A subscription's own policy (subscription add --contract) decides
	// for it, in a replay as in run; update --contract changes it.
	secretFile := filepath.Join(t.TempDir(), "sub.secret")
	require.NoError(t, os.WriteFile(secretFile, []byte(e2e.Secret), 0o600))
	code, out = e2e.RunCommand(t, b.env, "subscription", "add", "--url", b.recv.URL+"/sub", "--secret-file", secretFile, "--contract", "skipp")
	require.Equal(t, 2, code, out)
	require.Contains(t, out, `--contract: unknown contract policy "skipp"`)
	code, out = e2e.RunCommand(t, b.env, "subscription", "add", "--url", b.recv.URL+"/sub", "--secret-file", secretFile, "--contract", "dead-letter")
	require.Equal(t, 0, code, out)
	m := regexp.MustCompile(`subscription (\d+) added`).FindStringSubmatch(out)
	require.NotNil(t, m, out)
	subID := m[1]
	code, out = e2e.RunCommand(t, b.env, "subscription", "list", "--json")
	require.Equal(t, 0, code, out)
	require.Contains(t, out, `"contract":"dead-letter"`)
	before = len(b.recv.Deliveries())
	code, out = e2e.RunCommand(t, b.env, append([]string{"replay", "--subscription", subID}, span...)...)
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "withheld 0 (property filter) and 2 (contract policy)")
	require.Equal(t, []int64{good}, deliveredIDs(b.recv.Deliveries()[before:]))
	code, out = e2e.RunCommand(t, b.env, "subscription", "update", subID, "--contract", "deliver")
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "contract policy: deliver")
	before = len(b.recv.Deliveries())
	code, out = e2e.RunCommand(t, b.env, append([]string{"replay", "--subscription", subID}, span...)...)
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "replayed 3, failed 0, skipped 0 in", "nothing to withhold")
	require.Equal(t, []int64{bad, good, unknown}, deliveredIDs(b.recv.Deliveries()[before:]))

	// Run too: from its commit, the subscription's policy is its own.
	code, out = e2e.RunCommand(t, b.env, "subscription", "update", subID, "--contract", "skip")
	require.Equal(t, 0, code, out)
	badAfter := insertContractEvent(t, b.pool, false)
	goodAfter := insertContractEvent(t, b.pool, true)
	b.waitProcessed(t, 5, time.Minute)
	var toSub []int64
	for _, dl := range b.recv.Deliveries() {
		if dl.Path == "/sub" && !dl.Replay {
			toSub = append(toSub, dl.IDs...)
		}
	}
	require.Equal(t, []int64{goodAfter}, toSub, "the subscription skipped %d", badAfter)
}

// deliveredIDs lists the event ids of ds in order.
func deliveredIDs(ds []e2e.Delivery) []int64 {
	var out []int64
	for _, d := range ds {
		out = append(out, d.IDs...)
	}
	return out
}
