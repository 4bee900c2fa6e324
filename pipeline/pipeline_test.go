package pipeline_test

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/pipeline"
	"github.com/outboxd/outboxd/sink"
	"github.com/outboxd/outboxd/store"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// stall bounds every wait. Waits for a set of deliveries fail only when none
// arrived for that long (e2e.WaitProgress); waits for one row's state, which
// take well under a second, fail after that long.
const stall = 30 * time.Second

type bundle struct {
	db   *pgtest.Migrated
	recv *e2e.Receiver
	cfg  pipeline.Config
}

// setup gives the test its own database, slot and webhook receiver, and a
// pipeline configuration with short intervals.
func setup(t *testing.T) *bundle {
	t.Helper()
	db := pgtest.NewMigrated(t)
	recv := e2e.NewReceiver(t)
	return &bundle{db: db, recv: recv, cfg: config(db.URL, recv.URL)}
}

func config(dbURL, webhookURL string) pipeline.Config {
	return pipeline.Config{
		DatabaseURL: dbURL, Slot: e2e.SlotName(dbURL),
		Webhook: sink.WebhookConfig{URL: webhookURL, Secrets: []string{e2e.Secret}, HTTPConfig: sink.HTTPConfig{
			AllowPrivate: true, Timeout: time.Minute, RetryConfig: sink.RetryConfig{MaxAttempts: 1}}},
		Schedule: []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond,
			time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second},
		RetryInterval: 50 * time.Millisecond, FlushInterval: 20 * time.Millisecond,
		StatusInterval: 100 * time.Millisecond, ShutdownTimeout: time.Second,
	}
}

// start runs the pipeline until stop is called (or the test ends); stop
// returns Run's error.
func start(t *testing.T, cfg pipeline.Config) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- pipeline.Run(ctx, cfg, zerolog.Nop()) }()
	var err error
	stopped := false
	stop = func() error {
		if stopped {
			return err
		}
		stopped = true
		cancel()
		select {
		case err = <-done:
			return err
		case <-time.After(time.Minute):
			t.Fatal("the pipeline did not stop within a minute")
			return nil
		}
	}
	t.Cleanup(func() { _ = stop() })
	return stop
}

// insert commits one row with event_name name and returns its id.
func insert(t *testing.T, db *pgtest.Migrated, name string) int64 {
	t.Helper()
	var id int64
	require.NoError(t, db.Pool.QueryRow(context.Background(),
		`INSERT INTO domain_event (event_name, organization_id) VALUES ($1, 7) RETURNING id`, name).Scan(&id))
	return id
}

type row struct {
	processed    bool
	processedAt  bool
	attempts     int32
	parked, dead int
}

func rowOf(t *testing.T, db *pgtest.Migrated, id int64) row {
	t.Helper()
	var r row
	require.NoError(t, db.Pool.QueryRow(context.Background(), `SELECT is_processed, processed_at IS NOT NULL, delivery_attempts,
  (SELECT count(*) FROM outboxd_parked WHERE event_id = $1), (SELECT count(*) FROM outboxd_dead_letter WHERE event_id = $1)
FROM domain_event WHERE id = $1`, id).Scan(&r.processed, &r.processedAt, &r.attempts, &r.parked, &r.dead))
	return r
}

// waitRow waits until the row of id satisfies cond.
func waitRow(t *testing.T, db *pgtest.Migrated, id int64, what string, cond func(row) bool) {
	t.Helper()
	e2e.WaitFor(t, stall, func() bool { return cond(rowOf(t, db, id)) },
		func() string { return fmt.Sprintf("%s: row is %+v", what, rowOf(t, db, id)) })
}

// positions returns the stored checkpoint and the slot's confirmed position.
func positions(t *testing.T, b *bundle) (stored, confirmed pglogrepl.LSN) {
	t.Helper()
	ctx := context.Background()
	require.NoError(t, b.db.Pool.QueryRow(ctx, `SELECT lsn FROM outboxd_checkpoint WHERE slot_name = $1`, b.cfg.Slot).Scan(&stored))
	require.NoError(t, b.db.Pool.QueryRow(ctx, `SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1`, b.cfg.Slot).Scan(&confirmed))
	return stored, confirmed
}

func walPosition(t *testing.T, b *bundle) pglogrepl.LSN {
	t.Helper()
	var lsn pglogrepl.LSN
	require.NoError(t, b.db.Pool.QueryRow(context.Background(), `SELECT pg_current_wal_lsn()`).Scan(&lsn))
	return lsn
}

// Inserted events reach the receiver signed, once each, and their rows are
// marked; a stop then leaves the checkpoint and the slot past them, the slot
// never beyond the checkpoint.
func TestDeliversAndMarks(t *testing.T) {
	t.Parallel()
	b := setup(t)
	stop := start(t, b.cfg)

	ids := e2e.Insert(t, b.db.Pool, 2, 2, func(i int) int64 { return int64(i % 2) })
	before := walPosition(t, b)
	ids = append(ids, e2e.Insert(t, b.db.Pool, 1, 2, func(i int) int64 { return int64(i) })...)
	b.recv.WaitAccepted(t, ids, stall)
	for _, id := range ids {
		waitRow(t, b.db, id, "marked", func(r row) bool { return r.processed })
	}
	require.NoError(t, stop())

	c := b.recv.Count(ids)
	require.Zero(t, c.Lost+c.Duplicates+c.Unexpected+c.BadSignatures, c.String())
	for _, id := range ids {
		require.Equal(t, row{processed: true, processedAt: true, attempts: 1}, rowOf(t, b.db, id), "row %d", id)
	}
	stored, confirmed := positions(t, b)
	require.Greater(t, stored, before, "the checkpoint is not past the last delivered transaction")
	require.Greater(t, confirmed, before, "the slot was not confirmed past the last delivered transaction")
	require.LessOrEqual(t, confirmed, stored, "the slot was confirmed beyond the checkpoint")
}

// A stop while a delivery is in flight abandons it after the drain deadline
// without confirming it: its row stays unprocessed (neither parked nor dead),
// and the next run delivers it, and only it.
func TestStopConfirmsOnlyWhatWasDelivered(t *testing.T) {
	t.Parallel()
	b := setup(t)
	release := make(chan struct{})
	t.Cleanup(func() { close(release) }) // before the receiver closes
	var holding, arrived atomic.Bool
	holding.Store(true)
	b.recv.Respond = func(d *e2e.Delivery) int {
		if holding.Load() && bytes.Contains(d.Body, []byte(`"event_name":"held"`)) {
			arrived.Store(true)
			<-release
			return http.StatusServiceUnavailable
		}
		return http.StatusOK
	}
	stop := start(t, b.cfg)

	first := insert(t, b.db, "first")
	waitRow(t, b.db, first, "first marked", func(r row) bool { return r.processed })
	held := insert(t, b.db, "held")
	e2e.WaitFor(t, stall, arrived.Load, func() string { return "the held event never reached the receiver" })
	require.NoError(t, stop())

	r := rowOf(t, b.db, held)
	require.False(t, r.processed)
	require.Zero(t, r.parked+r.dead, "an abandoned delivery was settled")
	stored, confirmed := positions(t, b)
	require.LessOrEqual(t, confirmed, stored)

	// The next run delivers the held event again, and not the first one.
	holding.Store(false)
	stop = start(t, b.cfg)
	waitRow(t, b.db, held, "held marked by the next run", func(r row) bool { return r.processed })
	require.NoError(t, stop())
	require.Equal(t, 1, countAccepted(b.recv, first), "the first event was delivered again")
	require.Equal(t, 1, countAccepted(b.recv, held))
}

func countAccepted(r *e2e.Receiver, id int64) int {
	n := 0
	for _, got := range r.Accepted() {
		if got == id {
			n++
		}
	}
	return n
}

// A delivery the receiver refuses (503) is parked, its row unprocessed; the
// retrier delivers it once the receiver is back, and the row is marked with
// every attempt counted.
func TestFailingReceiverParksAndRetrierDelivers(t *testing.T) {
	t.Parallel()
	b := setup(t)
	var failing atomic.Bool
	failing.Store(true)
	b.recv.Respond = func(*e2e.Delivery) int {
		if failing.Load() {
			return http.StatusServiceUnavailable
		}
		return http.StatusOK
	}
	stop := start(t, b.cfg)

	id := insert(t, b.db, "flaky")
	waitRow(t, b.db, id, "parked", func(r row) bool { return r.parked == 1 })
	r := rowOf(t, b.db, id)
	require.False(t, r.processed)
	require.Zero(t, r.dead)
	failing.Store(false)
	waitRow(t, b.db, id, "delivered by the retrier", func(r row) bool { return r.processed })
	require.NoError(t, stop())

	r = rowOf(t, b.db, id)
	require.Zero(t, r.parked+r.dead, "the park was not resolved")
	var refused, accepted int
	for _, d := range b.recv.Deliveries() {
		if d.Status/100 == 2 {
			accepted++
		} else {
			refused++
		}
	}
	require.Equal(t, 1, accepted)
	require.Positive(t, refused)
	require.Equal(t, int32(refused+accepted), r.attempts, "attempts not all counted")
}

// observer records whether its pipeline streams from the slot.
type observer struct{ streaming, everStreamed atomic.Bool }

func (o *observer) Delivered(deliver.Result)                 {}
func (o *observer) Flushed(store.Batch, time.Duration)       {}
func (o *observer) Received(*decode.Event)                   {}
func (o *observer) Position(received, flushed pglogrepl.LSN) {}
func (o *observer) Streaming(active bool) {
	o.streaming.Store(active)
	if active {
		o.everStreamed.Store(true)
	}
}

// Of two pipelines on one slot, only the one holding the slot acts; the
// other starts nothing until the first stops, then takes the slot over with
// the parked deliveries as they are then: its retrier delivers them, and a
// later event of the same ordering key waits behind them (G5). Nothing the
// first one confirmed comes again.
func TestStandbyTakesOverWhenTheLeaderStops(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.recv.Respond = func(d *e2e.Delivery) int {
		if bytes.Contains(d.Body, []byte(`"event_name":"parked"`)) {
			return http.StatusServiceUnavailable
		}
		return http.StatusOK
	}
	recvB := e2e.NewReceiver(t)
	obsA, obsB := &observer{}, &observer{}
	cfgA, cfgB := b.cfg, config(b.db.URL, recvB.URL)
	cfgA.Observer, cfgB.Observer = obsA, obsB

	stopA := start(t, cfgA)
	e2e.WaitFor(t, stall, obsA.streaming.Load, func() string { return "the first pipeline never took the slot" })
	stopB := start(t, cfgB)
	first := insert(t, b.db, "first")
	parked := insert(t, b.db, "parked")
	waitRow(t, b.db, first, "first marked", func(r row) bool { return r.processed })
	waitRow(t, b.db, parked, "parked", func(r row) bool { return r.parked == 1 })
	require.False(t, obsB.everStreamed.Load(), "the standby streamed while the leader held the slot")
	require.Zero(t, recvB.Len(), "the standby delivered")

	require.NoError(t, stopA())
	e2e.WaitFor(t, stall, obsB.streaming.Load, func() string { return "the standby never took the slot over" })
	second := insert(t, b.db, "second")
	recvB.WaitAccepted(t, []int64{parked, second}, stall)
	waitRow(t, b.db, second, "second marked", func(r row) bool { return r.processed })
	require.NoError(t, stopB())
	require.Equal(t, []int64{parked, second}, recvB.Accepted(), "the new leader delivered out of order, or again what the old one had confirmed")
	require.Equal(t, []int64{first}, b.recv.Accepted())
	r := rowOf(t, b.db, parked)
	require.True(t, r.processed)
	require.Zero(t, r.parked+r.dead)
}

// A database without outboxd's schema is refused before anything starts.
func TestRefusesUnmigratedDatabase(t *testing.T) {
	t.Parallel()
	url := pgtest.Shared(t).NewDatabase(t)
	recv := e2e.NewReceiver(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := pipeline.Run(ctx, config(url, recv.URL), zerolog.Nop())
	require.ErrorContains(t, err, "check schema")
	require.Zero(t, recv.Len())
}

// With destinations, the webhook settings are checked only when a
// destination is the webhook (no Sink of its own).
func TestValidateDestinations(t *testing.T) {
	t.Parallel()
	base := pipeline.Config{DatabaseURL: "postgres://u@127.0.0.1:1/db"}
	other := pipeline.Config{DatabaseURL: base.DatabaseURL, Destinations: []deliver.Destination{{Name: "posthog", Sink: nopSink{}}}}
	require.NoError(t, other.WithDefaults().Validate(), "no webhook destination: no webhook URL needed")
	withWebhook := other
	withWebhook.Destinations = append([]deliver.Destination{{Name: "webhook"}}, other.Destinations...)
	require.Error(t, withWebhook.WithDefaults().Validate(), "a webhook destination needs its URL")
	withWebhook.Webhook = sink.WebhookConfig{URL: "https://hooks.example.com/x", Secrets: []string{"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}}
	require.NoError(t, withWebhook.WithDefaults().Validate())
}

type nopSink struct{}

func (nopSink) Name() string { return "nop" }
func (nopSink) Deliver(_ context.Context, evs []*decode.Event) []sink.Outcome {
	return make([]sink.Outcome, len(evs))
}
