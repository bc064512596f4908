-- The queue API. Signatures (parameter names, defaults, return types), STRICT
-- and SECURITY DEFINER are part of the contract: callers use named arguments.
--
-- Parameter names deliberately equal column names (queue_name, run_at, ...),
-- so inside the bodies every parameter is qualified with its function's name
-- and every column with a table alias.
--
-- Functions that return a row type return NULL when there is nothing to
-- return; `SELECT * FROM f(...)` shows that as ONE row of NULLs, and callers
-- test `id IS NULL`.
--
-- Only add_job / add_scheduled_job (and the trigger helpers in
-- 040_trigger_helpers.sql) are SECURITY DEFINER; they pin search_path so that
-- objects in a caller-controlled schema cannot be picked up while they run
-- with the owner's rights. Every other function runs with the caller's
-- privileges on the tables.

-- add_job ------------------------------------------------------------------

CREATE OR REPLACE FUNCTION app_jobs.add_job(
  db_id        uuid,
  identifier   text,
  payload      json        DEFAULT '{}'::json,
  job_key      text        DEFAULT NULL,
  queue_name   text        DEFAULT NULL,
  run_at       timestamptz DEFAULT now(),
  max_attempts integer     DEFAULT 25,
  priority     integer     DEFAULT 0
)
RETURNS app_jobs.jobs
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
  v_job app_jobs.jobs;
BEGIN
  IF add_job.job_key IS NOT NULL THEN
    -- Keyed: create the job, or overwrite the existing job with this key as
    -- long as no worker holds it. Overwriting starts its retries afresh.
    -- NULL arguments mean "the default" on this path.
    INSERT INTO app_jobs.jobs AS j
      (database_id, task_identifier, payload, queue_name, run_at, max_attempts, key, priority)
    VALUES (
      add_job.db_id,
      add_job.identifier,
      coalesce(add_job.payload, '{}'::json),
      add_job.queue_name,
      coalesce(add_job.run_at, now()),
      coalesce(add_job.max_attempts, 25),
      add_job.job_key,
      coalesce(add_job.priority, 0)
    )
    ON CONFLICT (key) DO UPDATE
       SET task_identifier = excluded.task_identifier,
           payload         = excluded.payload,
           queue_name      = excluded.queue_name,
           max_attempts    = excluded.max_attempts,
           run_at          = excluded.run_at,
           priority        = excluded.priority,
           attempts        = 0,
           last_error      = NULL
     WHERE j.locked_at IS NULL
    RETURNING j.* INTO v_job;

    IF FOUND THEN
      RETURN v_job;
    END IF;

    -- The job with this key is running. Leave it running, but take the key
    -- away from it and make sure it is never retried; the new request becomes
    -- a separate job below (which, as upstream, does not carry the key).
    UPDATE app_jobs.jobs AS j
       SET key = NULL,
           attempts = j.max_attempts
     WHERE j.key = add_job.job_key;
  END IF;

  INSERT INTO app_jobs.jobs
    (database_id, task_identifier, payload, queue_name, run_at, max_attempts, priority)
  VALUES (
    add_job.db_id,
    add_job.identifier,
    add_job.payload,
    add_job.queue_name,
    add_job.run_at,
    add_job.max_attempts,
    add_job.priority
  )
  RETURNING * INTO v_job;

  RETURN v_job;
END;
$function$;

COMMENT ON FUNCTION app_jobs.add_job(uuid, text, json, text, text, timestamptz, integer, integer) IS
  'Queue a job for tenant db_id. With job_key: replace the pending job that has this key '
  '(resetting its attempts), or, when that job is running, retire it and queue a new one.';

-- add_scheduled_job ----------------------------------------------------------

CREATE OR REPLACE FUNCTION app_jobs.add_scheduled_job(
  db_id         uuid,
  identifier    text,
  payload       json    DEFAULT '{}'::json,
  schedule_info json    DEFAULT '{}'::json,
  job_key       text    DEFAULT NULL,
  queue_name    text    DEFAULT NULL,
  max_attempts  integer DEFAULT 25,
  priority      integer DEFAULT 0
)
RETURNS app_jobs.scheduled_jobs
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
  v_sched app_jobs.scheduled_jobs;
BEGIN
  IF add_scheduled_job.job_key IS NOT NULL THEN
    INSERT INTO app_jobs.scheduled_jobs AS s
      (database_id, task_identifier, payload, queue_name, schedule_info, max_attempts, key, priority)
    VALUES (
      add_scheduled_job.db_id,
      add_scheduled_job.identifier,
      coalesce(add_scheduled_job.payload, '{}'::json),
      add_scheduled_job.queue_name,
      add_scheduled_job.schedule_info,
      coalesce(add_scheduled_job.max_attempts, 25),
      add_scheduled_job.job_key,
      coalesce(add_scheduled_job.priority, 0)
    )
    ON CONFLICT (key) DO UPDATE
       SET task_identifier = excluded.task_identifier,
           payload         = excluded.payload,
           queue_name      = excluded.queue_name,
           max_attempts    = excluded.max_attempts,
           schedule_info   = excluded.schedule_info,
           priority        = excluded.priority
     WHERE s.locked_at IS NULL
    RETURNING s.* INTO v_sched;

    IF FOUND THEN
      RETURN v_sched;
    END IF;

    -- A scheduler holds the keyed template: drop it; the replacement below
    -- is inserted without the key (upstream behaviour).
    DELETE FROM app_jobs.scheduled_jobs AS s
     WHERE s.key = add_scheduled_job.job_key;
  END IF;

  INSERT INTO app_jobs.scheduled_jobs
    (database_id, task_identifier, payload, queue_name, schedule_info, max_attempts, priority)
  VALUES (
    add_scheduled_job.db_id,
    add_scheduled_job.identifier,
    add_scheduled_job.payload,
    add_scheduled_job.queue_name,
    add_scheduled_job.schedule_info,
    add_scheduled_job.max_attempts,
    add_scheduled_job.priority
  )
  RETURNING * INTO v_sched;

  RETURN v_sched;
END;
$function$;

COMMENT ON FUNCTION app_jobs.add_scheduled_job(uuid, text, json, json, text, text, integer, integer) IS
  'Create a recurring job template. With job_key: update the template that has this key, '
  'or, when a scheduler holds it, replace it.';

-- get_job --------------------------------------------------------------------

CREATE OR REPLACE FUNCTION app_jobs.get_job(
  worker_id        text,
  task_identifiers text[]   DEFAULT NULL,
  job_expiry       interval DEFAULT '4 hours'
)
RETURNS app_jobs.jobs
LANGUAGE plpgsql
AS $function$
DECLARE
  -- now() is the transaction start: every comparison and the lock stamp use
  -- database time, and a lease is stamped with when its transaction began.
  v_now     timestamptz := now();
  v_expired timestamptz := now() - get_job.job_expiry;
  v_job_id  bigint;
  v_queue   text;
  v_job     app_jobs.jobs;
BEGIN
  IF get_job.worker_id IS NULL THEN
    RAISE EXCEPTION 'INVALID_WORKER_ID';
  END IF;

  -- The first runnable job: free (or its lease expired), due, retries left,
  -- of a wanted task, and either outside any serial queue or in a queue that
  -- no live worker holds. Both the job and its queue row are probed with
  -- SKIP LOCKED, so concurrent workers never wait on (or pick) the same ones.
  SELECT j.id, j.queue_name
    INTO v_job_id, v_queue
    FROM app_jobs.jobs AS j
   WHERE (j.locked_at IS NULL OR j.locked_at < v_expired)
     AND j.run_at <= v_now
     AND j.attempts < j.max_attempts
     AND (get_job.task_identifiers IS NULL
          OR j.task_identifier = ANY (get_job.task_identifiers))
     AND (j.queue_name IS NULL
          OR EXISTS (SELECT 1
                       FROM app_jobs.job_queues AS q
                      WHERE q.queue_name = j.queue_name
                        AND (q.locked_at IS NULL OR q.locked_at < v_expired)
                        FOR UPDATE SKIP LOCKED))
   ORDER BY j.priority, j.run_at, j.id
   LIMIT 1
     FOR UPDATE SKIP LOCKED;

  IF v_job_id IS NULL THEN
    RETURN NULL;
  END IF;

  IF v_queue IS NOT NULL THEN
    UPDATE app_jobs.job_queues AS q
       SET locked_by = get_job.worker_id,
           locked_at = v_now
     WHERE q.queue_name = v_queue;
  END IF;

  UPDATE app_jobs.jobs AS j
     SET attempts  = j.attempts + 1,
         locked_by = get_job.worker_id,
         locked_at = v_now
   WHERE j.id = v_job_id
  RETURNING j.* INTO v_job;

  RETURN v_job;
END;
$function$;

COMMENT ON FUNCTION app_jobs.get_job(text, text[], interval) IS
  'Lock the next runnable job for worker_id (counting an attempt) and return it; '
  'NULL when none is ready. Leases older than job_expiry are taken over.';

-- complete_job / complete_jobs ---------------------------------------------

CREATE OR REPLACE FUNCTION app_jobs.complete_job(
  worker_id text,
  job_id    bigint
)
RETURNS app_jobs.jobs
LANGUAGE plpgsql
AS $function$
DECLARE
  v_job app_jobs.jobs;
BEGIN
  -- Deleted by id alone: whoever holds the job, it is done (upstream
  -- behaviour; callers that need fencing check the lease first).
  DELETE FROM app_jobs.jobs AS j
   WHERE j.id = complete_job.job_id
  RETURNING j.* INTO v_job;

  IF v_job.queue_name IS NOT NULL THEN
    UPDATE app_jobs.job_queues AS q
       SET locked_by = NULL,
           locked_at = NULL
     WHERE q.queue_name = v_job.queue_name
       AND q.locked_by = complete_job.worker_id;
  END IF;

  RETURN v_job;
END;
$function$;

COMMENT ON FUNCTION app_jobs.complete_job(text, bigint) IS
  'Delete a finished job (by id; its lock holder is not checked) and free its queue '
  'if worker_id holds it.';

CREATE OR REPLACE FUNCTION app_jobs.complete_jobs(
  job_ids bigint[]
)
RETURNS SETOF app_jobs.jobs
LANGUAGE sql
AS $function$
  DELETE FROM app_jobs.jobs AS j
   WHERE j.id = ANY (complete_jobs.job_ids)
     AND (j.locked_by IS NULL OR j.locked_at < now() - interval '4 hours')
  RETURNING j.*;
$function$;

COMMENT ON FUNCTION app_jobs.complete_jobs(bigint[]) IS
  'Administrative: delete the given jobs unless a worker holds them (leases older '
  'than 4 hours do not count).';

-- fail_job -------------------------------------------------------------------

-- STRICT: a NULL argument (a NULL error_message included) makes the call a
-- no-op that returns NULL and leaves the job locked.
CREATE OR REPLACE FUNCTION app_jobs.fail_job(
  worker_id     text,
  job_id        bigint,
  error_message text
)
RETURNS app_jobs.jobs
LANGUAGE plpgsql
STRICT
AS $function$
DECLARE
  v_job app_jobs.jobs;
BEGIN
  -- Back off exponentially: e^attempts seconds (capped at e^10 ~ 6.1 h),
  -- counted from now or from a run_at still in the future.
  UPDATE app_jobs.jobs AS j
     SET last_error = fail_job.error_message,
         run_at     = greatest(now(), j.run_at)
                      + make_interval(secs => exp(least(j.attempts, 10))),
         locked_by  = NULL,
         locked_at  = NULL
   WHERE j.id = fail_job.job_id
     AND j.locked_by = fail_job.worker_id
  RETURNING j.* INTO v_job;

  IF v_job.queue_name IS NOT NULL THEN
    UPDATE app_jobs.job_queues AS q
       SET locked_by = NULL,
           locked_at = NULL
     WHERE q.queue_name = v_job.queue_name
       AND q.locked_by = fail_job.worker_id;
  END IF;

  RETURN v_job;
END;
$function$;

COMMENT ON FUNCTION app_jobs.fail_job(text, bigint, text) IS
  'Record a failed attempt of a job worker_id holds: unlock it and back it off by '
  'e^min(attempts,10) seconds. The job is kept even when it has no attempts left.';

-- release_jobs ---------------------------------------------------------------

CREATE OR REPLACE FUNCTION app_jobs.release_jobs(
  worker_id text
)
RETURNS void
LANGUAGE plpgsql
AS $function$
BEGIN
  -- Hand back everything worker_id holds; the attempt it was counted for is
  -- given back too.
  UPDATE app_jobs.jobs AS j
     SET locked_at = NULL,
         locked_by = NULL,
         attempts  = greatest(j.attempts - 1, 0)
   WHERE j.locked_by = release_jobs.worker_id;

  UPDATE app_jobs.job_queues AS q
     SET locked_at = NULL,
         locked_by = NULL
   WHERE q.locked_by = release_jobs.worker_id;
END;
$function$;

COMMENT ON FUNCTION app_jobs.release_jobs(text) IS
  'Unlock every job and queue worker_id holds, giving back one attempt per job.';

-- reschedule_jobs / permanently_fail_jobs ----------------------------------

CREATE OR REPLACE FUNCTION app_jobs.reschedule_jobs(
  job_ids      bigint[],
  run_at       timestamptz DEFAULT NULL,
  priority     integer     DEFAULT NULL,
  attempts     integer     DEFAULT NULL,
  max_attempts integer     DEFAULT NULL
)
RETURNS SETOF app_jobs.jobs
LANGUAGE sql
AS $function$
  UPDATE app_jobs.jobs AS j
     SET run_at       = coalesce(reschedule_jobs.run_at, j.run_at),
         priority     = coalesce(reschedule_jobs.priority, j.priority),
         attempts     = coalesce(reschedule_jobs.attempts, j.attempts),
         max_attempts = coalesce(reschedule_jobs.max_attempts, j.max_attempts)
   WHERE j.id = ANY (reschedule_jobs.job_ids)
     AND (j.locked_by IS NULL OR j.locked_at < now() - interval '4 hours')
  RETURNING j.*;
$function$;

COMMENT ON FUNCTION app_jobs.reschedule_jobs(bigint[], timestamptz, integer, integer, integer) IS
  'Administrative: change run_at / priority / attempts / max_attempts (NULL keeps the '
  'current value) of the given jobs unless a worker holds them.';

CREATE OR REPLACE FUNCTION app_jobs.permanently_fail_jobs(
  job_ids       bigint[],
  error_message text DEFAULT NULL
)
RETURNS SETOF app_jobs.jobs
LANGUAGE sql
AS $function$
  UPDATE app_jobs.jobs AS j
     SET last_error = coalesce(permanently_fail_jobs.error_message, 'Manually marked as failed'),
         attempts   = j.max_attempts
   WHERE j.id = ANY (permanently_fail_jobs.job_ids)
     AND (j.locked_by IS NULL OR j.locked_at < now() - interval '4 hours')
  RETURNING j.*;
$function$;

COMMENT ON FUNCTION app_jobs.permanently_fail_jobs(bigint[], text) IS
  'Administrative: use up the attempts of the given jobs (so they are never run again) '
  'unless a worker holds them.';

-- scheduled jobs ---------------------------------------------------------------

CREATE OR REPLACE FUNCTION app_jobs.get_scheduled_job(
  worker_id        text,
  task_identifiers text[] DEFAULT NULL
)
RETURNS app_jobs.scheduled_jobs
LANGUAGE plpgsql
AS $function$
DECLARE
  v_id    bigint;
  v_sched app_jobs.scheduled_jobs;
BEGIN
  IF get_scheduled_job.worker_id IS NULL THEN
    RAISE EXCEPTION 'INVALID_WORKER_ID';
  END IF;

  -- No expiry here: a scheduler keeps its templates locked for as long as it
  -- runs their timers, and releases them with release_scheduled_jobs.
  SELECT s.id
    INTO v_id
    FROM app_jobs.scheduled_jobs AS s
   WHERE s.locked_at IS NULL
     AND (get_scheduled_job.task_identifiers IS NULL
          OR s.task_identifier = ANY (get_scheduled_job.task_identifiers))
   ORDER BY s.priority, s.id
   LIMIT 1
     FOR UPDATE SKIP LOCKED;

  IF v_id IS NULL THEN
    RETURN NULL;
  END IF;

  UPDATE app_jobs.scheduled_jobs AS s
     SET locked_by = get_scheduled_job.worker_id,
         locked_at = now()
   WHERE s.id = v_id
  RETURNING s.* INTO v_sched;

  RETURN v_sched;
END;
$function$;

COMMENT ON FUNCTION app_jobs.get_scheduled_job(text, text[]) IS
  'Lock the next free scheduled job for worker_id and return it; NULL when none.';

CREATE OR REPLACE FUNCTION app_jobs.release_scheduled_jobs(
  worker_id text,
  ids       bigint[] DEFAULT NULL
)
RETURNS void
LANGUAGE plpgsql
AS $function$
BEGIN
  UPDATE app_jobs.scheduled_jobs AS s
     SET locked_at = NULL,
         locked_by = NULL
   WHERE s.locked_by = release_scheduled_jobs.worker_id
     AND (release_scheduled_jobs.ids IS NULL OR s.id = ANY (release_scheduled_jobs.ids));
END;
$function$;

COMMENT ON FUNCTION app_jobs.release_scheduled_jobs(text, bigint[]) IS
  'Unlock the scheduled jobs worker_id holds (all of them, or only ids).';

CREATE OR REPLACE FUNCTION app_jobs.run_scheduled_job(
  id         bigint,
  job_expiry interval DEFAULT '1 hours'
)
RETURNS app_jobs.jobs
LANGUAGE plpgsql
AS $function$
DECLARE
  v_last_job_id bigint;
  v_job         app_jobs.jobs;
BEGIN
  -- Row-lock the template so that two ticks for it cannot both pass the
  -- check below; a missing template simply finds nothing.
  SELECT s.last_scheduled_id
    INTO v_last_job_id
    FROM app_jobs.scheduled_jobs AS s
   WHERE s.id = run_scheduled_job.id
     FOR UPDATE;

  -- The previous run is still pending, or was picked up within job_expiry.
  IF v_last_job_id IS NOT NULL
     AND EXISTS (SELECT 1
                   FROM app_jobs.jobs AS j
                  WHERE j.id = v_last_job_id
                    AND (j.locked_at IS NULL
                         OR j.locked_at >= now() - run_scheduled_job.job_expiry)) THEN
    RAISE EXCEPTION 'ALREADY_SCHEDULED';
  END IF;

  INSERT INTO app_jobs.jobs
    (database_id, queue_name, task_identifier, payload, priority, max_attempts, key)
  SELECT s.database_id, s.queue_name, s.task_identifier, s.payload, s.priority,
         s.max_attempts, s.key
    FROM app_jobs.scheduled_jobs AS s
   WHERE s.id = run_scheduled_job.id
  RETURNING * INTO v_job;

  IF FOUND THEN
    UPDATE app_jobs.scheduled_jobs AS s
       SET last_scheduled = now(),
           last_scheduled_id = v_job.id
     WHERE s.id = run_scheduled_job.id;
  END IF;

  -- NULL (no template any more): the caller should stop this timer.
  RETURN v_job;
END;
$function$;

COMMENT ON FUNCTION app_jobs.run_scheduled_job(bigint, interval) IS
  'Queue one run of a scheduled job. Raises ALREADY_SCHEDULED while its previous run is '
  'pending or was locked within job_expiry; NULL when the scheduled job is gone.';
