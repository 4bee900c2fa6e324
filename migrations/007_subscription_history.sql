-- Version 7: a history of the subscriptions' routing, so that a catch-up
-- (first start, slot reset or recreation) routes each row it reads from the
-- table as the stream would have: to the subscriptions that were enabled and
-- matched it when it committed. One row per insert, delete, or change of
-- enabled, organization_id or events (never the URL or the secrets), written
-- by a trigger whoever makes the change; the commit time of each comes from
-- pg_xact_commit_timestamp(xmin), which needs track_commit_timestamp = on.
-- Without it a catch-up routes with the subscriptions as they are at its
-- snapshot. A tern template.

SET LOCAL lock_timeout = '15s';

CREATE TABLE IF NOT EXISTS {{.schema}}.outboxd_subscription_history (
  id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  subscription_id bigint      NOT NULL,
  deleted         boolean     NOT NULL DEFAULT false,
  enabled         boolean     NOT NULL,
  organization_id bigint,
  events          text[]      NOT NULL DEFAULT '{}',
  -- true for the entries this migration seeds: the state since always.
  since_always    boolean     NOT NULL DEFAULT false,
  recorded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS outboxd_subscription_history_sub ON {{.schema}}.outboxd_subscription_history (subscription_id, id);

-- SECURITY DEFINER: whoever changes a subscription (an operator, the
-- application, outboxd disabling a 410 endpoint) records it without a grant
-- on the history.
CREATE OR REPLACE FUNCTION {{.schema}}.outboxd_subscription_history_record() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
  IF TG_OP = 'DELETE' THEN
    INSERT INTO {{.schema}}.outboxd_subscription_history (subscription_id, deleted, enabled, organization_id, events)
    VALUES (OLD.id, true, false, OLD.organization_id, coalesce(OLD.events, '{}'));
    RETURN OLD;
  END IF;
  IF TG_OP = 'UPDATE' AND NEW.id = OLD.id AND NEW.enabled IS NOT DISTINCT FROM OLD.enabled
     AND NEW.organization_id IS NOT DISTINCT FROM OLD.organization_id AND NEW.events IS NOT DISTINCT FROM OLD.events THEN
    RETURN NEW; -- URL, secrets or bookkeeping: routing unchanged
  END IF;
  IF TG_OP = 'UPDATE' AND NEW.id <> OLD.id THEN
    INSERT INTO {{.schema}}.outboxd_subscription_history (subscription_id, deleted, enabled, organization_id, events)
    VALUES (OLD.id, true, false, OLD.organization_id, coalesce(OLD.events, '{}'));
  END IF;
  INSERT INTO {{.schema}}.outboxd_subscription_history (subscription_id, enabled, organization_id, events)
  VALUES (NEW.id, coalesce(NEW.enabled, false), NEW.organization_id, coalesce(NEW.events, '{}'));
  RETURN NEW;
END
$fn$;
REVOKE ALL ON FUNCTION {{.schema}}.outboxd_subscription_history_record() FROM PUBLIC;

DROP TRIGGER IF EXISTS outboxd_subscription_history ON {{.schema}}.outboxd_subscription;
CREATE TRIGGER outboxd_subscription_history
  AFTER INSERT OR UPDATE OR DELETE ON {{.schema}}.outboxd_subscription
  FOR EACH ROW EXECUTE FUNCTION {{.schema}}.outboxd_subscription_history_record();

-- The subscriptions as they are now are the history's first entries, taken
-- to hold since always: rows older than this migration are routed with them.
INSERT INTO {{.schema}}.outboxd_subscription_history (subscription_id, enabled, organization_id, events, since_always)
SELECT s.id, s.enabled, s.organization_id, s.events, true FROM {{.schema}}.outboxd_subscription AS s
WHERE NOT EXISTS (SELECT 1 FROM {{.schema}}.outboxd_subscription_history AS h WHERE h.subscription_id = s.id);
