-- Row triggers on the queue tables: timestamps, serial-queue bookkeeping and
-- the insert notifications workers LISTEN for.
--
-- Trigger names are kept from upstream; Postgres fires same-event triggers in
-- name order, so on an UPDATE that moves a job between queues the new queue is
-- counted (_500_...) before the old one is decremented (decrease_...).

-- created_at / updated_at for app_jobs.jobs. On UPDATE the stamp moves forward
-- by at least 1 ms, so two updates in one transaction still order correctly.
CREATE OR REPLACE FUNCTION app_jobs.tg_update_timestamps()
RETURNS trigger
LANGUAGE plpgsql
AS $function$
BEGIN
  IF TG_OP = 'INSERT' THEN
    NEW.created_at := now();
    NEW.updated_at := now();
  ELSIF TG_OP = 'UPDATE' THEN
    NEW.created_at := OLD.created_at;
    NEW.updated_at := greatest(now(), OLD.updated_at + interval '1 millisecond');
  END IF;
  RETURN NEW;
END;
$function$;

-- NOTIFY the channel named by the trigger argument, with an empty payload.
-- A notification only means "something was inserted"; workers still poll.
CREATE OR REPLACE FUNCTION app_jobs.do_notify()
RETURNS trigger
LANGUAGE plpgsql
AS $function$
BEGIN
  PERFORM pg_notify(TG_ARGV[0], '');
  RETURN NEW;
END;
$function$;

-- A job arrived in (or moved to) NEW.queue_name: count it, creating the
-- queue row on first use.
CREATE OR REPLACE FUNCTION app_jobs.tg_increase_job_queue_count()
RETURNS trigger
LANGUAGE plpgsql
AS $function$
BEGIN
  INSERT INTO app_jobs.job_queues AS q (queue_name, job_count)
  VALUES (NEW.queue_name, 1)
  ON CONFLICT (queue_name)
  DO UPDATE SET job_count = q.job_count + 1;
  RETURN NEW;
END;
$function$;

-- A job left OLD.queue_name (deleted or moved): uncount it and drop the
-- queue row once it has no jobs left.
CREATE OR REPLACE FUNCTION app_jobs.tg_decrease_job_queue_count()
RETURNS trigger
LANGUAGE plpgsql
AS $function$
DECLARE
  v_remaining integer;
BEGIN
  UPDATE app_jobs.job_queues AS q
     SET job_count = q.job_count - 1
   WHERE q.queue_name = OLD.queue_name
  RETURNING q.job_count INTO v_remaining;

  IF v_remaining <= 0 THEN
    DELETE FROM app_jobs.job_queues AS q
     WHERE q.queue_name = OLD.queue_name
       AND q.job_count <= 0;
  END IF;
  RETURN OLD;
END;
$function$;

-- app_jobs.jobs ------------------------------------------------------------

DROP TRIGGER IF EXISTS _100_update_jobs_modtime_tg ON app_jobs.jobs;
CREATE TRIGGER _100_update_jobs_modtime_tg
  BEFORE INSERT OR UPDATE ON app_jobs.jobs
  FOR EACH ROW
  EXECUTE FUNCTION app_jobs.tg_update_timestamps();

DROP TRIGGER IF EXISTS _500_increase_job_queue_count_on_insert ON app_jobs.jobs;
CREATE TRIGGER _500_increase_job_queue_count_on_insert
  AFTER INSERT ON app_jobs.jobs
  FOR EACH ROW
  WHEN (NEW.queue_name IS NOT NULL)
  EXECUTE FUNCTION app_jobs.tg_increase_job_queue_count();

DROP TRIGGER IF EXISTS _500_increase_job_queue_count_on_update ON app_jobs.jobs;
CREATE TRIGGER _500_increase_job_queue_count_on_update
  AFTER UPDATE OF queue_name ON app_jobs.jobs
  FOR EACH ROW
  WHEN (NEW.queue_name IS DISTINCT FROM OLD.queue_name AND NEW.queue_name IS NOT NULL)
  EXECUTE FUNCTION app_jobs.tg_increase_job_queue_count();

DROP TRIGGER IF EXISTS _900_notify_worker ON app_jobs.jobs;
CREATE TRIGGER _900_notify_worker
  AFTER INSERT ON app_jobs.jobs
  FOR EACH ROW
  EXECUTE FUNCTION app_jobs.do_notify('jobs:insert');

DROP TRIGGER IF EXISTS decrease_job_queue_count_on_delete ON app_jobs.jobs;
CREATE TRIGGER decrease_job_queue_count_on_delete
  AFTER DELETE ON app_jobs.jobs
  FOR EACH ROW
  WHEN (OLD.queue_name IS NOT NULL)
  EXECUTE FUNCTION app_jobs.tg_decrease_job_queue_count();

DROP TRIGGER IF EXISTS decrease_job_queue_count_on_update ON app_jobs.jobs;
CREATE TRIGGER decrease_job_queue_count_on_update
  AFTER UPDATE OF queue_name ON app_jobs.jobs
  FOR EACH ROW
  WHEN (NEW.queue_name IS DISTINCT FROM OLD.queue_name AND OLD.queue_name IS NOT NULL)
  EXECUTE FUNCTION app_jobs.tg_decrease_job_queue_count();

-- app_jobs.scheduled_jobs --------------------------------------------------

DROP TRIGGER IF EXISTS _900_notify_scheduled_job ON app_jobs.scheduled_jobs;
CREATE TRIGGER _900_notify_scheduled_job
  AFTER INSERT ON app_jobs.scheduled_jobs
  FOR EACH ROW
  EXECUTE FUNCTION app_jobs.do_notify('scheduled_jobs:insert');
