package migrations_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/migrations"
	"github.com/outboxd/outboxd/store"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

type bundle struct {
	ctx    context.Context
	server *pgtest.Server
	dbURL  string
	conn   *pgx.Conn
}

// setup gives each test a database of its own and a connection to it.
func setup(t *testing.T) *bundle {
	t.Helper()
	s := pgtest.Shared(t)
	b := &bundle{ctx: context.Background(), server: s, dbURL: s.NewDatabase(t)}
	b.conn = connect(t, b.dbURL)
	return b
}

func connect(t *testing.T, dbURL string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), dbURL)
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}

func (b *bundle) exec(t *testing.T, sql string, args ...any) {
	t.Helper()
	_, err := b.conn.Exec(b.ctx, sql, args...)
	require.NoError(t, err, sql)
}

// columns returns name → type of a table's columns.
func (b *bundle) columns(t *testing.T, schema, table string) map[string]string {
	t.Helper()
	rows, err := b.conn.Query(b.ctx, `SELECT a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped`, schema, table)
	require.NoError(t, err)
	cols := map[string]string{}
	for rows.Next() {
		var name, typ string
		require.NoError(t, rows.Scan(&name, &typ))
		cols[name] = typ
	}
	require.NoError(t, rows.Err())
	return cols
}

type pubFlags struct{ insert, update, delete, truncate bool }

func (b *bundle) publication(t *testing.T, pub string) pubFlags {
	t.Helper()
	var f pubFlags
	require.NoError(t, b.conn.QueryRow(b.ctx,
		"SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = $1", pub).
		Scan(&f.insert, &f.update, &f.delete, &f.truncate))
	return f
}

func (b *bundle) publishedTables(t *testing.T, pub string) []string {
	t.Helper()
	rows, err := b.conn.Query(b.ctx, "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1", pub)
	require.NoError(t, err)
	tables, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	return tables
}

func TestOptionsValidate(t *testing.T) {
	t.Parallel()
	var o migrations.Options
	require.NoError(t, o.Validate())
	require.Equal(t, migrations.Options{}, o, "Validate changes nothing")
	o = o.WithDefaults()
	require.NoError(t, o.Validate())
	require.Equal(t, migrations.Options{Schema: "public", Table: "domain_event", Publication: "outboxd"}, o)

	ok := migrations.Options{Schema: `My "Schema"`, Table: "Events.v2 ü", Publication: "pub-1"}
	require.NoError(t, ok.Validate())

	for _, bad := range []migrations.Options{
		{Table: strings.Repeat("x", 64)},
		{Schema: "a\nb"},
		{Publication: "bad\x00"},
		{Table: "\xff"},
		{Table: "outboxd_checkpoint"},
		{Table: "x$outboxd$y"},
	} {
		require.Error(t, bad.Validate(), "%+v", bad)
	}
}

func TestMigrateFresh(t *testing.T) {
	t.Parallel()
	b := setup(t)

	res, err := migrations.Migrate(b.ctx, b.conn, migrations.Options{})
	require.NoError(t, err)
	require.Equal(t, migrations.Result{
		FromVersion: 0, ToVersion: migrations.LatestVersion(),
		TableCreated: true, PublicationCreated: true,
	}, res)
	require.True(t, res.Changed())

	require.Equal(t, map[string]string{
		"id": "bigint", "event_name": "text", "occurred_at": "timestamp with time zone",
		"organization_id": "bigint", "user_id": "bigint", "entity_type": "text", "entity_id": "text",
		"correlation_id": "text", "source": "text", "schema_version": "integer", "properties": "jsonb",
		"is_processed": "boolean", "processed_at": "timestamp with time zone", "delivery_attempts": "integer",
	}, b.columns(t, "public", "domain_event"))
	require.Equal(t, map[string]string{
		"slot_name": "text", "lsn": "pg_lsn", "system_identifier": "text", "timeline": "integer",
		"catchup_pending": "boolean", "updated_at": "timestamp with time zone", "routing": "jsonb",
		"confirms_recorded": "boolean", "write_token": "text",
	}, b.columns(t, "public", "outboxd_checkpoint"))
	require.Equal(t, map[string]string{
		"singleton": "boolean", "namespace": "text", "created_at": "timestamp with time zone",
	}, b.columns(t, "public", "outboxd_outbox"))
	require.Equal(t, map[string]string{
		"id": "bigint", "event_id": "bigint", "sink": "text", "last_status": "integer",
		"last_error": "text", "attempts": "integer", "dead_at": "timestamp with time zone",
	}, b.columns(t, "public", "outboxd_dead_letter"))

	// Identity by default, and no index but the primary key (no partial
	// index on unprocessed rows: it would make marking non-HOT).
	var identity string
	require.NoError(t, b.conn.QueryRow(b.ctx, "SELECT attidentity::text FROM pg_attribute WHERE attrelid = 'public.domain_event'::regclass AND attname = 'id'").Scan(&identity))
	require.Equal(t, "d", identity)
	var indexes []string
	rows, err := b.conn.Query(b.ctx, "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND tablename = 'domain_event'")
	require.NoError(t, err)
	indexes, err = pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	require.Equal(t, []string{"domain_event_pkey"}, indexes)

	require.Equal(t, pubFlags{insert: true}, b.publication(t, "outboxd"))
	require.Equal(t, []string{"public.domain_event"}, b.publishedTables(t, "outboxd"))
	require.NoError(t, migrations.Check(b.ctx, b.conn, migrations.Options{}))

	again, err := migrations.Migrate(b.ctx, b.conn, migrations.Options{})
	require.NoError(t, err)
	require.Equal(t, migrations.Result{FromVersion: migrations.LatestVersion(), ToVersion: migrations.LatestVersion()}, again)
	require.False(t, again.Changed())
}

func TestEmit(t *testing.T) {
	t.Parallel()
	b := setup(t)
	_, err := migrations.Migrate(b.ctx, b.conn, migrations.Options{})
	require.NoError(t, err)

	var id int64
	require.NoError(t, b.conn.QueryRow(b.ctx,
		`SELECT outboxd_emit('batch_started', 7, '{"batch": "B-19"}', user_id => 3, entity_type => 'batch', entity_id => 'B-19')`).Scan(&id))
	require.Positive(t, id)
	var second int64
	require.NoError(t, b.conn.QueryRow(b.ctx, `SELECT outboxd_emit('ping', NULL, NULL)`).Scan(&second))
	require.Greater(t, second, id)

	var (
		name, props, entityType string
		org, user               *int64
		processed               bool
		attempts                int
	)
	require.NoError(t, b.conn.QueryRow(b.ctx,
		"SELECT event_name, organization_id, user_id, entity_type, properties::text, is_processed, delivery_attempts FROM domain_event WHERE id = $1", id).
		Scan(&name, &org, &user, &entityType, &props, &processed, &attempts))
	require.Equal(t, "batch_started", name)
	require.Equal(t, int64(7), *org)
	require.Equal(t, int64(3), *user)
	require.Equal(t, "batch", entityType)
	require.JSONEq(t, `{"batch": "B-19"}`, props)
	require.False(t, processed)
	require.Zero(t, attempts)

	require.NoError(t, b.conn.QueryRow(b.ctx, "SELECT properties::text FROM domain_event WHERE id = $1", second).Scan(&props))
	require.Equal(t, "{}", props, "NULL properties become {}")
}

func TestMigrateORMTable(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.exec(t, `CREATE TABLE domain_event (id integer PRIMARY KEY, event_name text, properties json, legacy_flag text, created_by text);
INSERT INTO domain_event VALUES (1, 'legacy', '{"a": 1}', 'y', 'orm')`)

	res, err := migrations.Migrate(b.ctx, b.conn, migrations.Options{})
	require.NoError(t, err)
	require.Equal(t, migrations.Result{
		FromVersion: 0, ToVersion: migrations.LatestVersion(),
		ColumnsAdded:       []string{"is_processed", "processed_at", "delivery_attempts"},
		PublicationCreated: true,
	}, res)

	// The ORM's columns and types are left alone; only the bookkeeping is new.
	require.Equal(t, map[string]string{
		"id": "integer", "event_name": "text", "properties": "json", "legacy_flag": "text", "created_by": "text",
		"is_processed": "boolean", "processed_at": "timestamp with time zone", "delivery_attempts": "integer",
	}, b.columns(t, "public", "domain_event"))
	var processed bool
	var attempts int
	require.NoError(t, b.conn.QueryRow(b.ctx, "SELECT is_processed, delivery_attempts FROM domain_event WHERE id = 1").Scan(&processed, &attempts))
	require.False(t, processed, "existing rows get the defaults")
	require.Zero(t, attempts)

	require.Equal(t, []string{"public.domain_event"}, b.publishedTables(t, "outboxd"))
	require.Equal(t, pubFlags{insert: true}, b.publication(t, "outboxd"))
	require.NoError(t, migrations.Check(b.ctx, b.conn, migrations.Options{}))

	again, err := migrations.Migrate(b.ctx, b.conn, migrations.Options{})
	require.NoError(t, err)
	require.False(t, again.Changed(), "%+v", again)
}

func TestMigrateCustomNames(t *testing.T) {
	t.Parallel()
	b := setup(t)
	opts := migrations.Options{Schema: `Out "Box"`, Table: "Domain Event.v2", Publication: "Pub-Custom_1"}

	require.Error(t, migrations.Check(b.ctx, b.conn, opts))
	res, err := migrations.Migrate(b.ctx, b.conn, opts)
	require.NoError(t, err)
	require.Equal(t, migrations.Result{
		FromVersion: 0, ToVersion: migrations.LatestVersion(),
		SchemaCreated: true, TableCreated: true, PublicationCreated: true,
	}, res)
	require.NoError(t, migrations.Check(b.ctx, b.conn, opts))

	require.Contains(t, b.columns(t, opts.Schema, opts.Table), "is_processed")
	require.Contains(t, b.columns(t, opts.Schema, "outboxd_checkpoint"), "lsn")
	require.Contains(t, b.columns(t, opts.Schema, migrations.VersionTable), "version")
	require.Equal(t, []string{opts.Schema + "." + opts.Table}, b.publishedTables(t, opts.Publication))
	require.Equal(t, pubFlags{insert: true}, b.publication(t, opts.Publication))

	// Nothing landed in public.
	require.Empty(t, b.columns(t, "public", "domain_event"))
	require.Empty(t, b.columns(t, "public", migrations.VersionTable))

	var id int64
	require.NoError(t, b.conn.QueryRow(b.ctx,
		"SELECT "+pgx.Identifier{opts.Schema}.Sanitize()+".outboxd_emit('e', 1)").Scan(&id))
	var n int
	require.NoError(t, b.conn.QueryRow(b.ctx,
		"SELECT count(*) FROM "+pgx.Identifier{opts.Schema, opts.Table}.Sanitize()+" WHERE id = $1", id).Scan(&n))
	require.Equal(t, 1, n)

	again, err := migrations.Migrate(b.ctx, b.conn, opts)
	require.NoError(t, err)
	require.False(t, again.Changed(), "%+v", again)
}

func TestMigrateConcurrent(t *testing.T) {
	t.Parallel()
	b := setup(t)
	conns := []*pgx.Conn{connect(t, b.dbURL), connect(t, b.dbURL)}

	results := make([]migrations.Result, len(conns))
	errs := make([]error, len(conns))
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i, conn := range conns {
		wg.Go(func() {
			<-start
			results[i], errs[i] = migrations.Migrate(b.ctx, conn, migrations.Options{})
		})
	}
	close(start)
	wg.Wait()
	require.NoError(t, errors.Join(errs...))

	// The runs serialised: exactly one did the work, the other found it done.
	created := 0
	for _, r := range results {
		require.Equal(t, migrations.LatestVersion(), r.ToVersion)
		if r.TableCreated {
			created++
			require.True(t, r.PublicationCreated)
			require.Zero(t, r.FromVersion)
		} else {
			require.False(t, r.Changed(), "%+v", r)
		}
	}
	require.Equal(t, 1, created, "%+v", results)
	require.NoError(t, migrations.Check(b.ctx, b.conn, migrations.Options{}))
}

func TestCheck(t *testing.T) {
	t.Parallel()
	b := setup(t)
	opts := migrations.Options{}

	err := migrations.Check(b.ctx, b.conn, opts)
	var ce *migrations.CheckError
	require.ErrorAs(t, err, &ce)
	require.True(t, ce.NeedsMigrate)
	require.False(t, ce.NeedsGrant)
	msg := err.Error()
	for _, want := range []string{
		`table "public"."domain_event" does not exist`,
		`"public"."outboxd_checkpoint" does not exist`,
		`"public"."outboxd_dead_letter" does not exist`,
		`publication "outboxd" does not exist`,
		"run `outboxd migrate`",
	} {
		require.Contains(t, msg, want)
	}
	t.Logf("before migrate: %v", err)

	_, err = migrations.Migrate(b.ctx, b.conn, opts)
	require.NoError(t, err)
	require.NoError(t, migrations.Check(b.ctx, b.conn, opts))

	// A publication widened by hand is reported, and migrate narrows it.
	b.exec(t, "ALTER PUBLICATION outboxd SET (publish = 'insert, update, delete')")
	err = migrations.Check(b.ctx, b.conn, opts)
	require.ErrorContains(t, err, `publication "outboxd" also publishes update, delete`)
	res, err := migrations.Migrate(b.ctx, b.conn, opts)
	require.NoError(t, err)
	require.True(t, res.PublicationPublishChanged)
	require.False(t, res.TableAddedToPublication)
	require.Equal(t, pubFlags{insert: true}, b.publication(t, "outboxd"))

	// A publication without the table gets it back.
	b.exec(t, "ALTER PUBLICATION outboxd DROP TABLE domain_event")
	require.ErrorContains(t, migrations.Check(b.ctx, b.conn, opts), `publication "outboxd" does not include "public"."domain_event"`)
	res, err = migrations.Migrate(b.ctx, b.conn, opts)
	require.NoError(t, err)
	require.Equal(t, migrations.Result{FromVersion: migrations.LatestVersion(), ToVersion: migrations.LatestVersion(), TableAddedToPublication: true}, res)
	require.NoError(t, migrations.Check(b.ctx, b.conn, opts))

	// A row filter would silently lose events: reported, not "fixed".
	b.exec(t, "ALTER PUBLICATION outboxd SET TABLE domain_event WHERE (organization_id > 0)")
	err = migrations.Check(b.ctx, b.conn, opts)
	require.ErrorContains(t, err, "filters the rows")
	require.ErrorAs(t, err, &ce)
	require.False(t, ce.NeedsMigrate)
}

// Migration 5 makes the outbox's message namespace once: random, 16 hex
// digits, kept by every later migrate (a version reset included), another in
// another database.
func TestMessageNamespace(t *testing.T) {
	t.Parallel()
	b := setup(t)
	_, err := migrations.Namespace(b.ctx, b.conn, "public")
	require.ErrorContains(t, err, "run `outboxd migrate`")

	_, err = migrations.Migrate(b.ctx, b.conn, migrations.Options{})
	require.NoError(t, err)
	ns, err := migrations.Namespace(b.ctx, b.conn, "")
	require.NoError(t, err)
	require.Regexp(t, `^[0-9a-f]{16}$`, ns)

	_, err = migrations.Migrate(b.ctx, b.conn, migrations.Options{})
	require.NoError(t, err)
	b.exec(t, "UPDATE outboxd_schema_version SET version = 0")
	_, err = migrations.Migrate(b.ctx, b.conn, migrations.Options{})
	require.NoError(t, err)
	again, err := migrations.Namespace(b.ctx, b.conn, "public")
	require.NoError(t, err)
	require.Equal(t, ns, again, "made once, kept by later migrations")
	var rows int
	require.NoError(t, b.conn.QueryRow(b.ctx, "SELECT count(*) FROM outboxd_outbox").Scan(&rows))
	require.Equal(t, 1, rows)
	_, err = b.conn.Exec(b.ctx, "INSERT INTO outboxd_outbox (namespace) VALUES ('abc')")
	require.Error(t, err, "one row only")
	_, err = b.conn.Exec(b.ctx, "UPDATE outboxd_outbox SET namespace = 'Not_Valid'")
	require.Error(t, err, "the form is checked")

	other := setup(t)
	_, err = migrations.Migrate(other.ctx, other.conn, migrations.Options{Schema: "svc"})
	require.NoError(t, err)
	otherNS, err := migrations.Namespace(other.ctx, other.conn, "svc")
	require.NoError(t, err)
	require.NotEqual(t, ns, otherNS, "another outbox, another namespace")

	// Missing or edited into something else: named, not used.
	b.exec(t, "ALTER TABLE outboxd_outbox DROP CONSTRAINT outboxd_outbox_namespace_check")
	b.exec(t, "UPDATE outboxd_outbox SET namespace = 'a_b'")
	_, err = migrations.Namespace(b.ctx, b.conn, "public")
	require.ErrorContains(t, err, `message namespace "a_b"`)
	b.exec(t, "DELETE FROM outboxd_outbox")
	_, err = migrations.Namespace(b.ctx, b.conn, "public")
	require.ErrorContains(t, err, "has no message namespace: run `outboxd migrate`")
	b.exec(t, "DROP TABLE outboxd_outbox")
	require.ErrorContains(t, migrations.Check(b.ctx, b.conn, migrations.Options{}), `table "public"."outboxd_outbox" does not exist`)
}

// Migration 6 rewrites routing states written with the secrets themselves:
// fingerprints instead (the daemon's deliver.SecretFingerprint), every other
// key kept, states already without secrets untouched.
func TestMigrationRemovesSecretsFromRoutingState(t *testing.T) {
	t.Parallel()
	b := setup(t)
	_, err := migrations.Migrate(b.ctx, b.conn, migrations.Options{})
	require.NoError(t, err)
	b.exec(t, "UPDATE outboxd_schema_version SET version = 5")
	b.exec(t, `INSERT INTO outboxd_checkpoint (slot_name, lsn, system_identifier, timeline, catchup_pending, routing) VALUES
 ('a', '0/1', 'x', 1, false, '[{"id":3,"organization_id":7,"url":"https://a","secrets":["whsec_new","whsec_old"],"events":["batch_*"],"enabled":true},{"id":4,"organization_id":null,"url":"https://u:pw@b/h?token=t0k3n","secrets":[],"events":[],"enabled":false}]'),
 ('b', '0/1', 'x', 1, false, '[{"id":5,"url":"https://c","secret_fingerprints":["sha256:0011223344556677"],"events":[],"enabled":true}]'),
 ('c', '0/1', 'x', 1, false, NULL)`)
	_, err = migrations.Migrate(b.ctx, b.conn, migrations.Options{})
	require.NoError(t, err)

	var a, bb string
	var c *string
	require.NoError(t, b.conn.QueryRow(b.ctx, `SELECT (SELECT routing::text FROM outboxd_checkpoint WHERE slot_name = 'a'),
 (SELECT routing::text FROM outboxd_checkpoint WHERE slot_name = 'b'), (SELECT routing::text FROM outboxd_checkpoint WHERE slot_name = 'c')`).Scan(&a, &bb, &c))
	require.NotContains(t, a, "whsec_")
	var got []deliver.Subscription
	require.NoError(t, json.Unmarshal([]byte(a), &got))
	require.Len(t, got, 2)
	require.Equal(t, []string{deliver.SecretFingerprint("whsec_new"), deliver.SecretFingerprint("whsec_old")}, got[0].SecretFingerprints)
	require.Equal(t, "https://a", got[0].URL)
	require.Equal(t, []string{"batch_*"}, got[0].Events)
	require.True(t, got[0].Enabled)
	require.Empty(t, got[1].SecretFingerprints)
	require.NotContains(t, a, "t0k3n")
	require.Empty(t, got[1].URL)
	require.Equal(t, deliver.SecretFingerprint("https://u:pw@b/h?token=t0k3n"), got[1].URLFingerprint)
	require.Contains(t, bb, "sha256:0011223344556677", "a state without secrets is kept")
	require.Nil(t, c)
}

func TestMigrateNewerVersion(t *testing.T) {
	t.Parallel()
	b := setup(t)
	_, err := migrations.Migrate(b.ctx, b.conn, migrations.Options{})
	require.NoError(t, err)
	b.exec(t, "UPDATE outboxd_schema_version SET version = 99")

	_, err = migrations.Migrate(b.ctx, b.conn, migrations.Options{})
	require.ErrorContains(t, err, "upgrade outboxd")
	require.ErrorContains(t, migrations.Check(b.ctx, b.conn, migrations.Options{}), "upgrade outboxd")
}

func TestMigrateSecondTableInSchema(t *testing.T) {
	t.Parallel()
	b := setup(t)
	_, err := migrations.Migrate(b.ctx, b.conn, migrations.Options{})
	require.NoError(t, err)
	_, err = migrations.Migrate(b.ctx, b.conn, migrations.Options{Table: "other_event", Publication: "other"})
	require.ErrorContains(t, err, "one outbox table per schema")
}

func TestRoles(t *testing.T) {
	// The only test of this package that touches roles, which are
	// cluster-wide: safe in parallel with the others.
	t.Parallel()
	s := pgtest.Shared(t)
	if !s.Dedicated() {
		t.Skip("creates a cluster-wide role and logs in without a password: needs a server started by pgtest")
	}
	admin := s.AdminConn(t)
	ctx := context.Background()
	// Registered before NewDatabase so that it runs after the database, and
	// with it the role's privileges, is gone.
	t.Cleanup(func() {
		_, err := admin.Exec(ctx, "DROP ROLE IF EXISTS outboxd")
		require.NoError(t, err)
	})
	dbURL := s.NewDatabase(t)
	owner := connect(t, dbURL)
	_, err := migrations.Migrate(ctx, owner, migrations.Options{})
	require.NoError(t, err)
	_, err = owner.Exec(ctx, migrations.RolesSQL)
	require.NoError(t, err)
	_, err = owner.Exec(ctx, migrations.RolesSQL)
	require.NoError(t, err, "roles.sql can be applied twice")
	_, err = owner.Exec(ctx, "INSERT INTO domain_event (event_name, organization_id) VALUES ('a', 1), ('b', 2)")
	require.NoError(t, err)

	var replication bool
	require.NoError(t, admin.QueryRow(ctx, "SELECT rolreplication FROM pg_roles WHERE rolname = 'outboxd'").Scan(&replication))
	require.True(t, replication)

	u, err := url.Parse(dbURL)
	require.NoError(t, err)
	u.User = url.User("outboxd")
	role := connect(t, u.String())

	var n int
	require.NoError(t, role.QueryRow(ctx, "SELECT count(*) FROM domain_event WHERE NOT is_processed").Scan(&n))
	require.Equal(t, 2, n)
	tag, err := role.Exec(ctx, "UPDATE domain_event SET is_processed = true, processed_at = now(), delivery_attempts = delivery_attempts + 1 WHERE id = 1")
	require.NoError(t, err)
	require.EqualValues(t, 1, tag.RowsAffected())
	_, err = role.Exec(ctx, `INSERT INTO outboxd_checkpoint (slot_name, lsn, system_identifier, timeline) VALUES ('s', '0/1', '1', 1)
ON CONFLICT (slot_name) DO UPDATE SET lsn = excluded.lsn`)
	require.NoError(t, err)
	_, err = role.Exec(ctx, `INSERT INTO outboxd_dead_letter (event_id, sink, last_error, attempts) VALUES (2, 'webhook', 'gone', 3)`)
	require.NoError(t, err, "the identity column needs no sequence grant")
	_, err = role.Exec(ctx, "DELETE FROM outboxd_checkpoint")
	require.NoError(t, err)
	require.NoError(t, migrations.Check(ctx, role, migrations.Options{}), "the role passes outboxd's start check")
	_, err = migrations.Namespace(ctx, role, "public")
	require.NoError(t, err, "the role reads the message namespace")

	for _, denied := range []string{
		"DELETE FROM domain_event",
		"UPDATE domain_event SET event_name = 'x'",
		"INSERT INTO domain_event (event_name) VALUES ('forged')",
		"TRUNCATE domain_event",
		"UPDATE outboxd_schema_version SET version = 0",
		"UPDATE outboxd_outbox SET namespace = 'forged'",
	} {
		_, err := role.Exec(ctx, denied)
		var pgErr *pgconn.PgError
		require.ErrorAs(t, err, &pgErr, denied)
		require.Equal(t, "42501", pgErr.Code, "%s: %v", denied, err)
	}

	// It cannot insert events, but it disables a failing subscription with
	// the one event that says so, through migration 9's function.
	var sub int64
	require.NoError(t, owner.QueryRow(ctx, `INSERT INTO outboxd_subscription (organization_id, url) VALUES (2, 'https://example.com') RETURNING id`).Scan(&sub))
	_, err = owner.Exec(ctx, `INSERT INTO outboxd_parked (target, event_id, ordering_key, commit_lsn, commit_index, next_attempt_at, parked_at)
VALUES ($1, 2, 2, '0/10', 0, now(), now() - interval '2 days')`, fmt.Sprintf("subscription:%d", sub))
	require.NoError(t, err)
	d, err := store.On(role, "public", "domain_event").DisableFailing(ctx, fmt.Sprintf("subscription:%d", sub), sub, 24*time.Hour, 503)
	require.NoError(t, err)
	require.True(t, d.Disabled)
	require.NoError(t, d.EventErr)
	var name string
	require.NoError(t, owner.QueryRow(ctx, `SELECT event_name FROM domain_event WHERE id = $1 AND organization_id = 2`, d.EventID).Scan(&name))
	require.Equal(t, store.SubscriptionDisabledEvent, name)

	// Take one grant away: the start check names it.
	_, err = owner.Exec(ctx, "REVOKE UPDATE (delivery_attempts) ON domain_event FROM outboxd")
	require.NoError(t, err)
	err = migrations.Check(ctx, role, migrations.Options{})
	var ce *migrations.CheckError
	require.ErrorAs(t, err, &ce)
	require.True(t, ce.NeedsGrant)
	require.False(t, ce.NeedsMigrate)
	require.ErrorContains(t, err, `role lacks UPDATE on column delivery_attempts of "public"."domain_event"`)
	require.ErrorContains(t, err, "roles.sql")
}

// Migration 8: the tracking plan's tables and trigger function; Check wants
// them.
func TestMigrateTrackingPlan(t *testing.T) {
	t.Parallel()
	b := setup(t)
	_, err := migrations.Migrate(b.ctx, b.conn, migrations.Options{})
	require.NoError(t, err)
	require.Equal(t, map[string]string{
		"singleton": "boolean", "source": "text", "source_sha256": "text", "envelope_required": "text[]",
		"entity_types": "text[]", "applied_at": "timestamp with time zone",
	}, b.columns(t, "public", migrations.PlanTable))
	require.Equal(t, map[string]string{
		"event_name": "text", "schema_version": "integer", "description": "text", "owner": "text",
		"required": "jsonb", "required_path": "jsonpath", "schema": "jsonb",
	}, b.columns(t, "public", migrations.PlanEventTable))
	require.Equal(t, map[string]string{
		"id": "bigint", "event_id": "bigint", "event_name": "text", "schema_version": "integer",
		"rule": "text", "recorded_at": "timestamp with time zone",
	}, b.columns(t, "public", migrations.PlanViolationTable))
	var fn string
	require.NoError(t, b.conn.QueryRow(b.ctx, "SELECT 'public.outboxd_plan_check()'::regprocedure::text").Scan(&fn))
	require.Equal(t, "outboxd_plan_check()", fn)
	// Migration 11: outboxd_plan (only) is published with the subscriptions,
	// so the daemon reads a plan in commit order.
	require.Equal(t, []string{"public.outboxd_plan", "public.outboxd_subscription"}, b.publishedTables(t, "outboxd_subscriptions"))
	var published int
	require.NoError(t, b.conn.QueryRow(b.ctx, "SELECT count(*) FROM pg_publication_tables WHERE tablename LIKE 'outboxd_plan_%'").Scan(&published))
	require.Zero(t, published)
	// Migration 11: a subscription's own contract policy, one of three.
	require.Equal(t, "text", b.columns(t, "public", "outboxd_subscription")["contract"])
	_, err = b.conn.Exec(b.ctx, "INSERT INTO outboxd_subscription (url, secrets, contract) VALUES ('https://a', '{whsec_x}', 'drop')")
	require.ErrorContains(t, err, "outboxd_subscription_contract")
	// A publication made before migration 11 gets the table at the next migrate.
	b.exec(t, "ALTER PUBLICATION outboxd_subscriptions DROP TABLE outboxd_plan")
	_, err = migrations.Migrate(b.ctx, b.conn, migrations.Options{})
	require.NoError(t, err)
	require.Equal(t, []string{"public.outboxd_plan", "public.outboxd_subscription"}, b.publishedTables(t, "outboxd_subscriptions"))

	b.exec(t, "DROP TABLE outboxd_plan_violation")
	require.ErrorContains(t, migrations.Check(b.ctx, b.conn, migrations.Options{}), `"public"."outboxd_plan_violation" does not exist`)
	require.ErrorContains(t, migrations.Options{Table: migrations.PlanTable}.Validate(), "taken by outboxd's own table")
}
