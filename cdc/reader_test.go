package cdc_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/cdc"
	"github.com/outboxd/outboxd/checkpoint"
	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/store"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// flakyStore is the real checkpoint store whose Load fails, as a cut
// connection does, while failing is set.
type flakyStore struct {
	*store.SlotStore
	mu      sync.Mutex
	failing bool
	failed  int
}

func (s *flakyStore) Load(ctx context.Context) (store.Checkpoint, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.failing {
		s.failed++
		return store.Checkpoint{}, fmt.Errorf("load checkpoint: %w", &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET})
	}
	return s.SlotStore.Load(ctx)
}

func (s *flakyStore) set(failing bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failing = failing
}

func (s *flakyStore) failures() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.failed
}

// A forced slot reset (slot and checkpoint removed, walsender terminated)
// whose checkpoint cannot be read at the reconnect, because that connection
// broke too, is retried until it can be told: the instance then starts over
// (ErrReset). It used to take the failed read for "the checkpoint is there"
// and stop for good with "slot disappeared while streaming".
func TestReconnectRetriesUnreadableCheckpointOfMissingSlot(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	db := pgtest.NewMigrated(t)
	url, conn, pool := db.URL, db.Conn, db.Pool

	slot := e2e.SlotName(url)
	t.Cleanup(func() {
		_, _ = conn.Exec(context.Background(), `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active`, slot)
	})
	table := decode.Table{Schema: "public", Name: "domain_event"}
	cps := &flakyStore{SlotStore: store.NewSlotStore(pool, store.SlotConfig{Schema: "public", Table: "domain_event", Slot: slot})}
	cfg := cdc.Config{ConnString: url, Slot: slot, Publication: "outboxd", Table: table,
		ReconnectMin: 10 * time.Millisecond, ReconnectMax: 50 * time.Millisecond}
	cfg = cfg.WithDefaults()
	require.NoError(t, cfg.Validate())
	reader := cdc.NewReader(cfg, checkpoint.NewTracker(0, 100), cps, zerolog.Nop())
	out := make(chan *decode.Event, 64)
	inserts := make(chan *decode.Event, 64)
	done := make(chan error, 1)
	go func() { done <- reader.Run(ctx, out, nil) }()
	go func() {
		for e := range out {
			if e.Change == nil && e.Name == "batch_started" {
				inserts <- e
			}
		}
	}()

	// Streaming: an insert after the first start's catch-up arrives.
	_, err := conn.Exec(ctx, `INSERT INTO domain_event (event_name) VALUES ('batch_started')`)
	require.NoError(t, err)
	select {
	case <-inserts:
	case err := <-done:
		t.Fatalf("reader stopped before streaming: %v", err)
	case <-ctx.Done():
		t.Fatal("no insert streamed")
	}

	// The forced reset, under the slot lock so that the reader reconnects
	// only once slot and checkpoint are both gone; its checkpoint read then
	// breaks.
	cps.set(true)
	lock, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	t.Cleanup(func() { _ = lock.Close(context.Background()) })
	_, err = lock.Exec(ctx, `SELECT pg_advisory_lock(hashtext($1))`, cdc.SlotLockKey(slot))
	require.NoError(t, err)
	_, err = lock.Exec(ctx, `SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active`, slot)
	require.NoError(t, err)
	e2e.WaitFor(t, time.Minute, func() bool {
		var active bool
		return lock.QueryRow(ctx, `SELECT active FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&active) == nil && !active
	}, func() string { return "the terminated walsender still holds the slot" })
	_, err = lock.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, slot)
	require.NoError(t, err)
	_, err = lock.Exec(ctx, `DELETE FROM outboxd_checkpoint WHERE slot_name = $1`, slot)
	require.NoError(t, err)
	_, err = lock.Exec(ctx, `SELECT pg_advisory_unlock(hashtext($1))`, cdc.SlotLockKey(slot))
	require.NoError(t, err)

	// The reader keeps retrying while the read fails...
	e2e.WaitFor(t, time.Minute, func() bool {
		select {
		case err := <-done:
			done <- err
			return true
		default:
			return cps.failures() >= 3
		}
	}, func() string { return "the reader never read the checkpoint after the reset" })
	select {
	case err := <-done:
		t.Fatalf("the reader stopped on an unreadable checkpoint: %v", err)
	default:
	}
	// ...and starts over once it can tell the checkpoint is gone too.
	cps.set(false)
	select {
	case err := <-done:
		require.True(t, errors.Is(err, cdc.ErrReset), "want ErrReset, got %v", err)
	case <-ctx.Done():
		t.Fatal("the reader did not stop after the reset")
	}
}

// A stop (SIGTERM) that lands while the instance takes the slot: the take
// fails, nothing was handed downstream, and Run returns at once instead of
// waiting for a drain that never comes. It used to keep the stream open
// waiting for it, for up to five minutes (soak seed 14: "did not stop
// within 1m30s after SIGTERM").
func TestStopWhileTakingTheSlotDoesNotWaitForADrain(t *testing.T) {
	t.Parallel()
	db := pgtest.NewMigrated(t)
	slot := e2e.SlotName(db.URL)
	t.Cleanup(func() {
		_, _ = db.Conn.Exec(context.Background(), `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active`, slot)
	})
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	cfg := cdc.Config{ConnString: db.URL, Slot: slot, Publication: "outboxd",
		Table: decode.Table{Schema: "public", Name: "domain_event"},
		OnTake: func(takeCtx context.Context) error {
			stop() // the signal arrives while the slot is being taken
			<-takeCtx.Done()
			return takeCtx.Err()
		}}
	cfg = cfg.WithDefaults()
	require.NoError(t, cfg.Validate())
	cps := store.NewSlotStore(db.Pool, store.SlotConfig{Schema: "public", Table: "domain_event", Slot: slot})
	reader := cdc.NewReader(cfg, checkpoint.NewTracker(0, 100), cps, zerolog.Nop())
	out := make(chan *decode.Event, 64)
	go func() {
		for range out {
		}
	}()
	done := make(chan error, 1)
	never := make(chan struct{}) // no component started: nothing drains
	go func() { done <- reader.Run(ctx, out, never) }()
	select {
	case err := <-done:
		require.NoError(t, err, "a stop is no error")
	case <-time.After(time.Minute):
		t.Fatal("Run still waits for a drain after a stop during the take")
	}
}
