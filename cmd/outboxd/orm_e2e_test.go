package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// A domain_event table an ORM made (integer ids, json properties, extra
// columns, no outboxd columns) is migrated and its rows are delivered with
// their database types kept and the extra columns left out.
func TestORMTableIsMigratedAndDelivered(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		srv := pgtest.Shared(t)
		url := srv.NewDatabase(t)
		pool := e2e.Pool(t, url)
		ctx := context.Background()
		_, err := pool.Exec(ctx, `CREATE TABLE domain_event (
  id serial PRIMARY KEY, event_name varchar(100) NOT NULL, occurred_at timestamptz NOT NULL DEFAULT now(),
  organization_id integer, user_id integer, entity_type text, entity_id text, properties json NOT NULL DEFAULT '{}',
  legacy_flag text, created_by text)`)
		require.NoError(t, err)
		recv := e2e.NewReceiver(t)
		env := e2e.Env(url, e2e.SlotName(url), recv.URL, nil)
		code, out := e2e.RunCommand(t, env, "migrate")
		require.Equal(t, 0, code, out)
		code, out = e2e.RunCommand(t, env, "migrate")
		require.Equal(t, 0, code, "migrate is idempotent: %s", out)

		d := e2e.StartDaemon(t, env)
		var id int64
		require.NoError(t, pool.QueryRow(ctx, `INSERT INTO domain_event (event_name, organization_id, user_id, entity_type, entity_id, properties, legacy_flag)
VALUES ('recipe_created', 7, 3, 'recipe', 'R-1', '{"name": "Sourdough", "steps": [1, 2]}', 'x') RETURNING id`).Scan(&id))
		recv.WaitAccepted(t, []int64{id}, time.Minute)
		var env2 map[string]any
		require.NoError(t, json.Unmarshal(recv.Deliveries()[0].Body, &env2))
		require.Equal(t, float64(id), env2["id"])
		require.Equal(t, float64(7), env2["organization_id"])
		require.Equal(t, map[string]any{"name": "Sourdough", "steps": []any{float64(1), float64(2)}}, env2["properties"])
		require.Nil(t, env2["correlation_id"], "a missing optional column is null")
		require.Nil(t, env2["schema_version"], "migrate adds only the bookkeeping columns")
		require.NotContains(t, env2, "legacy_flag")
		e2e.WaitFor(t, time.Minute, func() bool {
			var p bool
			require.NoError(t, pool.QueryRow(ctx, `SELECT is_processed FROM domain_event WHERE id = $1`, id).Scan(&p))
			return p
		}, func() string { return "row not marked" })
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// sqlalchemyOutbox is the table SQLAlchemy's create_all makes for the
// product's DomainEvent model: Integer id, JSON properties, DateTime without
// zone, an integer entity_id, and status columns that are nullable with
// Python-side defaults only, so that rows written by other languages' plain
// INSERTs carry NULL in them.
const sqlalchemyOutbox = `CREATE TABLE domain_event (
  id SERIAL NOT NULL,
  event_name VARCHAR(100) NOT NULL,
  occurred_at TIMESTAMP WITHOUT TIME ZONE NOT NULL,
  organization_id INTEGER,
  user_id INTEGER,
  entity_type VARCHAR(50),
  entity_id INTEGER,
  correlation_id VARCHAR(64),
  source VARCHAR(50),
  schema_version INTEGER,
  properties JSON,
  is_processed BOOLEAN,
  processed_at TIMESTAMP WITHOUT TIME ZONE,
  delivery_attempts INTEGER,
  PRIMARY KEY (id)
)`

// G10: an ORM's table works as it is. Rows whose is_processed and
// delivery_attempts are NULL are unprocessed with 0 attempts: the catch-up
// reads them, status counts them, and marking leaves them processed with
// delivery_attempts 1 (not NULL). outboxd_emit works with the table's own
// column types (an integer entity_id given as text).
func TestORMNullStatusColumnsAreUnprocessed(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundleWith(t, pgtest.Shared(t), nil, sqlalchemyOutbox)
		ctx := context.Background()
		insert := func() int64 {
			var id int64
			require.NoError(t, b.pool.QueryRow(ctx, `INSERT INTO domain_event (event_name, occurred_at, organization_id, entity_type, entity_id, properties)
VALUES ('inventory_adjusted', now() AT TIME ZONE 'UTC', 7, 'sku', 700, '{"delta": -3}') RETURNING id`).Scan(&id))
			return id
		}
		before := []int64{insert(), insert()}
		var nulls int
		require.NoError(t, b.pool.QueryRow(ctx, `SELECT count(*) FROM domain_event WHERE is_processed IS NULL AND delivery_attempts IS NULL`).Scan(&nulls))
		require.Equal(t, 2, nulls, "the table keeps its nullable status columns")

		code, out := e2e.RunCommand(t, b.env, "status", "--json")
		var st struct {
			Backlog struct {
				UnprocessedRows *int64 `json:"unprocessed_rows"`
			} `json:"backlog"`
		}
		// stdout's JSON, then stderr's summary line.
		require.NoError(t, json.NewDecoder(strings.NewReader(out[strings.Index(out, "{"):])).Decode(&st), "exit %d: %s", code, out)
		require.NotNil(t, st.Backlog.UnprocessedRows, out)
		require.EqualValues(t, 2, *st.Backlog.UnprocessedRows, "NULL is_processed is unprocessed")

		d := e2e.StartDaemon(t, b.env)
		var emitted int64
		require.NoError(t, b.pool.QueryRow(ctx, `SELECT outboxd_emit('sku_created', 7, '{"sku": "SKU-700"}', entity_type => 'sku', entity_id => '700')`).Scan(&emitted))
		all := append(before, insert(), emitted)
		b.recv.WaitAccepted(t, all, time.Minute)
		b.waitProcessed(t, int64(len(all)), time.Minute)
		rows, attempts := e2e.Processed(t, b.pool)
		require.EqualValues(t, len(all), rows)
		require.EqualValues(t, len(all), attempts, "delivery_attempts counted from 0, not left NULL")
		var nullAttempts int
		require.NoError(t, b.pool.QueryRow(ctx, `SELECT count(*) FROM domain_event WHERE delivery_attempts IS NULL OR processed_at IS NULL`).Scan(&nullAttempts))
		require.Zero(t, nullAttempts)
		var entityID any
		for _, dl := range b.recv.Deliveries() {
			if len(dl.IDs) == 1 && dl.IDs[0] == emitted {
				var env map[string]any
				require.NoError(t, json.Unmarshal(dl.Body, &env))
				entityID = env["entity_id"]
			}
		}
		require.Equal(t, float64(700), entityID, "the integer column keeps its type")
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}
