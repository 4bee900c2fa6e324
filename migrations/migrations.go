// Package migrations holds outboxd's schema as numbered SQL files embedded in
// the binary, applied with tern by `outboxd migrate` ([Migrate]) and verified
// read-only by `outboxd run` at start ([Check]).
//
// Invariants:
//   - Every migration is idempotent and works on an outbox table that an ORM
//     made: it adds outboxd's bookkeeping columns and leaves other columns, and
//     their types, alone.
//   - The applied version is kept by tern in outboxd_schema_version, in the
//     outbox table's schema. It tracks one outbox table per schema: a second
//     outbox table needs a schema of its own.
//   - outboxd's own objects are prefixed outboxd_ and live in the outbox
//     table's schema; the publication publishes inserts only (docs/DESIGN.md §2).
//   - Identifiers are quoted with pgx.Identifier.Sanitize, in Go and in the
//     templates alike.
//   - Migrate runs under a session advisory lock: concurrent runs serialise.
//
// roles.sql, embedded as [RolesSQL], is a least-privilege role for running
// outboxd; it is documentation and is never applied by Migrate.
package migrations

import (
	"cmp"

	"github.com/outboxd/outboxd/store"

	"context"
	"embed"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/tern/v2/migrate"

	"github.com/outboxd/outboxd/decode"
)

//go:embed [0-9]*.sql
var files embed.FS

// RolesSQL is migrations/roles.sql: a least-privilege role `outboxd` for
// public.domain_event, to be reviewed and applied by an administrator. Migrate
// never applies it.
//
//go:embed roles.sql
var RolesSQL string

// VersionTable is the table, in the outbox table's schema, where tern keeps
// the applied migration version.
const VersionTable = "outboxd_schema_version"

// Defaults for Options.
const (
	DefaultSchema      = "public"
	DefaultTable       = "domain_event"
	DefaultPublication = "outboxd"
)

// lockKey is the pg_advisory_lock key of Migrate ("outboxd\x00" in ASCII).
const lockKey int64 = 0x6f7574626f786400

// bookkeeping are the columns outboxd writes; a table that lacks one after
// the migrations is not an outbox table outboxd can run on.
var bookkeeping = []string{"is_processed", "processed_at", "delivery_attempts"}

// ownTables are outboxd's own tables, created next to the outbox table.
var ownTables = []string{store.CheckpointTable, store.DeadLetterTable, store.ParkedTable, store.SubscriptionTable, store.NamespaceTable, VersionTable,
	PlanTable, PlanEventTable, PlanViolationTable}

// The tracking plan's tables (migration 8) and the function of its trigger.
const (
	PlanTable          = "outboxd_plan"
	PlanEventTable     = "outboxd_plan_event"
	PlanViolationTable = "outboxd_plan_violation"
	PlanCheckFunction  = "outboxd_plan_check"
)

// latest is the version of the newest embedded migration.
var latest = func() int32 {
	names, err := migrate.FindMigrations(files)
	if err != nil || len(names) == 0 {
		panic(fmt.Sprintf("migrations: embedded migrations are broken: %v", err))
	}
	return int32(len(names))
}()

// LatestVersion returns the version the embedded migrations bring a schema
// to.
func LatestVersion() int32 { return latest }

// Options name the outbox table and publication. Names are plain identifiers
// (not quoted, not schema-qualified): Table "domain_event", not
// "public.domain_event".
type Options struct {
	// Schema holds the outbox table and outboxd's own tables; default public.
	Schema string
	// Table is the outbox table; default domain_event.
	Table string
	// Publication is the publication the slot reads; default outboxd.
	Publication string
}

// WithDefaults returns a copy of o with the default of each empty name.
func (o Options) WithDefaults() Options {
	o.Schema = cmp.Or(o.Schema, DefaultSchema)
	o.Table = cmp.Or(o.Table, DefaultTable)
	o.Publication = cmp.Or(o.Publication, DefaultPublication)
	return o
}

// Validate checks each name of o with its defaults (WithDefaults), changing
// nothing: valid UTF-8, no control characters, at most 63 bytes (Postgres
// would silently truncate a longer name) and, for the table, not one of
// outboxd's own tables.
// Any other character is fine in the schema and table names: they are always
// quoted. The publication name is stricter, because it also travels inside
// replication commands (a quoted list in a string literal) and, with
// "_subscriptions" appended, names a second publication that must fit 63
// bytes too: 1-49 characters of A-Z, a-z, 0-9, _, $ and -, starting with a
// letter or _. The daemon and the operator commands check names with this.
func (o Options) Validate() error {
	o = o.WithDefaults()
	var errs []error
	for _, f := range []struct{ what, name string }{
		{"schema", o.Schema}, {"table", o.Table}, {"publication", o.Publication},
	} {
		if err := validateIdentifier(f.name); err != nil {
			errs = append(errs, fmt.Errorf("%s name %q: %w", f.what, f.name, err))
		}
	}
	if slices.Contains(ownTables, o.Table) {
		errs = append(errs, fmt.Errorf("table name %q: taken by outboxd's own table", o.Table))
	}
	maxPublication := 63 - len(SubscriptionPublication(""))
	plain := len(o.Publication) <= maxPublication
	for i, r := range o.Publication {
		switch {
		case r == '_' || 'a' <= r && r <= 'z' || 'A' <= r && r <= 'Z':
		case i > 0 && (r == '$' || r == '-' || '0' <= r && r <= '9'):
		default:
			plain = false
		}
	}
	if !plain && validateIdentifier(o.Publication) == nil {
		errs = append(errs, fmt.Errorf("publication name %q: must be 1-%d characters of A-Z, a-z, 0-9, _, $ and -, starting with a letter or _ "+
			"(it is quoted into replication commands, and with %q appended must still fit Postgres's 63-byte names)",
			o.Publication, maxPublication, SubscriptionPublication("")))
	}
	return errors.Join(errs...)
}

func validateIdentifier(name string) error {
	switch {
	case len(name) > 63:
		return errors.New("longer than 63 bytes")
	case !utf8.ValidString(name):
		return errors.New("not valid UTF-8")
	case strings.ContainsFunc(name, unicode.IsControl):
		return errors.New("contains a control character")
	case strings.Contains(name, "$outboxd$"):
		// The dollar quote of function bodies in the migrations.
		return errors.New(`contains "$outboxd$"`)
	}
	return nil
}

// Result is what Migrate did.
type Result struct {
	// FromVersion and ToVersion are the schema versions before and after;
	// equal when no migration was pending.
	FromVersion, ToVersion int32
	// SchemaCreated is set when the schema did not exist.
	SchemaCreated bool
	// TableCreated is set when the outbox table did not exist.
	TableCreated bool
	// ColumnsAdded lists the columns added to an outbox table that existed
	// already (an ORM's), in table order.
	ColumnsAdded []string
	// PublicationCreated is set when the publication did not exist.
	PublicationCreated bool
	// TableAddedToPublication is set when an existing publication lacked the
	// outbox table.
	TableAddedToPublication bool
	// PublicationPublishChanged is set when an existing publication published
	// more than inserts (or not inserts) and was set to publish = 'insert', or
	// did not publish via the partition root and was set to.
	PublicationPublishChanged bool
}

// Changed reports whether Migrate changed anything.
func (r Result) Changed() bool {
	return r.FromVersion != r.ToVersion || r.SchemaCreated || r.TableCreated || len(r.ColumnsAdded) > 0 ||
		r.PublicationCreated || r.TableAddedToPublication || r.PublicationPublishChanged
}

// Migrate applies the embedded migrations (tern, version table
// outboxd_schema_version in the table's schema, created with the schema if
// missing) and ensures the publication. It is idempotent and safe to run
// concurrently from several processes: runs serialise on a pg_advisory_lock.
// It runs as the table's owner (creating a publication for a table requires
// it). The Result says what it did.
func Migrate(ctx context.Context, conn *pgx.Conn, opts Options) (res Result, err error) {
	opts = opts.WithDefaults()
	if err := opts.Validate(); err != nil {
		return res, err
	}
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock($1)", lockKey); err != nil {
		return res, fmt.Errorf("take migration lock: %w", err)
	}
	defer func() {
		// Released on a context of its own: a cancelled ctx must not leave
		// the lock held by a session that lives on.
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if _, uerr := conn.Exec(uctx, "SELECT pg_advisory_unlock($1)", lockKey); uerr != nil && err == nil {
			err = fmt.Errorf("release migration lock: %w", uerr)
		}
	}()
	return migrateLocked(ctx, conn, opts)
}

func migrateLocked(ctx context.Context, conn *pgx.Conn, opts Options) (res Result, err error) {
	schema := pgx.Identifier{opts.Schema}.Sanitize()
	table := pgx.Identifier{opts.Schema, opts.Table}.Sanitize()

	var schemaExists bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)",
		opts.Schema).Scan(&schemaExists); err != nil {
		return res, fmt.Errorf("look up schema %s: %w", schema, err)
	}
	if !schemaExists {
		if _, err := conn.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+schema); err != nil {
			return res, fmt.Errorf("create schema %s: %w", schema, err)
		}
		res.SchemaCreated = true
	}

	before, existed, err := tableColumns(ctx, conn, opts.Schema, opts.Table)
	if err != nil {
		return res, err
	}
	if res.FromVersion, _, err = schemaVersion(ctx, conn, opts.Schema); err != nil {
		return res, err
	}
	if res.FromVersion > latest {
		return res, fmt.Errorf("schema %s is at outboxd schema version %d, newer than version %d of this outboxd: upgrade outboxd",
			schema, res.FromVersion, latest)
	}

	m, err := migrate.NewMigrator(ctx, conn, pgx.Identifier{opts.Schema, VersionTable}.Sanitize())
	if err != nil {
		return res, fmt.Errorf("prepare version table in schema %s: %w", schema, err)
	}
	m.Data["schema"] = schema
	m.Data["table"] = pgx.Identifier{opts.Table}.Sanitize()
	if err := m.LoadMigrations(files); err != nil {
		return res, fmt.Errorf("load embedded migrations: %w", err)
	}
	if err := m.Migrate(ctx); err != nil {
		return res, fmt.Errorf("apply migrations to %s: %w", table, err)
	}
	if res.ToVersion, _, err = schemaVersion(ctx, conn, opts.Schema); err != nil {
		return res, err
	}

	after, exists, err := tableColumns(ctx, conn, opts.Schema, opts.Table)
	if err != nil {
		return res, err
	}
	if missing := missingColumns(after, bookkeeping); !exists || len(missing) > 0 {
		// The migrations ran earlier, for this schema, while this table did
		// not exist (another outbox table in the same schema, or the table
		// was dropped and made again since).
		what := "does not exist"
		if exists {
			what = "lacks columns " + strings.Join(missing, ", ")
		}
		return res, fmt.Errorf("table %s %s although schema %s is at outboxd schema version %d: %s tracks one outbox table per schema; use a schema of its own for another outbox table, or reset the version with UPDATE %s SET version = 0 and migrate again",
			table, what, schema, res.ToVersion, VersionTable, pgx.Identifier{opts.Schema, VersionTable}.Sanitize())
	}
	res.TableCreated = !existed
	if existed {
		for _, c := range after {
			if !slices.ContainsFunc(before, func(b column) bool { return b.name == c.name }) {
				res.ColumnsAdded = append(res.ColumnsAdded, c.name)
			}
		}
	}

	if err := ensurePublication(ctx, conn, opts, &res); err != nil {
		return res, err
	}
	if err := ensureSubscriptionPublication(ctx, conn, opts, &res); err != nil {
		return res, err
	}
	return res, nil
}

// Querier runs a query that returns one row: a *pgx.Conn, a *pgxpool.Pool
// or a pgx.Tx.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// Namespace reads the outbox's message namespace (docs/DESIGN.md §4), made by
// migration 5 in outboxd_outbox in the outbox table's schema. Every message id
// of the outbox's events starts with it. A missing table or row says to run
// `outboxd migrate`; a namespace that decode.CheckNamespace refuses (edited by
// hand) is an error too.
func Namespace(ctx context.Context, q Querier, schema string) (string, error) {
	if schema == "" {
		schema = DefaultSchema
	}
	table := pgx.Identifier{schema, store.NamespaceTable}.Sanitize()
	var ns string
	err := q.QueryRow(ctx, "SELECT namespace FROM "+table).Scan(&ns)
	var pgErr *pgconn.PgError
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return "", fmt.Errorf("%s has no message namespace: run `outboxd migrate`", table)
	case errors.As(err, &pgErr) && pgErr.Code == "42P01": // undefined_table
		return "", fmt.Errorf("%s does not exist: run `outboxd migrate`", table)
	case err != nil:
		return "", fmt.Errorf("read message namespace from %s: %w", table, err)
	}
	if err := decode.CheckNamespace(ns); err != nil {
		return "", fmt.Errorf("message namespace %q in %s: %w", ns, table, err)
	}
	return ns, nil
}

// SubscriptionPublication names the publication of the subscription table
// and the tracking plan's outboxd_plan: inserts, updates and deletes, so
// their changes reach the stream in commit order with the events.
func SubscriptionPublication(publication string) string { return publication + "_subscriptions" }

// ensureSubscriptionPublication creates the publication of outboxd_subscription.
func ensureSubscriptionPublication(ctx context.Context, conn *pgx.Conn, opts Options, res *Result) error {
	name := SubscriptionPublication(opts.Publication)
	var exists bool
	if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1)`, name).Scan(&exists); err != nil {
		return fmt.Errorf("look up publication %s: %w", name, err)
	}
	table := pgx.Identifier{opts.Schema, "outboxd_subscription"}.Sanitize()
	plan := pgx.Identifier{opts.Schema, PlanTable}.Sanitize()
	if exists {
		// Since migration 11 the tracking plan is published with the
		// subscriptions: the daemon applies a plan from its commit on.
		var published bool
		if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel r JOIN pg_catalog.pg_publication p ON p.oid = r.prpubid
WHERE p.pubname = $1 AND r.prrelid = to_regclass($2))`, name, plan).Scan(&published); err != nil {
			return fmt.Errorf("look up publication %s: %w", name, err)
		}
		if !published {
			if _, err := conn.Exec(ctx, "ALTER PUBLICATION "+pgx.Identifier{name}.Sanitize()+" ADD TABLE "+plan); err != nil {
				return fmt.Errorf("add %s to publication %s: %w", plan, name, err)
			}
		}
		return nil
	}
	if _, err := conn.Exec(ctx, "CREATE PUBLICATION "+pgx.Identifier{name}.Sanitize()+" FOR TABLE "+table+", "+plan+
		" WITH (publish = 'insert, update, delete')"); err != nil {
		return fmt.Errorf("create publication %s: %w", name, err)
	}
	res.PublicationCreated = true
	return nil
}

// ensurePublication creates the publication, adds the table to it or sets it
// to publish inserts only, whichever is needed.
func ensurePublication(ctx context.Context, conn *pgx.Conn, opts Options, res *Result) error {
	pubName := pgx.Identifier{opts.Publication}.Sanitize()
	table := pgx.Identifier{opts.Schema, opts.Table}.Sanitize()
	pub, found, err := lookupPublication(ctx, conn, opts)
	if err != nil {
		return err
	}
	if !found {
		if _, err := conn.Exec(ctx, "CREATE PUBLICATION "+pubName+" FOR TABLE "+table+" WITH (publish = 'insert', publish_via_partition_root = true)"); err != nil {
			return fmt.Errorf("create publication %s for %s: %w", pubName, table, err)
		}
		res.PublicationCreated = true
		return nil
	}
	if !pub.hasTable {
		if _, err := conn.Exec(ctx, "ALTER PUBLICATION "+pubName+" ADD TABLE "+table); err != nil {
			return fmt.Errorf("add %s to publication %s: %w", table, pubName, err)
		}
		res.TableAddedToPublication = true
	}
	if !pub.insertOnly() {
		if _, err := conn.Exec(ctx, "ALTER PUBLICATION "+pubName+" SET (publish = 'insert')"); err != nil {
			return fmt.Errorf("set publication %s to publish inserts only: %w", pubName, err)
		}
		res.PublicationPublishChanged = true
	}
	if !pub.viaRoot {
		// A partitioned outbox's rows must arrive under the table's own
		// relation, not each partition's; harmless for a plain table.
		if _, err := conn.Exec(ctx, "ALTER PUBLICATION "+pubName+" SET (publish_via_partition_root = true)"); err != nil {
			return fmt.Errorf("set publication %s to publish via the partition root: %w", pubName, err)
		}
		res.PublicationPublishChanged = true
	}
	return nil
}

// column is one column of a table as the catalog has it.
type column struct {
	name, typ string
}

// tableColumns returns the columns of schema.name in order, and whether that
// ordinary or partitioned table exists. It reads only the catalog, so it needs
// no privilege on the table.
func tableColumns(ctx context.Context, conn *pgx.Conn, schema, name string) ([]column, bool, error) {
	oid, err := tableOID(ctx, conn, schema, name)
	if err != nil || oid == 0 {
		return nil, false, err
	}
	rows, err := conn.Query(ctx, `SELECT attname, format_type(atttypid, atttypmod)
FROM pg_catalog.pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum`, oid)
	if err != nil {
		return nil, true, fmt.Errorf("read columns of %s: %w", pgx.Identifier{schema, name}.Sanitize(), err)
	}
	cols, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (column, error) {
		var c column
		return c, r.Scan(&c.name, &c.typ)
	})
	if err != nil {
		return nil, true, fmt.Errorf("read columns of %s: %w", pgx.Identifier{schema, name}.Sanitize(), err)
	}
	return cols, true, nil
}

// tableOID returns the oid of ordinary or partitioned table schema.name, or 0.
func tableOID(ctx context.Context, conn *pgx.Conn, schema, name string) (uint32, error) {
	var oid uint32
	err := conn.QueryRow(ctx, `SELECT c.oid FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')`, schema, name).Scan(&oid)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("look up table %s: %w", pgx.Identifier{schema, name}.Sanitize(), err)
	}
	return oid, nil
}

func missingColumns(cols []column, want []string) []string {
	var missing []string
	for _, w := range want {
		if !slices.ContainsFunc(cols, func(c column) bool { return c.name == w }) {
			missing = append(missing, w)
		}
	}
	return missing
}

// schemaVersion reads the applied version from the schema's version table:
// 0 and false when that table does not exist.
func schemaVersion(ctx context.Context, conn *pgx.Conn, schema string) (int32, bool, error) {
	oid, err := tableOID(ctx, conn, schema, VersionTable)
	if err != nil || oid == 0 {
		return 0, false, err
	}
	versionTable := pgx.Identifier{schema, VersionTable}.Sanitize()
	var v int32
	if err := conn.QueryRow(ctx, "SELECT version FROM "+versionTable).Scan(&v); err != nil {
		return 0, true, fmt.Errorf("read schema version from %s: %w", versionTable, err)
	}
	return v, true, nil
}

// publication is what the catalog says of a publication and the outbox table.
type publication struct {
	allTables                        bool
	insert, update, delete, truncate bool
	viaRoot                          bool // publish_via_partition_root
	partitioned                      bool // the outbox table is partitioned
	hasTable                         bool
	rowFilter                        *string // PostgreSQL 15+: WHERE of the table
	columnList                       bool    // PostgreSQL 15+: only some columns
}

func (p publication) insertOnly() bool {
	return p.insert && !p.update && !p.delete && !p.truncate
}

// extraOps lists the operations the publication publishes besides insert.
func (p publication) extraOps() []string {
	var ops []string
	for _, op := range []struct {
		on   bool
		name string
	}{{p.update, "update"}, {p.delete, "delete"}, {p.truncate, "truncate"}} {
		if op.on {
			ops = append(ops, op.name)
		}
	}
	return ops
}

// lookupPublication reads the publication from the catalog; found is false
// when it does not exist.
func lookupPublication(ctx context.Context, conn *pgx.Conn, opts Options) (p publication, found bool, err error) {
	pubName := pgx.Identifier{opts.Publication}.Sanitize()
	var pubOID uint32
	err = conn.QueryRow(ctx, `SELECT oid, puballtables, pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot
FROM pg_catalog.pg_publication WHERE pubname = $1`, opts.Publication).
		Scan(&pubOID, &p.allTables, &p.insert, &p.update, &p.delete, &p.truncate, &p.viaRoot)
	if errors.Is(err, pgx.ErrNoRows) {
		return p, false, nil
	}
	if err != nil {
		return p, false, fmt.Errorf("look up publication %s: %w", pubName, err)
	}
	tableOID, err := tableOID(ctx, conn, opts.Schema, opts.Table)
	if err != nil || tableOID == 0 {
		return p, true, err
	}
	if err := conn.QueryRow(ctx, `SELECT relkind = 'p' FROM pg_catalog.pg_class WHERE oid = $1`, tableOID).Scan(&p.partitioned); err != nil {
		return p, true, fmt.Errorf("look up table of publication %s: %w", pubName, err)
	}
	// pg_publication_tables covers FOR ALL TABLES and, from 15, TABLES IN
	// SCHEMA; pg_publication_rel covers a partitioned table listed by name
	// (whose leaves pg_publication_tables shows instead).
	err = conn.QueryRow(ctx, `SELECT
  EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel WHERE prpubid = $1 AND prrelid = $2)
  OR EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables WHERE pubname = $3 AND schemaname = $4 AND tablename = $5)`,
		pubOID, tableOID, opts.Publication, opts.Schema, opts.Table).Scan(&p.hasTable)
	if err != nil {
		return p, true, fmt.Errorf("look up publication %s: %w", pubName, err)
	}
	var version int
	if err := conn.QueryRow(ctx, "SELECT current_setting('server_version_num')::int").Scan(&version); err != nil {
		return p, true, fmt.Errorf("read server version: %w", err)
	}
	if version >= 150000 && p.hasTable {
		err := conn.QueryRow(ctx, `SELECT pg_get_expr(prqual, prrelid), prattrs IS NOT NULL
FROM pg_catalog.pg_publication_rel WHERE prpubid = $1 AND prrelid = $2`, pubOID, tableOID).Scan(&p.rowFilter, &p.columnList)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return p, true, fmt.Errorf("look up publication %s: %w", pubName, err)
		}
	}
	return p, true, nil
}
