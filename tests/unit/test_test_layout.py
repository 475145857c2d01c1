"""The test tree's layout: a test module takes what it shares with others from tests/support/, a
suite's conftest.py or its helper modules (tests/integration/helpers.py, tests/faults/load.py, ...),
never from another test module. Such an import breaks its users when the test module is split,
renamed or moved, and hides what is shared among the tests."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _is_test_module(path: Path) -> bool:
    """What pytest collects by default (the project sets no python_files)."""
    return path.suffix == ".py" and (path.name.startswith("test_") or path.stem.endswith("_test"))


def _imported(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every module, or module member, the file at `path` imports."""
    package = list(path.relative_to(root).parent.parts)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield node.lineno, module
            for alias in node.names:  # `from tests.integration import test_payout` names a module too
                yield node.lineno, f"{module}.{alias.name}"


def _imports_of_test_modules(root: Path) -> list[str]:
    """`file:line imports module` for every import of a test module by a test module under root/tests."""
    found = []
    for path in sorted((root / "tests").rglob("*.py")):
        if not _is_test_module(path):
            continue
        for line, dotted in _imported(path, root):
            target = root.joinpath(*dotted.split(".")).with_suffix(".py")
            if target.is_file() and _is_test_module(target) and target != path:
                found.append(f"{path.relative_to(root)}:{line} imports {dotted}")
    return found


def test_no_test_module_imports_another_test_module() -> None:
    found = _imports_of_test_modules(REPO)
    assert not found, (
        "a test module imports another test module; move what they share to tests/support/, the suite's "
        "conftest.py or a helper module next to them:\n" + "\n".join(found)
    )


def test_the_check_sees_every_form_of_such_an_import(tmp_path: Path) -> None:
    suite = tmp_path / "tests" / "suite"
    suite.mkdir(parents=True)
    for name in ("__init__.py", "helpers.py", "conftest.py", "test_shared.py"):
        (suite / name).write_text("X = 1\n")
    (suite / "test_absolute.py").write_text("from tests.suite.test_shared import X\n")
    (suite / "test_plain.py").write_text("import tests.suite.test_shared\n")
    (suite / "test_member.py").write_text("from tests.suite import test_shared\n")
    (suite / "test_relative.py").write_text("from .test_shared import X\n")
    (suite / "test_relative_member.py").write_text("from . import test_shared\n")
    (suite / "test_in_a_function.py").write_text("def f():\n    from tests.suite.test_shared import X\n")
    (suite / "test_helpers_only.py").write_text(
        "from tests.suite import conftest, helpers\nfrom tests.suite.helpers import X\nfrom .conftest import X\n"
    )

    found = _imports_of_test_modules(tmp_path)

    assert sorted(f.split(":")[0] for f in found) == [
        "tests/suite/test_absolute.py",
        "tests/suite/test_in_a_function.py",
        "tests/suite/test_member.py",
        "tests/suite/test_plain.py",
        "tests/suite/test_relative.py",
        "tests/suite/test_relative_member.py",
    ]
