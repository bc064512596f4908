-- Trigger functions that application tables attach to enqueue a job when a
-- row changes, e.g.
--
--   CREATE TRIGGER send-welcome AFTER INSERT ON app.users
--     FOR EACH ROW EXECUTE FUNCTION app_jobs.tg_add_job_with_row_id('send-welcome');
--
-- The job's tenant (database_id) is the current database id of the session:
--   * jwt_private.current_database_id() when that function exists (a full
--     LaunchQL / Constructive database);
--   * otherwise the `jwt.claims.database_id` setting, which a standalone
--     application sets per transaction, e.g.
--       SELECT set_config('jwt.claims.database_id', '<uuid>', true);
-- The choice is made on every call, so these files install without
-- jwt_private and still use it if it is created later.
--
-- They are SECURITY DEFINER so that application roles need no rights on the
-- app_jobs tables; search_path is pinned for the same reason as add_job's.

CREATE OR REPLACE FUNCTION app_jobs.tg_add_job_with_row_id()
RETURNS trigger
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
  v_database_id uuid;
BEGIN
  IF to_regprocedure('jwt_private.current_database_id()') IS NOT NULL THEN
    EXECUTE 'SELECT jwt_private.current_database_id()' INTO v_database_id;
  ELSE
    v_database_id := nullif(current_setting('jwt.claims.database_id', true), '')::uuid;
  END IF;

  IF TG_OP IN ('INSERT', 'UPDATE') THEN
    PERFORM app_jobs.add_job(v_database_id, TG_ARGV[0], json_build_object('id', NEW.id));
    RETURN NEW;
  ELSIF TG_OP = 'DELETE' THEN
    PERFORM app_jobs.add_job(v_database_id, TG_ARGV[0], json_build_object('id', OLD.id));
    RETURN OLD;
  END IF;
  RAISE EXCEPTION 'app_jobs.tg_add_job_with_row_id does not handle %', TG_OP;
END;
$function$;

COMMENT ON FUNCTION app_jobs.tg_add_job_with_row_id() IS
  'Row trigger: queue task TG_ARGV[0] with payload {"id": <row id>} (the old row''s id '
  'on DELETE).';

CREATE OR REPLACE FUNCTION app_jobs.tg_add_job_with_row()
RETURNS trigger
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
  v_database_id uuid;
BEGIN
  IF to_regprocedure('jwt_private.current_database_id()') IS NOT NULL THEN
    EXECUTE 'SELECT jwt_private.current_database_id()' INTO v_database_id;
  ELSE
    v_database_id := nullif(current_setting('jwt.claims.database_id', true), '')::uuid;
  END IF;

  IF TG_OP IN ('INSERT', 'UPDATE') THEN
    PERFORM app_jobs.add_job(v_database_id, TG_ARGV[0], to_json(NEW));
    RETURN NEW;
  ELSIF TG_OP = 'DELETE' THEN
    PERFORM app_jobs.add_job(v_database_id, TG_ARGV[0], to_json(OLD));
    RETURN OLD;
  END IF;
  RAISE EXCEPTION 'app_jobs.tg_add_job_with_row does not handle %', TG_OP;
END;
$function$;

COMMENT ON FUNCTION app_jobs.tg_add_job_with_row() IS
  'Row trigger: queue task TG_ARGV[0] with the whole row as its JSON payload (the old '
  'row on DELETE).';

-- Build a JSON object from alternating key / value texts:
-- {k1, v1, k2, v2} -> {"k1" : "v1", "k2" : "v2"}. Every value is a JSON string;
-- a NULL key or value becomes "" (as upstream, which formats each element into
-- a quoted literal). Quotes and backslashes in values are kept as they are.
CREATE OR REPLACE FUNCTION app_jobs.json_build_object_apply(arguments text[])
RETURNS json
LANGUAGE sql
AS $function$
  SELECT json_object(coalesce(array_agg(coalesce(a.item, '') ORDER BY a.n), '{}'::text[]))
    FROM unnest(json_build_object_apply.arguments) WITH ORDINALITY AS a (item, n);
$function$;

COMMENT ON FUNCTION app_jobs.json_build_object_apply(text[]) IS
  'Build a JSON object of string values from alternating key / value texts.';

CREATE OR REPLACE FUNCTION app_jobs.trigger_job_with_fields()
RETURNS trigger
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
  v_database_id uuid;
  v_row         record;
  v_args        text[] := '{}';
  v_column      text[];
  v_value       text;
  i             integer;
BEGIN
  IF to_regprocedure('jwt_private.current_database_id()') IS NOT NULL THEN
    EXECUTE 'SELECT jwt_private.current_database_id()' INTO v_database_id;
  ELSE
    v_database_id := nullif(current_setting('jwt.claims.database_id', true), '')::uuid;
  END IF;

  IF TG_OP IN ('INSERT', 'UPDATE') THEN
    v_row := NEW;
  ELSIF TG_OP = 'DELETE' THEN
    v_row := OLD;
  ELSE
    RAISE EXCEPTION 'app_jobs.trigger_job_with_fields does not handle %', TG_OP;
  END IF;

  -- TG_ARGV[0] is the task; every further argument names a column whose value
  -- (as text) goes into the payload, keyed by the argument as written. An
  -- argument is read the way SQL reads an identifier (unquoted names fold to
  -- lower case, "Quoted" ones keep theirs), as upstream does; but it must be
  -- exactly one identifier: this runs with the owner's rights, so an argument
  -- is never spliced into the query as an expression.
  FOR i IN 1 .. TG_NARGS - 1 LOOP
    v_column := parse_ident(TG_ARGV[i]);
    IF cardinality(v_column) <> 1 THEN
      RAISE EXCEPTION 'app_jobs.trigger_job_with_fields: % is not a column name', TG_ARGV[i];
    END IF;
    EXECUTE format('SELECT ($1).%I::text', v_column[1]) USING v_row INTO v_value;
    v_args := v_args || TG_ARGV[i] || v_value;
  END LOOP;

  PERFORM app_jobs.add_job(v_database_id, TG_ARGV[0], app_jobs.json_build_object_apply(v_args));

  IF TG_OP = 'DELETE' THEN
    RETURN OLD;
  END IF;
  RETURN NEW;
END;
$function$;

COMMENT ON FUNCTION app_jobs.trigger_job_with_fields() IS
  'Row trigger: queue task TG_ARGV[0] with a payload of the columns named by the other '
  'arguments, each value as text.';
