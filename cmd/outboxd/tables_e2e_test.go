package main

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// partitionedOutbox is an outbox partitioned by month, as applications keep
// it to drop old months: the primary key must include the partition key.
const partitionedOutbox = `
CREATE TABLE domain_event (` + e2e.OutboxColumns + `,
  PRIMARY KEY (id, occurred_at)
) PARTITION BY RANGE (occurred_at);
CREATE TABLE domain_event_2000_01 PARTITION OF domain_event FOR VALUES FROM ('2000-01-01') TO ('2000-02-01');
CREATE TABLE domain_event_2000_02 PARTITION OF domain_event FOR VALUES FROM ('2000-02-01') TO ('2000-03-01');
CREATE TABLE domain_event_default PARTITION OF domain_event DEFAULT;`

// insertAt inserts n events of organization org with occurred_at at, in one
// transaction, and returns their ids.
func insertAt(t *testing.T, b *bundle, n int, org int64, at string) []int64 {
	t.Helper()
	rows, err := b.pool.Query(context.Background(), `INSERT INTO domain_event (event_name, organization_id, occurred_at, properties)
SELECT 'batch_started', $1, $2::timestamptz, jsonb_build_object('i', g) FROM generate_series(1, $3) g RETURNING id`, org, at, n)
	require.NoError(t, err)
	var ids []int64
	for rows.Next() {
		var id int64
		require.NoError(t, rows.Scan(&id))
		ids = append(ids, id)
	}
	require.NoError(t, rows.Err())
	return ids
}

// G10: a partitioned outbox (rows land in partitions) is delivered whole:
// rows from before the first start through the catch-up, rows after it
// through the stream, every partition, and every row is marked.
func TestPartitionedOutboxDeliversEveryRow(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundleWith(t, pgtest.Shared(t), nil, partitionedOutbox)
		var viaRoot bool
		require.NoError(t, b.pool.QueryRow(context.Background(),
			`SELECT pubviaroot FROM pg_publication WHERE pubname = $1`, "outboxd").Scan(&viaRoot))
		require.True(t, viaRoot, "migrate publishes a partitioned outbox through its root")

		before := insertAt(t, b, 5, 1, "2000-01-15T10:00:00Z")
		d := e2e.StartDaemon(t, b.env)
		var after []int64
		after = append(after, insertAt(t, b, 5, 1, "2000-01-20T10:00:00Z")...)
		after = append(after, insertAt(t, b, 5, 1, "2000-02-10T10:00:00Z")...)
		after = append(after, insertAt(t, b, 5, 1, "2031-06-01T10:00:00Z")...) // default partition
		all := append(append([]int64(nil), before...), after...)
		b.recv.WaitAccepted(t, all, time.Minute)
		b.waitProcessed(t, int64(len(all)), time.Minute)
		c := b.recv.Count(all)
		t.Logf("partitioned outbox: %s", c)
		require.Zero(t, c.Duplicates)
		require.Zero(t, c.Unexpected)
		require.Equal(t, all, b.recv.Accepted(), "one organization: commit order")
		rows, attempts := e2e.Processed(t, b.pool)
		require.EqualValues(t, len(all), rows)
		require.EqualValues(t, len(all), attempts)
		require.Equal(t, 0, d.Stop(30*time.Second))

		// replay reads every partition.
		again := e2e.NewReceiver(t)
		code, out := e2e.RunCommand(t, b.env, "replay", "--webhook-url", again.URL)
		require.Equal(t, 0, code, out)
		require.Equal(t, all, again.Accepted(), "replayed in id order, from every partition")
		// prune deletes processed rows older than the cutoff in every
		// partition (processed_at moved back instead of waiting).
		_, err := b.pool.Exec(context.Background(), `UPDATE domain_event SET processed_at = processed_at - interval '2 days'`)
		require.NoError(t, err)
		code, out = e2e.RunCommand(t, b.env, "prune", "--older-than", "1d", "--yes")
		require.Equal(t, 0, code, out)
		var left int
		require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT count(*) FROM domain_event`).Scan(&left))
		require.Zero(t, left, out)
	})
}

// G10: a partitioned outbox whose publication does not publish through the
// root (made by hand, not by migrate) is refused at start with the fix,
// instead of streaming rows under partition names that nothing recognises.
func TestPartitionedOutboxWithoutViaRootIsRefused(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundleWith(t, pgtest.Shared(t), nil, partitionedOutbox)
		_, err := b.pool.Exec(context.Background(), `ALTER PUBLICATION outboxd SET (publish_via_partition_root = false)`)
		require.NoError(t, err)
		d := e2e.StartDaemon(t, b.env)
		require.Equal(t, 1, d.Wait(time.Minute), d.Log())
		require.Contains(t, d.Log(), "publish_via_partition_root")
		code, out := e2e.RunCommand(t, b.env, "status")
		require.Equal(t, 1, code, out)
		require.Contains(t, out, "publish_via_partition_root")
	})
}

// G10: a row inserted while the outbox table is renamed inside the writing
// transaction is delivered like any other (pgoutput names the relation as
// it was then).
func TestRowInsertedUnderAnotherNameIsDelivered(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), nil)
		d := e2e.StartDaemon(t, b.env)
		waitStreaming(t, d)
		first := e2e.Insert(t, b.pool, 1, 2, one)
		ctx := context.Background()
		tx, err := b.pool.Begin(ctx)
		require.NoError(t, err)
		_, err = tx.Exec(ctx, `ALTER TABLE domain_event RENAME TO domain_event_renamed`)
		require.NoError(t, err)
		var middle int64
		require.NoError(t, tx.QueryRow(ctx, `INSERT INTO domain_event_renamed (event_name, organization_id) VALUES ('renamed', 1) RETURNING id`).Scan(&middle))
		_, err = tx.Exec(ctx, `ALTER TABLE domain_event_renamed RENAME TO domain_event`)
		require.NoError(t, err)
		require.NoError(t, tx.Commit(ctx))
		last := e2e.Insert(t, b.pool, 1, 2, one)
		all := append(append(append([]int64(nil), first...), middle), last...)
		b.recv.WaitAccepted(t, all, time.Minute)
		b.waitProcessed(t, int64(len(all)), time.Minute)
		require.Equal(t, all, b.recv.Accepted())
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// G10: an insert into a published relation that is not the outbox (another
// table added to the publication) stops outboxd with an error naming it; the
// slot does not confirm past it and the outbox row of the same transaction
// is not marked.
func TestInsertFromUnexpectedRelationStops(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), nil)
		ctx := context.Background()
		_, err := b.pool.Exec(ctx, `CREATE TABLE stray (id int PRIMARY KEY, v text);
ALTER PUBLICATION outboxd ADD TABLE stray`)
		require.NoError(t, err)
		d := e2e.StartDaemon(t, b.env)
		waitStreaming(t, d)
		ok := e2e.Insert(t, b.pool, 1, 1, one)
		b.recv.WaitAccepted(t, ok, time.Minute)
		b.waitProcessed(t, 1, time.Minute)

		tx, err := b.pool.Begin(ctx)
		require.NoError(t, err)
		var inTxn int64
		require.NoError(t, tx.QueryRow(ctx, `INSERT INTO domain_event (event_name, organization_id) VALUES ('with_stray', 1) RETURNING id`).Scan(&inTxn))
		_, err = tx.Exec(ctx, `INSERT INTO stray VALUES (1, 'x')`)
		require.NoError(t, err)
		require.NoError(t, tx.Commit(ctx))
		end := b.currentLSN(t)

		require.Equal(t, 1, d.Wait(time.Minute), "outboxd stops on a relation it does not recognise")
		require.Contains(t, d.Log(), `public.stray`)
		require.Less(t, b.confirmedFlush(t), end, "the slot never confirms past an unrecognised insert")
		var processed bool
		require.NoError(t, b.pool.QueryRow(ctx, `SELECT is_processed FROM domain_event WHERE id = $1`, inTxn).Scan(&processed))
		require.False(t, processed, "the transaction holding the unknown insert is not settled")
		// A restart stops again at the same place: nothing is skipped by retrying.
		d2 := e2e.StartDaemon(t, b.env)
		require.Equal(t, 1, d2.Wait(time.Minute))
		require.Contains(t, d2.Log(), `public.stray`)
		require.Less(t, b.confirmedFlush(t), end)
		// The way out: take the table out of the publication (changes already in
		// the WAL are decoded with the publication as it was then) and reset the
		// slot; the catch-up delivers the unmarked row.
		_, err = b.pool.Exec(ctx, `ALTER PUBLICATION outboxd DROP TABLE stray`)
		require.NoError(t, err)
		code, out := e2e.RunCommand(t, b.env, "slot", "reset", "--yes")
		require.Equal(t, 0, code, out)
		d3 := e2e.StartDaemon(t, b.env)
		b.recv.WaitAccepted(t, []int64{inTxn}, time.Minute)
		b.waitProcessed(t, 2, time.Minute)
		require.Equal(t, 0, d3.Stop(30*time.Second))
	})
}
