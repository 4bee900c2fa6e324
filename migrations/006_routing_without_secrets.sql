-- Version 6: the routing state kept with the checkpoint holds no secret.
-- outboxd_checkpoint.routing is the subscription registry as of the
-- checkpoint; it used to copy every subscription's signing secrets and URL.
-- From this version on it names the secrets, and a URL that carries
-- credentials (userinfo or a query string), by fingerprint ("sha256:" and the
-- first 16 hex digits of the value's SHA-256), and the daemon reads their
-- values from outboxd_subscription when it takes the slot. This rewrites
-- states written before. A tern template.

SET LOCAL lock_timeout = '15s';

UPDATE {{.schema}}.outboxd_checkpoint AS c
SET routing = (
  SELECT coalesce(jsonb_agg(
    CASE WHEN s ->> 'url' ~ '^[^/]*//[^/?#]*@' OR s ->> 'url' ~ '[?#]' THEN
      jsonb_set(s, '{url}', '""') || jsonb_build_object('url_fingerprint',
        'sha256:' || left(encode(sha256(convert_to(s ->> 'url', 'UTF8')), 'hex'), 16))
    ELSE s END ORDER BY ord), '[]'::jsonb)
  FROM jsonb_array_elements((
    SELECT coalesce(jsonb_agg(
      CASE WHEN jsonb_typeof(s -> 'secrets') = 'array' THEN
        (s - 'secrets') || jsonb_build_object('secret_fingerprints', (
          SELECT coalesce(jsonb_agg('sha256:' || left(encode(sha256(convert_to(x, 'UTF8')), 'hex'), 16) ORDER BY n), '[]'::jsonb)
          FROM jsonb_array_elements_text(s -> 'secrets') WITH ORDINALITY AS a(x, n)))
      ELSE s END ORDER BY ord), '[]'::jsonb)
    FROM jsonb_array_elements(c.routing) WITH ORDINALITY AS e(s, ord))) WITH ORDINALITY AS e(s, ord))
WHERE c.routing IS NOT NULL AND jsonb_typeof(c.routing) = 'array';
