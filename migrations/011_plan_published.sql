-- Version 11: the daemon validates events against the tracking plan
-- (README "Tracking plan"). outboxd_plan is published with the
-- subscriptions (the publication <OUTBOXD_PUBLICATION>_subscriptions, which
-- `outboxd migrate` manages after the migrations), so that a plan applied
-- in a transaction takes effect from that commit on. This migration marks
-- the version: a daemon of this version refuses a schema at an older one,
-- so `outboxd migrate` runs, and publishes the table.
--
-- It also adds outboxd_subscription.contract: the subscription's own policy
-- for events that break the plan (NULL: OUTBOXD_SUBSCRIPTION_CONTRACT).
-- A tern template.

SET LOCAL lock_timeout = '15s';

ALTER TABLE {{.schema}}.outboxd_subscription ADD COLUMN IF NOT EXISTS contract text
  CONSTRAINT outboxd_subscription_contract CHECK (contract IN ('deliver', 'skip', 'dead-letter'));

COMMENT ON TABLE {{.schema}}.outboxd_plan
  IS 'outboxd: the tracking plan as applied (outboxd plan apply); published with the subscriptions, read by the daemon in commit order';
