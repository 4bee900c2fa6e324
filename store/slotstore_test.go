package store_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
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

// The retrier records a page of a key's run in one call: each resolution
// must have the effect it has alone (delivered rows processed, a failed one
// rescheduled, a refused one dead-lettered), and two targets' runs over the
// same events, recorded at the same moment, must both commit (the rows are
// locked in one order) and leave every row that nothing holds back
// processed.
func TestResolutionsRecordedTogether(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := pgtest.NewMigrated(t)
	conn := db.Conn
	ss := store.NewSlotStore(db.Pool, store.SlotConfig{Schema: "public", Table: "domain_event", Slot: "parked_test"})
	var ids []int64
	rows, err := conn.Query(ctx, `INSERT INTO domain_event (event_name) SELECT 'batch_started' FROM generate_series(1, 6) RETURNING id`)
	require.NoError(t, err)
	ids, err = pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(t, err)
	var b store.Batch
	for _, target := range []string{"webhook", "subscription:1"} {
		for _, id := range ids {
			b.Parked = append(b.Parked, store.Park{EventID: id, Target: target, Key: 1, Attempts: 1})
		}
	}
	require.NoError(t, ss.Write(ctx, b))

	// Both targets deliver events 0-3, in opposite orders of ids; the
	// webhook's event 4 fails again and subscription:1 gives event 5 up.
	run := func(target string, order []int) []store.Resolution {
		var rs []store.Resolution
		for _, i := range order {
			rs = append(rs, store.Resolution{Kind: store.Delivered, Target: target, EventID: ids[i], Attempts: 1})
		}
		return rs
	}
	webhook := append(run("webhook", []int{0, 1, 2, 3}),
		store.Resolution{Kind: store.RetryLater, Target: "webhook", EventID: ids[4], Attempts: 1, RetryIn: time.Hour, Status: 503, Reason: "503"})
	sub := append(run("subscription:1", []int{3, 2, 1, 0}),
		store.Resolution{Kind: store.GiveUp, Target: "subscription:1", EventID: ids[5], Attempts: 1, Status: 400, Reason: "refused"})
	resolveTogether(t, conn, ids[0],
		func() error { return ss.Resolve(ctx, webhook...) },
		func() error { return ss.Resolve(ctx, sub...) })

	type state struct {
		processed bool
		parked    int
		dead      int
	}
	got := map[int64]state{}
	rows, err = conn.Query(ctx, `SELECT id, coalesce(is_processed, false),
  (SELECT count(*) FROM outboxd_parked p WHERE p.event_id = e.id), (SELECT count(*) FROM outboxd_dead_letter d WHERE d.event_id = e.id)
FROM domain_event e`)
	require.NoError(t, err)
	for rows.Next() {
		var id int64
		var s state
		require.NoError(t, rows.Scan(&id, &s.processed, &s.parked, &s.dead))
		got[id] = s
	}
	require.NoError(t, rows.Err())
	for i := 0; i < 4; i++ {
		require.Equal(t, state{processed: true}, got[ids[i]], "event %d: delivered at both targets", i)
	}
	require.Equal(t, state{parked: 2}, got[ids[4]], "event 4: rescheduled at the webhook, untouched at subscription:1")
	require.Equal(t, state{parked: 1, dead: 1}, got[ids[5]], "event 5: dead at subscription:1, still parked at the webhook")
	var next time.Duration
	require.NoError(t, conn.QueryRow(ctx, `SELECT extract(epoch FROM next_attempt_at - now())::float8 * 1e9 FROM outboxd_parked WHERE target = 'webhook' AND event_id = $1`, ids[4]).Scan(&next))
	require.Greater(t, next, 50*time.Minute, "the retry is an hour away")
}

// A former holder's write that passed its fence before the slot was taken
// over commits after it: the new holder's Barrier waits for it, so the
// parked deliveries it then reads include that write's. Before, a new
// holder read the parked counts at once, missed the former holder's last
// parks and routed the key's next events past them (first receipts out of
// commit order: SOAK-10).
func TestBarrierWaitsForTheFormerHoldersWrite(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := pgtest.NewMigrated(t)
	const slot = "barrier_test"
	_, err := db.Conn.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, slot)
	require.NoError(t, err)
	t.Cleanup(func() {
		_, _ = db.Conn.Exec(context.Background(), `SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL`, slot)
		_, _ = db.Conn.Exec(context.Background(), `SELECT pg_drop_replication_slot($1)`, slot)
	})
	cfg := store.SlotConfig{Schema: "public", Table: "domain_event", Slot: slot}
	require.NoError(t, store.NewSlotStore(db.Pool, cfg).Save(ctx, store.Checkpoint{LSN: 1}))
	var id int64
	require.NoError(t, db.Conn.QueryRow(ctx, `INSERT INTO domain_event (event_name, organization_id) VALUES ('batch_started', 5) RETURNING id`).Scan(&id))

	hold := func() uint32 {
		pc, err := pgconn.ParseConfig(db.URL)
		require.NoError(t, err)
		pc.RuntimeParams["replication"] = "database"
		conn, err := pgconn.ConnectConfig(ctx, pc)
		require.NoError(t, err)
		t.Cleanup(func() { conn.Close(context.Background()) }) //nolint:errcheck // may be terminated already
		require.NoError(t, pglogrepl.StartReplication(ctx, conn, slot, 0, pglogrepl.StartReplicationOptions{
			PluginArgs: []string{"proto_version '1'", "publication_names 'outboxd'"}}))
		e2e.WaitFor(t, time.Minute, func() bool {
			var active bool
			require.NoError(t, db.Conn.QueryRow(ctx, `SELECT active_pid IS NOT DISTINCT FROM $2 FROM pg_replication_slots WHERE slot_name = $1`, slot, int32(conn.PID())).Scan(&active))
			return active
		}, func() string { return "slot not taken" })
		return conn.PID()
	}

	// The former holder's write passes its fence; its COMMIT is held.
	former := hold()
	cutter := pgtest.NewCommitCutter(t, db.URL)
	old := store.NewSlotStore(cutter.Pool(t, db.URL), cfg)
	old.SetFence(func() uint32 { return former })
	fired := cutter.Arm(pgtest.CommitHeld)
	written := make(chan error, 1)
	go func() {
		written <- old.Write(ctx, store.Batch{Parked: []store.Park{{EventID: id, Target: "webhook", Key: 5, Attempts: 1, Reason: "503"}}})
	}()
	<-fired

	// Taken over: the former holder is terminated (asynchronously: the
	// slot is free once its backend has exited).
	_, err = db.Conn.Exec(ctx, `SELECT pg_terminate_backend($1)`, int32(former))
	require.NoError(t, err)
	e2e.WaitFor(t, time.Minute, func() bool {
		var free bool
		require.NoError(t, db.Conn.QueryRow(ctx, `SELECT active_pid IS NULL FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&free))
		return free
	}, func() string { return "the former holder still holds the slot" })
	holder := hold()
	current := store.NewSlotStore(db.Pool, cfg)
	current.SetFence(func() uint32 { return holder })
	parked, err := current.ParkedCounts(ctx)
	require.NoError(t, err)
	require.Empty(t, parked, "the former holder's park is not committed yet")

	barrier := make(chan error, 1)
	go func() { barrier <- current.Barrier(ctx) }()
	e2e.WaitFor(t, time.Minute, func() bool {
		var waiting int
		require.NoError(t, pgx.BeginFunc(ctx, db.Conn, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `SELECT pg_stat_clear_snapshot()`); err != nil {
				return err
			}
			return tx.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`).Scan(&waiting)
		}))
		return waiting > 0
	}, func() string { return "the barrier did not wait for the former holder's write" })
	select {
	case err := <-barrier:
		t.Fatalf("the barrier returned (%v) while the former holder's write was still open", err)
	default:
	}
	cutter.Release()
	require.NoError(t, <-written, "the former holder passed its fence before the takeover")
	require.NoError(t, <-barrier)
	parked, err = current.ParkedCounts(ctx)
	require.NoError(t, err)
	require.Equal(t, map[string]map[uint64]int{"webhook": {5: 1}}, parked)

	// A write of the former holder after the barrier is refused.
	err = old.Write(ctx, store.Batch{Attempts: []store.Mark{{ID: id, Attempts: 1}}})
	require.ErrorIs(t, err, store.ErrNotLeader)
}
