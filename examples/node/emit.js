// Emit outbox events from Node.js with node-postgres (pg).
//
// The business write and its event are one transaction: the event exists if
// and only if the change was committed, and outboxd delivers it afterwards.
//
//   cd examples/node && npm install
//   DATABASE_URL='postgres://postgres@127.0.0.1:PORT/postgres?sslmode=disable' node emit.js
//
// Run it against a database where `outboxd migrate` ran, for example the one
// `outboxd dev` prints. It creates two small example tables, starts a batch
// (event written with a plain INSERT INTO domain_event) and adjusts stock
// (event written with the outboxd_emit helper), and prints the event ids.
'use strict';

const { Pool } = require('pg');

const SCHEMA = `
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
);`;

// inTransaction runs fn(client) between BEGIN and COMMIT on one pooled
// connection, and rolls back if fn throws.
async function inTransaction(pool, fn) {
  const client = await pool.connect();
  try {
    await client.query('BEGIN');
    const result = await fn(client);
    await client.query('COMMIT');
    return result;
  } catch (err) {
    await client.query('ROLLBACK');
    throw err;
  } finally {
    client.release();
  }
}

// startBatch inserts the batch and its batch_started event (plain INSERT)
// atomically, and returns the event id (a string: bigint).
async function startBatch(pool, { batchId, orgId, userId, sku, plannedUnits }) {
  return inTransaction(pool, async (client) => {
    await client.query(
      'INSERT INTO example_batch (id, organization_id, sku, planned_units) VALUES ($1, $2, $3, $4)',
      [batchId, orgId, sku, plannedUnits],
    );
    const { rows } = await client.query(
      `INSERT INTO domain_event
         (event_name, organization_id, user_id, entity_type, entity_id, correlation_id, source, properties)
       VALUES ('batch_started', $1, $2, 'batch', $3, $4, 'node-example', $5)
       RETURNING id`,
      [orgId, userId, batchId, `batch-${batchId}`, JSON.stringify({ batch_id: batchId, sku, planned_units: plannedUnits })],
    );
    return rows[0].id;
  });
}

// adjustInventory changes stock and emits inventory_adjusted with the
// outboxd_emit helper, atomically; stock going negative rolls back both.
async function adjustInventory(pool, { orgId, userId, sku, delta, reason }) {
  return inTransaction(pool, async (client) => {
    const updated = await client.query(
      `UPDATE example_inventory SET on_hand = on_hand + $3
       WHERE organization_id = $1 AND sku = $2 RETURNING on_hand`,
      [orgId, sku, delta],
    );
    if (updated.rowCount === 0) {
      throw new Error(`organization ${orgId} does not stock ${sku}`);
    }
    const onHand = updated.rows[0].on_hand;
    const { rows } = await client.query(
      `SELECT outboxd_emit('inventory_adjusted', $1, $2::jsonb,
         user_id => $3, entity_type => 'sku', entity_id => $4, source => 'node-example') AS id`,
      [orgId, JSON.stringify({ sku, delta, reason, on_hand: onHand }), userId, sku],
    );
    return rows[0].id;
  });
}

async function main() {
  if (!process.env.DATABASE_URL) {
    throw new Error('set DATABASE_URL to a database where `outboxd migrate` ran (`outboxd dev` prints one)');
  }
  const pool = new Pool({ connectionString: process.env.DATABASE_URL });
  try {
    await pool.query(SCHEMA);
    await pool.query("INSERT INTO example_inventory VALUES (7, 'SKU-SD-800', 100) ON CONFLICT DO NOTHING");
    const { rows } = await pool.query('SELECT count(*)::int AS n FROM example_batch');
    const batchId = `B-NODE-${rows[0].n + 1}`;
    let id = await startBatch(pool, { batchId, orgId: 7, userId: 3, sku: 'SKU-SD-800', plannedUnits: 120 });
    console.log(`batch ${batchId} started: event ${id} (batch_started)`);
    id = await adjustInventory(pool, { orgId: 7, userId: 3, sku: 'SKU-SD-800', delta: -3, reason: 'sale' });
    console.log(`stock adjusted: event ${id} (inventory_adjusted)`);
  } finally {
    await pool.end();
  }
}

module.exports = { startBatch, adjustInventory, inTransaction };

if (require.main === module) {
  main().catch((err) => {
    console.error('node-example:', err.message);
    process.exit(1);
  });
}
