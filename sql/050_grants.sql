-- Privileges for the `administrator` role that LaunchQL databases have.
-- A standalone database usually has no such role: then nothing is granted
-- (functions stay executable by PUBLIC, as Postgres creates them, and the
-- tables are reachable by their owner and by whoever is granted them).
-- Re-running the grants is harmless.

DO $grants$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'administrator') THEN
    GRANT USAGE ON SCHEMA app_jobs TO administrator;
    GRANT SELECT, INSERT, UPDATE, DELETE
      ON app_jobs.jobs, app_jobs.scheduled_jobs, app_jobs.job_queues
      TO administrator;
    GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA app_jobs TO administrator;
    ALTER DEFAULT PRIVILEGES IN SCHEMA app_jobs GRANT EXECUTE ON FUNCTIONS TO administrator;
  END IF;
END;
$grants$;
