"""Every migration's upgrade() only adds to the schema: the previous release serves on it.

Migrations run in the first new pod's init container while the previous release's pods keep
serving (docs/sre.md "Order of start"), and a rollback runs the previous release on the migrated
schema with no downgrade (docs/sre.md "Rolling back"). So an upgrade() may add tables, nullable
columns (or NOT NULL ones with a server default), indexes and rows; it may not drop, rename or
retype a table or column, make a column NOT NULL, or add a constraint rows the previous release
writes could break. Such a change goes in two releases: stop using it in one, drop it in the
next. Read from the source (ast): no database needed, so it runs with the unit tests.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = sorted(ROOT.glob("services/*/migrations/versions/*.py"))

# op.<name>(...) or batch_op.<name>(...) calls that take away from, or tighten, what the previous
# release reads and writes.
CONTRACTING_CALLS = {
    "drop_table",
    "drop_column",
    "rename_table",
    "alter_column",  # a rename, a new type, NOT NULL: each breaks the previous release's statements
    "drop_constraint",
    "create_unique_constraint",
    "create_check_constraint",
    "create_foreign_key",
    "create_primary_key",
}
# The same in SQL given to op.execute.
CONTRACTING_SQL = re.compile(
    r"\b(DROP\s+(TABLE|COLUMN|CONSTRAINT)|RENAME\b|SET\s+NOT\s+NULL|ALTER\s+COLUMN\s+\S+\s+(SET\s+DATA\s+)?TYPE"
    r"|ADD\s+CONSTRAINT|CREATE\s+UNIQUE\s+INDEX)",
    re.IGNORECASE,
)


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _not_null_without_default(column: ast.expr) -> bool:
    """A Column(..., nullable=False) without server_default: the previous release's inserts fail."""
    if not (isinstance(column, ast.Call) and getattr(column.func, "attr", getattr(column.func, "id", "")) == "Column"):
        return False
    nullable = _keyword(column, "nullable")
    not_null = isinstance(nullable, ast.Constant) and nullable.value is False
    return not_null and _keyword(column, "server_default") is None


def contracting_steps(source: str) -> list[str]:
    """What the upgrade() of a migration's source does that the previous release's code may not survive."""
    tree = ast.parse(source)
    upgrade = next(
        (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "upgrade"),
        None,
    )
    assert upgrade is not None, "a migration without upgrade()"
    # A constraint or unique index on a table this same upgrade() creates binds no row of the
    # previous release (it never wrote that table).
    created = {
        n.args[0].value
        for n in ast.walk(upgrade)
        if isinstance(n, ast.Call)
        and getattr(n.func, "attr", "") == "create_table"
        and n.args
        and isinstance(n.args[0], ast.Constant)
    }
    # Calls inside `with op.batch_alter_table("t") as b:` name no table of their own.
    batch_table = {
        id(call): item.context_expr.args[0].value
        for w in ast.walk(upgrade)
        if isinstance(w, ast.With)
        for item in w.items
        if isinstance(item.context_expr, ast.Call)
        and getattr(item.context_expr.func, "attr", "") == "batch_alter_table"
        and isinstance(item.context_expr.args[0], ast.Constant)
        for call in ast.walk(w)
    }
    found = []
    for node in ast.walk(upgrade):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        name = node.func.attr
        where = f"line {node.lineno}: {name}"
        table = batch_table.get(id(node))
        if table is None and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
            table = node.args[1].value
        if name.startswith("create_") and table in created:
            continue
        if name in CONTRACTING_CALLS:
            found.append(where)
        elif name == "add_column" and any(_not_null_without_default(a) for a in node.args):
            found.append(f"{where} of a NOT NULL column without server_default")
        elif name == "create_index" and isinstance(_keyword(node, "unique"), ast.Constant):
            if _keyword(node, "unique").value is True:  # type: ignore[union-attr]
                found.append(f"{where} unique=True")
        elif name == "execute":
            sql = " ".join(
                c.value
                for a in node.args
                for c in ast.walk(a)
                if isinstance(c, ast.Constant) and isinstance(c.value, str)
            )
            if CONTRACTING_SQL.search(sql):
                found.append(f"{where} {sql[:80]!r}")
    return found


@pytest.mark.parametrize("path", MIGRATIONS, ids=lambda p: f"{p.parts[-4]}-{p.stem}")
def test_every_migration_only_adds_to_the_schema(path: Path) -> None:
    assert contracting_steps(path.read_text()) == [], (
        f"{path.relative_to(ROOT)}: its upgrade() would break the previous release, which serves beside it"
        " during a rollout and on it after a rollback; split it over two releases (module docstring)"
    )


def test_there_are_migrations_to_check() -> None:
    assert {p.parts[-4] for p in MIGRATIONS} == {"wallet", "gifting", "payout"}


@pytest.mark.parametrize(
    "body",
    [
        'op.drop_column("purchases", "region")',
        'op.alter_column("purchases", "region", new_column_name="area")',
        'op.add_column("purchases", sa.Column("region", sa.String(8), nullable=False))',
        'with op.batch_alter_table("purchases") as b:\n        b.drop_column("region")',
        'op.execute("ALTER TABLE purchases ALTER COLUMN region SET NOT NULL")',
        'op.execute("ALTER TABLE purchases RENAME COLUMN region TO area")',
        'op.create_index("ix_x", "purchases", ["region"], unique=True)',
        'op.create_unique_constraint("uq_x", "purchases", ["region"])',
    ],
)
def test_a_contracting_step_is_caught(body: str) -> None:
    source = f"def upgrade() -> None:\n    {body}\n\n\ndef downgrade() -> None:\n    op.drop_table('x')\n"
    assert contracting_steps(source) != []


def test_expanding_steps_and_the_downgrade_pass() -> None:
    source = (
        "def upgrade() -> None:\n"
        '    op.add_column("purchases", sa.Column("region", sa.String(8), nullable=False, server_default=""))\n'
        '    op.add_column("purchases", sa.Column("note", sa.Text(), nullable=True))\n'
        '    create_index_beside_writers("ix_x", "purchases", ["region"])\n'
        '    op.execute("DELETE FROM outbox WHERE published_at_us IS NOT NULL")\n'
        '    op.create_table("notes", sa.Column("id", sa.String(64), nullable=False))\n'
        '    op.create_index("ix_notes_id", "notes", ["id"], unique=True)\n'
        "\n\ndef downgrade() -> None:\n"
        '    op.drop_column("purchases", "region")\n'
    )
    assert contracting_steps(source) == []
