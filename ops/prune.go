package ops

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/outboxd/outboxd/store"
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
	// DeadLetters also deletes the dead letters dead before the cutoff
	// (store.Tables.PruneDeadLetters). Their events stay in the outbox table (they are unprocessed);
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
	if !cols[store.ProcessedColumn] || !cols[store.ProcessedAtColumn] || !cols["id"] {
		return nil, fmt.Errorf("table %s does not exist or lacks id, is_processed or processed_at: run `outboxd migrate`", c.t.Table)
	}
	res := &PruneResult{}
	// One cutoff, taken from the server's clock, for the whole run.
	if err := c.pool.QueryRow(ctx, `SELECT now() - make_interval(secs => $1)`, opts.OlderThan.Seconds()).Scan(&res.Cutoff); err != nil {
		return nil, fmt.Errorf("compute cutoff: %w", err)
	}
	res.Cutoff = res.Cutoff.UTC()
	tables := c.tables()
	haveDead, err := tables.Exists(ctx, store.DeadLetterTable)
	if err != nil {
		return nil, err
	}
	if opts.DryRun {
		if res.Rows, err = tables.CountPrunable(ctx, res.Cutoff); err != nil {
			return nil, fmt.Errorf("count prunable rows: %w", err)
		}
		if opts.DeadLetters && haveDead {
			if res.DeadLetters, err = tables.CountDeadLettersBefore(ctx, res.Cutoff); err != nil {
				return nil, fmt.Errorf("count prunable dead letters: %w", err)
			}
		}
		return res, nil
	}
	last := int64(math.MinInt64)
	for {
		picked, maxID, deleted, err := tables.PruneBatch(ctx, last, res.Cutoff, opts.BatchSize)
		if err != nil {
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
		for {
			n, err := tables.PruneDeadLetters(ctx, res.Cutoff, opts.BatchSize)
			if err != nil {
				return res, fmt.Errorf("delete dead letters: %w", err)
			}
			res.DeadLetters += n
			if n < int64(opts.BatchSize) {
				break
			}
		}
	}
	return res, nil
}
