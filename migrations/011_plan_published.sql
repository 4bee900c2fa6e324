-- Version 11: the daemon validates events against the tracking plan
-- (README "Tracking plan"). outboxd_plan is published with the
-- subscriptions (the publication <OUTBOXD_PUBLICATION>_subscriptions, which
-- `outboxd migrate` manages after the migrations), so that a plan applied
-- in a transaction takes effect from that commit on. This migration marks
-- the version: a daemon of this version refuses a schema at an older one,
-- so `outboxd migrate` runs, and publishes the table.
-- A tern template.

COMMENT ON TABLE {{.schema}}.outboxd_plan
  IS 'outboxd: the tracking plan as applied (outboxd plan apply); published with the subscriptions, read by the daemon in commit order';
