"""Each component runs exactly the statements ``lqjobs.ops.roles.STATEMENTS`` lists
for it, and imports only the DB modules those statements live in: the grants are
derived from that list (the integration test runs each one under its role)."""

from __future__ import annotations

import ast
from pathlib import Path

from lqjobs.db.fence import Fence
from lqjobs.db.queue import Queue
from lqjobs.db.reads import Reads
from lqjobs.db.scheduled import Scheduled
from lqjobs.ops.roles import STATEMENTS

ROOT = Path(__file__).resolve().parents[2]
ROLE_CLASSES = {cls.__name__: cls for cls in (Queue, Scheduled, Fence, Reads)}
SOURCES = {
    "bridge": ["lqjobs/bridge/*.py"],
    "worker": ["lqjobs/worker.py", "lqjobs/celery.py"],
    "callback": ["lqjobs/callback/*.py"],
    "scheduler": ["lqjobs/scheduler/*.py"],
}


def statement_names() -> dict[str, str]:
    """method name -> "Class.method", for every public statement of the role classes."""
    names: dict[str, str] = {}
    for class_name, cls in ROLE_CLASSES.items():
        for method in vars(cls):
            if not method.startswith("_") and callable(getattr(cls, method)):
                assert method not in names, f"{method} is defined by two role classes"
                names[method] = f"{class_name}.{method}"
    return names


def trees(component: str) -> list[ast.Module]:
    paths = [path for pattern in SOURCES[component] for path in ROOT.glob(pattern)]
    assert paths, component
    return [ast.parse(path.read_text()) for path in paths]


def called_statements(component: str) -> set[str]:
    names = statement_names()
    return {
        names[node.func.attr]
        for tree in trees(component)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in names
    }


def imported_db_modules(component: str) -> set[str]:
    return {
        node.module
        for tree in trees(component)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and node.module is not None
        and node.module.startswith("lqjobs.db.")
    }


def test_each_component_runs_exactly_its_listed_statements() -> None:
    found = {component: called_statements(component) for component in STATEMENTS}
    assert found == {component: set(listed) for component, listed in STATEMENTS.items()}


def test_each_component_imports_only_the_db_modules_of_its_statements() -> None:
    for component, listed in STATEMENTS.items():
        allowed = {"lqjobs.db.base"} | {
            ROLE_CLASSES[statement.split(".")[0]].__module__ for statement in listed
        }
        assert imported_db_modules(component) <= allowed, component


def test_every_listed_statement_exists() -> None:
    names = set(statement_names().values())
    assert {statement for listed in STATEMENTS.values() for statement in listed} <= names
