package main

import (
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// G5: after a slot reset, rows the catch-up reads for a key that has parked
// deliveries are parked behind them and delivered after them, in commit
// order. Before, they were parked with commit_lsn 0/0 and went out first.
func TestParkedOrderHoldsAcrossSlotReset(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), map[string]string{
			"OUTBOXD_WEBHOOK_MAX_ATTEMPTS": "1",
			"OUTBOXD_RETRY_SCHEDULE":       strings.TrimSuffix(strings.Repeat("300ms,", 300), ","),
		})
		up := refuseUntilUp(b.recv, 0)
		d := e2e.StartDaemon(t, b.env)
		waitStreaming(t, d)
		first := e2e.Insert(t, b.pool, 3, 1, one)
		waitParked(t, b, len(first))
		require.Equal(t, 0, d.Stop(30*time.Second))

		// Written while outboxd is stopped, then the slot is reset: the next
		// start reads these from the table.
		second := e2e.Insert(t, b.pool, 3, 1, one)
		code, out := e2e.RunCommand(t, b.env, "slot", "reset", "--yes")
		require.Equal(t, 0, code, out)
		d = e2e.StartDaemon(t, b.env)
		waitStreaming(t, d)
		waitParked(t, b, len(first)+len(second))

		up.Store(true)
		all := append(append([]int64(nil), first...), second...)
		b.recv.WaitAccepted(t, all, time.Minute)
		require.Equal(t, all, firstReceipts(b.recv)[1], "one key: commit order across the reset")
		b.waitProcessed(t, int64(len(all)), time.Minute)
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// refuseUntilUp makes r answer 503 until the returned flag is set, then 200
// (after delay: a slow receiver, when not zero).
func refuseUntilUp(r *e2e.Receiver, delay time.Duration) *atomic.Bool {
	up := new(atomic.Bool)
	r.Respond = func(*e2e.Delivery) int {
		if !up.Load() {
			return http.StatusServiceUnavailable
		}
		if delay > 0 {
			time.Sleep(delay) //nolint:forbidigo // the receiver's behaviour, not a synchronisation
		}
		return http.StatusOK
	}
	return up
}

// waitParked waits until n deliveries are parked.
func waitParked(t *testing.T, b *bundle, n int) {
	t.Helper()
	e2e.WaitProgress(t, time.Minute, func() (bool, int64) {
		var parked int64
		require.NoError(t, b.pool.QueryRow(t.Context(), `SELECT count(*) FROM outboxd_parked`).Scan(&parked))
		return parked >= int64(n), parked
	}, func() string { return "deliveries not parked" })
}

// G2/G10: a slot advanced by someone else while outboxd was stopped, past
// rows it never delivered, is refused at start with the repair command; with
// OUTBOXD_SLOT_RECREATE=true the slot is recreated and the rows are caught up
// from the table. Before, outboxd streamed from the advanced position and the
// rows were skipped without a word.
func TestSlotAdvancedOutsideWhileStoppedIsRefused(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), nil)
		d := e2e.StartDaemon(t, b.env)
		waitStreaming(t, d)
		first := e2e.Insert(t, b.pool, 2, 2, one)
		b.recv.WaitAccepted(t, first, time.Minute)
		b.waitProcessed(t, int64(len(first)), time.Minute)
		require.Equal(t, 0, d.Stop(30*time.Second))

		skipped := e2e.Insert(t, b.pool, 3, 1, one)
		_, err := b.pool.Exec(t.Context(), `SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())`, b.env["OUTBOXD_SLOT"])
		require.NoError(t, err)

		refused := e2e.StartDaemon(t, b.env)
		require.Equal(t, 1, refused.Wait(time.Minute), "a slot advanced past unprocessed rows is refused; log:\n%s", refused.Log())
		require.Contains(t, refused.Log(), "advanced outside outboxd")
		require.Contains(t, refused.Log(), "outboxd slot reset --yes")

		env := map[string]string{}
		for k, v := range b.env {
			env[k] = v
		}
		env["OUTBOXD_SLOT_RECREATE"] = "true"
		d = e2e.StartDaemon(t, env)
		b.recv.WaitAccepted(t, skipped, time.Minute)
		b.waitProcessed(t, int64(len(first)+len(skipped)), time.Minute)
		c := b.recv.Count(append(append([]int64(nil), first...), skipped...))
		require.Zero(t, c.Duplicates, "only the skipped rows come from the table")
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// Parked deliveries of targets no running outboxd delivers to (a removed
// subscription, a sink no longer configured) never starve the live ones: the
// retrier looks only for due heads of live targets. Before, the 1,000 oldest
// due heads were fetched, the unknown ones skipped without being
// rescheduled, and with 1,000 such orphans nothing else was ever retried.
// dlq retry refuses to revive dead letters of unknown targets, and a revived
// delivery gets an ordering key of its own (minus the event id), which no
// organization key can equal.
func TestOrphanParkedDeliveriesDoNotStarveLiveOnes(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), map[string]string{
			"OUTBOXD_WEBHOOK_MAX_ATTEMPTS": "1",
			"OUTBOXD_RETRY_SCHEDULE":       strings.TrimSuffix(strings.Repeat("300ms,", 300), ","),
		})
		ctx := t.Context()
		// 1,000 orphans, due long ago: they sort first.
		_, err := b.pool.Exec(ctx, `INSERT INTO outboxd_parked (target, event_id, ordering_key, commit_lsn, commit_index, next_attempt_at, last_error)
SELECT 'subscription:999999', g, g, '0/0', 0, now() - interval '1 hour', 'gone' FROM generate_series(1000000, 1000999) g`)
		require.NoError(t, err)
		up := refuseUntilUp(b.recv, 0)
		d := e2e.StartDaemon(t, b.env)
		waitStreaming(t, d)
		ids := e2e.Insert(t, b.pool, 5, 1, one)
		waitParked(t, b, 1000+len(ids))
		up.Store(true)
		b.recv.WaitAccepted(t, ids, time.Minute)
		b.waitProcessed(t, int64(len(ids)), time.Minute)

		// A dead letter of an unknown target is not revived...
		_, err = b.pool.Exec(ctx, `INSERT INTO outboxd_dead_letter (event_id, sink, last_error, attempts) VALUES ($1, 'fakesink', 'x', 1)`, ids[0])
		require.NoError(t, err)
		code, out := e2e.RunCommand(t, b.env, "dlq", "retry", "--target", "fakesink")
		require.Equal(t, 2, code, out)
		require.Contains(t, out, "fakesink")
		var left int
		require.NoError(t, b.pool.QueryRow(ctx, `SELECT count(*) FROM outboxd_parked WHERE target = 'fakesink'`).Scan(&left))
		require.Zero(t, left)
		// ...one of the webhook is, under a key no organization key can be.
		_, err = b.pool.Exec(ctx, `DELETE FROM outboxd_dead_letter`)
		require.NoError(t, err)
		_, err = b.pool.Exec(ctx, `INSERT INTO outboxd_dead_letter (event_id, sink, last_error, attempts) VALUES ($1, 'webhook', 'x', 1)`, ids[1])
		require.NoError(t, err)
		require.Equal(t, 0, d.Stop(30*time.Second))
		code, out = e2e.RunCommand(t, b.env, "dlq", "retry", "--target", "webhook")
		require.Equal(t, 0, code, out)
		var key int64
		require.NoError(t, b.pool.QueryRow(ctx, `SELECT ordering_key FROM outboxd_parked WHERE target = 'webhook' AND event_id = $1`, ids[1]).Scan(&key))
		require.Equal(t, -ids[1], key)
	})
}

// G1: deliveries parked for a subscription are retried after a slot reset
// even when no new event is routed to it. The catch-up seeds the routing
// state (the reset cleared it) and skips parked rows; the subscription's
// target used to start only for a routed event, so the retrier never saw
// its parks. Found by the soak (41,012 parked deliveries stuck).
func TestParkedSubscriptionDeliveriesResumeAfterSlotReset(t *testing.T) {
	t.Parallel()
	b := newBundle(t, pgtest.Shared(t), map[string]string{
		"OUTBOXD_WEBHOOK_MAX_ATTEMPTS": "1",
		"OUTBOXD_RETRY_SCHEDULE":       strings.TrimSuffix(strings.Repeat("300ms,", 300), ","),
	})
	tenant := e2e.NewReceiver(t)
	up := refuseUntilUp(tenant, 0)
	addSubscription(t, b.pool, org(1), tenant.URL, nil, nil)
	d := e2e.StartDaemon(t, b.env)
	waitStreaming(t, d)
	ids := e2e.Insert(t, b.pool, 3, 2, one)
	b.recv.WaitAccepted(t, ids, time.Minute)
	waitParked(t, b, len(ids))
	require.Equal(t, 0, d.Stop(30*time.Second))

	code, out := e2e.RunCommand(t, b.env, "slot", "reset", "--yes")
	require.Equal(t, 0, code, out)
	up.Store(true)
	d = e2e.StartDaemon(t, b.env)
	waitStreaming(t, d)
	tenant.WaitAccepted(t, ids, time.Minute) // no new event: the retrier alone
	b.waitProcessed(t, int64(len(ids)), time.Minute)
	require.Equal(t, 0, d.Stop(30*time.Second))
}
