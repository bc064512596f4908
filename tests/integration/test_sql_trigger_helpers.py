"""Trigger helpers for application tables, json_build_object_apply, and where
the helpers take the tenant from (jwt_private.current_database_id() when it
exists, else the jwt.claims.database_id setting), resolved on every call."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql

pytestmark = pytest.mark.integration

SETTING_TENANT = uuid.UUID("aaaaaaaa-0000-4000-8000-000000000001")
FUNCTION_TENANT = uuid.UUID("bbbbbbbb-0000-4000-8000-000000000002")
HELPERS = (
    ("tg_add_job_with_row_id", "by_id", []),
    ("tg_add_job_with_row", "by_row", []),
    ("trigger_job_with_fields", "by_fields", ["name", '"Note"']),
)


@pytest.fixture
def app_table(conn):
    """public.items with one AFTER INSERT OR UPDATE OR DELETE trigger per helper."""
    conn.execute('CREATE TABLE items (id serial PRIMARY KEY, name text, "Note" text, n int)')
    for function, task, columns in HELPERS:
        args = sql.SQL(", ").join(sql.Literal(a) for a in [task, *columns])
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON items "
                "FOR EACH ROW EXECUTE FUNCTION app_jobs.{}({})"
            ).format(sql.Identifier(task), sql.Identifier(function), args)
        )
    return "items"


def _as_tenant(conn, tenant, statement: str, params=None) -> None:
    with conn.transaction():
        conn.execute("SELECT set_config('jwt.claims.database_id', %s, true)", [str(tenant)])
        conn.execute(statement, params)


def _jobs(q) -> list[tuple]:
    rows = q.rows(
        "SELECT database_id, task_identifier, payload, queue_name FROM app_jobs.jobs ORDER BY id"
    )
    return [(r["database_id"], r["task_identifier"], r["payload"], r["queue_name"]) for r in rows]


def _create_jwt_private(conn, tenant) -> None:
    conn.execute("CREATE SCHEMA IF NOT EXISTS jwt_private")
    conn.execute(
        sql.SQL(
            "CREATE OR REPLACE FUNCTION jwt_private.current_database_id() RETURNS uuid "
            "LANGUAGE sql STABLE AS $$ SELECT {}::uuid $$"
        ).format(sql.Literal(str(tenant)))
    )


def test_helpers_enqueue_on_insert_update_delete_with_the_setting_tenant(conn, q, app_table):
    t = SETTING_TENANT
    _as_tenant(conn, t, "INSERT INTO items (name, \"Note\", n) VALUES ('a', NULL, 1)")
    assert _jobs(q) == [
        (t, "by_fields", {"name": "a", '"Note"': ""}, None),  # NULL becomes "" (as upstream)
        (t, "by_id", {"id": 1}, None),
        (t, "by_row", {"id": 1, "name": "a", "Note": None, "n": 1}, None),
    ]
    q.execute("DELETE FROM app_jobs.jobs")

    _as_tenant(conn, t, "UPDATE items SET name = 'b', \"Note\" = 'it''s \"quoted\"' WHERE id = 1")
    assert _jobs(q) == [
        (t, "by_fields", {"name": "b", '"Note"': 'it\'s "quoted"'}, None),
        (t, "by_id", {"id": 1}, None),
        (t, "by_row", {"id": 1, "name": "b", "Note": 'it\'s "quoted"', "n": 1}, None),
    ]
    q.execute("DELETE FROM app_jobs.jobs")

    _as_tenant(conn, t, "DELETE FROM items WHERE id = 1")  # the OLD row is sent
    assert _jobs(q) == [
        (t, "by_fields", {"name": "b", '"Note"': 'it\'s "quoted"'}, None),
        (t, "by_id", {"id": 1}, None),
        (t, "by_row", {"id": 1, "name": "b", "Note": 'it\'s "quoted"', "n": 1}, None),
    ]
    assert q.value("SELECT count(*) FROM items") == 0


def test_helpers_work_as_before_triggers(conn, q):
    conn.execute("CREATE TABLE things (id int PRIMARY KEY, label text)")
    conn.execute(
        "CREATE TRIGGER t BEFORE INSERT OR DELETE ON things FOR EACH ROW "
        "EXECUTE FUNCTION app_jobs.trigger_job_with_fields('thing', 'label')"
    )
    _as_tenant(conn, SETTING_TENANT, "INSERT INTO things VALUES (7, 'x')")
    _as_tenant(conn, SETTING_TENANT, "DELETE FROM things WHERE id = 7")
    assert q.value("SELECT count(*) FROM things") == 0  # the DELETE went through (OLD returned)
    assert [job[2] for job in _jobs(q)] == [{"label": "x"}, {"label": "x"}]


def test_field_arguments_are_read_as_identifiers(conn, q):
    """Unquoted arguments fold to lower case as in SQL; the payload key is the
    argument as written (upstream behaviour)."""
    conn.execute('CREATE TABLE people (id int PRIMARY KEY, name text, "Nick" text)')
    conn.execute(
        "CREATE TRIGGER t AFTER INSERT ON people FOR EACH ROW EXECUTE FUNCTION "
        "app_jobs.trigger_job_with_fields('person', 'NAME', '\"Nick\"', 'id')"
    )
    _as_tenant(conn, SETTING_TENANT, "INSERT INTO people VALUES (3, 'Ann', 'an')")
    assert [job[2] for job in _jobs(q)] == [{"NAME": "Ann", '"Nick"': "an", "id": "3"}]


@pytest.mark.parametrize("argument", ["name, (SELECT 1)", "name::int", "people.name", "nope"])
def test_field_arguments_are_never_run_as_expressions(conn, q, argument):
    conn.execute("CREATE TABLE people (id int PRIMARY KEY, name text)")
    conn.execute(
        sql.SQL(
            "CREATE TRIGGER t AFTER INSERT ON people FOR EACH ROW "
            "EXECUTE FUNCTION app_jobs.trigger_job_with_fields('person', {})"
        ).format(sql.Literal(argument))
    )
    with pytest.raises(psycopg.Error):
        _as_tenant(conn, SETTING_TENANT, "INSERT INTO people VALUES (1, 'x')")
    assert q.value("SELECT count(*) FROM app_jobs.jobs") == 0


def test_without_any_tenant_the_enqueue_fails(conn, app_table):
    with pytest.raises(psycopg.errors.NotNullViolation):
        conn.execute("INSERT INTO items (name) VALUES ('a')")
    assert conn.execute("SELECT count(*) FROM items").fetchone() == (0,)


def test_jwt_private_created_after_install_is_used_and_resolved_per_call(conn, q, app_table):
    _create_jwt_private(conn, FUNCTION_TENANT)
    _as_tenant(conn, SETTING_TENANT, "INSERT INTO items (name) VALUES ('a')")
    assert {job[0] for job in _jobs(q)} == {FUNCTION_TENANT}
    q.execute("DELETE FROM app_jobs.jobs")

    conn.execute("DROP FUNCTION jwt_private.current_database_id()")
    _as_tenant(conn, SETTING_TENANT, "INSERT INTO items (name) VALUES ('b')")
    assert {job[0] for job in _jobs(q)} == {SETTING_TENANT}


def test_helpers_run_with_the_owners_rights(pg_url, db_url, conn, q, app_table):
    """An application role with no rights on app_jobs (nor on jwt_private, as in
    LaunchQL) still enqueues through the SECURITY DEFINER helpers, and can call
    add_job but not get_job."""
    _create_jwt_private(conn, FUNCTION_TENANT)
    conn.execute("REVOKE ALL ON FUNCTION jwt_private.current_database_id() FROM PUBLIC")
    role = f"lqjobs_app_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        for grant in (
            "GRANT SELECT, INSERT, UPDATE, DELETE ON items TO {}",
            "GRANT USAGE ON SEQUENCE items_id_seq TO {}",
            "GRANT USAGE ON SCHEMA app_jobs TO {}",
        ):
            q.execute(sql.SQL(grant).format(sql.Identifier(role)))
        app_url = psycopg.conninfo.make_conninfo(db_url, user=role)
        with psycopg.connect(app_url, autocommit=True) as app:
            _as_tenant(app, SETTING_TENANT, "INSERT INTO items (name) VALUES ('a')")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("SELECT jwt_private.current_database_id()")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("SELECT count(*) FROM app_jobs.jobs")
            app.execute("SELECT app_jobs.add_job(%s, 'direct')", [SETTING_TENANT])
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("SELECT * FROM app_jobs.get_job('worker-1')")
        assert sorted((job[1], job[0]) for job in _jobs(q)) == [
            ("by_fields", FUNCTION_TENANT),
            ("by_id", FUNCTION_TENANT),
            ("by_row", FUNCTION_TENANT),
            ("direct", SETTING_TENANT),
        ]
    finally:
        q.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_json_build_object_apply(q):
    def build(arguments):
        return q.value("SELECT app_jobs.json_build_object_apply(%s::text[])::text", [arguments])

    assert build(["a", "1", "b", "two"]) == '{"a" : "1", "b" : "two"}'
    assert build(["k", None]) == '{"k" : ""}'
    assert build(["q", 'it\'s "x" \\ y']) == '{"q" : "it\'s \\"x\\" \\\\ y"}'
    assert (
        build(["a", "1", "a", "2"]) == '{"a" : "1", "a" : "2"}'
    )  # json keeps duplicates, in order
    assert build([]) == "{}"
    assert build(None) == "{}"
    with pytest.raises(psycopg.errors.DataError):
        build(["lonely"])
