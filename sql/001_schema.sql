-- lqjobs: standalone install of the app_jobs job queue.
--
-- These files reproduce the schema of the LaunchQL `launchql-database-jobs`
-- extension (see /work/shared/design/sql-contract.md): the same tables,
-- functions, parameter names, defaults and side effects, so that lqjobs (and
-- any other worker) behaves the same against either install.
--
-- Rules every file in this directory follows:
--   * applied in file-name order, by `psql -v ON_ERROR_STOP=1 -f FILE` or as
--     one script per file through a driver, all inside one transaction;
--   * re-applying is a no-op: IF NOT EXISTS, CREATE OR REPLACE, and
--     DROP TRIGGER IF EXISTS + CREATE TRIGGER (Postgres 13 has no
--     CREATE OR REPLACE TRIGGER); no data is ever dropped;
--   * no psql meta-commands, no top-level BEGIN/COMMIT, nothing CONCURRENTLY;
--   * no extension is required (gen_random_uuid() is core since Postgres 13).
--
-- The schema comment is owned by `lqjobs migrate` (it stamps a fingerprint
-- there), so it is deliberately not set here.

CREATE SCHEMA IF NOT EXISTS app_jobs;
