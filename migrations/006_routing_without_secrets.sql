-- Version 6: the routing state kept with the checkpoint holds no secret.
-- outboxd_checkpoint.routing is the subscription registry as of the
-- checkpoint; it used to copy every subscription's signing secrets. From this
-- version on it names them by fingerprint ("sha256:" and the first 16 hex
-- digits of the secret's SHA-256) and the daemon reads their values from
-- outboxd_subscription when it takes the slot. This rewrites states written
-- before. A tern template.

SET LOCAL lock_timeout = '15s';

UPDATE {{.schema}}.outboxd_checkpoint AS c
SET routing = (
  SELECT coalesce(jsonb_agg(
    CASE WHEN jsonb_typeof(s -> 'secrets') = 'array' THEN
      (s - 'secrets') || jsonb_build_object('secret_fingerprints', (
        SELECT coalesce(jsonb_agg('sha256:' || left(encode(sha256(convert_to(x, 'UTF8')), 'hex'), 16) ORDER BY n), '[]'::jsonb)
        FROM jsonb_array_elements_text(s -> 'secrets') WITH ORDINALITY AS a(x, n)))
    ELSE s END ORDER BY ord), '[]'::jsonb)
  FROM jsonb_array_elements(c.routing) WITH ORDINALITY AS e(s, ord))
WHERE c.routing IS NOT NULL AND jsonb_typeof(c.routing) = 'array';
