"""Installing sql/: with psql, through psycopg in one transaction, on a bare
database and on one that has LaunchQL's jwt_private and administrator; and
re-applying it, which must change nothing."""

from __future__ import annotations

import re
import subprocess
import uuid
from uuid import UUID

import psycopg
import pytest
from psycopg import sql

from lqjobs.db.schema import apply_schema
from lqjobs.ops import migrate

pytestmark = pytest.mark.integration

ADMIN_ROLE = "administrator"
LAUNCHQL_TENANT = UUID("11111111-2222-3333-4444-555555555555")
APP_FUNCTIONS = {
    "add_job",
    "add_scheduled_job",
    "complete_job",
    "complete_jobs",
    "fail_job",
    "get_job",
    "get_scheduled_job",
    "json_build_object_apply",
    "permanently_fail_jobs",
    "release_jobs",
    "release_scheduled_jobs",
    "reschedule_jobs",
    "run_scheduled_job",
    "tg_add_job_with_row",
    "tg_add_job_with_row_id",
    "trigger_job_with_fields",
}


def _role_exists(url: str, role: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        return bool(conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone())


def _seed(conn: psycopg.Connection) -> None:
    """Rows of every kind, including locked ones, to check they survive a re-apply."""
    tenant = str(uuid.uuid4())
    conn.execute("SELECT app_jobs.add_job(%s, 'plain')", [tenant])
    conn.execute("SELECT app_jobs.add_job(%s, 'queued', queue_name => 'q1')", [tenant])
    conn.execute(
        "SELECT app_jobs.add_job(%s, 'queued', queue_name => 'q1', job_key => 'k')", [tenant]
    )
    conn.execute("SELECT app_jobs.get_job('worker-seed', ARRAY['queued'])")
    conn.execute("SELECT app_jobs.add_scheduled_job(%s, 'sched', schedule_info => '{}')", [tenant])
    conn.execute("SELECT app_jobs.get_scheduled_job('scheduler-seed')")


def _pg_dump(pg_dump_bin: str | None, url: str) -> str | None:
    if pg_dump_bin is None:
        return None
    done = subprocess.run(
        [pg_dump_bin, "--schema-only", "--schema=app_jobs", "-d", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    # pg_dump 18 wraps its output in \restrict / \unrestrict lines with a random key
    return re.sub(r"^\\(un)?restrict .*$", "", done.stdout, flags=re.M)


def test_files_are_plain_sql_a_driver_can_run(sql_files):
    for path in sql_files:
        text = re.sub(r"--[^\n]*", "", path.read_text())  # checks apply to code, not comments
        assert not re.search(r"^\s*\\", text, re.M), f"{path.name}: psql meta-command"
        assert not re.search(
            r"^\s*(BEGIN|COMMIT|ROLLBACK|START\s+TRANSACTION)\s*;", text, re.M | re.I
        )
        assert "CONCURRENTLY" not in text.upper(), f"{path.name}: cannot run in a transaction"
        assert not re.search(r"\b(pgcrypto|uuid-ossp|uuid_generate)", text, re.I), path.name
    assert [p.name for p in sql_files] == sorted(p.name for p in sql_files)


def test_psql_installs_into_an_empty_database(empty_db_url, psql_apply, make_q):
    psql_apply(empty_db_url)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        names = {
            row[0]
            for row in conn.execute(
                "SELECT proname FROM pg_proc WHERE pronamespace = 'app_jobs'::regnamespace"
            )
        }
        assert names >= APP_FUNCTIONS
        tables = conn.execute(
            "SELECT array_agg(relname::text ORDER BY relname) FROM pg_class "
            "WHERE relnamespace = 'app_jobs'::regnamespace AND relkind = 'r'"
        ).fetchone()
        assert tables == (["job_queues", "jobs", "scheduled_jobs"],)
        # no extension was needed, nor created
        extensions = conn.execute("SELECT array_agg(extname::text) FROM pg_extension").fetchone()
        assert extensions == (["plpgsql"],)
        q = make_q(conn)
        job = q.add_job("smoke", queue_name="q")
        got = q.get_job("worker-1")
        assert got is not None and got["id"] == job["id"]


def test_reapplying_with_psql_changes_nothing(empty_db_url, psql_apply, catalogue, pg_dump_bin):
    psql_apply(empty_db_url)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        _seed(conn)
        before = catalogue(conn)
    dump_before = _pg_dump(pg_dump_bin, empty_db_url)

    psql_apply(empty_db_url)

    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        after = catalogue(conn)
        assert after == before
        assert len(after["rows:jobs"]) == 3 and len(after["rows:scheduled_jobs"]) == 1
        assert len(after["rows:job_queues"]) == 1
        # the sequence carried on: no id is reused
        max_id = conn.execute("SELECT max(id) FROM app_jobs.jobs").fetchone()[0]
        new_id = conn.execute("SELECT id FROM app_jobs.add_job(gen_random_uuid(), 'x')").fetchone()[
            0
        ]
        assert new_id > max_id
    assert _pg_dump(pg_dump_bin, empty_db_url) == dump_before


def test_reapplying_in_one_driver_transaction_changes_nothing(db_url, catalogue, sql_files):
    """The way lqjobs.ops.migrate applies the files: one script per file, one transaction."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        _seed(conn)
        before = catalogue(conn)
        marker = before["schema"][0][2]
        assert marker.startswith(migrate.MARKER_PREFIX)
    with psycopg.connect(db_url) as conn, conn.transaction():
        apply_schema(conn, [p.read_text() for p in sql_files], "app_jobs", marker)
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert catalogue(conn) == before


def test_migrate_installs_once_then_is_up_to_date(empty_db_url, catalogue):
    assert migrate.migrate(empty_db_url).outcome is migrate.Outcome.INSTALLED
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        _seed(conn)
        before = catalogue(conn)
    assert migrate.migrate(empty_db_url).outcome is migrate.Outcome.UP_TO_DATE
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        assert catalogue(conn) == before


def test_bare_install_grants_nothing_and_helpers_use_the_session_setting(
    pg_url, empty_db_url, psql_apply, make_q
):
    if _role_exists(pg_url, ADMIN_ROLE):
        pytest.skip("the test cluster has an administrator role")
    psql_apply(empty_db_url)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        assert conn.execute("SELECT to_regnamespace('jwt_private')").fetchone() == (None,)
        acls = conn.execute(
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'app_jobs'::regnamespace "
            "AND relacl IS NOT NULL"
        ).fetchone()
        assert acls == (0,)
        tenant = uuid.uuid4()
        conn.execute("CREATE TABLE items (id serial PRIMARY KEY, name text)")
        conn.execute(
            "CREATE TRIGGER enqueue AFTER INSERT ON items FOR EACH ROW "
            "EXECUTE FUNCTION app_jobs.tg_add_job_with_row_id('item_added')"
        )
        with conn.transaction():
            conn.execute("SELECT set_config('jwt.claims.database_id', %s, true)", [str(tenant)])
            conn.execute("INSERT INTO items (name) VALUES ('a')")
        job = make_q(conn).one("SELECT database_id, task_identifier, payload FROM app_jobs.jobs")
        assert job == {"database_id": tenant, "task_identifier": "item_added", "payload": {"id": 1}}


def _create_launchql_bits(conn: psycopg.Connection) -> None:
    conn.execute("CREATE SCHEMA jwt_private")
    conn.execute(
        sql.SQL(
            "CREATE FUNCTION jwt_private.current_database_id() RETURNS uuid "
            "LANGUAGE sql STABLE AS $$ SELECT {}::uuid $$"
        ).format(sql.Literal(str(LAUNCHQL_TENANT)))
    )


def test_install_where_jwt_private_and_administrator_exist(
    pg_url, template_db, psql_apply, catalogue, make_q
):
    # template_db is requested so that the shared template is built before the
    # cluster-wide administrator role exists (or it would hold grants to it)
    created_role = not _role_exists(pg_url, ADMIN_ROLE)
    dbname = f"lqjobs_launchql_{uuid.uuid4().hex[:10]}"
    url = psycopg.conninfo.make_conninfo(pg_url, dbname=dbname)
    with psycopg.connect(pg_url, autocommit=True) as admin:
        if created_role:
            admin.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(ADMIN_ROLE)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            _create_launchql_bits(conn)
        psql_apply(url)
        with psycopg.connect(url, autocommit=True) as conn:
            _check_administrator_grants(conn)
            _check_helpers_use_jwt_private(conn, make_q(conn))
            before = catalogue(conn)
        psql_apply(url)  # a re-apply works there too, and changes nothing
        with psycopg.connect(url, autocommit=True) as conn:
            assert catalogue(conn) == before
    finally:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )
            if created_role:
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(ADMIN_ROLE)))


def _check_administrator_grants(conn: psycopg.Connection) -> None:
    assert conn.execute(
        "SELECT has_schema_privilege('administrator', 'app_jobs', 'USAGE')"
    ).fetchone() == (True,)
    for table in ("jobs", "scheduled_jobs", "job_queues"):
        granted = conn.execute(
            "SELECT array_agg(privilege_type::text ORDER BY privilege_type) "
            "FROM information_schema.role_table_grants "
            "WHERE grantee = 'administrator' AND table_schema = 'app_jobs' AND table_name = %s",
            [table],
        ).fetchone()
        assert granted == (["DELETE", "INSERT", "SELECT", "UPDATE"],), table
    # EXECUTE granted explicitly on every function (not only through PUBLIC)
    missing = conn.execute(
        """SELECT array_agg(p.proname::text) FROM pg_proc p
            WHERE p.pronamespace = 'app_jobs'::regnamespace
              AND NOT EXISTS (SELECT 1 FROM aclexplode(p.proacl) a
                               WHERE a.grantee = 'administrator'::regrole
                                 AND a.privilege_type = 'EXECUTE')"""
    ).fetchone()
    assert missing == (None,)
    default_acl = conn.execute(
        "SELECT defaclacl::text FROM pg_default_acl "
        "WHERE defaclnamespace = 'app_jobs'::regnamespace"
    ).fetchone()
    assert default_acl is not None and "administrator=X" in default_acl[0]


def _check_helpers_use_jwt_private(conn: psycopg.Connection, q) -> None:
    conn.execute("CREATE TABLE items (id serial PRIMARY KEY, name text)")
    for function, task in (
        ("tg_add_job_with_row_id", "by_id"),
        ("tg_add_job_with_row", "by_row"),
        ("trigger_job_with_fields", "by_fields"),
    ):
        args = [sql.Literal(task)] + ([sql.Literal("name")] if task == "by_fields" else [])
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {} AFTER INSERT ON items FOR EACH ROW "
                "EXECUTE FUNCTION app_jobs.{}({})"
            ).format(sql.Identifier(task), sql.Identifier(function), sql.SQL(", ").join(args))
        )
    with conn.transaction():
        # the session setting says otherwise: jwt_private wins when it exists
        conn.execute("SELECT set_config('jwt.claims.database_id', %s, true)", [str(uuid.uuid4())])
        conn.execute("INSERT INTO items (name) VALUES ('a')")
    jobs = q.rows(
        "SELECT database_id, task_identifier, payload FROM app_jobs.jobs ORDER BY task_identifier"
    )
    assert jobs == [
        {"database_id": LAUNCHQL_TENANT, "task_identifier": "by_fields", "payload": {"name": "a"}},
        {"database_id": LAUNCHQL_TENANT, "task_identifier": "by_id", "payload": {"id": 1}},
        {
            "database_id": LAUNCHQL_TENANT,
            "task_identifier": "by_row",
            "payload": {"id": 1, "name": "a"},
        },
    ]
    conn.execute("DELETE FROM app_jobs.jobs")
