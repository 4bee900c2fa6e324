package store

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// The outbox table's status columns, which only outboxd writes.
const (
	ProcessedColumn   = "is_processed"
	ProcessedAtColumn = "processed_at"
	AttemptsColumn    = "delivery_attempts"
)

// Querier runs statements: a pool, a connection or a transaction.
type Querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// Tables runs the statements of the operator commands and of the monitor on
// outboxd's tables and on the outbox table's status columns, through one
// Querier. The statements' errors are returned as the driver's: the caller
// names what it was doing, in the words its command prints (Exists and the
// methods built on it name the table they looked up).
type Tables struct {
	q      Querier
	schema string
	table  string
}

// On returns the tables of the outbox table schema.table (and of outboxd's
// own tables in schema), queried through q.
func On(q Querier, schema, table string) Tables {
	return Tables{q: q, schema: schema, table: table}
}

// With returns the same tables queried through q (a transaction).
func (t Tables) With(q Querier) Tables {
	t.q = q
	return t
}

// outbox is the quoted name of the outbox table.
func (t Tables) outbox() string { return Ident(t.schema, t.table) }

// own is the quoted name of outboxd's table name.
func (t Tables) own(name string) string { return Ident(t.schema, name) }

// Exists reports whether outboxd's table name exists in the schema.
func (t Tables) Exists(ctx context.Context, name string) (bool, error) {
	var ok bool
	if err := t.q.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, t.own(name)).Scan(&ok); err != nil {
		return false, fmt.Errorf("look up table %s: %w", name, err)
	}
	return ok, nil
}

// Migrated reports whether outboxd's tables exist (the checkpoint table
// stands for them all).
func (t Tables) Migrated(ctx context.Context) (bool, error) {
	return t.Exists(ctx, CheckpointTable)
}

// PresentScope returns the Scope of the tables that exist: a schema migrated
// before the delivery engine has no parked table.
func (t Tables) PresentScope(ctx context.Context) (Scope, error) {
	var sc Scope
	var err error
	if sc.DeadLetters, err = t.Exists(ctx, DeadLetterTable); err != nil {
		return sc, err
	}
	sc.Parked, err = t.Exists(ctx, ParkedTable)
	return sc, err
}

// CountPending counts the pending rows (PendingPredicate within scope):
// what a catch-up reads. It scans the outbox table.
func (t Tables) CountPending(ctx context.Context, scope Scope) (int64, error) {
	var n int64
	err := t.q.QueryRow(ctx, `SELECT count(*) FROM `+t.outbox()+` AS e WHERE `+PendingPredicate(t.schema, "e", scope)).Scan(&n)
	return n, err
}

// Backlog is the pending rows of the outbox table.
type Backlog struct {
	Rows int64
	// OldestAt is the oldest pending row's occurred_at, and OldestAgeSeconds
	// its age by the server's clock; nil when there is none (or no column).
	OldestAt         *time.Time
	OldestAgeSeconds *float64
}

// PendingBacklog counts the pending rows (PendingPredicate within scope) and,
// with oldest, finds the oldest one's occurred_at. It scans the outbox table.
func (t Tables) PendingBacklog(ctx context.Context, scope Scope, oldest bool) (Backlog, error) {
	var b Backlog
	at := "NULL::timestamptz"
	if oldest {
		at = "min(e.occurred_at)"
	}
	err := t.q.QueryRow(ctx, `SELECT count(*), `+at+`, extract(epoch FROM now() - `+at+`)::float8
FROM `+t.outbox()+` AS e WHERE `+PendingPredicate(t.schema, "e", scope)).Scan(&b.Rows, &b.OldestAt, &b.OldestAgeSeconds)
	return b, err
}

// Count counts the rows of outboxd's table name.
func (t Tables) Count(ctx context.Context, name string) (int64, error) {
	var n int64
	err := t.q.QueryRow(ctx, `SELECT count(*) FROM `+t.own(name)).Scan(&n)
	return n, err
}
