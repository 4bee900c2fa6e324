package main

import (
	"bytes"
	"context"
	"encoding/json"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/migrations"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// setup gives a test a migrated database of its own with the example tables.
func setup(t *testing.T) (string, *pgx.Conn) {
	t.Helper()
	url := pgtest.Shared(t).NewDatabase(t)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close(context.Background()) })
	_, err = migrations.Migrate(ctx, conn, migrations.Options{})
	require.NoError(t, err)
	_, err = conn.Exec(ctx, Schema)
	require.NoError(t, err)
	return url, conn
}

type eventRow struct {
	Name, EntityType, EntityID, Source string
	Org, User                          int64
	Correlation                        *string
	Props                              map[string]any
	Processed                          bool
}

func loadEvent(t *testing.T, conn *pgx.Conn, id int64) eventRow {
	t.Helper()
	var e eventRow
	var props []byte
	require.NoError(t, conn.QueryRow(context.Background(), `SELECT event_name, organization_id, user_id, entity_type,
  entity_id, correlation_id, source, properties, is_processed FROM domain_event WHERE id = $1`, id).
		Scan(&e.Name, &e.Org, &e.User, &e.EntityType, &e.EntityID, &e.Correlation, &e.Source, &props, &e.Processed))
	require.NoError(t, json.Unmarshal(props, &e.Props))
	return e
}

func countEvents(t *testing.T, conn *pgx.Conn) int {
	t.Helper()
	var n int
	require.NoError(t, conn.QueryRow(context.Background(), `SELECT count(*) FROM domain_event`).Scan(&n))
	return n
}

// StartBatch commits the batch and its batch_started event together; a
// failing business write (the batch exists already) leaves no event.
func TestStartBatchWritesBatchAndEventTogether(t *testing.T) {
	t.Parallel()
	_, conn := setup(t)
	ctx := context.Background()
	id, err := StartBatch(ctx, conn, Batch{ID: "B-19", OrganizationID: 7, UserID: 3, SKU: "SKU-SD-800", PlannedUnits: 120})
	require.NoError(t, err)

	var planned int
	require.NoError(t, conn.QueryRow(ctx, `SELECT planned_units FROM example_batch WHERE id = 'B-19'`).Scan(&planned))
	require.Equal(t, 120, planned)
	e := loadEvent(t, conn, id)
	require.Equal(t, "batch_started", e.Name)
	require.EqualValues(t, 7, e.Org)
	require.EqualValues(t, 3, e.User)
	require.Equal(t, "batch", e.EntityType)
	require.Equal(t, "B-19", e.EntityID)
	require.Equal(t, "batch-B-19", *e.Correlation)
	require.Equal(t, "go-example", e.Source)
	require.Equal(t, map[string]any{"batch_id": "B-19", "sku": "SKU-SD-800", "planned_units": float64(120)}, e.Props)
	require.False(t, e.Processed, "outboxd marks it once delivered")

	_, err = StartBatch(ctx, conn, Batch{ID: "B-19", OrganizationID: 7, UserID: 3, SKU: "SKU-SD-800", PlannedUnits: 1})
	require.Error(t, err, "duplicate batch")
	require.Equal(t, 1, countEvents(t, conn), "no event without its business write")
}

// AdjustInventory changes stock and emits inventory_adjusted through
// outboxd_emit in one transaction; stock going negative or an unknown SKU
// commit neither.
func TestAdjustInventoryEmitsWithTheHelper(t *testing.T) {
	t.Parallel()
	_, conn := setup(t)
	ctx := context.Background()
	_, err := conn.Exec(ctx, `INSERT INTO example_inventory VALUES (7, 'SKU-1', 10)`)
	require.NoError(t, err)

	id, err := AdjustInventory(ctx, conn, Adjustment{OrganizationID: 7, UserID: 3, SKU: "SKU-1", Delta: -3, Reason: "sale"})
	require.NoError(t, err)
	e := loadEvent(t, conn, id)
	require.Equal(t, "inventory_adjusted", e.Name)
	require.EqualValues(t, 7, e.Org)
	require.Equal(t, "sku", e.EntityType)
	require.Equal(t, "SKU-1", e.EntityID)
	require.Nil(t, e.Correlation)
	require.Equal(t, map[string]any{"sku": "SKU-1", "delta": float64(-3), "reason": "sale", "on_hand": float64(7)}, e.Props)

	_, err = AdjustInventory(ctx, conn, Adjustment{OrganizationID: 7, UserID: 3, SKU: "SKU-1", Delta: -8, Reason: "sale"})
	require.Error(t, err, "stock would go negative")
	_, err = AdjustInventory(ctx, conn, Adjustment{OrganizationID: 8, UserID: 3, SKU: "SKU-1", Delta: 1, Reason: "count"})
	require.ErrorIs(t, err, ErrUnknownSKU)
	var onHand int
	require.NoError(t, conn.QueryRow(ctx, `SELECT on_hand FROM example_inventory WHERE sku = 'SKU-1'`).Scan(&onHand))
	require.Equal(t, 7, onHand)
	require.Equal(t, 1, countEvents(t, conn), "failed adjustments emitted nothing")
}

// The program itself runs twice against the same database.
func TestRunTwice(t *testing.T) {
	t.Parallel()
	url, conn := setup(t)
	for range 2 {
		var out bytes.Buffer
		require.NoError(t, run(context.Background(), url, &out))
		require.Contains(t, out.String(), "(batch_started)")
		require.Contains(t, out.String(), "(inventory_adjusted)")
	}
	require.Equal(t, 4, countEvents(t, conn))
	require.Error(t, run(context.Background(), "", &bytes.Buffer{}))
}
