package main

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// checkpointLSN returns the stored checkpoint of the bundle's slot (0/0 when
// there is none yet).
func (b *bundle) checkpointLSN(t *testing.T) pglogrepl.LSN {
	t.Helper()
	var lsn pglogrepl.LSN
	err := b.pool.QueryRow(context.Background(), `SELECT coalesce(max(lsn), '0/0') FROM outboxd_checkpoint WHERE slot_name = $1`,
		b.env["OUTBOXD_SLOT"]).Scan(&lsn)
	require.NoError(t, err)
	return lsn
}

// G9: of two instances, only the slot holder retries parked deliveries.
// Before, the standby ran the retrier too, and parked events went out twice,
// out of order.
func TestStandbyNeverRetriesParkedDeliveries(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), map[string]string{
			"OUTBOXD_WEBHOOK_MAX_ATTEMPTS": "1",
			"OUTBOXD_RETRY_SCHEDULE":       strings.TrimSuffix(strings.Repeat("300ms,", 200), ","),
		})
		// A slow receiver once up: a retry round over the 30 parked events
		// lasts well beyond a retrier tick, so two instances retrying would
		// overlap.
		up := refuseUntilUp(b.recv, 50*time.Millisecond)
		leader := e2e.StartDaemon(t, b.env)
		waitStreaming(t, leader)
		standby := e2e.StartDaemon(t, b.env)
		e2e.WaitFor(t, time.Minute, func() bool { return strings.Contains(standby.Log(), "waiting for the slot") },
			func() string { return "the second instance does not wait for the slot" })

		ids := e2e.Insert(t, b.pool, 30, 1, one)
		var parked int
		e2e.WaitFor(t, time.Minute, func() bool {
			require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT count(*) FROM outboxd_parked`).Scan(&parked))
			return parked == len(ids)
		}, func() string { return fmt.Sprintf("%d of %d parked", parked, len(ids)) })
		up.Store(true)
		b.recv.WaitAccepted(t, ids, time.Minute)
		b.waitProcessed(t, int64(len(ids)), time.Minute)
		c := b.recv.Count(ids)
		t.Logf("parked events with a standby beside the leader: %s", c)
		require.Zero(t, c.Duplicates, "each parked event is retried by the slot holder only")
		require.Equal(t, ids, firstReceipts(b.recv)[1], "parked events arrive in commit order")
		require.NotContains(t, standby.Log(), "webhook attempt", "the standby sends nothing")
		require.Equal(t, 0, leader.Stop(30*time.Second))
		require.Equal(t, 0, standby.Stop(30*time.Second))
	})
}

// G9: a standby that takes over routes with the subscriptions as of the
// moment it takes the slot, not those it could have read when its process
// started: one added while it waited receives, one disabled meanwhile does not.
func TestStandbyTakesOverWithCurrentSubscriptions(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), nil)
		ctx := context.Background()
		gone := e2e.NewReceiver(t)
		disabledID := addSubscription(t, b.pool, org(5), gone.URL, nil, nil)

		leader := e2e.StartDaemon(t, b.env)
		waitStreaming(t, leader)
		standby := e2e.StartDaemon(t, b.env)
		e2e.WaitFor(t, time.Minute, func() bool { return strings.Contains(standby.Log(), "waiting for the slot") },
			func() string { return "the second instance does not wait for the slot" })

		// While the standby waits: one subscription added, one disabled.
		added := e2e.NewReceiver(t)
		addSubscription(t, b.pool, org(5), added.URL, nil, nil)
		_, err := b.pool.Exec(ctx, `UPDATE outboxd_subscription SET enabled = false WHERE id = $1`, disabledID)
		require.NoError(t, err)
		changed := b.currentLSN(t) // past the subscription changes
		before := e2e.Insert(t, b.pool, 1, 1, func(int) int64 { return 5 })
		added.WaitAccepted(t, before, time.Minute)
		b.recv.WaitAccepted(t, before, time.Minute)
		b.waitProcessed(t, 1, time.Minute)
		// The leader's checkpoint passes the event's transaction, so those
		// changes too: the standby starts streaming after them and never
		// sees them in the stream.
		e2e.WaitFor(t, time.Minute, func() bool { return b.checkpointLSN(t) > changed },
			func() string { return fmt.Sprintf("checkpoint %s <= %s", b.checkpointLSN(t), changed) })

		leader.Kill()
		waitStreamingAgain(t, standby)
		after := e2e.Insert(t, b.pool, 3, 1, func(int) int64 { return 5 })
		b.recv.WaitAccepted(t, after, time.Minute)
		added.WaitAccepted(t, after, time.Minute)
		b.waitProcessed(t, int64(len(before)+len(after)), time.Minute)
		require.Zero(t, gone.Count(nil).Unexpected, "the disabled subscription received nothing")
		require.Equal(t, 0, standby.Stop(30*time.Second))
	})
}

// waitStreamingAgain waits until a standby has taken the slot.
func waitStreamingAgain(t *testing.T, d *e2e.Daemon) {
	t.Helper()
	e2e.WaitFor(t, time.Minute, func() bool { return strings.Contains(d.Log(), `"message":"streaming"`) },
		func() string { return "the standby did not take over" })
}

// A forced slot reset under a running instance (the reset leaves neither
// slot nor checkpoint, so that the instance cannot stream from a new slot
// without a catch-up) makes that instance start over as on a first start:
// it creates the slot, catches up from the table and streams, without a
// restart. It used to exit 1 asking for another `slot reset`.
func TestForcedSlotResetUnderARunningInstanceStartsOver(t *testing.T) {
	t.Parallel()
	b := newBundle(t, pgtest.Shared(t), nil)
	d := e2e.StartDaemon(t, b.env)
	waitStreaming(t, d)
	before := e2e.Insert(t, b.pool, 2, 5, func(i int) int64 { return int64(i % 3) })
	b.recv.WaitAccepted(t, before, time.Minute)

	code, out := e2e.RunCommand(t, b.env, "slot", "reset", "--yes", "--force")
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "terminated process")
	e2e.WaitFor(t, time.Minute, func() bool {
		return strings.Count(d.Log(), `"message":"streaming"`) >= 2
	}, func() string { return "the instance did not start over; log:\n" + d.Log() })
	require.Contains(t, d.Log(), "slot reset by an operator; starting over with a catch-up from the table")
	require.False(t, d.Exited(), "no exit")

	after := e2e.Insert(t, b.pool, 2, 5, func(i int) int64 { return int64(i % 3) })
	b.recv.WaitAccepted(t, append(append([]int64(nil), before...), after...), time.Minute)
	b.waitProcessed(t, int64(len(before)+len(after)), time.Minute)
	require.Equal(t, 0, d.Stop(30*time.Second), d.Log())
}
