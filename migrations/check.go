package migrations

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
)

// CheckError is returned by Check when the database does not fit: it lists
// every problem found, not just the first.
type CheckError struct {
	// Problems has one sentence per problem.
	Problems []string
	// NeedsMigrate is set when running `outboxd migrate` fixes a problem.
	NeedsMigrate bool
	// NeedsGrant is set when the connected role lacks privileges.
	NeedsGrant bool
}

func (e *CheckError) Error() string {
	var b strings.Builder
	b.WriteString("outbox schema does not fit: ")
	b.WriteString(strings.Join(e.Problems, "; "))
	var fixes []string
	if e.NeedsMigrate {
		fixes = append(fixes, "run `outboxd migrate` as the table owner")
	}
	if e.NeedsGrant {
		fixes = append(fixes, "grant the missing privileges (see migrations/roles.sql)")
	}
	if len(fixes) > 0 {
		b.WriteString(": ")
		b.WriteString(strings.Join(fixes, ", and "))
	}
	return b.String()
}

// columnKinds are the column types outboxd can work with, by column; a
// column not listed may have any type.
var columnKinds = map[string][]string{
	"id":                {"smallint", "integer", "bigint"},
	"is_processed":      {"boolean"},
	"processed_at":      {"timestamp with time zone", "timestamp without time zone"},
	"delivery_attempts": {"smallint", "integer", "bigint"},
}

// required lists, per table, the columns outboxd reads or writes.
var required = map[string][]string{
	"outboxd_checkpoint":           {"slot_name", "lsn", "system_identifier", "timeline", "catchup_pending", "updated_at", "routing", "write_token"},
	"outboxd_dead_letter":          {"event_id", "sink", "last_status", "last_error", "attempts", "dead_at"},
	"outboxd_parked":               {"target", "event_id", "ordering_key", "commit_lsn", "commit_index", "attempts", "rounds", "next_attempt_at", "last_status", "last_error"},
	"outboxd_subscription":         {"id", "organization_id", "url", "secrets", "events", "enabled", "disabled_reason", "filter", "kind", "settings"},
	"outboxd_outbox":               {"namespace"},
	"outboxd_subscription_history": {"id", "subscription_id", "deleted", "enabled", "organization_id", "events", "since_always"},
	// The tracking plan (migration 8): read by its trigger and by `outboxd
	// plan`, not by the daemon, so no privilege of the daemon's role.
	"outboxd_plan":           {"source", "source_sha256", "envelope_required", "entity_types"},
	"outboxd_plan_event":     {"event_name", "schema_version", "required", "schema"},
	"outboxd_plan_violation": {"id", "event_id", "event_name", "schema_version", "rule"},
}

// privileges are what outboxd does with each table: checked for the
// connected role, so that `outboxd run` fails at start rather than at its
// first checkpoint.
var privileges = map[string][]string{
	"outboxd_checkpoint":           {"SELECT", "INSERT", "UPDATE", "DELETE"},
	"outboxd_dead_letter":          {"SELECT", "INSERT", "UPDATE", "DELETE"},
	"outboxd_parked":               {"SELECT", "INSERT", "UPDATE", "DELETE"},
	"outboxd_subscription":         {"SELECT"},
	"outboxd_outbox":               {"SELECT"},
	"outboxd_subscription_history": {"SELECT"},
	"outboxd_plan":                 {"SELECT"},
	VersionTable:                   {"SELECT"},
}

// columnPrivileges are privileges outboxd needs on some columns only: it
// disables a subscription whose endpoint answered 410 Gone, and must not be
// able to repoint a tenant's URL or read-write its secrets (roles.sql grants
// exactly these columns).
var columnPrivileges = map[string]map[string][]string{
	"outboxd_subscription": {"UPDATE": {"enabled", "disabled_reason", "updated_at"}},
}

// Check verifies, changing nothing, that the outbox table, outboxd's own
// tables and the publication exist and fit, at the schema version this
// outboxd knows, and that the connected role may use them. It reads the
// catalog, so it works for a least-privilege role. On a misfit it returns a
// *CheckError naming every problem and how to fix it.
func Check(ctx context.Context, conn *pgx.Conn, opts Options) error {
	opts = opts.WithDefaults()
	if err := opts.Validate(); err != nil {
		return err
	}
	c := checker{ctx: ctx, conn: conn, opts: opts, e: &CheckError{}}
	if err := c.run(); err != nil {
		return err
	}
	if len(c.e.Problems) > 0 {
		return c.e
	}
	return nil
}

type checker struct {
	ctx  context.Context
	conn *pgx.Conn
	opts Options
	e    *CheckError
}

func (c *checker) migrate(format string, args ...any) {
	c.e.Problems = append(c.e.Problems, fmt.Sprintf(format, args...))
	c.e.NeedsMigrate = true
}

func (c *checker) grant(format string, args ...any) {
	c.e.Problems = append(c.e.Problems, fmt.Sprintf(format, args...))
	c.e.NeedsGrant = true
}

func (c *checker) other(format string, args ...any) {
	c.e.Problems = append(c.e.Problems, fmt.Sprintf(format, args...))
}

// run collects problems; it returns an error only when the database could not
// be read.
func (c *checker) run() error {
	schema := pgx.Identifier{c.opts.Schema}.Sanitize()
	var exists, usage bool
	err := c.conn.QueryRow(c.ctx, `SELECT true, has_schema_privilege(oid, 'USAGE')
FROM pg_catalog.pg_namespace WHERE nspname = $1`, c.opts.Schema).Scan(&exists, &usage)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("look up schema %s: %w", schema, err)
	}
	if !exists {
		c.migrate("schema %s does not exist", schema)
		return c.checkPublication()
	}
	if !usage {
		c.grant("role lacks USAGE on schema %s", schema)
	}

	if err := c.checkVersion(usage); err != nil {
		return err
	}
	if err := c.checkOutboxTable(); err != nil {
		return err
	}
	for _, name := range []string{"outboxd_checkpoint", "outboxd_dead_letter", "outboxd_parked", "outboxd_subscription", "outboxd_outbox", "outboxd_subscription_history",
		"outboxd_plan", "outboxd_plan_event", "outboxd_plan_violation"} {
		if err := c.checkOwnTable(name); err != nil {
			return err
		}
	}
	return c.checkPublication()
}

func (c *checker) checkVersion(schemaUsage bool) error {
	versionTable := pgx.Identifier{c.opts.Schema, VersionTable}.Sanitize()
	oid, err := tableOID(c.ctx, c.conn, c.opts.Schema, VersionTable)
	if err != nil {
		return err
	}
	if oid == 0 {
		c.migrate("%s does not exist (the schema was never migrated)", versionTable)
		return nil
	}
	if ok, err := c.lacking(oid, versionTable, privileges[VersionTable]); err != nil || !ok || !schemaUsage {
		return err // the version cannot be read; the grant problem is noted
	}
	v, _, err := schemaVersion(c.ctx, c.conn, c.opts.Schema)
	if err != nil {
		return err
	}
	switch {
	case v < latest:
		c.migrate("schema version is %d, this outboxd needs %d", v, latest)
	case v > latest:
		c.other("schema version is %d, newer than version %d of this outboxd: upgrade outboxd", v, latest)
	}
	return nil
}

func (c *checker) checkOutboxTable() error {
	table := pgx.Identifier{c.opts.Schema, c.opts.Table}.Sanitize()
	cols, exists, err := tableColumns(c.ctx, c.conn, c.opts.Schema, c.opts.Table)
	if err != nil {
		return err
	}
	if !exists {
		c.migrate("table %s does not exist", table)
		return nil
	}
	if missing := missingColumns(cols, bookkeeping); len(missing) > 0 {
		c.migrate("table %s lacks columns %s", table, strings.Join(missing, ", "))
	}
	if missing := missingColumns(cols, []string{"id", "event_name"}); len(missing) > 0 {
		c.other("table %s lacks columns %s, which outboxd needs and migrate does not add to an existing table", table, strings.Join(missing, ", "))
	}
	for _, col := range cols {
		if kinds, ok := columnKinds[col.name]; ok && !slices.Contains(kinds, col.typ) {
			c.other("column %s of table %s is %s, want %s", col.name, table, col.typ, strings.Join(kinds, " or "))
		}
	}

	oid, err := tableOID(c.ctx, c.conn, c.opts.Schema, c.opts.Table)
	if err != nil {
		return err
	}
	var canSelect bool
	if err := c.conn.QueryRow(c.ctx, "SELECT has_table_privilege($1::oid, 'SELECT')", oid).Scan(&canSelect); err != nil {
		return fmt.Errorf("check privileges on %s: %w", table, err)
	}
	if !canSelect {
		c.grant("role lacks SELECT on %s", table)
	}
	for _, col := range bookkeeping {
		if missingColumns(cols, []string{col}) != nil {
			continue
		}
		var canUpdate bool
		if err := c.conn.QueryRow(c.ctx, "SELECT has_column_privilege($1::oid, $2, 'UPDATE')", oid, col).Scan(&canUpdate); err != nil {
			return fmt.Errorf("check privileges on %s: %w", table, err)
		}
		if !canUpdate {
			c.grant("role lacks UPDATE on column %s of %s", col, table)
		}
	}
	return nil
}

func (c *checker) checkOwnTable(name string) error {
	table := pgx.Identifier{c.opts.Schema, name}.Sanitize()
	cols, exists, err := tableColumns(c.ctx, c.conn, c.opts.Schema, name)
	if err != nil {
		return err
	}
	if !exists {
		c.migrate("table %s does not exist", table)
		return nil
	}
	if missing := missingColumns(cols, required[name]); len(missing) > 0 {
		c.migrate("table %s lacks columns %s", table, strings.Join(missing, ", "))
	}
	oid, err := tableOID(c.ctx, c.conn, c.opts.Schema, name)
	if err != nil {
		return err
	}
	if _, err = c.lacking(oid, table, privileges[name]); err != nil {
		return err
	}
	for priv, cols := range columnPrivileges[name] {
		for _, col := range cols {
			var has bool
			if err := c.conn.QueryRow(c.ctx, "SELECT has_column_privilege($1::oid, $2, $3)", oid, col, priv).Scan(&has); err != nil {
				return fmt.Errorf("check privileges on %s: %w", table, err)
			}
			if !has {
				c.grant("role lacks %s on column %s of %s", priv, col, table)
			}
		}
	}
	return nil
}

// lacking notes each of privs the role lacks on table; ok is true when it has
// them all.
func (c *checker) lacking(oid uint32, table string, privs []string) (ok bool, err error) {
	ok = true
	for _, p := range privs {
		var has bool
		if err := c.conn.QueryRow(c.ctx, "SELECT has_table_privilege($1::oid, $2)", oid, p).Scan(&has); err != nil {
			return false, fmt.Errorf("check privileges on %s: %w", table, err)
		}
		if !has {
			c.grant("role lacks %s on %s", p, table)
			ok = false
		}
	}
	return ok, nil
}

func (c *checker) checkPublication() error {
	pubName := pgx.Identifier{c.opts.Publication}.Sanitize()
	table := pgx.Identifier{c.opts.Schema, c.opts.Table}.Sanitize()
	pub, found, err := lookupPublication(c.ctx, c.conn, c.opts)
	if err != nil {
		return err
	}
	if !found {
		c.migrate("publication %s does not exist", pubName)
		return nil
	}
	if !pub.hasTable {
		c.migrate("publication %s does not include %s", pubName, table)
	}
	if !pub.insert {
		c.migrate("publication %s does not publish inserts", pubName)
	}
	if ops := pub.extraOps(); len(ops) > 0 {
		// The marking UPDATEs would come back through the slot.
		c.migrate("publication %s also publishes %s: outboxd needs inserts only", pubName, strings.Join(ops, ", "))
	}
	if pub.partitioned && !pub.viaRoot {
		// Rows would arrive under each partition's relation, not the outbox's.
		c.migrate("publication %s does not set publish_via_partition_root, and %s is partitioned", pubName, table)
	}
	if pub.rowFilter != nil {
		c.other("publication %s filters the rows of %s (WHERE %s): filtered events would never be delivered; drop the filter", pubName, table, *pub.rowFilter)
	}
	if pub.columnList {
		c.other("publication %s publishes only some columns of %s: drop the column list", pubName, table)
	}
	return nil
}
