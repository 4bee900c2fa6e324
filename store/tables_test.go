package store_test

import (
	"context"
	"errors"
	"testing"

	"github.com/jackc/pglogrepl"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/store"
)

// The operator statements on a checkpoint row: absent, saved, marked for a
// catch-up, moved only forward, deleted.
func TestTablesCheckpointRow(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := pgtest.NewMigrated(t)
	tables := store.On(db.Pool, "public", "domain_event")
	const slot = "tables_test"

	_, err := tables.ReadCheckpoint(ctx, slot)
	require.True(t, errors.Is(err, store.ErrNoCheckpoint), "%v", err)
	changed, err := tables.MarkCatchupPending(ctx, slot)
	require.NoError(t, err)
	require.False(t, changed, "no checkpoint to mark")

	ss := store.NewSlotStore(db.Pool, store.SlotConfig{Schema: "public", Table: "domain_event", Slot: slot})
	require.NoError(t, ss.Save(ctx, store.Checkpoint{LSN: 0x100, SystemID: "42", Timeline: 1}))
	cp, err := tables.ReadCheckpoint(ctx, slot)
	require.NoError(t, err)
	require.Equal(t, pglogrepl.LSN(0x100), cp.LSN)
	require.Equal(t, "42", cp.SystemID)
	require.False(t, cp.CatchupPending)

	changed, err = tables.MarkCatchupPending(ctx, slot)
	require.NoError(t, err)
	require.True(t, changed)
	pending, err := tables.CatchupPending(ctx, slot)
	require.NoError(t, err)
	require.True(t, pending)

	moved, err := tables.AdvanceCheckpoint(ctx, slot, 0x80)
	require.NoError(t, err)
	require.True(t, moved)
	cp, err = tables.ReadCheckpoint(ctx, slot)
	require.NoError(t, err)
	require.Equal(t, pglogrepl.LSN(0x100), cp.LSN, "a checkpoint never moves back")

	deleted, err := tables.DeleteCheckpoint(ctx, slot)
	require.NoError(t, err)
	require.True(t, deleted)
	has, err := tables.HasCheckpoint(ctx, slot)
	require.NoError(t, err)
	require.False(t, has)
}

// A dead-lettered row is not pending; revived, it is parked and still not
// pending; purged, it is pending again (a later catch-up delivers it).
func TestTablesDeadLetters(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := pgtest.NewMigrated(t)
	tables := store.On(db.Pool, "public", "domain_event")
	var id int64
	require.NoError(t, db.Conn.QueryRow(ctx, `INSERT INTO domain_event (event_name, organization_id) VALUES ('x', 7) RETURNING id`).Scan(&id))
	countPending := func() int64 {
		n, err := tables.CountPending(ctx, store.All)
		require.NoError(t, err)
		return n
	}
	require.Equal(t, int64(1), countPending())

	ss := store.NewSlotStore(db.Pool, store.SlotConfig{Schema: "public", Table: "domain_event", Slot: "dead_test"})
	require.NoError(t, ss.Write(ctx, store.Batch{Dead: []store.DeadLetter{{EventID: id, Sink: "webhook", Status: 400, Reason: "bad", Attempts: 2}}}))
	require.Equal(t, int64(0), countPending())

	org := int64(7)
	rows, err := tables.DeadLetters(ctx, store.DeadLetterFilter{Sink: "webhook", OrganizationID: &org})
	require.NoError(t, err)
	require.Len(t, rows, 1)
	require.Equal(t, id, rows[0].EventID)
	require.Equal(t, "x", *rows[0].EventName)
	other := int64(8)
	rows, err = tables.DeadLetters(ctx, store.DeadLetterFilter{OrganizationID: &other})
	require.NoError(t, err)
	require.Empty(t, rows)

	all, err := tables.DeadLetters(ctx, store.DeadLetterFilter{})
	require.NoError(t, err)
	ids := []int64{all[0].ID}
	unknown, err := tables.UnknownTargets(ctx, ids, []string{"webhook"})
	require.NoError(t, err)
	require.Empty(t, unknown)
	unknown, err = tables.UnknownTargets(ctx, ids, []string{"kafka", "posthog"})
	require.NoError(t, err)
	require.Equal(t, []string{"webhook"}, unknown)

	n, err := tables.ReviveDeadLetters(ctx, ids)
	require.NoError(t, err)
	require.Equal(t, int64(1), n)
	parked, err := tables.Count(ctx, store.ParkedTable)
	require.NoError(t, err)
	require.Equal(t, int64(1), parked)
	require.Equal(t, int64(0), countPending(), "a parked row is not pending")
	n, err = tables.CountPending(ctx, store.Scope{DeadLetters: true})
	require.NoError(t, err)
	require.Equal(t, int64(1), n, "outside the parked scope it is")

	_, err = db.Conn.Exec(ctx, `DELETE FROM outboxd_parked`)
	require.NoError(t, err)
	require.NoError(t, ss.Write(ctx, store.Batch{Dead: []store.DeadLetter{{EventID: id, Sink: "webhook", Reason: "bad"}}}))
	all, err = tables.DeadLetters(ctx, store.DeadLetterFilter{})
	require.NoError(t, err)
	n, err = tables.PurgeDeadLetters(ctx, []int64{all[0].ID})
	require.NoError(t, err)
	require.Equal(t, int64(1), n)
	require.Equal(t, int64(1), countPending())
}
