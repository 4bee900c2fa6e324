-- Version 3 (with the REPLICA IDENTITY of outboxd_subscription at the end):
-- outboxd_emit converts its arguments to the outbox table's own
-- column types. Version 1 inserted its text and bigint arguments as they are,
-- so on a table an ORM made (an integer entity_id, json or text properties)
-- the call failed with "column ... is of type integer but expression is of
-- type text". jsonb_populate_record casts each value to its column's type, as
-- an INSERT of a quoted literal would. occurred_at is given too (the time of
-- the call, as UTC text, which both timestamptz and timestamp-without-zone
-- columns read as that instant): an ORM's table often has no database
-- default for it. A tern template like version 1.

SET LOCAL lock_timeout = '15s';

CREATE OR REPLACE FUNCTION {{.schema}}.outboxd_emit(
  event_name      text,
  organization_id bigint,
  properties      jsonb  DEFAULT '{}',
  user_id         bigint DEFAULT NULL,
  entity_type     text   DEFAULT NULL,
  entity_id       text   DEFAULT NULL,
  correlation_id  text   DEFAULT NULL,
  source          text   DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql
AS $outboxd$
DECLARE
  new_id bigint;
BEGIN
  INSERT INTO {{.schema}}.{{.table}}
    (event_name, occurred_at, organization_id, properties, user_id, entity_type, entity_id, correlation_id, source)
  SELECT r.event_name, r.occurred_at, r.organization_id, r.properties, r.user_id, r.entity_type, r.entity_id,
         r.correlation_id, r.source
  FROM jsonb_populate_record(NULL::{{.schema}}.{{.table}}, jsonb_build_object(
    'event_name', outboxd_emit.event_name,
    'occurred_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    'organization_id', outboxd_emit.organization_id,
    'properties', coalesce(outboxd_emit.properties, '{}'),
    'user_id', outboxd_emit.user_id,
    'entity_type', outboxd_emit.entity_type,
    'entity_id', outboxd_emit.entity_id,
    'correlation_id', outboxd_emit.correlation_id,
    'source', outboxd_emit.source)) AS r
  RETURNING id INTO new_id;
  RETURN new_id;
END
$outboxd$;

-- Updates of a subscription carry its whole old row: a TOASTed column the
-- update did not touch (a long secrets or events array) then comes with its
-- value instead of as "unchanged", and the router need not rely on the copy it
-- holds. Subscription rows change rarely; the extra WAL is small.
ALTER TABLE {{.schema}}.outboxd_subscription REPLICA IDENTITY FULL;
