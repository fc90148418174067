"""The migrations policy (docs/operations.md, "Migrations"): expand/contract only.

A migration never drops or renames what the previous release reads. A contract
step (a drop or rename) ships only in a release after the one that stopped
reading the thing, and says so: ``contract_after = "<that release>"`` at the
top of the script, a release older than this one (pyproject.toml's version).
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

DESTRUCTIVE_OPS = {"drop_column", "drop_table", "rename_table", "drop_constraint"}
DESTRUCTIVE_SQL = re.compile(r"\b(DROP\s+(TABLE|COLUMN)|RENAME\s+(TO|COLUMN))\b", re.IGNORECASE)


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


def violations(source: str, current_release: str) -> list[str]:
    """What in a migration script's upgrade() breaks expand/contract."""
    tree = ast.parse(source)
    marker = None
    upgrade = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "contract_after":
            marker = ast.literal_eval(node.value)
        if isinstance(node, ast.FunctionDef) and node.name == "upgrade":
            upgrade = node
    found = []
    for node in ast.walk(upgrade) if upgrade else ():
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "attr", getattr(node.func, "id", ""))
        if name in DESTRUCTIVE_OPS:
            found.append(f"op.{name}")
        elif name == "alter_column" and any(k.arg == "new_column_name" for k in node.keywords):
            found.append("op.alter_column(new_column_name=...)")
        elif name == "execute":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) \
                        and DESTRUCTIVE_SQL.search(arg.value):
                    found.append(f"op.execute({arg.value!r})")
    if not found:
        return []
    if marker is None:
        return [f"{what} without contract_after = '<release that stopped reading it>'"
                for what in found]
    if version_tuple(marker) >= version_tuple(current_release):
        return [f"contract_after = {marker!r} is not a release before this one "
                f"({current_release}): the previous release may still read it"]
    return []


def current_release() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.parametrize("script", sorted((ROOT / "migrations" / "versions").glob("*.py")),
                         ids=lambda path: path.name)
def test_every_shipped_migration_is_expand_or_a_marked_contract(script: Path):
    assert violations(script.read_text(), current_release()) == []


EXPAND = '''
def upgrade():
    op.add_column("users", sa.Column("nickname", sa.String(64), nullable=True))
'''
DROP = '''
def upgrade():
    op.drop_column("users", "created_at")
'''
RENAME = '''
def upgrade():
    op.alter_column("users", "date_of_birth", new_column_name="born_on")
'''
RAW_SQL = '''
def upgrade():
    op.execute("ALTER TABLE users DROP COLUMN created_at")
'''


@pytest.mark.parametrize("source", [DROP, RENAME, RAW_SQL, DROP.replace(
    'op.drop_column("users", "created_at")', 'op.drop_table("users")')])
def test_a_drop_or_rename_is_refused_unmarked(source):
    assert violations(source, "0.3.0")


def test_an_expand_step_needs_no_mark():
    assert violations(EXPAND, "0.3.0") == []


def test_a_contract_step_names_an_earlier_release():
    assert violations('contract_after = "0.2.0"\n' + DROP, "0.3.0") == []
    # The release that stopped reading it is this one: the previous still reads it.
    assert violations('contract_after = "0.3.0"\n' + DROP, "0.3.0")
