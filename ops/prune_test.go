package ops

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// prune deletes only processed rows processed before the cutoff, in
// batches; unprocessed rows stay whatever their age, dead-lettered included.
func TestPruneKeepsUnprocessedRows(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	longAgo := time.Now().Add(-90 * 24 * time.Hour)
	oldDone := b.insert(t, 7, "a", 1, longAgo)
	oldPending := b.insert(t, 3, "a", 1, longAgo)
	oldDead := b.insert(t, 1, "a", 1, longAgo)
	recentDone := b.insert(t, 4, "a", 1, time.Now())
	b.exec(t, `UPDATE domain_event SET is_processed = true, processed_at = now() - interval '40 days' WHERE id = ANY($1)`, oldDone)
	b.exec(t, `UPDATE domain_event SET is_processed = true, processed_at = now() - interval '1 day' WHERE id = ANY($1)`, recentDone)
	b.exec(t, `INSERT INTO outboxd_dead_letter (event_id, sink, last_error, attempts, dead_at) VALUES ($1, 'webhook', 'HTTP 400', 1, now() - interval '40 days')`, oldDead[0])

	res, err := b.client.Prune(ctx, PruneOptions{OlderThan: 30 * 24 * time.Hour, DryRun: true, DeadLetters: true})
	require.NoError(t, err)
	require.EqualValues(t, 7, res.Rows)
	require.EqualValues(t, 1, res.DeadLetters)
	require.EqualValues(t, 15, b.int(t, `SELECT count(*) FROM domain_event`), "dry run deleted rows")

	var batches []int64
	res, err = b.client.Prune(ctx, PruneOptions{OlderThan: 30 * 24 * time.Hour, BatchSize: 3, OnBatch: func(n int64) { batches = append(batches, n) }})
	require.NoError(t, err)
	require.EqualValues(t, 7, res.Rows)
	require.Equal(t, []int64{3, 6, 7}, batches)
	require.Zero(t, res.DeadLetters, "dead letters only with the flag")
	require.EqualValues(t, 0, b.int(t, `SELECT count(*) FROM domain_event WHERE id = ANY($1)`, oldDone))
	require.EqualValues(t, 8, b.int(t, `SELECT count(*) FROM domain_event WHERE id = ANY($1)`, append(append(oldPending, oldDead...), recentDone...)))
	require.EqualValues(t, 1, b.int(t, `SELECT count(*) FROM outboxd_dead_letter`))

	res, err = b.client.Prune(ctx, PruneOptions{OlderThan: 30 * 24 * time.Hour, DeadLetters: true})
	require.NoError(t, err)
	require.Zero(t, res.Rows)
	require.EqualValues(t, 1, res.DeadLetters)
	require.EqualValues(t, 0, b.int(t, `SELECT count(*) FROM outboxd_dead_letter`))
	require.EqualValues(t, 1, b.int(t, `SELECT count(*) FROM domain_event WHERE id = $1 AND NOT is_processed`, oldDead[0]), "the dead-lettered event itself stays")

	_, err = b.client.Prune(ctx, PruneOptions{})
	require.Error(t, err, "a cutoff is required")
}
