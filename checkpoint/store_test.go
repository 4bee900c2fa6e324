package checkpoint_test

import (
	"context"
	"errors"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/checkpoint"
	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/migrations"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// A fenced store writes nothing unless this instance's walsender holds the
// slot: an instance that lost the slot (or never had it) cannot mark rows or
// move the checkpoint under the new holder (G9).
func TestFencedStoreWritesOnlyForTheSlotHolder(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	srv := pgtest.Shared(t)
	url := srv.NewDatabase(t)
	conn, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	_, err = migrations.Migrate(ctx, conn, migrations.Options{Schema: "public", Table: "domain_event", Publication: "outboxd"})
	require.NoError(t, err)
	const slot = "fence_test"
	_, err = conn.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, slot)
	require.NoError(t, err)
	t.Cleanup(func() { _, _ = conn.Exec(context.Background(), `SELECT pg_drop_replication_slot($1)`, slot) })
	var id int64
	require.NoError(t, conn.QueryRow(ctx, `INSERT INTO domain_event (event_name) VALUES ('x') RETURNING id`).Scan(&id))

	pool, err := pgxpool.New(ctx, url)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	store := checkpoint.NewStore(pool, checkpoint.StoreConfig{Schema: "public", Table: "domain_event", Slot: slot})
	batch := checkpoint.Batch{Marks: []checkpoint.Range{{Lo: id, Hi: id, Attempts: 1}}}
	for _, pid := range []uint32{0, 4242} { // no walsender; a walsender that is not the slot's
		store.SetFence(func() uint32 { return pid })
		err := store.Write(ctx, batch)
		require.True(t, errors.Is(err, checkpoint.ErrNotLeader), "pid %d: %v", pid, err)
		err = store.Delivered(ctx, "webhook", id, 1)
		require.True(t, errors.Is(err, checkpoint.ErrNotLeader), "parked-delivery writes are fenced too: %v", err)
	}
	var processed bool
	require.NoError(t, conn.QueryRow(ctx, `SELECT is_processed FROM domain_event WHERE id = $1`, id).Scan(&processed))
	require.False(t, processed, "a refused write marks nothing")
}
