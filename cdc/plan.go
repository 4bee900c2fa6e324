package cdc

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/store"
)

// planChange reads the tracking plan in the catch-up's snapshot: an insert
// of its row, or a delete (no plan stored) of the same relation. It seeds
// the router's plan as the subscriptions seed its registry, so that the
// streamed transactions after the slot's consistent point are checked
// against the plan they committed under. The caller knows the table exists.
func planChange(ctx context.Context, conn *pgconn.PgConn, schema string) (*decode.Change, error) {
	t := store.Ident(schema, PlanTable)
	rr := conn.ExecParams(ctx, "SELECT source, source_sha256 FROM "+t, nil, nil, nil, nil)
	rel := &decode.Relation{Namespace: schema, Name: PlanTable, Columns: []decode.Column{{Name: "source"}, {Name: "source_sha256"}}}
	c := &decode.Change{Kind: decode.KindDelete, Row: &decode.Row{Relation: rel, Values: make([][]byte, 2)}}
	for rr.NextRow() {
		c.Kind = decode.KindInsert
		for i, v := range rr.Values() {
			c.Row.Values[i] = append([]byte{}, v...)
		}
	}
	if _, err := rr.Close(); err != nil {
		return nil, fmt.Errorf("read the tracking plan: %w", err)
	}
	return c, nil
}
