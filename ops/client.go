package ops

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/migrations"
	"github.com/outboxd/outboxd/store"
)

// Target names the database objects the commands work on.
type Target struct {
	// DatabaseURL is a libpq URL or key/value string. It may hold a password:
	// it never appears in an error of this package.
	DatabaseURL string
	// Table is the outbox table; outboxd's own tables live in its schema.
	Table decode.Table
	// Slot and Publication are the replication slot and publication names.
	Slot        string
	Publication string
	// SlotFailover is OUTBOXD_SLOT_FAILOVER: a slot the commands create has
	// failover set on PostgreSQL 17 and later, and status says when the
	// slot's failover differs.
	SlotFailover bool
}

var slotNameRE = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)

// Validate checks t. The slot name rule is the reader's: it is interpolated
// into replication commands. The schema, table and publication names follow
// migrate's rules (migrations.Options.Validate), so that a name migrate
// refuses is refused here too, and the other way round.
func (t Target) Validate() error {
	if t.DatabaseURL == "" {
		return errors.New("database URL is empty")
	}
	if t.Table.Name == "" {
		return errors.New("table name is empty")
	}
	if !slotNameRE.MatchString(t.Slot) {
		return fmt.Errorf("slot name %q must be 1-63 characters of a-z, 0-9 and _", t.Slot)
	}
	if t.Publication == "" {
		return errors.New("publication name is empty")
	}
	return migrations.Options{Schema: t.schema(), Table: t.Table.Name, Publication: t.Publication}.Validate()
}

func (t Target) schema() string {
	if t.Table.Schema == "" {
		return "public"
	}
	return t.Table.Schema
}

// tableSQL is the outbox table's quoted identifier.
func (t Target) tableSQL() string { return pgx.Identifier{t.schema(), t.Table.Name}.Sanitize() }

// ErrRefused marks a command that was not carried out because acting would be
// unsafe or pointless in the current state (a slot active in another process,
// an advance backwards). The error text says why and what to do.
var ErrRefused = errors.New("refused")

func refused(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrRefused, fmt.Sprintf(format, args...))
}

// Client runs the commands against one database.
type Client struct {
	t    Target
	pool *pgxpool.Pool
	log  zerolog.Logger
}

// Open connects to the target's database. The session uses the settings the
// reader uses (UTC, ISO dates, shortest exact floats), so rows read in text
// format become the same envelopes as streamed rows.
func Open(ctx context.Context, t Target, log zerolog.Logger) (*Client, error) {
	if err := t.Validate(); err != nil {
		return nil, err
	}
	cfg, err := pgxpool.ParseConfig(t.DatabaseURL)
	if err != nil {
		// pgconn's parse errors may quote the string, password included.
		return nil, errors.New("parse database URL: invalid connection string")
	}
	setSession(cfg.ConnConfig.Config.RuntimeParams)
	if cfg.ConnConfig.ConnectTimeout == 0 {
		cfg.ConnConfig.ConnectTimeout = 10 * time.Second
	}
	cfg.MaxConns = 4
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("connect: %w", err)
	}
	return &Client{t: t, pool: pool, log: log.With().Str("component", "ops").Str("slot", t.Slot).Logger()}, nil
}

// Close closes the connections.
func (c *Client) Close() { c.pool.Close() }

func setSession(p map[string]string) {
	p["application_name"] = "outboxd-ops"
	p["TimeZone"] = "UTC"
	p["DateStyle"] = "ISO, YMD"
	p["extra_float_digits"] = "1"
}

// replConn opens a replication connection in database mode (IDENTIFY_SYSTEM,
// CREATE_REPLICATION_SLOT).
func (c *Client) replConn(ctx context.Context) (*pgconn.PgConn, error) {
	cfg, err := pgconn.ParseConfig(c.t.DatabaseURL)
	if err != nil {
		return nil, errors.New("parse database URL: invalid connection string")
	}
	setSession(cfg.RuntimeParams)
	cfg.RuntimeParams["replication"] = "database"
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 10 * time.Second
	}
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("replication connection: %w", err)
	}
	return conn, nil
}

// identity is the cluster the database belongs to.
type identity struct {
	SystemID string
	Timeline int32
}

// identify returns the server's system identifier and timeline. It tries SQL
// first (pg_control_system, which a monitoring role may be refused), then the
// replication command IDENTIFY_SYSTEM (which needs the REPLICATION attribute
// outboxd's role has anyway).
func (c *Client) identify(ctx context.Context) (identity, error) {
	var id identity
	errSQL := c.pool.QueryRow(ctx, `SELECT s.system_identifier::text, c.timeline_id
FROM pg_control_system() s, pg_control_checkpoint() c`).Scan(&id.SystemID, &id.Timeline)
	if errSQL == nil {
		return id, nil
	}
	conn, err := c.replConn(ctx)
	if err != nil {
		return id, fmt.Errorf("identify system: %w (pg_control_system: %w)", err, errSQL)
	}
	defer conn.Close(context.WithoutCancel(ctx)) //nolint:errcheck // read-only
	sys, err := pglogrepl.IdentifySystem(ctx, conn)
	if err != nil {
		return id, fmt.Errorf("identify system: %w", err)
	}
	return identity{SystemID: sys.SystemID, Timeline: sys.Timeline}, nil
}

// tables runs statements on outboxd's tables and the outbox table's status
// columns (package store owns them) through the client's pool.
func (c *Client) tables() store.Tables { return store.On(c.pool, c.t.schema(), c.t.Table.Name) }

// columns returns the outbox table's column names; an empty set when the
// table does not exist.
func (c *Client) columns(ctx context.Context) (map[string]bool, error) {
	rows, err := c.pool.Query(ctx, `SELECT a.attname FROM pg_attribute a
WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped`, c.t.tableSQL())
	if err != nil {
		return nil, fmt.Errorf("read columns of %s: %w", c.t.Table, err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("read columns of %s: %w", c.t.Table, err)
	}
	set := make(map[string]bool, len(names))
	for _, n := range names {
		set[n] = true
	}
	return set, nil
}

// isTimestamp reports whether the outbox table's column col is a timestamp
// (with or without time zone) or a date: an ORM may hold occurred_at as
// text or epoch seconds, which cannot be compared with a time.
func (c *Client) isTimestamp(ctx context.Context, col string) (bool, error) {
	var ok bool
	err := c.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_attribute a
WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped
  AND a.atttypid IN ('timestamptz'::regtype, 'timestamp'::regtype, 'date'::regtype))`, c.t.tableSQL(), col).Scan(&ok)
	if err != nil {
		return false, fmt.Errorf("read columns of %s: %w", c.t.Table, err)
	}
	return ok, nil
}

// sqlState returns the SQLSTATE of a server error, "" otherwise.
func sqlState(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}
