// Package store owns outboxd's tables and the outbox table's status columns:
// it names the tables, and holds the SQL fragments on the status columns that
// every reader and writer must agree on (the one "pending row" predicate and
// the marking arithmetic) and every statement on them: the slot holder's
// writes (SlotStore: checkpoint, marks, attempts, dead letters, parked
// deliveries), the catch-up's reads in a slot's snapshot (DeclarePending,
// SubscriptionRows, SubscriptionHistory) and those of the operator commands
// and the monitor (Tables). Other packages call it; none writes its own SQL
// on these tables or columns.
//
// Invariants:
//   - A row is pending (still to deliver) when is_processed is not true — NULL
//     counts as unprocessed, so a table an ORM made with nullable status
//     columns and no defaults works as it is — and it is neither dead-lettered
//     nor parked (parked rows are retried from outboxd_parked, not re-read).
//   - delivery_attempts is counted from 0 when NULL.
//   - Catch-up, status, the backlog gauge, slot reset and marking all use
//     these fragments; none writes its own.
//   - A write of a fenced SlotStore commits only while this instance's
//     walsender holds the slot (ErrNotLeader otherwise).
package store

import (
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outboxd/outboxd/decode"
)

// Names of outboxd's own tables, in the outbox table's schema.
const (
	CheckpointTable   = "outboxd_checkpoint"
	DeadLetterTable   = "outboxd_dead_letter"
	ParkedTable       = "outboxd_parked"
	SubscriptionTable = "outboxd_subscription"
	// NamespaceTable holds the outbox's message namespace (one row,
	// migration 5; docs/DESIGN.md §4).
	NamespaceTable = "outboxd_outbox"
	// SubscriptionHistoryTable holds the subscriptions' routing changes
	// (migration 7), written by a trigger on SubscriptionTable.
	SubscriptionHistoryTable = "outboxd_subscription_history"
)

// Ident returns the quoted identifier of table name in schema.
func Ident(schema, name string) string { return pgx.Identifier{schema, name}.Sanitize() }

// Scope says which of outboxd's tables exist to be consulted by
// PendingPredicate: a database not migrated to the delivery engine has no
// outboxd_parked, and status must still work on it.
type Scope struct {
	DeadLetters bool
	Parked      bool
}

// All is the scope of a migrated database.
var All = Scope{DeadLetters: true, Parked: true}

// NotProcessed is the condition on the outbox row aliased alias that its
// is_processed is not true (false or NULL).
func NotProcessed(alias string) string { return alias + ".is_processed IS NOT TRUE" }

// PendingPredicate returns the SQL condition that the outbox row aliased
// alias is pending: not processed, not dead-lettered and not parked (within
// scope). schema is the outbox table's schema, where outboxd's tables live.
func PendingPredicate(schema, alias string, scope Scope) string {
	p := NotProcessed(alias)
	if scope.DeadLetters {
		p += " AND NOT EXISTS (SELECT 1 FROM " + Ident(schema, DeadLetterTable) + " AS d WHERE d.event_id = " + alias + ".id)"
	}
	if scope.Parked {
		p += " AND NOT EXISTS (SELECT 1 FROM " + Ident(schema, ParkedTable) + " AS p WHERE p.event_id = " + alias + ".id)"
	}
	return p
}

// AddAttempts returns the SQL expression for the outbox row aliased alias's
// delivery_attempts plus n (an SQL expression), counting NULL as 0.
func AddAttempts(alias, n string) string {
	return "coalesce(" + alias + ".delivery_attempts, 0) + " + n
}

// RelationOf describes the result columns of a query on the outbox table t
// as the relation the decoder expects, so that rows read from the table
// (catch-up, replay) become events exactly as streamed ones do.
func RelationOf(t decode.Table, fields []pgconn.FieldDescription) *decode.Relation {
	rel := &decode.Relation{Namespace: t.Schema, Name: t.Name, Columns: make([]decode.Column, len(fields))}
	for i, f := range fields {
		rel.Columns[i] = decode.Column{Name: f.Name, TypeOID: f.DataTypeOID}
	}
	return rel
}

// SubscriptionSecret is what the subscription table holds now of a
// subscription's secret material: its URL and secrets. The routing state
// names secrets by fingerprint only; their values are read from the table
// when a target is built.
type SubscriptionSecret struct {
	URL     string
	Secrets []string
}
