-- Emit outbox events from plain SQL, each in the same transaction as the
-- business write it describes. Run it against a database where
-- `outboxd migrate` ran (for example the one `outboxd dev` prints):
--
--   psql "$DATABASE_URL" -X -v ON_ERROR_STOP=1 -f examples/psql/emit.sql
--
-- It can run again and again: each run starts a new batch. With `outboxd dev`
-- or `outboxd run` streaming that database, the events are delivered a few
-- milliseconds after each COMMIT.

-- The example's business table.
CREATE TABLE IF NOT EXISTS example_batch (
  id              text        PRIMARY KEY,
  organization_id bigint      NOT NULL,
  sku             text        NOT NULL,
  planned_units   integer     NOT NULL,
  produced_units  integer,
  started_at      timestamptz NOT NULL DEFAULT now(),
  completed_at    timestamptz
);
CREATE SEQUENCE IF NOT EXISTS example_batch_seq START 1000;

-- A new batch id for this run, in the psql variable :batch_id.
SELECT 'B-' || nextval('example_batch_seq') AS batch_id \gset

-- 1. The business write and its event with the outboxd_emit helper, which
--    returns the event's id.
BEGIN;
INSERT INTO example_batch (id, organization_id, sku, planned_units)
VALUES (:'batch_id', 7, 'SKU-SD-800', 120);
SELECT outboxd_emit(
  'batch_started', 7,
  jsonb_build_object('batch_id', :'batch_id', 'sku', 'SKU-SD-800', 'planned_units', 120),
  user_id        => 3,
  entity_type    => 'batch',
  entity_id      => :'batch_id',
  correlation_id => 'batch-' || :'batch_id',
  source         => 'psql-example'
) AS batch_started_event_id;
COMMIT;

-- 2. The same with a plain INSERT INTO domain_event: all it takes from any
--    language that speaks SQL.
BEGIN;
UPDATE example_batch SET produced_units = 114, completed_at = now() WHERE id = :'batch_id';
INSERT INTO domain_event
  (event_name, organization_id, user_id, entity_type, entity_id, correlation_id, source, properties)
VALUES
  ('batch_completed', 7, 3, 'batch', :'batch_id', 'batch-' || :'batch_id', 'psql-example',
   jsonb_build_object('batch_id', :'batch_id', 'sku', 'SKU-SD-800', 'produced_units', 114, 'planned_units', 120))
RETURNING id AS batch_completed_event_id;
COMMIT;
