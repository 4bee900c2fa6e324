"""Emit outbox events from Python with psycopg 3.

The business write and its event are one transaction: the event exists if and
only if the change was committed, and outboxd delivers it afterwards.

    pip install "psycopg[binary]>=3.1"
    DATABASE_URL='postgres://postgres@127.0.0.1:PORT/postgres?sslmode=disable' python examples/python/emit.py

Run it against a database where `outboxd migrate` ran, for example the one
`outboxd dev` prints. It creates two small example tables, starts a batch
(event written with the outboxd_emit helper) and adjusts stock (event written
with a plain INSERT INTO domain_event), and prints the event ids.
"""

import os
import sys

import psycopg
from psycopg.types.json import Jsonb

SCHEMA = """
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
);
"""


def start_batch(conn, batch_id, org_id, user_id, sku, planned_units):
    """Insert the batch and emit batch_started with outboxd_emit, atomically.

    Returns the event id. If either statement fails, neither is committed.
    """
    with conn.transaction():
        conn.execute(
            "INSERT INTO example_batch (id, organization_id, sku, planned_units) VALUES (%s, %s, %s, %s)",
            (batch_id, org_id, sku, planned_units),
        )
        (event_id,) = conn.execute(
            """SELECT outboxd_emit('batch_started', %s, %s,
                   user_id => %s, entity_type => 'batch', entity_id => %s,
                   correlation_id => %s, source => 'python-example')""",
            (
                org_id,
                Jsonb({"batch_id": batch_id, "sku": sku, "planned_units": planned_units}),
                user_id,
                batch_id,
                "batch-" + batch_id,
            ),
        ).fetchone()
    return event_id


def adjust_inventory(conn, org_id, user_id, sku, delta, reason):
    """Change stock and emit inventory_adjusted with a plain INSERT, atomically.

    Returns the event id. Stock going negative fails the CHECK constraint and
    rolls back both writes.
    """
    with conn.transaction():
        row = conn.execute(
            "UPDATE example_inventory SET on_hand = on_hand + %s"
            " WHERE organization_id = %s AND sku = %s RETURNING on_hand",
            (delta, org_id, sku),
        ).fetchone()
        if row is None:
            raise LookupError(f"organization {org_id} does not stock {sku}")
        (event_id,) = conn.execute(
            """INSERT INTO domain_event
                 (event_name, organization_id, user_id, entity_type, entity_id, source, properties)
               VALUES ('inventory_adjusted', %s, %s, 'sku', %s, 'python-example', %s)
               RETURNING id""",
            (org_id, user_id, sku, Jsonb({"sku": sku, "delta": delta, "reason": reason, "on_hand": row[0]})),
        ).fetchone()
    return event_id


def main():
    url = os.environ.get("DATABASE_URL")
    if not url:
        sys.exit("set DATABASE_URL to a database where `outboxd migrate` ran (`outboxd dev` prints one)")
    # autocommit: every `with conn.transaction()` block is then its own
    # BEGIN ... COMMIT (or ROLLBACK on an exception).
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(
            "INSERT INTO example_inventory VALUES (7, 'SKU-SD-800', 100) ON CONFLICT DO NOTHING"
        )
        (n,) = conn.execute("SELECT count(*) FROM example_batch").fetchone()
        batch_id = f"B-PY-{n + 1}"
        event_id = start_batch(conn, batch_id, 7, 3, "SKU-SD-800", 120)
        print(f"batch {batch_id} started: event {event_id} (batch_started)")
        event_id = adjust_inventory(conn, 7, 3, "SKU-SD-800", -3, "sale")
        print(f"stock adjusted: event {event_id} (inventory_adjusted)")


if __name__ == "__main__":
    main()
