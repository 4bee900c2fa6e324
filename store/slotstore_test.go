package store_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/store"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// A fenced store writes nothing unless this instance's walsender holds the
// slot: an instance that lost the slot (or never had it) cannot mark rows or
// move the checkpoint under the new holder (G9).
func TestFencedStoreWritesOnlyForTheSlotHolder(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := pgtest.NewMigrated(t)
	conn := db.Conn
	const slot = "fence_test"
	_, err := conn.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, slot)
	require.NoError(t, err)
	t.Cleanup(func() { _, _ = conn.Exec(context.Background(), `SELECT pg_drop_replication_slot($1)`, slot) })
	var id int64
	require.NoError(t, conn.QueryRow(ctx, `INSERT INTO domain_event (event_name) VALUES ('x') RETURNING id`).Scan(&id))

	ss := store.NewSlotStore(db.Pool, store.SlotConfig{Schema: "public", Table: "domain_event", Slot: slot})
	batch := store.Batch{Marks: []store.Range{{Lo: id, Hi: id, Attempts: 1}}}
	for _, pid := range []uint32{0, 4242} { // no walsender; a walsender that is not the slot's
		ss.SetFence(func() uint32 { return pid })
		err := ss.Write(ctx, batch)
		require.True(t, errors.Is(err, store.ErrNotLeader), "pid %d: %v", pid, err)
		err = ss.Resolve(ctx, store.Resolution{Kind: store.Delivered, Target: "webhook", EventID: id, Attempts: 1})
		require.True(t, errors.Is(err, store.ErrNotLeader), "parked-delivery writes are fenced too: %v", err)
	}
	var processed bool
	require.NoError(t, conn.QueryRow(ctx, `SELECT is_processed FROM domain_event WHERE id = $1`, id).Scan(&processed))
	require.False(t, processed, "a refused write marks nothing")
}

// parkedEvent makes a database with one event parked for each of targets and
// returns the store, a connection of the test's own and the event's id.
func parkedEvent(t *testing.T, targets ...string) (*store.SlotStore, *pgx.Conn, int64) {
	t.Helper()
	ctx := context.Background()
	db := pgtest.NewMigrated(t)
	conn := db.Conn
	var id int64
	require.NoError(t, conn.QueryRow(ctx, `INSERT INTO domain_event (event_name) VALUES ('batch_started') RETURNING id`).Scan(&id))
	ss := store.NewSlotStore(db.Pool, store.SlotConfig{Schema: "public", Table: "domain_event", Slot: "parked_test"})
	var b store.Batch
	for _, target := range targets {
		b.Parked = append(b.Parked, store.Park{EventID: id, Target: target, Key: 1, Attempts: 1})
	}
	b.Attempts = []store.Mark{{ID: id, Attempts: int32(len(targets))}}
	require.NoError(t, ss.Write(ctx, b))
	return ss, conn, id
}

// resolveTogether runs each resolution at once while conn holds the event's
// row, releases it once every resolution waits for it, and returns their
// errors. That is how the retrier's workers meet when two targets' parked
// deliveries of one event are due together.
func resolveTogether(t *testing.T, conn *pgx.Conn, id int64, resolve ...func() error) {
	t.Helper()
	ctx := context.Background()
	tx, err := conn.Begin(ctx)
	require.NoError(t, err)
	_, err = tx.Exec(ctx, `SELECT 1 FROM domain_event WHERE id = $1 FOR UPDATE`, id)
	require.NoError(t, err)
	errs := make(chan error, len(resolve))
	for _, r := range resolve {
		go func() { errs <- r() }()
	}
	e2e.WaitFor(t, time.Minute, func() bool {
		var waiting int
		require.NoError(t, pgx.BeginFunc(ctx, tx, func(sub pgx.Tx) error {
			// Activity is read once per transaction unless cleared.
			if _, err := sub.Exec(ctx, `SELECT pg_stat_clear_snapshot()`); err != nil {
				return err
			}
			return sub.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`).Scan(&waiting)
		}))
		return waiting >= len(resolve)
	}, func() string { return "the resolutions never waited for the row" })
	require.NoError(t, tx.Commit(ctx))
	for range resolve {
		require.NoError(t, <-errs)
	}
}

// Two targets' parked deliveries of one event delivered at the same moment:
// the second to finish must see that nothing is parked any more and mark the
// row processed. Each used to check with a snapshot in which the other's
// parked row was still there, and the row stayed unprocessed for good.
func TestParkedDeliveriesResolvedTogetherMarkTheRow(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	ss, conn, id := parkedEvent(t, "webhook", "subscription:1")
	resolveTogether(t, conn, id,
		func() error {
			return ss.Resolve(ctx, store.Resolution{Kind: store.Delivered, Target: "webhook", EventID: id, Attempts: 1})
		},
		func() error {
			return ss.Resolve(ctx, store.Resolution{Kind: store.Delivered, Target: "subscription:1", EventID: id, Attempts: 1})
		})
	var processed *bool
	var attempts *int32
	var at *time.Time
	require.NoError(t, conn.QueryRow(ctx, `SELECT is_processed, processed_at, delivery_attempts FROM domain_event WHERE id = $1`, id).Scan(&processed, &at, &attempts))
	require.NotNil(t, processed)
	require.True(t, *processed, "both parked deliveries were delivered: the row is processed")
	require.NotNil(t, at)
	require.Equal(t, int32(4), *attempts, "two parked attempts and two retries")
}

// A parked delivery delivered while another target's is dead-lettered at the
// same moment: the row must not be marked processed, since one target never
// acknowledged it.
func TestParkedDeliveryDeliveredWhileAnotherIsDeadLetteredStaysUnprocessed(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	ss, conn, id := parkedEvent(t, "webhook", "subscription:1")
	resolveTogether(t, conn, id,
		func() error {
			return ss.Resolve(ctx, store.Resolution{Kind: store.GiveUp, Target: "subscription:1", EventID: id, Attempts: 1, Status: 410, Reason: "gone"})
		},
		func() error {
			return ss.Resolve(ctx, store.Resolution{Kind: store.Delivered, Target: "webhook", EventID: id, Attempts: 1})
		})
	var processed *bool
	var dead int
	require.NoError(t, conn.QueryRow(ctx, `SELECT is_processed, (SELECT count(*) FROM outboxd_dead_letter WHERE event_id = $1) FROM domain_event WHERE id = $1`, id).Scan(&processed, &dead))
	require.Equal(t, 1, dead)
	require.False(t, processed != nil && *processed, "a dead-lettered event is not processed")
}
