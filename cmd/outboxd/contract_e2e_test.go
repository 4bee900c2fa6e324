package main

import (
	"context"
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
}
