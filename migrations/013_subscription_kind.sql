-- Version 13: a subscription of another kind than a webhook (README.md
-- "Destinations declared in SQL"). kind names the sink (webhook, the default
-- and what every existing subscription gets; posthog, ga4, kafka, nats) and
-- settings its settings, as an object of strings keyed by the variable
-- suffixes of that kind (HOST, TOPIC, ...). A secret is never stored: a key
-- that names one (ending in KEY, SECRET, PASSWORD, TOKEN, CREDS or SEED) is
-- refused here, and is given by reference instead (PROJECT_API_KEY_ENV naming
-- an OUTBOXD_SECRET_* variable of the daemon, or PROJECT_API_KEY_FILE naming
-- a file in OUTBOXD_SECRETS_DIR). Changes reach the daemon through the
-- replication stream in commit order, like the other columns, and are kept
-- in the routing state with the checkpoint. A tern template.

SET LOCAL lock_timeout = '15s';

CREATE OR REPLACE FUNCTION {{.schema}}.outboxd_subscription_settings_ok(s jsonb) RETURNS boolean
  LANGUAGE sql IMMUTABLE AS $$
  SELECT jsonb_typeof(s) = 'object' AND NOT EXISTS (
    SELECT 1 FROM jsonb_each(s) AS e
    WHERE jsonb_typeof(e.value) <> 'string'
       OR e.key !~ '^[A-Z][A-Z0-9_]*$'
       OR e.key ~ '(KEY|SECRET|PASSWORD|TOKEN|CREDS|SEED)$')
$$;

ALTER TABLE {{.schema}}.outboxd_subscription ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'webhook';
ALTER TABLE {{.schema}}.outboxd_subscription ADD COLUMN IF NOT EXISTS settings jsonb NOT NULL DEFAULT '{}';
ALTER TABLE {{.schema}}.outboxd_subscription DROP CONSTRAINT IF EXISTS outboxd_subscription_kind_check;
ALTER TABLE {{.schema}}.outboxd_subscription ADD CONSTRAINT outboxd_subscription_kind_check
  CHECK (kind IN ('webhook', 'posthog', 'ga4', 'kafka', 'nats'));
ALTER TABLE {{.schema}}.outboxd_subscription DROP CONSTRAINT IF EXISTS outboxd_subscription_settings_check;
ALTER TABLE {{.schema}}.outboxd_subscription ADD CONSTRAINT outboxd_subscription_settings_check
  CHECK ({{.schema}}.outboxd_subscription_settings_ok(settings));
