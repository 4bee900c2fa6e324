package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"
)

// SlotConfig names the outbox table and the slot whose checkpoint is kept.
// outboxd's own tables live in the outbox table's schema.
type SlotConfig struct {
	Schema string
	Table  string
	Slot   string
}

// SlotStore reads and writes the checkpoint of one slot and what each flush
// writes with it: processed marks, attempts, dead letters and parked
// deliveries. Its writes can be fenced to the slot holder (SetFence).
type SlotStore struct {
	pool *pgxpool.Pool
	cfg  SlotConfig
	log  zerolog.Logger
	// fence, when set, returns this instance's walsender pid (SetFence).
	fence func() uint32

	markSQL, deadSQL, attemptsSQL, parkSQL, stateSQL, tokenSQL, advanceSQL, loadSQL, saveSQL string
}

// NewSlotStore returns a store over pool.
func NewSlotStore(pool *pgxpool.Pool, cfg SlotConfig) *SlotStore {
	table := Ident(cfg.Schema, cfg.Table)
	cp := Ident(cfg.Schema, CheckpointTable)
	dl := Ident(cfg.Schema, DeadLetterTable)
	return &SlotStore{
		pool: pool,
		cfg:  cfg,
		// One statement per flush marks every settled row: contiguous ids with
		// the same attempt count travel as one range, so a flush of thousands of
		// events sends a handful of ranges. Only non-indexed columns change, so
		// the update can stay HOT where the page has room.
		markSQL: `UPDATE ` + table + ` AS e SET is_processed = true,
  processed_at = coalesce(e.processed_at, now()),
  delivery_attempts = ` + AddAttempts("e", "r.n") + `
FROM unnest($1::bigint[], $2::bigint[], $3::int[]) AS r(lo, hi, n)
WHERE e.id BETWEEN r.lo AND r.hi`,
		deadSQL: `INSERT INTO ` + dl + ` AS d (event_id, sink, last_status, last_error, attempts)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::int[], $4::text[], $5::int[])
ON CONFLICT (event_id, sink) DO UPDATE SET last_status = excluded.last_status,
  last_error = excluded.last_error, attempts = d.attempts + excluded.attempts, dead_at = now()`,
		attemptsSQL: `UPDATE ` + table + ` AS e SET delivery_attempts = ` + AddAttempts("e", "r.n") + `
FROM unnest($1::bigint[], $2::int[]) AS r(id, n) WHERE e.id = r.id`,
		parkSQL: `INSERT INTO ` + Ident(cfg.Schema, ParkedTable) + ` AS p
  (target, event_id, ordering_key, commit_lsn, commit_index, attempts, next_attempt_at, last_status, last_error)
SELECT t, id, k, l, i, a, now() + r * interval '1 microsecond', st, e
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::pg_lsn[], $5::int[], $6::int[], $7::bigint[], $8::int[], $9::text[]) AS u(t, id, k, l, i, a, r, st, e)
ON CONFLICT (target, event_id) DO UPDATE SET attempts = p.attempts + excluded.attempts,
  last_status = coalesce(excluded.last_status, p.last_status),
  last_error = CASE WHEN excluded.last_error = '' THEN p.last_error ELSE excluded.last_error END`,
		stateSQL: `UPDATE ` + cp + ` SET routing = $2 WHERE slot_name = $1`,
		tokenSQL: `UPDATE ` + cp + ` SET write_token = $2 WHERE slot_name = $1`,
		advanceSQL: `UPDATE ` + cp + ` SET lsn = greatest(lsn, $2::pg_lsn),
  catchup_pending = catchup_pending AND NOT $3, updated_at = now(), confirms_recorded = true
WHERE slot_name = $1`,
		loadSQL: `SELECT lsn, system_identifier, timeline, catchup_pending, updated_at, routing, confirms_recorded FROM ` + cp + ` WHERE slot_name = $1`,
		saveSQL: `INSERT INTO ` + cp + ` (slot_name, lsn, system_identifier, timeline, catchup_pending, updated_at, confirms_recorded)
VALUES ($1, $2, $3, $4, $5, now(), true)
ON CONFLICT (slot_name) DO UPDATE SET lsn = excluded.lsn, system_identifier = excluded.system_identifier,
  timeline = excluded.timeline, catchup_pending = excluded.catchup_pending, updated_at = now(), routing = NULL,
  confirms_recorded = true`,
	}
}

// SetLogger sets the logger of the store (default: none).
func (s *SlotStore) SetLogger(log zerolog.Logger) { s.log = log }

// ErrNotLeader is returned by the writes of a fenced store when this instance
// does not hold the slot: it may not mark rows, move the checkpoint or resolve
// parked deliveries (only the slot holder acts). The write is not made.
var ErrNotLeader = errors.New("this instance does not hold the slot")

// SetFence fences every write of the store: pid returns the process id of
// this instance's walsender (0 while it has none), and a write commits only
// if that walsender is the slot's active_pid at the time, checked inside the
// write's transaction. A slot is active in one walsender at a time, so an
// instance that lost the slot (a standby took over while its connection was
// cut) cannot write over the new holder's marks and checkpoint.
func (s *SlotStore) SetFence(pid func() uint32) { s.fence = pid }

// fenced checks the fence inside tx.
func (s *SlotStore) fenced(ctx context.Context, tx pgx.Tx) error {
	if s.fence == nil {
		return nil
	}
	pid := s.fence()
	if pid == 0 {
		return fmt.Errorf("write for slot %q: %w (not streaming)", s.cfg.Slot, ErrNotLeader)
	}
	// The checkpoint row, held in KEY SHARE until the write ends, before the
	// check: a new holder's Barrier waits for every write that passed it.
	if _, err := tx.Exec(ctx, `SELECT 1 FROM `+Ident(s.cfg.Schema, CheckpointTable)+` WHERE slot_name = $1 FOR KEY SHARE`, s.cfg.Slot); err != nil {
		return fmt.Errorf("check that this instance holds slot %q: %w", s.cfg.Slot, err)
	}
	var holds bool
	if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1 AND active_pid = $2)`,
		s.cfg.Slot, int32(pid)).Scan(&holds); err != nil {
		return fmt.Errorf("check that this instance holds slot %q: %w", s.cfg.Slot, err)
	}
	if !holds {
		return fmt.Errorf("write for slot %q: %w (walsender %d is not its active process)", s.cfg.Slot, ErrNotLeader, pid)
	}
	return nil
}

// Barrier returns once every fenced write that passed its fence before the
// call has ended. A fenced write checks the slot's holder at its start and
// commits later: without the barrier, a new holder that just took the slot
// could read the parked deliveries and routing state before a former
// holder's last write, checked in time, committed, and route a key's events
// past deliveries that write parked. The new holder calls it after taking
// the slot, before it reads them; the writes lock the checkpoint row in KEY
// SHARE before their check, the barrier in UPDATE.
func (s *SlotStore) Barrier(ctx context.Context) error {
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `SELECT 1 FROM `+Ident(s.cfg.Schema, CheckpointTable)+` WHERE slot_name = $1 FOR UPDATE`, s.cfg.Slot)
		return err
	})
	if err != nil {
		return fmt.Errorf("wait for the writes of the slot's former holder: %w", err)
	}
	return nil
}

// ErrNoCheckpoint is returned by Load when the slot has no checkpoint yet.
var ErrNoCheckpoint = errors.New("no checkpoint")

// Load returns the stored checkpoint of the slot, or ErrNoCheckpoint.
func (s *SlotStore) Load(ctx context.Context) (Checkpoint, error) {
	cp := Checkpoint{Slot: s.cfg.Slot}
	err := s.pool.QueryRow(ctx, s.loadSQL, s.cfg.Slot).Scan(&cp.LSN, &cp.SystemID, &cp.Timeline, &cp.CatchupPending, &cp.UpdatedAt, &cp.Routing, &cp.ConfirmsRecorded)
	if errors.Is(err, pgx.ErrNoRows) {
		return cp, ErrNoCheckpoint
	}
	if err != nil {
		return cp, fmt.Errorf("load checkpoint of slot %q: %w", s.cfg.Slot, err)
	}
	return cp, nil
}

// SubscriptionSecrets returns the current URL and secrets of the subscriptions with
// the given ids; ids without a row are absent. The routing state names
// secrets by fingerprint only, and the router takes their values from here.
func (s *SlotStore) SubscriptionSecrets(ctx context.Context, ids []int64) (map[int64]SubscriptionSecret, error) {
	rows, err := s.pool.Query(ctx, `SELECT id, url, coalesce(secrets, '{}') FROM `+Ident(s.cfg.Schema, SubscriptionTable)+` WHERE id = ANY($1)`, ids)
	if err != nil {
		return nil, fmt.Errorf("read subscription secrets: %w", err)
	}
	defer rows.Close()
	out := map[int64]SubscriptionSecret{}
	for rows.Next() {
		var id int64
		var v SubscriptionSecret
		if err := rows.Scan(&id, &v.URL, &v.Secrets); err != nil {
			return nil, fmt.Errorf("read subscription secrets: %w", err)
		}
		out[id] = v
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read subscription secrets: %w", err)
	}
	return out, nil
}

// Save writes cp as the slot's checkpoint, replacing any earlier one. It is
// used when a slot is created; flushes only move the LSN forward.
func (s *SlotStore) Save(ctx context.Context, cp Checkpoint) error {
	_, err := s.pool.Exec(ctx, s.saveSQL, s.cfg.Slot, cp.LSN, cp.SystemID, cp.Timeline, cp.CatchupPending)
	if err != nil {
		return fmt.Errorf("save checkpoint of slot %q: %w", s.cfg.Slot, err)
	}
	return nil
}

// SetTimeline records the server's timeline in the slot's checkpoint after a
// promotion (same cluster, a later timeline). It changes nothing when the
// checkpoint is of another cluster.
func (s *SlotStore) SetTimeline(ctx context.Context, systemID string, timeline int32) error {
	_, err := s.pool.Exec(ctx, `UPDATE `+Ident(s.cfg.Schema, CheckpointTable)+` SET timeline = $3, updated_at = now()
WHERE slot_name = $1 AND system_identifier = $2`, s.cfg.Slot, systemID, timeline)
	if err != nil {
		return fmt.Errorf("record timeline %d in the checkpoint of slot %q: %w", timeline, s.cfg.Slot, err)
	}
	return nil
}

// Write records a batch in one transaction: processed marks, dead letters and,
// when the batch moves it, the checkpoint LSN. Nothing is visible unless all is.
// A commit whose answer was lost is an *InDoubtError: the batch may be
// written already (its attempts counted), so it is written again only once
// Committed says it was not.
func (s *SlotStore) Write(ctx context.Context, b Batch) error {
	if b.Empty() {
		return nil
	}
	what := fmt.Sprintf("write checkpoint of slot %q", s.cfg.Slot)
	tx, err := s.beginFenced(ctx, what)
	if err != nil {
		return err
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // no-op after commit

	var q pgx.Batch
	var lo, hi []int64
	var n []int32
	var want, marked int64
	if len(b.Marks) > 0 {
		lo, hi, n = Ranges(b.Marks)
		for i := range lo {
			want += hi[i] - lo[i] + 1
		}
		q.Queue(s.markSQL, lo, hi, n).Exec(func(ct pgconn.CommandTag) error {
			marked = ct.RowsAffected()
			return nil
		})
	}
	if len(b.Dead) > 0 {
		ids := make([]int64, len(b.Dead))
		sinks := make([]string, len(b.Dead))
		status := make([]int32, len(b.Dead))
		reasons := make([]string, len(b.Dead))
		attempts := make([]int32, len(b.Dead))
		for i, d := range b.Dead {
			ids[i], sinks[i], status[i], reasons[i], attempts[i] = d.EventID, d.Sink, int32(d.Status), d.Reason, d.Attempts
		}
		q.Queue(s.deadSQL, ids, sinks, status, reasons, attempts)
	}
	if len(b.Attempts) > 0 {
		ids := make([]int64, len(b.Attempts))
		n := make([]int32, len(b.Attempts))
		for i, m := range b.Attempts {
			ids[i], n[i] = m.ID, m.Attempts
		}
		q.Queue(s.attemptsSQL, ids, n)
	}
	if len(b.Parked) > 0 {
		q.Queue(s.parkSQL, parkColumns(b.Parked)...)
	}
	if b.State != nil {
		q.Queue(s.stateSQL, s.cfg.Slot, b.State)
	}
	// The token tells, after a restart that took the transaction's id with
	// it, whether a write whose COMMIT got no answer is in the database.
	token := newToken()
	q.Queue(s.tokenSQL, s.cfg.Slot, token)
	var advanced pgconn.CommandTag
	if b.LSN != 0 || b.CatchupDone {
		q.Queue(s.advanceSQL, s.cfg.Slot, b.LSN, b.CatchupDone).Exec(func(ct pgconn.CommandTag) error {
			advanced = ct
			return nil
		})
	}
	if err := tx.SendBatch(ctx, &q).Close(); err != nil {
		return fmt.Errorf("write checkpoint batch of slot %q: %w", s.cfg.Slot, err)
	}
	if (b.LSN != 0 || b.CatchupDone) && advanced.RowsAffected() != 1 {
		return fmt.Errorf("write checkpoint of slot %q: %w", s.cfg.Slot, ErrNoCheckpoint)
	}
	if marked < want {
		if err := s.markLate(ctx, tx, lo, hi, n, want, marked); err != nil {
			return err
		}
	}
	return tx.commit(ctx, func(ctx context.Context, q Querier) (bool, error) {
		var written bool
		err := q.QueryRow(ctx, `SELECT coalesce(bool_or(write_token = $2), false) FROM `+Ident(s.cfg.Schema, CheckpointTable)+` WHERE slot_name = $1`,
			s.cfg.Slot, token).Scan(&written)
		return written, err
	})
}

// markLate marks rows the marking statement did not see. The walsender can
// send a transaction as soon as its commit record is written, a moment before
// the commit is visible to new snapshots; a flush in that moment finds fewer
// rows than it settled. Each statement of this READ COMMITTED transaction takes
// a new snapshot, so it retries the rows still unmarked until they show up.
// A row that never does (deleted by the application) is given up after a few
// seconds, with a log line.
func (s *SlotStore) markLate(ctx context.Context, tx pgx.Tx, lo, hi []int64, n []int32, want, marked int64) error {
	deadline := time.Now().Add(5 * time.Second)
	wait := time.Millisecond
	for marked < want && time.Now().Before(deadline) {
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("mark rows of slot %q: %w", s.cfg.Slot, ctx.Err())
		case <-t.C:
		}
		wait = min(wait*2, 50*time.Millisecond)
		tag, err := tx.Exec(ctx, s.markSQL+` AND `+NotProcessed("e"), lo, hi, n)
		if err != nil {
			return fmt.Errorf("mark rows of slot %q: %w", s.cfg.Slot, err)
		}
		marked += tag.RowsAffected()
	}
	if marked < want {
		s.log.Warn().Int64("settled", want).Int64("marked", marked).
			Msg("some settled rows were not found to mark processed (deleted by the application?)")
	}
	return nil
}

// parkColumns turns parked deliveries into the parallel arrays of parkSQL.
func parkColumns(ps []Park) []any {
	var (
		targets  = make([]string, len(ps))
		ids      = make([]int64, len(ps))
		keys     = make([]int64, len(ps))
		lsns     = make([]string, len(ps))
		idx      = make([]int32, len(ps))
		attempts = make([]int32, len(ps))
		retryIn  = make([]int64, len(ps)) // microseconds
		status   = make([]*int32, len(ps))
		reasons  = make([]string, len(ps))
	)
	for i, p := range ps {
		targets[i], ids[i], keys[i], lsns[i], idx[i] = p.Target, p.EventID, p.Key, p.CommitLSN.String(), p.Index
		attempts[i], retryIn[i], reasons[i] = p.Attempts, p.RetryIn.Microseconds(), p.Reason
		if p.Status != 0 {
			st := int32(p.Status)
			status[i] = &st
		}
	}
	return []any{targets, ids, keys, lsns, idx, attempts, retryIn, status, reasons}
}
