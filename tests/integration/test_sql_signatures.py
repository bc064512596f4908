"""The shape of app_jobs, read from the catalogue and checked against the
contract: function signatures, tables, defaults, checks and indexes."""

from __future__ import annotations

import uuid

import psycopg
import pytest

pytestmark = pytest.mark.integration

JOBS = "app_jobs.jobs"
SCHEDULED = "app_jobs.scheduled_jobs"
TS = "timestamp with time zone"

# name -> (arguments as pg_get_function_arguments prints them, result, STRICT, SECURITY DEFINER)
CONTRACT_FUNCTIONS = {
    "add_job": (
        "db_id uuid, identifier text, payload json DEFAULT '{}'::json, "
        "job_key text DEFAULT NULL::text, queue_name text DEFAULT NULL::text, "
        f"run_at {TS} DEFAULT now(), "
        "max_attempts integer DEFAULT 25, priority integer DEFAULT 0",
        JOBS,
        False,
        True,
    ),
    "add_scheduled_job": (
        "db_id uuid, identifier text, payload json DEFAULT '{}'::json, "
        "schedule_info json DEFAULT '{}'::json, job_key text DEFAULT NULL::text, "
        "queue_name text DEFAULT NULL::text, max_attempts integer DEFAULT 25, "
        "priority integer DEFAULT 0",
        SCHEDULED,
        False,
        True,
    ),
    "get_job": (
        "worker_id text, task_identifiers text[] DEFAULT NULL::text[], "
        "job_expiry interval DEFAULT '04:00:00'::interval",
        JOBS,
        False,
        False,
    ),
    "complete_job": ("worker_id text, job_id bigint", JOBS, False, False),
    "complete_jobs": ("job_ids bigint[]", f"SETOF {JOBS}", False, False),
    "fail_job": ("worker_id text, job_id bigint, error_message text", JOBS, True, False),
    "release_jobs": ("worker_id text", "void", False, False),
    "get_scheduled_job": (
        "worker_id text, task_identifiers text[] DEFAULT NULL::text[]",
        SCHEDULED,
        False,
        False,
    ),
    "release_scheduled_jobs": (
        "worker_id text, ids bigint[] DEFAULT NULL::bigint[]",
        "void",
        False,
        False,
    ),
    "run_scheduled_job": (
        "id bigint, job_expiry interval DEFAULT '01:00:00'::interval",
        JOBS,
        False,
        False,
    ),
    "reschedule_jobs": (
        f"job_ids bigint[], run_at {TS} DEFAULT NULL::{TS}, "
        "priority integer DEFAULT NULL::integer, attempts integer DEFAULT NULL::integer, "
        "max_attempts integer DEFAULT NULL::integer",
        f"SETOF {JOBS}",
        False,
        False,
    ),
    "permanently_fail_jobs": (
        "job_ids bigint[], error_message text DEFAULT NULL::text",
        f"SETOF {JOBS}",
        False,
        False,
    ),
    "tg_add_job_with_row_id": ("", "trigger", False, True),
    "tg_add_job_with_row": ("", "trigger", False, True),
    "trigger_job_with_fields": ("", "trigger", False, True),
    "json_build_object_apply": ("arguments text[]", "json", False, False),
}
# Trigger functions of the queue tables themselves (same names as upstream).
INTERNAL_FUNCTIONS = {
    "do_notify",
    "tg_update_timestamps",
    "tg_increase_job_queue_count",
    "tg_decrease_job_queue_count",
}

# table -> [(column, type, NOT NULL, default)]; "<uuid>" = a random uuid as text
COLUMNS = {
    "jobs": [
        ("id", "bigint", True, "nextval('app_jobs.jobs_id_seq'::regclass)"),
        ("database_id", "uuid", True, None),
        ("queue_name", "text", False, "<uuid>"),
        ("task_identifier", "text", True, None),
        ("payload", "json", True, "'{}'::json"),
        ("priority", "integer", True, "0"),
        ("run_at", TS, True, "now()"),
        ("attempts", "integer", True, "0"),
        ("max_attempts", "integer", True, "25"),
        ("key", "text", False, None),
        ("last_error", "text", False, None),
        ("locked_at", TS, False, None),
        ("locked_by", "text", False, None),
        ("created_at", TS, False, "now()"),
        ("updated_at", TS, False, "now()"),
    ],
    "scheduled_jobs": [
        ("id", "bigint", True, "nextval('app_jobs.scheduled_jobs_id_seq'::regclass)"),
        ("database_id", "uuid", True, None),
        ("queue_name", "text", False, "<uuid>"),
        ("task_identifier", "text", True, None),
        ("payload", "json", True, "'{}'::json"),
        ("priority", "integer", True, "0"),
        ("max_attempts", "integer", True, "25"),
        ("key", "text", False, None),
        ("locked_at", TS, False, None),
        ("locked_by", "text", False, None),
        ("schedule_info", "json", True, None),
        ("last_scheduled", TS, False, None),
        ("last_scheduled_id", "bigint", False, None),
    ],
    "job_queues": [
        ("queue_name", "text", True, None),
        ("job_count", "integer", True, "0"),
        ("locked_at", TS, False, None),
        ("locked_by", "text", False, None),
    ],
}

# table -> {(unique, columns)} of its indexes
INDEXES = {
    "jobs": {
        (True, ("id",)),
        (True, ("key",)),
        (False, ("priority", "run_at", "id")),
        (False, ("locked_by",)),
    },
    "scheduled_jobs": {
        (True, ("id",)),
        (True, ("key",)),
        (False, ("priority", "id")),
        (False, ("locked_by",)),
    },
    "job_queues": {(True, ("queue_name",)), (False, ("locked_by",))},
}


def test_contract_functions_have_the_exact_signatures(q):
    rows = q.rows(
        """SELECT p.proname, pg_get_function_arguments(p.oid) AS args,
                  pg_get_function_result(p.oid) AS result, p.proisstrict, p.prosecdef
             FROM pg_proc p WHERE p.pronamespace = 'app_jobs'::regnamespace"""
    )
    names = [row["proname"] for row in rows]
    assert len(names) == len(set(names)), "no function may be overloaded"
    assert set(names) == set(CONTRACT_FUNCTIONS) | INTERNAL_FUNCTIONS
    found = {
        row["proname"]: (row["args"], row["result"], row["proisstrict"], row["prosecdef"])
        for row in rows
        if row["proname"] in CONTRACT_FUNCTIONS
    }
    assert found == CONTRACT_FUNCTIONS


def test_only_fail_job_is_strict_and_only_writers_are_security_definer(q):
    strict = q.value(
        "SELECT array_agg(proname::text ORDER BY proname) FROM pg_proc "
        "WHERE pronamespace = 'app_jobs'::regnamespace AND proisstrict"
    )
    definer = q.value(
        "SELECT array_agg(proname::text ORDER BY proname) FROM pg_proc "
        "WHERE pronamespace = 'app_jobs'::regnamespace AND prosecdef"
    )
    assert strict == ["fail_job"]
    assert definer == [
        "add_job",
        "add_scheduled_job",
        "tg_add_job_with_row",
        "tg_add_job_with_row_id",
        "trigger_job_with_fields",
    ]
    # a SECURITY DEFINER function must not resolve names through the caller's search_path
    unpinned = q.value(
        """SELECT count(*) FROM pg_proc WHERE pronamespace = 'app_jobs'::regnamespace AND prosecdef
              AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (proconfig), false)"""
    )
    assert unpinned == 0


def test_named_arguments_and_defaults_are_accepted(q, tenant):
    """Callers use named notation (Node does): every documented name must work."""
    job = q.one(
        """SELECT * FROM app_jobs.add_job(db_id => %s, identifier => 't',
               payload => '{"a": 1}', job_key => 'k', queue_name => 'q', run_at => now(),
               max_attempts => 3, priority => 2)""",
        [tenant],
    )
    assert (job["key"], job["queue_name"], job["max_attempts"], job["priority"]) == ("k", "q", 3, 2)
    one_id = [job["id"]]
    got = q.one(
        """SELECT * FROM app_jobs.get_job(worker_id => 'worker-1', task_identifiers => NULL,
               job_expiry => '1 hour')"""
    )
    assert got["id"] == job["id"]
    failed = q.one(
        """SELECT * FROM app_jobs.fail_job(worker_id => 'worker-1', job_id => %s,
               error_message => 'x')""",
        one_id,
    )
    assert failed["last_error"] == "x"
    moved = q.rows(
        """SELECT * FROM app_jobs.reschedule_jobs(job_ids => ARRAY[%s::bigint], run_at => now(),
               priority => 1, attempts => 0, max_attempts => 4)""",
        one_id,
    )
    assert [(r["priority"], r["max_attempts"]) for r in moved] == [(1, 4)]
    parked = q.rows(
        """SELECT * FROM app_jobs.permanently_fail_jobs(job_ids => ARRAY[%s::bigint],
               error_message => 'e')""",
        one_id,
    )
    assert [(r["last_error"], r["attempts"]) for r in parked] == [("e", 4)]
    done = q.rows("SELECT * FROM app_jobs.complete_jobs(job_ids => ARRAY[%s::bigint])", one_id)
    assert [r["id"] for r in done] == one_id
    none = q.one(
        "SELECT * FROM app_jobs.complete_job(worker_id => 'worker-1', job_id => %s)", one_id
    )
    assert none["id"] is None
    q.execute("SELECT app_jobs.release_jobs(worker_id => 'worker-1')")
    sched = q.one(
        """SELECT * FROM app_jobs.add_scheduled_job(db_id => %s, identifier => 't', payload => '{}',
               schedule_info => '{"rule": "* * * * *"}', job_key => 'sk', queue_name => NULL,
               max_attempts => 2, priority => 1)""",
        [tenant],
    )
    held = q.one(
        """SELECT * FROM app_jobs.get_scheduled_job(worker_id => 'sched-1',
               task_identifiers => ARRAY['t'])"""
    )
    assert held["id"] == sched["id"]
    q.execute("SELECT app_jobs.release_scheduled_jobs(worker_id => 'sched-1', ids => NULL)")
    run = q.one(
        "SELECT * FROM app_jobs.run_scheduled_job(id => %s, job_expiry => '1 hour')", [sched["id"]]
    )
    assert run["task_identifier"] == "t"
    built = q.value("SELECT app_jobs.json_build_object_apply(arguments => ARRAY['a', 'b'])::text")
    assert built == '{"a" : "b"}'


def test_columns_types_not_null_and_defaults(q):
    for table, expected in COLUMNS.items():
        rows = q.rows(
            """SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull,
                      pg_get_expr(d.adbin, d.adrelid) AS default_expr
                 FROM pg_attribute a
                 LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
                ORDER BY a.attnum""",
            [f"app_jobs.{table}"],
        )
        actual = []
        for row in rows:
            default = row["default_expr"]
            if default is not None and "gen_random_uuid()" in default:
                default = "<uuid>"
            actual.append((row["attname"], row["type"], row["attnotnull"], default))
        assert actual == expected, table


def test_default_queue_name_is_a_fresh_uuid_per_row(q, tenant):
    for table, extra in (("jobs", ""), ("scheduled_jobs", ", schedule_info")):
        values = ", '{}'" if extra else ""
        names = [
            q.value(
                f"INSERT INTO app_jobs.{table} (database_id, task_identifier{extra}) "
                f"VALUES (%s, 't'{values}) RETURNING queue_name",
                [tenant],
            )
            for _ in range(2)
        ]
        assert names[0] != names[1]
        assert all(str(uuid.UUID(name)) == name for name in names)


def test_indexes(q):
    for table, expected in INDEXES.items():
        rows = q.rows(
            """SELECT i.indisunique,
                      array(SELECT a.attname::text
                              FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
                              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                             ORDER BY k.n) AS columns
                 FROM pg_index i WHERE i.indrelid = %s::regclass""",
            [f"app_jobs.{table}"],
        )
        assert {(row["indisunique"], tuple(row["columns"])) for row in rows} == expected, table


CHECKS = [
    # (column, allowed value, rejected value)
    ("task_identifier", "t" * 126, "t" * 127),
    ("key", "k" * 512, "k" * 513),
    ("locked_by", "abcd", "abc"),
    ("max_attempts", 1, 0),
    ("queue_name", "q" * 126, "q" * 127),
]


@pytest.mark.parametrize("table", ["jobs", "scheduled_jobs"])
def test_check_constraints(q, tenant, table):
    base = {"database_id": str(tenant), "task_identifier": "t"}
    if table == "scheduled_jobs":
        base["schedule_info"] = "{}"

    def insert(column, value):
        row = {**base, column: value}
        cols = ", ".join(row)
        marks = ", ".join(["%s"] * len(row))
        return q.value(
            f"INSERT INTO app_jobs.{table} ({cols}) VALUES ({marks}) RETURNING id",
            list(row.values()),
        )

    for column, allowed, rejected in CHECKS:
        assert insert(column, allowed) > 0
        with pytest.raises(psycopg.errors.CheckViolation):
            insert(column, rejected)


@pytest.mark.parametrize("table", ["jobs", "scheduled_jobs"])
def test_key_is_unique(q, tenant, table):
    extra = ", schedule_info" if table == "scheduled_jobs" else ""
    values = ", '{}'" if extra else ""
    insert = (
        f"INSERT INTO app_jobs.{table} (database_id, task_identifier, key{extra}) "
        f"VALUES (%s, 't', 'same'{values})"
    )
    q.execute(insert, [tenant])
    with pytest.raises(psycopg.errors.UniqueViolation):
        q.execute(insert, [tenant])
    # NULL keys never collide
    for _ in range(2):
        q.execute(insert.replace("'same'", "NULL"), [tenant])


def test_payload_is_json_not_jsonb(q, tenant):
    """json keeps the text as given: key order, duplicates and spacing survive."""
    text = '{"b": 1,   "a": [1, 2], "b": 2}'
    job = q.one(
        "SELECT payload::text AS p FROM app_jobs.add_job(%s, 't', %s::json)", [tenant, text]
    )
    assert job["p"] == text
