-- roles.sql: a least-privilege role for running outboxd. Not applied by
-- `outboxd migrate`: review it, then apply it as a superuser (or a role with
-- CREATEROLE that owns the tables) after `outboxd migrate` has created them:
--
--   psql "$ADMIN_DATABASE_URL" -v ON_ERROR_STOP=1 -f migrations/roles.sql
--   psql "$ADMIN_DATABASE_URL" -c "ALTER ROLE outboxd PASSWORD '…'"
--   OUTBOXD_DATABASE_URL=postgres://outboxd:…@host/db outboxd run
--
-- It is written for the defaults (OUTBOXD_TABLE=public.domain_event): for
-- another table or schema, replace public and domain_event below. Re-running
-- it is harmless.
--
-- What outboxd does, and the privilege each needs:
--   * streams the outbox through a logical replication slot: LOGIN, REPLICATION
--     (on Amazon RDS/Aurora: GRANT rds_replication TO outboxd instead);
--   * reads unprocessed rows (catch-up after slot loss, replay): USAGE on the
--     schema, SELECT on the outbox table;
--   * marks rows delivered: UPDATE of is_processed, processed_at and
--     delivery_attempts only. It never inserts, deletes or edits events;
--   * keeps its checkpoint and dead letters: SELECT, INSERT, UPDATE, DELETE on
--     outboxd_checkpoint and outboxd_dead_letter;
--   * routes the rows a catch-up reads as they were routed at their commit:
--     SELECT on outboxd_subscription_history;
--   * validates events against the tracking plan (read at start and by a
--     catch-up): SELECT on outboxd_plan;
--   * checks the schema version at start: SELECT on outboxd_schema_version;
--   * reads the outbox's message namespace: SELECT on outboxd_outbox
--     (migration 5 grants it to PUBLIC already; the namespace is no secret).
-- It needs no ownership and no superuser. `outboxd migrate` is a different
-- matter: it runs as the table owner, since creating a publication for a table
-- requires owning it.
-- CONNECT on the database is granted to PUBLIC by default; if you revoked it:
--   GRANT CONNECT ON DATABASE yourdb TO outboxd;
--
-- What REPLICATION gives beyond outboxd's needs, plainly. It is a
-- cluster-level attribute, and table grants do not bound it:
--   * logical decoding reads every change of every table of a database the
--     role can connect to with replication=database: with its own slot and
--     another output plugin (test_decoding) it could stream the changes of
--     any table there, not only the outbox;
--   * physical replication (pg_basebackup, a walreceiver) copies the whole
--     cluster: every database, pg_authid's password hashes included.
-- The second is closed in pg_hba.conf: logical replication connections match
-- the database's name, physical ones only the keyword `replication`. Allow
-- the role its own database and no `replication` line:
--
--   # TYPE  DATABASE     USER     ADDRESS        METHOD
--   hostssl yourdb       outboxd  10.0.0.0/8     scram-sha-256
--   # and no line with DATABASE `replication` (or `all` ... `replication`)
--   # matching outboxd
--
-- `outboxd status` warns when the server still accepts a physical replication
-- connection from the role, and when the role is a superuser. The first
-- (other tables of the same database) is inherent to logical replication:
-- keep the outbox in a database that holds nothing the role must not read,
-- or accept that a REPLICATION role can read that database.

DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'outboxd') THEN
    CREATE ROLE outboxd LOGIN REPLICATION;
  END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO outboxd;

GRANT SELECT ON public.domain_event TO outboxd;
GRANT UPDATE (is_processed, processed_at, delivery_attempts) ON public.domain_event TO outboxd;
-- A subscription failing for OUTBOXD_SUBSCRIPTION_DISABLE_AFTER is disabled
-- with an outboxd_subscription_disabled event in the outbox, through this
-- SECURITY DEFINER function (migration 9): the role still cannot insert
-- events of its own.
GRANT EXECUTE ON FUNCTION public.outboxd_disable_failing_subscription(bigint, text, interval, text, integer) TO outboxd;

GRANT SELECT, INSERT, UPDATE, DELETE ON public.outboxd_checkpoint, public.outboxd_dead_letter, public.outboxd_parked TO outboxd;
-- Subscriptions: read for routing; update only the columns that disable an
-- endpoint that answered 410 (never the URL, the secrets or the event globs:
-- outboxd cannot repoint a tenant). A role given UPDATE on the whole table by
-- an earlier version of this file keeps it until revoked:
REVOKE UPDATE ON public.outboxd_subscription FROM outboxd;
GRANT SELECT ON public.outboxd_subscription TO outboxd;
GRANT UPDATE (enabled, disabled_reason, updated_at) ON public.outboxd_subscription TO outboxd;
GRANT SELECT ON public.outboxd_subscription_history TO outboxd;
GRANT SELECT ON public.outboxd_plan TO outboxd;
GRANT SELECT ON public.outboxd_schema_version TO outboxd;
GRANT SELECT ON public.outboxd_outbox TO outboxd;
