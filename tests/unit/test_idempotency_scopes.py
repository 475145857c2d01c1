"""Each idempotent command of the use cases names its scope once, in its `answers_retry`.

The decorator's look-up after a refusal must read the record the command's run writes: with a
second scope string inside the command, a mismatch would silently turn the retry's answer off
(a retry of a request that took effect, refused by a later stricter check, would lose its first
answer). The command gets its scope from the decorator (`idem.run`, `idem.stored`); these tests
hold the use cases to that, read from their source.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[2] / "services"
USECASES = [SERVICES / name / "usecases.py" for name in ("wallet", "gifting", "payout")]
# Every module of the services (not their migrations): a command, or a run under a scope of its
# own, may live beside the use cases (wallet/spending.py imports from idempotency too).
MODULES = sorted(
    p
    for name in ("wallet", "gifting", "payout")
    for p in (SERVICES / name).rglob("*.py")
    if "migrations" not in p.parts
)
# Functions that take a scope string of their own: only IdempotentCall may call them here.
SCOPED = {"run_idempotent", "stored_answer", "lookup", "record"}
UNAMBIGUOUS = {"run_idempotent", "stored_answer"}  # no other function has these names
IDEMPOTENCY = "services.common.idempotency"


def _name(node: ast.expr) -> str:
    """The called or decorating name: `f` for `f(...)`, `m.f(...)` or `@f(...)`."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _scoped(func: ast.expr, imported: set[str]) -> bool:
    """Whether a call of `func` is one of idempotency's functions that take a scope string."""
    if isinstance(func, ast.Name):
        return func.id in imported or func.id in UNAMBIGUOUS
    if isinstance(func, ast.Attribute) and func.attr in SCOPED:
        return func.attr in UNAMBIGUOUS or (isinstance(func.value, ast.Name) and func.value.id == "idempotency")
    return False


def _commands(tree: ast.Module) -> list[tuple[ast.AsyncFunctionDef, str]]:
    """Each function decorated with answers_retry, and the scope its decorator names."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncFunctionDef):
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and _name(dec) == "answers_retry":
                    scope = dec.args[1]
                    assert isinstance(scope, ast.Constant), f"{node.name}: the scope is a literal"
                    found.append((node, scope.value))
    return found


def scope_problems(source: str) -> list[str]:
    """What in these use cases could let a command's scope differ between its decorator and its run."""
    tree = ast.parse(source)
    # lookup and record are common names: theirs are idempotency's only if imported from it, or
    # called on the module (`idempotency.record`).
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == IDEMPOTENCY
        for alias in node.names
        if alias.name in SCOPED
    }
    problems = [
        f"line {node.lineno}: {_name(node)}() names a scope of its own; use the command's idem"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and _scoped(node.func, imported)
    ]
    seen: dict[str, str] = {}
    for func, scope in _commands(tree):
        if "idem" not in [a.arg for a in func.args.kwonlyargs]:
            problems.append(f"{func.name}: takes no keyword-only idem from answers_retry")
        elif not any(isinstance(n, ast.Name) and n.id == "idem" for n in ast.walk(func)):
            problems.append(f"{func.name}: never uses its idem (its run would name a scope of its own)")
        if scope in seen:
            problems.append(f"{func.name}: scope {scope!r} is {seen[scope]}'s too")
        seen[scope] = func.name
    return problems


@pytest.mark.parametrize("path", USECASES, ids=lambda p: p.parent.name)
def test_every_idempotent_command_names_its_scope_once_in_its_decorator(path: Path) -> None:
    source = path.read_text()
    assert _commands(ast.parse(source)), "the use cases have commands that answer retries"
    assert scope_problems(source) == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SERVICES)))
def test_no_module_of_the_services_runs_or_looks_up_under_a_scope_of_its_own(path: Path) -> None:
    assert scope_problems(path.read_text()) == []


def test_the_modules_held_to_it_are_every_module_of_the_services_but_their_migrations() -> None:
    assert set(USECASES) <= set(MODULES)
    assert SERVICES / "wallet" / "spending.py" in MODULES
    assert not any("migrations" in p.parts for p in MODULES)


def test_a_command_that_runs_under_a_scope_string_of_its_own_is_caught() -> None:
    source = """
class Uses:
    @answers_retry(common.idempotency, "StartStream", gifting_pb2.Stream)
    async def start_stream(self, req, *, idem):
        return await run_idempotent(self.db, common.idempotency, "StartStreams", req, gifting_pb2.Stream, work)

    @answers_retry(common.idempotency, "StartStream", gifting_pb2.Stream)
    async def end_stream(self, req):
        return await idem.run(work)
"""
    assert scope_problems(source) == [
        "line 5: run_idempotent() names a scope of its own; use the command's idem",
        "start_stream: never uses its idem (its run would name a scope of its own)",
        "end_stream: takes no keyword-only idem from answers_retry",
        "end_stream: scope 'StartStream' is start_stream's too",
    ]


def test_a_run_or_look_up_by_idempotencys_lower_functions_is_caught_and_a_method_of_that_name_is_not() -> None:
    source = """
from services.common.idempotency import lookup, record as keep
from services.common import idempotency

async def spend(uow, req):
    await keep(uow, table, "Spend", req.key, digest, answer)
    await idempotency.lookup(uow, table, "Spend", req.key, digest, Answer)
    await lookup(uow, table, "Spend", req.key, digest, Answer)
    self.metrics.record(1)
    await self.cache.lookup(req.key)
"""
    assert scope_problems(source) == [
        "line 6: keep() names a scope of its own; use the command's idem",
        "line 7: lookup() names a scope of its own; use the command's idem",
        "line 8: lookup() names a scope of its own; use the command's idem",
    ]
