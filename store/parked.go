package store

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outboxd/outboxd/decode"
)

// ParkedHead is an ordering key of a target whose first parked delivery is due.
type ParkedHead struct {
	Target string
	Key    int64
}

// ParkedRow is a parked delivery with its event's row in text format (nil
// Values when the row no longer exists).
type ParkedRow struct {
	EventID  int64
	Attempts int32
	Rounds   int32
	Relation *decode.Relation
	Values   [][]byte
}

func (s *SlotStore) parked() string { return Ident(s.cfg.Schema, ParkedTable) }
func (s *SlotStore) table() string  { return Ident(s.cfg.Schema, s.cfg.Table) }
func (s *SlotStore) dead() string   { return Ident(s.cfg.Schema, DeadLetterTable) }

// ParkedCounts returns the parked deliveries per target and ordering key.
func (s *SlotStore) ParkedCounts(ctx context.Context) (map[string]map[uint64]int, error) {
	rows, err := s.pool.Query(ctx, `SELECT target, ordering_key, count(*) FROM `+s.parked()+` GROUP BY 1, 2`)
	if err != nil {
		return nil, fmt.Errorf("count parked deliveries: %w", err)
	}
	out := map[string]map[uint64]int{}
	for rows.Next() {
		var target string
		var key, n int64
		if err := rows.Scan(&target, &key, &n); err != nil {
			return nil, fmt.Errorf("count parked deliveries: %w", err)
		}
		if out[target] == nil {
			out[target] = map[uint64]int{}
		}
		out[target][uint64(key)] = int(n)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("count parked deliveries: %w", err)
	}
	return out, nil
}

// DeadLetterTargets returns the subscription targets that have dead letters.
func (s *SlotStore) DeadLetterTargets(ctx context.Context) ([]string, error) {
	var out []string
	err := s.pool.QueryRow(ctx, `SELECT coalesce(array_agg(DISTINCT sink), '{}') FROM `+s.dead()+` WHERE sink LIKE 'subscription:%'`).Scan(&out)
	if err != nil {
		return nil, fmt.Errorf("list targets with dead letters: %w", err)
	}
	return out, nil
}

// DueHeads returns the keys of targets whose first parked delivery (in
// commit order) is due, oldest first, among targets only: parked
// deliveries of a target that cannot deliver now (a disabled subscription,
// one that no longer exists) stay due and would otherwise fill the limit at
// every round, starving every live target behind them.
func (s *SlotStore) DueHeads(ctx context.Context, targets []string, limit int) ([]ParkedHead, error) {
	rows, err := s.pool.Query(ctx, `SELECT target, ordering_key FROM (
  SELECT DISTINCT ON (target, ordering_key) target, ordering_key, next_attempt_at
  FROM `+s.parked()+` WHERE target = ANY($2) ORDER BY target, ordering_key, commit_lsn, commit_index, event_id) AS h
WHERE next_attempt_at <= now() ORDER BY next_attempt_at LIMIT $1`, limit, targets)
	if err != nil {
		return nil, fmt.Errorf("find due parked deliveries: %w", err)
	}
	heads, err := pgx.CollectRows(rows, pgx.RowToStructByPos[ParkedHead])
	if err != nil {
		return nil, fmt.Errorf("find due parked deliveries: %w", err)
	}
	return heads, nil
}

// ParkedRun returns the first parked deliveries of one key of a target, in
// commit order, with their rows.
func (s *SlotStore) ParkedRun(ctx context.Context, target string, key int64, limit int) ([]ParkedRow, error) {
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return nil, fmt.Errorf("read parked deliveries: %w", err)
	}
	defer conn.Release()
	sql := `SELECT p.event_id, p.attempts, p.rounds, e.* FROM ` + s.parked() + ` AS p
LEFT JOIN ` + s.table() + ` AS e ON e.id = p.event_id
WHERE p.target = $1 AND p.ordering_key = $2
ORDER BY p.commit_lsn, p.commit_index, p.event_id LIMIT $3`
	// Text results, so the envelope is built exactly as for streamed rows.
	rr := conn.Conn().PgConn().ExecParams(ctx, sql,
		[][]byte{[]byte(target), []byte(strconv.FormatInt(key, 10)), []byte(strconv.Itoa(limit))}, nil, nil, nil)
	var (
		out   []ParkedRow
		rel   *decode.Relation
		idCol int
	)
	for rr.NextRow() {
		fields := rr.FieldDescriptions()
		if rel == nil {
			rel = &decode.Relation{Namespace: s.cfg.Schema, Name: s.cfg.Table}
			for i, f := range fields[3:] {
				rel.Columns = append(rel.Columns, decode.Column{Name: f.Name, TypeOID: f.DataTypeOID})
				if f.Name == "id" {
					idCol = i
				}
			}
		}
		v := rr.Values()
		var r ParkedRow
		r.EventID, _ = strconv.ParseInt(string(v[0]), 10, 64)
		a, _ := strconv.ParseInt(string(v[1]), 10, 32)
		n, _ := strconv.ParseInt(string(v[2]), 10, 32)
		r.Attempts, r.Rounds, r.Relation = int32(a), int32(n), rel
		if v[3+idCol] != nil {
			r.Values = make([][]byte, len(v)-3)
			for i, b := range v[3:] {
				if b != nil {
					r.Values[i] = append([]byte{}, b...)
				}
			}
		}
		out = append(out, r)
	}
	if _, err := rr.Close(); err != nil {
		return nil, fmt.Errorf("read parked deliveries of %s: %w", target, err)
	}
	return out, nil
}

// ResolutionKind is what became of a parked delivery's retry.
type ResolutionKind int

// Resolution kinds.
const (
	// Delivered: acknowledged. The parked row goes, the attempts are
	// counted, and the event row becomes processed when nothing else of it
	// is parked or dead.
	Delivered ResolutionKind = iota + 1
	// RetryLater: failed again; the next attempt is due RetryIn after the
	// database's now().
	RetryLater
	// GiveUp: dead-lettered (the schedule ran out, a permanent refusal, or
	// the row is gone).
	GiveUp
)

// Resolution is the outcome of one retry of a parked delivery.
type Resolution struct {
	Kind     ResolutionKind
	Target   string
	EventID  int64
	Attempts int32         // attempts made by this retry
	RetryIn  time.Duration // RetryLater only
	Status   int           // the last HTTP status, 0 if none
	Reason   string        // the failure (RetryLater, GiveUp)
}

// Resolve records rs in one fenced transaction that first locks the events'
// rows, in ascending id order: one order of locks for every kind and every
// caller, so resolutions of one event's parked deliveries at several targets
// take turns, and each statement after the lock sees what the one before it
// committed. (Without the lock, two resolving together each saw the other's
// parked row still there, and the row stayed unprocessed for good.) The
// retrier resolves a key's run together: one commit for many rows. A commit
// whose answer was lost is an *InDoubtError (see Committed).
func (s *SlotStore) Resolve(ctx context.Context, rs ...Resolution) error {
	if len(rs) == 0 {
		return nil
	}
	ids := make([]int64, len(rs))
	for i, r := range rs {
		ids[i] = r.EventID
	}
	slices.Sort(ids)
	ids = slices.Compact(ids)
	what := fmt.Sprintf("resolve %d parked deliveries (first: event %d)", len(rs), rs[0].EventID)
	if len(rs) == 1 {
		what = fmt.Sprintf("resolve parked delivery of event %d", rs[0].EventID)
	}
	tx, err := s.beginFenced(ctx, what)
	if err != nil {
		return err
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // no-op after commit
	var q pgx.Batch
	q.Queue(`SELECT 1 FROM `+s.table()+` WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE`, ids)
	for _, r := range rs {
		if err := s.queueResolution(&q, r); err != nil {
			return err
		}
	}
	if err := wrapBatch(tx.SendBatch(ctx, &q).Close(), "%s", what); err != nil {
		return err
	}
	return tx.commit(ctx, s.resolved(rs))
}

// resolved checks, for a resolution whose COMMIT got no answer, whether its
// parked rows that it ended (delivered or dead-lettered) are gone: all or
// none of them, one transaction deleted them. Only its rescheduled ones it
// cannot tell, and says not written: the retrier reads the table again
// rather than record the same outcomes twice.
func (s *SlotStore) resolved(rs []Resolution) func(ctx context.Context, q Querier) (bool, error) {
	var targets []string
	var ids []int64
	for _, r := range rs {
		if r.Kind != RetryLater {
			targets, ids = append(targets, r.Target), append(ids, r.EventID)
		}
	}
	return func(ctx context.Context, q Querier) (bool, error) {
		if len(ids) == 0 {
			return false, nil
		}
		var left bool
		err := q.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+s.parked()+` AS p
JOIN unnest($1::text[], $2::bigint[]) AS r(t, id) ON p.target = r.t AND p.event_id = r.id)`, targets, ids).Scan(&left)
		return !left, err
	}
}

// queueResolution queues the statements that record r; the caller holds the
// lock of r's event row.
func (s *SlotStore) queueResolution(q *pgx.Batch, r Resolution) error {
	switch r.Kind {
	case Delivered:
		// The parked row goes; the event is processed when nothing else of
		// it is parked or dead.
		q.Queue(`DELETE FROM `+s.parked()+` WHERE target = $1 AND event_id = $2`, r.Target, r.EventID)
		q.Queue(`UPDATE `+s.table()+` AS e SET delivery_attempts = `+AddAttempts("e", "$2")+`,
  is_processed = NOT EXISTS (SELECT 1 FROM `+s.parked()+` AS p WHERE p.event_id = $1)
    AND NOT EXISTS (SELECT 1 FROM `+s.dead()+` AS d WHERE d.event_id = $1),
  processed_at = CASE WHEN e.processed_at IS NULL
    AND NOT EXISTS (SELECT 1 FROM `+s.parked()+` AS p WHERE p.event_id = $1)
    AND NOT EXISTS (SELECT 1 FROM `+s.dead()+` AS d WHERE d.event_id = $1) THEN now() ELSE e.processed_at END
WHERE e.id = $1`, r.EventID, r.Attempts)
	case RetryLater:
		// The next attempt is due RetryIn after the database's now(): the
		// retrier compares next_attempt_at with now() too, so a daemon
		// whose clock is off neither retries early nor dead-letters early.
		q.Queue(`UPDATE `+s.parked()+` SET attempts = attempts + $3, rounds = rounds + 1, next_attempt_at = now() + $4 * interval '1 microsecond',
  last_status = $5, last_error = $6 WHERE target = $1 AND event_id = $2`, r.Target, r.EventID, r.Attempts, r.RetryIn.Microseconds(), nullStatus(r.Status), r.Reason)
		q.Queue(`UPDATE `+s.table()+` AS e SET delivery_attempts = `+AddAttempts("e", "$2")+` WHERE e.id = $1`, r.EventID, r.Attempts)
	case GiveUp:
		q.Queue(`WITH p AS (DELETE FROM `+s.parked()+` WHERE target = $1 AND event_id = $2 RETURNING attempts)
INSERT INTO `+s.dead()+` AS d (event_id, sink, last_status, last_error, attempts)
SELECT $2, $1, $3, $4, coalesce((SELECT attempts FROM p), 0) + $5
ON CONFLICT (event_id, sink) DO UPDATE SET last_status = excluded.last_status, last_error = excluded.last_error,
  attempts = d.attempts + excluded.attempts, dead_at = now()`, r.Target, r.EventID, nullStatus(r.Status), r.Reason, r.Attempts)
		q.Queue(`UPDATE `+s.table()+` AS e SET delivery_attempts = `+AddAttempts("e", "$2")+` WHERE e.id = $1`, r.EventID, r.Attempts)
	default:
		return fmt.Errorf("resolve parked delivery of event %d: unknown resolution %d", r.EventID, r.Kind)
	}
	return nil
}

func nullStatus(status int) *int32 {
	if status == 0 {
		return nil
	}
	st := int32(status)
	return &st
}

func wrapBatch(err error, format string, args ...any) error {
	if err != nil {
		return fmt.Errorf(format+": %w", append(args, err)...)
	}
	return nil
}

// Pool is the store's pool (for components that share it).
func (s *SlotStore) Pool() *pgxpool.Pool { return s.pool }
