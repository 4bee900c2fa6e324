package store

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
)

// DeadLetterFilter selects dead letters; zero fields select all.
type DeadLetterFilter struct {
	Sink           string
	OrganizationID *int64
	// Since and Until bound dead_at (Since included, Until not).
	Since, Until *time.Time
	EventIDs     []int64
}

// DeadLetterRow is a dead letter with its event's name and organization (nil
// when the event's row is gone).
type DeadLetterRow struct {
	ID        int64
	EventID   int64
	Sink      string
	Status    *int32
	Error     string
	Attempts  int32
	DeadAt    time.Time
	EventName *string
	Org       *int64
}

// DeadLetters returns the dead letters f selects, by id.
func (t Tables) DeadLetters(ctx context.Context, f DeadLetterFilter) ([]DeadLetterRow, error) {
	rows, err := t.q.Query(ctx, `SELECT d.id, d.event_id, d.sink, d.last_status, d.last_error, d.attempts, d.dead_at,
  e.event_name::text, e.organization_id::bigint
FROM `+t.own(DeadLetterTable)+` AS d LEFT JOIN `+t.outbox()+` AS e ON e.id = d.event_id
WHERE ($1 = '' OR d.sink = $1) AND ($2::bigint IS NULL OR e.organization_id = $2)
  AND ($3::timestamptz IS NULL OR d.dead_at >= $3) AND ($4::timestamptz IS NULL OR d.dead_at < $4)
  AND (coalesce(cardinality($5::bigint[]), 0) = 0 OR d.event_id = ANY($5))
ORDER BY d.id`, f.Sink, f.OrganizationID, f.Since, f.Until, f.EventIDs)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowToStructByPos[DeadLetterRow])
}

// UnknownTargets returns, sorted, the targets of the dead letters ids that
// are neither one of targets (the daemon's own: deliver.DefaultTarget with
// OUTBOXD_SINK, whatever its kind; each kind of OUTBOXD_SINKS) nor an
// existing subscription: no running outboxd delivers to them.
func (t Tables) UnknownTargets(ctx context.Context, ids []int64, targets []string) ([]string, error) {
	var unknown []string
	err := t.q.QueryRow(ctx, `SELECT coalesce(array_agg(DISTINCT d.sink ORDER BY d.sink), '{}') FROM `+t.own(DeadLetterTable)+` AS d
WHERE d.id = ANY($1) AND d.sink <> ALL($2::text[])
  AND NOT EXISTS (SELECT 1 FROM `+t.own(SubscriptionTable)+` AS s WHERE 'subscription:' || s.id = d.sink)`, ids, targets).Scan(&unknown)
	return unknown, err
}

// ReviveDeadLetters moves the dead letters ids back to the retry schedule,
// due now, and returns how many it moved. The ordering key of a revived
// delivery is minus its event id: it no longer has a place in its key's
// order, and a key space of its own (organization keys are odd positives,
// event-id keys positive) keeps it from landing in another key's parked run.
func (t Tables) ReviveDeadLetters(ctx context.Context, ids []int64) (int64, error) {
	tag, err := t.q.Exec(ctx, `WITH d AS (DELETE FROM `+t.own(DeadLetterTable)+` WHERE id = ANY($1) RETURNING event_id, sink, last_status, last_error)
INSERT INTO `+t.own(ParkedTable)+` (target, event_id, ordering_key, commit_lsn, commit_index, next_attempt_at, last_status, last_error)
SELECT sink, event_id, -event_id, '0/0', 0, now(), last_status, last_error FROM d
ON CONFLICT (target, event_id) DO UPDATE SET next_attempt_at = now(), rounds = 0`, ids)
	return tag.RowsAffected(), err
}

// PurgeDeadLetters deletes the dead letters ids and returns how many it
// deleted. Their rows stay unprocessed in the outbox table.
func (t Tables) PurgeDeadLetters(ctx context.Context, ids []int64) (int64, error) {
	tag, err := t.q.Exec(ctx, `DELETE FROM `+t.own(DeadLetterTable)+` WHERE id = ANY($1)`, ids)
	return tag.RowsAffected(), err
}

// TargetCount is what waits for one target: its parked deliveries and its
// dead letters, and how far behind the target is.
type TargetCount struct {
	Target      string `json:"target"`
	Parked      int64  `json:"parked"`
	DeadLetters int64  `json:"dead_letters"`
	// LagSeconds is the age, by the database's clock, of the target's oldest
	// parked event (OldestParkedAt); 0 when nothing is parked.
	LagSeconds float64 `json:"lag_seconds"`
	// OldestParkedEventID is the parked event with the lowest id (ids grow
	// with inserts: the oldest); nil when nothing is parked.
	OldestParkedEventID *int64 `json:"oldest_parked_event_id"`
	// OldestParkedAt is when that event happened: the earlier of its
	// occurred_at and the time it was parked (parked_at); parked_at alone
	// when the outbox table has no occurred_at column or the event's row is
	// gone. Nil when nothing is parked.
	OldestParkedAt *time.Time `json:"oldest_parked_at"`
}

// TargetCounts returns, per target with any, the parked deliveries and dead
// letters, by target name, and each target's lag (TargetCount.LagSeconds).
// It reads each table once, grouped by target (an index-only scan of the
// parked table's primary key when its pages are all-visible), plus two
// primary-key lookups per target for its oldest parked event.
func (t Tables) TargetCounts(ctx context.Context) ([]TargetCount, error) {
	// An ORM's table may lack occurred_at (or, unmigrated, id), or hold it
	// as another type than a timestamp (text, epoch seconds), and the role
	// may not read them (a monitoring role): parked_at then.
	var n int
	if err := t.q.QueryRow(ctx, `SELECT count(*) FROM pg_catalog.pg_attribute
WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped
  AND (attname = 'id' OR attname = 'occurred_at' AND atttypid IN ('timestamptz'::regtype, 'timestamp'::regtype, 'date'::regtype))
  AND has_column_privilege(attrelid, attnum, 'SELECT')`, t.outbox()).Scan(&n); err != nil {
		return nil, err
	}
	at, event := "q.parked_at", ""
	if n == 2 {
		// least ignores NULL: a row gone, parked_at alone. An occurred_at
		// after the parking (a client's clock ahead) cannot make the lag
		// smaller than the time parked.
		at, event = "least(e.occurred_at, q.parked_at)", ` LEFT JOIN `+t.outbox()+` AS e ON e.id = q.event_id`
	}
	rows, err := t.q.Query(ctx, `WITH p AS (
  SELECT target, count(*) AS parked, min(event_id) AS oldest FROM `+t.own(ParkedTable)+` GROUP BY target
), d AS (
  SELECT sink AS target, count(*) AS dead FROM `+t.own(DeadLetterTable)+` GROUP BY sink
), c AS (
  SELECT coalesce(p.target, d.target) AS target, coalesce(p.parked, 0) AS parked, coalesce(d.dead, 0) AS dead, p.oldest
  FROM p FULL JOIN d ON d.target = p.target
)
SELECT c.target, c.parked::bigint, c.dead::bigint, coalesce(extract(epoch FROM greatest(now() - o.at, interval '0'))::float8, 0),
  c.oldest, o.at
FROM c LEFT JOIN LATERAL (
  SELECT `+at+`::timestamptz AS at FROM `+t.own(ParkedTable)+` AS q`+event+`
  WHERE q.target = c.target AND q.event_id = c.oldest) AS o ON true
ORDER BY c.target`)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowToStructByPos[TargetCount])
}
