-- Tables and their indexes.
--
-- Column order matters: the functions return these row types, and callers
-- read `SELECT * FROM app_jobs.get_job(...)` positionally as well as by name.
-- Constraint and index names follow what the upstream extension ends up with,
-- so that tooling written against one install finds the same names in the other.

-- Serial queues: one row per queue name that has jobs. Maintained only by the
-- triggers on app_jobs.jobs (020_queue_triggers.sql); get_job locks a row here
-- while one of the queue's jobs runs, so a queue's jobs run one at a time.
CREATE TABLE IF NOT EXISTS app_jobs.job_queues (
  queue_name text NOT NULL,
  job_count  integer NOT NULL DEFAULT 0,
  locked_at  timestamptz,
  locked_by  text,
  CONSTRAINT job_queues_pkey PRIMARY KEY (queue_name)
);

CREATE INDEX IF NOT EXISTS job_queues_locked_by_idx
  ON app_jobs.job_queues (locked_by);

-- Queued and running jobs. A job whose attempts reached max_attempts is kept
-- (permanently failed) and never handed out again.
CREATE TABLE IF NOT EXISTS app_jobs.jobs (
  id              bigserial,
  database_id     uuid NOT NULL,
  queue_name      text DEFAULT (pg_catalog.gen_random_uuid())::text,
  task_identifier text NOT NULL,
  payload         json NOT NULL DEFAULT '{}'::json,
  priority        integer NOT NULL DEFAULT 0,
  run_at          timestamptz NOT NULL DEFAULT now(),
  attempts        integer NOT NULL DEFAULT 0,
  max_attempts    integer NOT NULL DEFAULT 25,
  key             text,
  last_error      text,
  locked_at       timestamptz,
  locked_by       text,
  created_at      timestamptz DEFAULT now(),
  updated_at      timestamptz DEFAULT now(),
  CONSTRAINT jobs_pkey PRIMARY KEY (id),
  CONSTRAINT jobs_key_key UNIQUE (key),
  CONSTRAINT jobs_key_check CHECK (length(key) < 513),
  CONSTRAINT jobs_task_identifier_check CHECK (length(task_identifier) < 127),
  CONSTRAINT jobs_max_attempts_check CHECK (max_attempts > 0),
  CONSTRAINT jobs_queue_name_check CHECK (length(queue_name) < 127),
  CONSTRAINT jobs_locked_by_check CHECK (length(locked_by) > 3)
);

CREATE INDEX IF NOT EXISTS priority_run_at_id_idx
  ON app_jobs.jobs (priority, run_at, id);

CREATE INDEX IF NOT EXISTS jobs_locked_by_idx
  ON app_jobs.jobs (locked_by);

-- Recurring job templates: a scheduler locks one with get_scheduled_job, arms
-- a timer from schedule_info and calls run_scheduled_job on every tick.
CREATE TABLE IF NOT EXISTS app_jobs.scheduled_jobs (
  id                bigserial,
  database_id       uuid NOT NULL,
  queue_name        text DEFAULT (pg_catalog.gen_random_uuid())::text,
  task_identifier   text NOT NULL,
  payload           json NOT NULL DEFAULT '{}'::json,
  priority          integer NOT NULL DEFAULT 0,
  max_attempts      integer NOT NULL DEFAULT 25,
  key               text,
  locked_at         timestamptz,
  locked_by         text,
  schedule_info     json NOT NULL,
  last_scheduled    timestamptz,
  last_scheduled_id bigint,
  CONSTRAINT scheduled_jobs_pkey PRIMARY KEY (id),
  CONSTRAINT scheduled_jobs_key_key UNIQUE (key),
  CONSTRAINT scheduled_jobs_key_check CHECK (length(key) < 513),
  CONSTRAINT scheduled_jobs_task_identifier_check CHECK (length(task_identifier) < 127),
  CONSTRAINT scheduled_jobs_max_attempts_check CHECK (max_attempts > 0),
  CONSTRAINT scheduled_jobs_queue_name_check CHECK (length(queue_name) < 127),
  CONSTRAINT scheduled_jobs_locked_by_check CHECK (length(locked_by) > 3)
);

CREATE INDEX IF NOT EXISTS scheduled_jobs_priority_id_idx
  ON app_jobs.scheduled_jobs (priority, id);

CREATE INDEX IF NOT EXISTS scheduled_jobs_locked_by_idx
  ON app_jobs.scheduled_jobs (locked_by);
