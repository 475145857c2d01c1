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
# Functions that take a scope string of their own: only IdempotentCall may call them here.
SCOPED = {"run_idempotent", "stored_answer"}


def _name(node: ast.expr) -> str:
    """The called or decorating name: `f` for `f(...)`, `m.f(...)` or `@f(...)`."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


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
    problems = [
        f"line {node.lineno}: {_name(node)}() names a scope of its own; use the command's idem"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and _name(node) in SCOPED
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
