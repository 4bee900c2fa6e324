-- A tenant subscription whose endpoint has failed every retry for
-- OUTBOXD_SUBSCRIPTION_DISABLE_AFTER is disabled, and the application is told
-- through an event in the outbox (outboxd_subscription_disabled), inserted in
-- the same transaction and delivered like any other.
--
-- SECURITY DEFINER: the daemon's least-privilege role has no INSERT on the
-- outbox (it cannot forge events); this function inserts that one event only,
-- for the subscription it has just disabled, and only when the oldest of the
-- subscription's parked deliveries was parked more than p_after ago (a parked
-- delivery stays parked only while every retry fails). Only the outbox's
-- columns that exist are filled, each cast to its type; an insert the outbox
-- refuses (a tracking plan's trigger, a column of another type) leaves the
-- subscription disabled and returns the error's message.
CREATE OR REPLACE FUNCTION {{.schema}}.outboxd_disable_failing_subscription(
  p_id bigint, p_target text, p_after interval, p_reason text, p_last_status integer)
RETURNS TABLE (failing_since timestamptz, new_event_id bigint, event_error text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  since timestamptz;
  org bigint;
  props jsonb;
  cols text := '';
  vals text := '';
  c record;
BEGIN
  SELECT min(p.parked_at) INTO since FROM {{.schema}}.outboxd_parked AS p WHERE p.target = p_target;
  IF since IS NULL OR since > now() - p_after THEN
    RETURN;
  END IF;
  UPDATE {{.schema}}.outboxd_subscription AS s SET enabled = false,
    disabled_reason = p_reason || ' since ' || since::text, updated_at = now()
  WHERE s.id = p_id AND s.enabled
  RETURNING s.organization_id INTO org;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  failing_since := since;
  props := jsonb_build_object('subscription_id', p_id, 'reason', p_reason, 'failing_since', since);
  IF p_last_status IS NOT NULL THEN
    props := props || jsonb_build_object('last_status', p_last_status);
  END IF;
  FOR c IN SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS typ
    FROM pg_catalog.pg_attribute AS a
    WHERE a.attrelid = '{{.schema}}.{{.table}}'::regclass AND a.attnum > 0 AND NOT a.attisdropped
      AND a.attname IN ('event_name', 'occurred_at', 'organization_id', 'entity_type', 'entity_id', 'source', 'schema_version', 'properties')
    ORDER BY a.attnum
  LOOP
    IF c.name = 'organization_id' AND org IS NULL THEN
      CONTINUE;
    END IF;
    cols := cols || CASE WHEN cols = '' THEN '' ELSE ', ' END || quote_ident(c.name);
    vals := vals || CASE WHEN vals = '' THEN '' ELSE ', ' END || CASE c.name
      WHEN 'event_name' THEN quote_literal('outboxd_subscription_disabled')
      WHEN 'occurred_at' THEN 'now()'
      WHEN 'organization_id' THEN quote_literal(org::text)
      WHEN 'entity_type' THEN quote_literal('subscription')
      WHEN 'entity_id' THEN quote_literal(p_id::text)
      WHEN 'source' THEN quote_literal('outboxd')
      WHEN 'schema_version' THEN quote_literal('1')
      ELSE quote_literal(props::text)
    END || '::' || c.typ;
  END LOOP;
  BEGIN
    EXECUTE format('INSERT INTO {{.schema}}.{{.table}} (%s) VALUES (%s) RETURNING id', cols, vals) INTO new_event_id;
  EXCEPTION WHEN OTHERS THEN
    new_event_id := NULL;
    event_error := SQLERRM;
  END;
  RETURN NEXT;
END
$fn$;
REVOKE ALL ON FUNCTION {{.schema}}.outboxd_disable_failing_subscription(bigint, text, interval, text, integer) FROM PUBLIC;
