// Package psql_test runs examples/psql/emit.sql with psql against the test
// Postgres and checks the rows it writes.
package psql_test

import (
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/migrations"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// psql finds the psql next to the server binaries, else on PATH.
func psql(t *testing.T, s *pgtest.Server) string {
	t.Helper()
	if dir := s.BinDir(); dir != "" {
		p := filepath.Join(dir, "psql")
		if _, err := exec.LookPath(p); err == nil {
			return p
		}
	}
	p, err := exec.LookPath("psql")
	require.NoError(t, err, "the SQL example runs with psql: install the PostgreSQL client")
	return p
}

// emit.sql, run twice, commits two batches, each with its batch_started
// (outboxd_emit) and batch_completed (plain INSERT) event carrying the batch
// id the business row got.
func TestEmitSQL(t *testing.T) {
	t.Parallel()
	s := pgtest.Shared(t)
	url := s.NewDatabase(t)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close(context.Background()) })
	_, err = migrations.Migrate(ctx, conn, migrations.Options{})
	require.NoError(t, err)

	for range 2 {
		out, err := exec.Command(psql(t, s), url, "-X", "-v", "ON_ERROR_STOP=1", "-f", "emit.sql").CombinedOutput()
		require.NoError(t, err, "%s", out)
		require.Contains(t, string(out), "batch_started_event_id")
		require.Contains(t, string(out), "batch_completed_event_id")
	}

	rows, err := conn.Query(ctx, `SELECT b.id, b.produced_units, e.event_name, e.organization_id, e.user_id,
  e.entity_type, e.entity_id, e.correlation_id, e.source, e.properties, e.is_processed
FROM domain_event e JOIN example_batch b ON b.id = e.entity_id ORDER BY e.id`)
	require.NoError(t, err)
	type row struct {
		batch                                    string
		produced                                 int
		name, entityType, entityID, corr, source string
		org, user                                int64
		props                                    []byte
		processed                                bool
	}
	var got []row
	for rows.Next() {
		var r row
		require.NoError(t, rows.Scan(&r.batch, &r.produced, &r.name, &r.org, &r.user, &r.entityType, &r.entityID,
			&r.corr, &r.source, &r.props, &r.processed))
		got = append(got, r)
	}
	require.NoError(t, rows.Err())
	require.Len(t, got, 4)
	require.NotEqual(t, got[0].batch, got[2].batch, "each run starts a new batch")
	for i, r := range got {
		want := []string{"batch_started", "batch_completed"}[i%2]
		require.Equal(t, want, r.name)
		require.EqualValues(t, 7, r.org)
		require.EqualValues(t, 3, r.user)
		require.Equal(t, "batch", r.entityType)
		require.Equal(t, "batch-"+r.batch, r.corr)
		require.Equal(t, "psql-example", r.source)
		require.Equal(t, 114, r.produced)
		require.False(t, r.processed)
		var props map[string]any
		require.NoError(t, json.Unmarshal(r.props, &props))
		require.Equal(t, r.batch, props["batch_id"])
		require.Equal(t, "SKU-SD-800", props["sku"])
		if want == "batch_completed" {
			require.EqualValues(t, 114, props["produced_units"])
		}
	}
}
