package store

import (
	"context"
	"time"
)

// CountPrunable counts the processed rows processed before cutoff.
func (t Tables) CountPrunable(ctx context.Context, cutoff time.Time) (int64, error) {
	var n int64
	err := t.q.QueryRow(ctx, `SELECT count(*) FROM `+t.outbox()+` WHERE is_processed AND processed_at < $1`, cutoff).Scan(&n)
	return n, err
}

// PruneBatch deletes up to limit processed rows processed before cutoff, in
// id order after id after: a keyset over the primary key, so each batch
// resumes where the last one stopped instead of rescanning the rows kept.
// The condition is checked again on the row being deleted: a row someone set
// back to unprocessed meanwhile is kept. It returns how many rows it picked,
// the highest id picked (nil when none) and how many it deleted.
func (t Tables) PruneBatch(ctx context.Context, after int64, cutoff time.Time, limit int) (picked int64, maxID *int64, deleted int64, err error) {
	batch := `WITH c AS (
  SELECT id FROM ` + t.outbox() + ` WHERE id > $1 AND is_processed AND processed_at < $2 ORDER BY id LIMIT $3
), d AS (
  DELETE FROM ` + t.outbox() + ` AS e USING c WHERE e.id = c.id AND e.is_processed AND e.processed_at < $2 RETURNING e.id
)
SELECT (SELECT count(*) FROM c), (SELECT max(id)::bigint FROM c), (SELECT count(*) FROM d)`
	err = t.q.QueryRow(ctx, batch, after, cutoff, limit).Scan(&picked, &maxID, &deleted)
	return picked, maxID, deleted, err
}

// CountDeadLettersBefore counts the dead letters dead before cutoff.
func (t Tables) CountDeadLettersBefore(ctx context.Context, cutoff time.Time) (int64, error) {
	var n int64
	err := t.q.QueryRow(ctx, `SELECT count(*) FROM `+t.own(DeadLetterTable)+` WHERE dead_at < $1`, cutoff).Scan(&n)
	return n, err
}

// PruneDeadLetters deletes up to limit dead letters dead before cutoff, oldest
// id first, and returns how many it deleted. Their events stay unprocessed.
func (t Tables) PruneDeadLetters(ctx context.Context, cutoff time.Time, limit int) (int64, error) {
	dl := t.own(DeadLetterTable)
	tag, err := t.q.Exec(ctx, `DELETE FROM `+dl+` WHERE id IN (SELECT id FROM `+dl+` WHERE dead_at < $1 ORDER BY id LIMIT $2)`, cutoff, limit)
	return tag.RowsAffected(), err
}
