package store_test

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/store"
)

// The slot's row reads the same over a pool and over a replication
// connection (simple protocol); a missing slot is nil, with the WAL
// position still read.
func TestReadSlotOverBothProtocols(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := pgtest.NewMigrated(t)
	const name = "read_slot_test"

	none, current, err := store.ReadSlot(ctx, db.Pool, name)
	require.NoError(t, err)
	require.Nil(t, none)
	require.NotZero(t, current)

	_, err = db.Pool.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, name)
	require.NoError(t, err)
	t.Cleanup(func() { _, _ = db.Pool.Exec(context.Background(), `SELECT pg_drop_replication_slot($1)`, name) })

	viaPool, _, err := store.ReadSlot(ctx, db.Pool, name)
	require.NoError(t, err)
	require.NotNil(t, viaPool)
	require.Equal(t, "pgoutput", viaPool.Plugin)
	require.True(t, viaPool.SameDatabase)
	require.False(t, viaPool.Active)
	require.Zero(t, viaPool.ActivePID)
	require.NotNil(t, viaPool.ConfirmedFlush)
	require.NotNil(t, viaPool.RestartLSN)
	require.NotZero(t, viaPool.Confirmed())

	conn, err := pgconn.Connect(ctx, db.URL+"&replication=database")
	require.NoError(t, err)
	defer conn.Close(ctx)
	viaRepl, _, err := store.ReadSlotSimple(ctx, conn, name)
	require.NoError(t, err)
	viaRepl.CurrentLSN = viaPool.CurrentLSN // read at another moment
	require.Equal(t, viaPool, viaRepl)

	missing, _, err := store.ReadSlotSimple(ctx, conn, "no_such_slot")
	require.NoError(t, err)
	require.Nil(t, missing)
}
