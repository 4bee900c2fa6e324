package main

import (
	"context"
	"encoding/json"
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
}
