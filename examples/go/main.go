// Command go-example shows how a Go application emits outbox events with pgx:
// the business write and the event are one transaction, so the event exists
// if and only if the change was committed. outboxd delivers it afterwards.
//
// Two ways to write the event, both in the caller's transaction:
//   - StartBatch: a plain INSERT INTO domain_event (the contract, docs/DESIGN.md §2);
//   - AdjustInventory: SELECT outboxd_emit(...), the helper `outboxd migrate`
//     creates, which returns the new event's id.
//
// Run it against a database where `outboxd migrate` ran, for example the one
// `outboxd dev` prints:
//
//	DATABASE_URL='postgres://postgres@127.0.0.1:PORT/postgres?sslmode=disable' go run ./examples/go
//
// It creates two small example tables (example_batch, example_inventory),
// starts a batch and adjusts stock, and prints the event ids.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/jackc/pgx/v5"
)

// Schema creates the example's business tables.
const Schema = `
CREATE TABLE IF NOT EXISTS example_batch (
  id              text        PRIMARY KEY,
  organization_id bigint      NOT NULL,
  sku             text        NOT NULL,
  planned_units   integer     NOT NULL,
  produced_units  integer,
  started_at      timestamptz NOT NULL DEFAULT now(),
  completed_at    timestamptz
);
CREATE TABLE IF NOT EXISTS example_inventory (
  organization_id bigint  NOT NULL,
  sku             text    NOT NULL,
  on_hand         integer NOT NULL CHECK (on_hand >= 0),
  PRIMARY KEY (organization_id, sku)
);`

// Beginner starts a transaction: *pgx.Conn and *pgxpool.Pool both are one.
type Beginner interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}

// Batch is a production batch to start.
type Batch struct {
	ID             string
	OrganizationID int64
	UserID         int64
	SKU            string
	PlannedUnits   int
}

// StartBatch records the batch and its batch_started event in one
// transaction, the event by a plain INSERT INTO domain_event. It returns the
// event's id. If either write fails, neither is committed.
func StartBatch(ctx context.Context, db Beginner, b Batch) (eventID int64, err error) {
	err = pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx,
			`INSERT INTO example_batch (id, organization_id, sku, planned_units) VALUES ($1, $2, $3, $4)`,
			b.ID, b.OrganizationID, b.SKU, b.PlannedUnits); err != nil {
			return fmt.Errorf("insert batch %s: %w", b.ID, err)
		}
		props, err := json.Marshal(map[string]any{"batch_id": b.ID, "sku": b.SKU, "planned_units": b.PlannedUnits})
		if err != nil {
			return err
		}
		return tx.QueryRow(ctx, `INSERT INTO domain_event
  (event_name, organization_id, user_id, entity_type, entity_id, correlation_id, source, properties)
VALUES ('batch_started', $1, $2, 'batch', $3, $4, 'go-example', $5)
RETURNING id`,
			b.OrganizationID, b.UserID, b.ID, "batch-"+b.ID, string(props)).Scan(&eventID)
	})
	return eventID, err
}

// Adjustment is a change of stock.
type Adjustment struct {
	OrganizationID int64
	UserID         int64
	SKU            string
	Delta          int
	Reason         string
}

// ErrUnknownSKU is returned by AdjustInventory for a SKU the organization
// does not stock.
var ErrUnknownSKU = errors.New("unknown sku")

// AdjustInventory changes the stock of a SKU and emits inventory_adjusted
// with outboxd_emit, in one transaction. It returns the event's id. Stock
// that would go negative fails the CHECK constraint: nothing is committed,
// and no event exists.
func AdjustInventory(ctx context.Context, db Beginner, a Adjustment) (eventID int64, err error) {
	err = pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		var onHand int
		err := tx.QueryRow(ctx, `UPDATE example_inventory SET on_hand = on_hand + $3
WHERE organization_id = $1 AND sku = $2 RETURNING on_hand`, a.OrganizationID, a.SKU, a.Delta).Scan(&onHand)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("adjust %s of organization %d: %w", a.SKU, a.OrganizationID, ErrUnknownSKU)
		}
		if err != nil {
			return fmt.Errorf("adjust %s of organization %d: %w", a.SKU, a.OrganizationID, err)
		}
		props, err := json.Marshal(map[string]any{"sku": a.SKU, "delta": a.Delta, "reason": a.Reason, "on_hand": onHand})
		if err != nil {
			return err
		}
		return tx.QueryRow(ctx, `SELECT outboxd_emit('inventory_adjusted', $1, $2::jsonb,
  user_id => $3, entity_type => 'sku', entity_id => $4, source => 'go-example')`,
			a.OrganizationID, string(props), a.UserID, a.SKU).Scan(&eventID)
	})
	return eventID, err
}

// run is main without the process: it sets up the example tables, starts a
// batch and adjusts stock, and reports the event ids to out.
func run(ctx context.Context, databaseURL string, out io.Writer) error {
	if databaseURL == "" {
		return errors.New("set DATABASE_URL to a database where `outboxd migrate` ran (`outboxd dev` prints one)")
	}
	conn, err := pgx.Connect(ctx, databaseURL)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, Schema); err != nil {
		return fmt.Errorf("create example tables: %w", err)
	}
	if _, err := conn.Exec(ctx, `INSERT INTO example_inventory (organization_id, sku, on_hand)
VALUES (7, 'SKU-SD-800', 100) ON CONFLICT DO NOTHING`); err != nil {
		return fmt.Errorf("stock the example SKU: %w", err)
	}
	var n int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM example_batch`).Scan(&n); err != nil {
		return fmt.Errorf("count batches: %w", err)
	}
	b := Batch{ID: fmt.Sprintf("B-GO-%d", n+1), OrganizationID: 7, UserID: 3, SKU: "SKU-SD-800", PlannedUnits: 120}
	id, err := StartBatch(ctx, conn, b)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "batch %s started: event %d (batch_started)\n", b.ID, id)
	id, err = AdjustInventory(ctx, conn, Adjustment{OrganizationID: 7, UserID: 3, SKU: "SKU-SD-800", Delta: -3, Reason: "sale"})
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "stock adjusted: event %d (inventory_adjusted)\n", id)
	return nil
}

func main() {
	if err := run(context.Background(), os.Getenv("DATABASE_URL"), os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "go-example:", err)
		os.Exit(1)
	}
}
