-- Version 8: the tracking plan (README "Tracking plan"), stored by
-- `outboxd plan apply`, and the function of its optional BEFORE INSERT
-- trigger on the outbox table. The trigger itself is created and dropped by
-- `outboxd plan apply --trigger enforce|record|off`, not here: without it
-- nothing changes for inserts. A tern template.
--
-- The trigger reads the plan from these tables at every insert, so applying
-- a new plan changes what it enforces without re-creating it. The tables are
-- not in a publication: the daemon does not read the plan yet.

SET LOCAL lock_timeout = '15s';

-- The plan as applied: one row. source is the YAML file; the envelope rules
-- are copied out for the trigger.
CREATE TABLE IF NOT EXISTS {{.schema}}.outboxd_plan (
  singleton         boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
  source            text        NOT NULL,
  source_sha256     text        NOT NULL,
  envelope_required text[]      NOT NULL DEFAULT '{}',
  -- The allowed entity_type values; empty allows any.
  entity_types      text[]      NOT NULL DEFAULT '{}',
  applied_at        timestamptz NOT NULL DEFAULT now()
);

-- One row per event name and schema_version of the plan. required maps each
-- required property to the JSON Schema type names it may have
-- ({"delta": ["number"]}; [] for any type); schema is the whole JSON Schema.
CREATE TABLE IF NOT EXISTS {{.schema}}.outboxd_plan_event (
  event_name     text    NOT NULL,
  schema_version integer NOT NULL,
  description    text    NOT NULL DEFAULT '',
  owner          text    NOT NULL DEFAULT '',
  required       jsonb   NOT NULL DEFAULT '{}',
  -- The same as one SQL/JSON path predicate over properties: the trigger's
  -- fast check of a valid row, without a query.
  required_path  jsonpath NOT NULL DEFAULT 'true',
  schema         jsonb   NOT NULL,
  PRIMARY KEY (event_name, schema_version)
);

-- What the trigger in record mode let in against the plan: one row per rule
-- broken. event_id is the row's id (NULL when the id is not an integer).
CREATE TABLE IF NOT EXISTS {{.schema}}.outboxd_plan_violation (
  id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  event_id       bigint,
  event_name     text,
  schema_version integer,
  rule           text        NOT NULL,
  recorded_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS outboxd_plan_violation_event ON {{.schema}}.outboxd_plan_violation (event_id);

-- The trigger function. Its one argument is the mode: 'enforce' raises
-- SQLSTATE OB001 (class OB: outboxd) naming the first rule broken, the
-- others in DETAIL; 'record' lets the row in and inserts one
-- outboxd_plan_violation row per rule broken. With no plan applied it lets
-- every row in. The row is read as jsonb, so the function works on an
-- outbox table an ORM made (other column types, missing envelope columns:
-- a missing column reads as NULL). SECURITY DEFINER: the application's role
-- needs no grant on the plan tables.
CREATE OR REPLACE FUNCTION {{.schema}}.outboxd_plan_check() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $outboxd$
DECLARE
  r        jsonb := to_jsonb(NEW);
  ev_name  text := r ->> 'event_name';
  version  integer;
  props    jsonb := r -> 'properties';
  env      record;
  problems text[] := '{}';
  col      text;
  hint     text := 'the tracking plan is in outboxd_plan_event (outboxd plan apply); outboxd plan check lints it';
BEGIN
  -- One query per valid insert: the plan's envelope with the row's event
  -- rule; the rule's path checks the properties. Only a row that fails it
  -- runs the query that names the properties missing or of another type.
  -- A version that is no whole number (an ORM's text column) breaks a rule
  -- of its own, named, rather than the insert with a cast error.
  IF r ->> 'schema_version' IS NULL THEN
    version := 1;
  ELSIF r ->> 'schema_version' ~ '^\s*[0-9]{1,9}\s*$' THEN
    version := (r ->> 'schema_version')::integer;
  ELSE
    problems := problems || format('schema_version "%s" is not a whole number', r ->> 'schema_version');
  END IF;
  SELECT p.envelope_required, p.entity_types, e.required, e.required_path INTO env
  FROM {{.schema}}.outboxd_plan p
  LEFT JOIN {{.schema}}.outboxd_plan_event e ON e.event_name = ev_name AND e.schema_version = version;
  IF NOT FOUND THEN
    RETURN NEW;
  END IF;
  IF jsonb_typeof(props) = 'string' THEN
    -- A json-as-text properties column.
    BEGIN
      props := (props #>> '{}')::jsonb;
    EXCEPTION WHEN invalid_text_representation THEN
      props := NULL;
    END;
  END IF;

  FOREACH col IN ARRAY env.envelope_required LOOP
    IF r ->> col IS NULL THEN
      problems := problems || format('every event requires %s (not NULL)', col);
    END IF;
  END LOOP;
  IF cardinality(env.entity_types) > 0 AND r ->> 'entity_type' IS NOT NULL
     AND NOT (r ->> 'entity_type') = ANY (env.entity_types) THEN
    problems := problems || format('entity_type "%s" is not one of %s', r ->> 'entity_type', array_to_string(env.entity_types, ', '));
  END IF;

  IF env.required IS NULL AND version IS NULL THEN
    NULL; -- named above
  ELSIF env.required IS NULL THEN
    IF EXISTS (SELECT FROM {{.schema}}.outboxd_plan_event e WHERE e.event_name = ev_name) THEN
      problems := problems || format('%s has no schema_version %s in the tracking plan', ev_name, version);
    ELSE
      problems := problems || format('event "%s" is not in the tracking plan', ev_name);
    END IF;
  ELSIF NOT coalesce(jsonb_path_match(props, env.required_path, '{}', true), false) THEN
    -- want: the JSON Schema type names allowed ([] for any); got: the
    -- value's jsonb_typeof, NULL when the key is missing.
    problems := problems || ARRAY(
      SELECT format('%s v%s requires property "%s" (%s)', ev_name, version, w.key,
          coalesce((SELECT string_agg(t, '|') FROM jsonb_array_elements_text(w.value) t), 'any type'))
        || CASE WHEN g.got IS NULL THEN '' ELSE ', got ' || g.got END
      FROM jsonb_each(env.required) AS w(key, value),
        LATERAL (SELECT jsonb_typeof(props -> w.key) AS got) AS g
      WHERE g.got IS NULL
        OR jsonb_array_length(w.value) > 0 AND NOT (w.value ? g.got
          OR g.got = 'number' AND w.value ? 'integer' AND (props ->> w.key)::numeric = trunc((props ->> w.key)::numeric))
      ORDER BY w.key);
  END IF;

  IF cardinality(problems) = 0 THEN
    RETURN NEW;
  END IF;
  IF TG_ARGV[0] = 'record' THEN
    INSERT INTO {{.schema}}.outboxd_plan_violation (event_id, event_name, schema_version, rule)
    SELECT CASE WHEN r ->> 'id' ~ '^-?[0-9]{1,18}$' THEN (r ->> 'id')::bigint END, ev_name, version, p
    FROM unnest(problems) AS p;
    RETURN NEW;
  END IF;
  IF cardinality(problems) = 1 THEN
    RAISE EXCEPTION USING ERRCODE = 'OB001', MESSAGE = 'outboxd plan: ' || problems[1], HINT = hint;
  END IF;
  RAISE EXCEPTION USING ERRCODE = 'OB001', MESSAGE = 'outboxd plan: ' || problems[1], HINT = hint,
    DETAIL = 'also: ' || array_to_string(problems[2:], '; ');
END
$outboxd$;

COMMENT ON FUNCTION {{.schema}}.outboxd_plan_check()
  IS 'outboxd: BEFORE INSERT trigger of the outbox table enforcing the tracking plan (argument enforce or record)';
