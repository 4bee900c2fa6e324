package ops

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/migrations"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// bundle is a migrated database of its own, a client on it and a pool for
// the test's own SQL.
type bundle struct {
	url    string
	target Target
	client *Client
	pool   *pgxpool.Pool
}

func setup(t *testing.T) *bundle {
	t.Helper()
	ctx := context.Background()
	url := pgtest.Shared(t).NewDatabase(t)
	conn, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	_, err = migrations.Migrate(ctx, conn, migrations.Options{})
	require.NoError(t, err)
	require.NoError(t, conn.Close(ctx))
	b := &bundle{url: url, pool: e2e.Pool(t, url)}
	b.target = Target{DatabaseURL: url, Table: decode.Table{Schema: "public", Name: "domain_event"}, Slot: e2e.SlotName(url), Publication: "outboxd"}
	b.client, err = Open(ctx, b.target, zerolog.Nop())
	require.NoError(t, err)
	t.Cleanup(b.client.Close)
	return b
}

func (b *bundle) exec(t *testing.T, sql string, args ...any) {
	t.Helper()
	_, err := b.pool.Exec(context.Background(), sql, args...)
	require.NoError(t, err)
}

func (b *bundle) int(t *testing.T, sql string, args ...any) int64 {
	t.Helper()
	var n int64
	require.NoError(t, b.pool.QueryRow(context.Background(), sql, args...).Scan(&n))
	return n
}

// insert adds n rows of one event name and organization and returns their ids.
func (b *bundle) insert(t *testing.T, n int, name string, org int64, occurred time.Time) []int64 {
	t.Helper()
	rows, err := b.pool.Query(context.Background(), `INSERT INTO domain_event (event_name, organization_id, occurred_at, properties)
SELECT $1, $2, $3, jsonb_build_object('i', i) FROM generate_series(1, $4) AS i ORDER BY i RETURNING id`, name, org, occurred, n)
	require.NoError(t, err)
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(t, err)
	return ids
}

type slotState struct {
	exists    bool
	active    bool
	confirmed pglogrepl.LSN
}

func (b *bundle) slot(t *testing.T) slotState {
	t.Helper()
	var s slotState
	err := b.pool.QueryRow(context.Background(), `SELECT active, coalesce(confirmed_flush_lsn, '0/0') FROM pg_replication_slots WHERE slot_name = $1`, b.target.Slot).
		Scan(&s.active, &s.confirmed)
	if err == pgx.ErrNoRows {
		return s
	}
	require.NoError(t, err)
	s.exists = true
	return s
}

type cpState struct {
	exists  bool
	lsn     pglogrepl.LSN
	sysID   string
	pending bool
}

func (b *bundle) checkpoint(t *testing.T) cpState {
	t.Helper()
	var c cpState
	err := b.pool.QueryRow(context.Background(), `SELECT lsn, system_identifier, catchup_pending FROM outboxd_checkpoint WHERE slot_name = $1`, b.target.Slot).
		Scan(&c.lsn, &c.sysID, &c.pending)
	if err == pgx.ErrNoRows {
		return c
	}
	require.NoError(t, err)
	c.exists = true
	return c
}

// hold makes the slot active by streaming from it on a replication
// connection of the test's own, as an outboxd instance would.
func (b *bundle) hold(t *testing.T) *pgconn.PgConn {
	t.Helper()
	ctx := context.Background()
	cfg, err := pgconn.ParseConfig(b.url)
	require.NoError(t, err)
	cfg.RuntimeParams["replication"] = "database"
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close(context.Background()) }) //nolint:errcheck // may be terminated already
	require.NoError(t, pglogrepl.StartReplication(ctx, conn, b.target.Slot, 0, pglogrepl.StartReplicationOptions{
		PluginArgs: []string{"proto_version '1'", "publication_names 'outboxd'"},
	}))
	e2e.WaitFor(t, 10*time.Second, func() bool { return b.slot(t).active }, func() string { return "slot not active" })
	return conn
}

func (b *bundle) currentLSN(t *testing.T) pglogrepl.LSN {
	t.Helper()
	var l pglogrepl.LSN
	require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT pg_current_wal_lsn()`).Scan(&l))
	return l
}
