-- Version 5: the outbox's message namespace (docs/DESIGN.md §4). Receivers
-- deduplicate on the message id (webhook-id, Nats-Msg-Id, …), which must
-- never name two different events: not when two outboxes post to one
-- endpoint. Every message id starts with this namespace, a random name made
-- here once and never changed by outboxd: it survives restarts, slot resets
-- and restores (the restored events are the same events). A copy of the
-- database that becomes another outbox needs a namespace of its own:
--   UPDATE outboxd_outbox SET namespace = left(encode(sha256(convert_to(gen_random_uuid()::text, 'UTF8')), 'hex'), 16);
-- A tern template.
--
-- 16 hex digits (64 bits) of a version-4 UUID hashed with SHA-256, both in
-- core from PostgreSQL 13. The namespace is no secret (every message id
-- carries it), so every role may read it: a least-privilege role made before
-- this version runs on without a new grant.

CREATE TABLE IF NOT EXISTS {{.schema}}.outboxd_outbox (
  singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
  namespace  text        NOT NULL CHECK (namespace ~ '^[0-9a-z]{1,32}$'),
  created_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO {{.schema}}.outboxd_outbox (namespace)
VALUES (left(encode(sha256(convert_to(gen_random_uuid()::text, 'UTF8')), 'hex'), 16))
ON CONFLICT (singleton) DO NOTHING;

GRANT SELECT ON {{.schema}}.outboxd_outbox TO PUBLIC;
