package ops

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"
)

// PruneOptions configure Prune.
type PruneOptions struct {
	// OlderThan: rows processed before now() - OlderThan are deleted.
	OlderThan time.Duration
	// BatchSize is the number of rows per DELETE statement; default 1000.
	// Each batch is its own short transaction, so locks and WAL stay small.
	BatchSize int
	// DryRun counts and deletes nothing.
	DryRun bool
	// DeadLetters also deletes outboxd_dead_letter rows dead before the
	// cutoff. Their events stay in the outbox table (they are unprocessed);
	// without their dead letter, a later catch-up delivers them again.
	DeadLetters bool
	// OnBatch, when set, is called after each batch with the running total.
	OnBatch func(deleted int64)
}

// PruneResult is what Prune deleted (or would delete, with DryRun).
type PruneResult struct {
	// Cutoff is the server time processed_at (dead_at) had to be before.
	Cutoff      time.Time `json:"cutoff"`
	Rows        int64     `json:"rows"`
	DeadLetters int64     `json:"dead_letters"`
	Batches     int       `json:"batches"`
}

// Prune deletes processed rows older than opts.OlderThan in small batches:
// retention for the outbox table. Rows with is_processed = false are never
// deleted, whatever their age: dead-lettered rows included.
func (c *Client) Prune(ctx context.Context, opts PruneOptions) (*PruneResult, error) {
	if opts.OlderThan <= 0 {
		return nil, errors.New("--older-than must be a positive duration")
	}
	if opts.BatchSize <= 0 {
		opts.BatchSize = 1000
	}
	cols, err := c.columns(ctx)
	if err != nil {
		return nil, err
	}
	if !cols["is_processed"] || !cols["processed_at"] || !cols["id"] {
		return nil, fmt.Errorf("table %s does not exist or lacks id, is_processed or processed_at: run `outboxd migrate`", c.t.Table)
	}
	res := &PruneResult{}
	// One cutoff, taken from the server's clock, for the whole run.
	if err := c.pool.QueryRow(ctx, `SELECT now() - make_interval(secs => $1)`, opts.OlderThan.Seconds()).Scan(&res.Cutoff); err != nil {
		return nil, fmt.Errorf("compute cutoff: %w", err)
	}
	res.Cutoff = res.Cutoff.UTC()
	table := c.t.tableSQL()
	haveDead, err := c.exists(ctx, deadLetterTable)
	if err != nil {
		return nil, err
	}
	if opts.DryRun {
		if err := c.pool.QueryRow(ctx, `SELECT count(*) FROM `+table+` WHERE is_processed AND processed_at < $1`, res.Cutoff).Scan(&res.Rows); err != nil {
			return nil, fmt.Errorf("count prunable rows: %w", err)
		}
		if opts.DeadLetters && haveDead {
			if err := c.pool.QueryRow(ctx, `SELECT count(*) FROM `+c.t.ownSQL(deadLetterTable)+` WHERE dead_at < $1`, res.Cutoff).Scan(&res.DeadLetters); err != nil {
				return nil, fmt.Errorf("count prunable dead letters: %w", err)
			}
		}
		return res, nil
	}
	// Keyset over the primary key, so each batch resumes where the last one
	// stopped instead of rescanning the rows kept. The condition is checked
	// again on the row being deleted: a row someone set back to unprocessed
	// meanwhile is kept.
	batch := `WITH c AS (
  SELECT id FROM ` + table + ` WHERE id > $1 AND is_processed AND processed_at < $2 ORDER BY id LIMIT $3
), d AS (
  DELETE FROM ` + table + ` AS e USING c WHERE e.id = c.id AND e.is_processed AND e.processed_at < $2 RETURNING e.id
)
SELECT (SELECT count(*) FROM c), (SELECT max(id)::bigint FROM c), (SELECT count(*) FROM d)`
	last := int64(math.MinInt64)
	for {
		var picked, deleted int64
		var maxID *int64
		if err := c.pool.QueryRow(ctx, batch, last, res.Cutoff, opts.BatchSize).Scan(&picked, &maxID, &deleted); err != nil {
			return res, fmt.Errorf("delete processed rows after id %d: %w", last, err)
		}
		if picked > 0 {
			res.Batches++
			res.Rows += deleted
			last = *maxID
			if opts.OnBatch != nil {
				opts.OnBatch(res.Rows)
			}
		}
		if picked < int64(opts.BatchSize) {
			break
		}
	}
	if opts.DeadLetters && haveDead {
		dl := c.t.ownSQL(deadLetterTable)
		for {
			tag, err := c.pool.Exec(ctx, `DELETE FROM `+dl+` WHERE id IN (SELECT id FROM `+dl+` WHERE dead_at < $1 ORDER BY id LIMIT $2)`, res.Cutoff, opts.BatchSize)
			if err != nil {
				return res, fmt.Errorf("delete dead letters: %w", err)
			}
			res.DeadLetters += tag.RowsAffected()
			if tag.RowsAffected() < int64(opts.BatchSize) {
				break
			}
		}
	}
	return res, nil
}
