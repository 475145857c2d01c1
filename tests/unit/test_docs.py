"""README.md and docs/sre.md against the code they describe: settings, metrics, error reasons, CLI.

What an SRE or a calling team reads there (a setting's name and default, a metric and its labels
for a dashboard, a reason to branch on, a command line to paste) must be what the code has; these
checks fail when one side changes without the other.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import grpc
import pytest
import typer.main
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from services.cli.main import app
from services.common import db
from services.common.config import ServiceSettings
from services.gifting.config import GiftingSettings
from services.payout.config import PayoutSettings
from services.wallet.config import WalletSettings
from tests.support.docs import REPO, SRE, TARGET_LABELS, exported_metrics

README = (REPO / "README.md").read_text()
DOCS = {"README.md": README, "docs/sre.md": SRE}
SETTINGS: dict[str, type[ServiceSettings]] = {
    "wallet": WalletSettings,
    "gifting": GiftingSettings,
    "payout": PayoutSettings,
}


def _settings_table() -> list[tuple[str | None, list[str], str]]:
    """README's configuration table as (service or None for every one, names, default cell)."""
    return [(svc, names, default) for svc, names, default, _ in _settings_rows()]


def _settings_rows() -> list[tuple[str | None, list[str], str, str]]:
    """README's configuration table as (service or None for every one, names, default, range)."""
    section = README.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or len(cells) < 3 or cells[0].startswith("variable") or set(cells[0]) <= {"-"}:
            continue
        svc = cells[0].split()[0] if cells[0].split()[0] in SETTINGS else None
        rows.append((svc, re.findall(r"`([A-Z0-9_]+)`", cells[0]), cells[1], cells[2]))
    assert rows, "README has no configuration table"
    return rows


def _documented_defaults() -> dict[tuple[str, str], str]:
    """(service, NAME) -> the default README gives for it in that service."""
    out: dict[tuple[str, str], str] = {}
    for svc, names, cell in _settings_table():
        # One value per name, separated like the names are: "a / b" or "a, b" (1,000 is one number).
        parts = cell.split(" / ") if " / " in cell else re.split(r",\s+", cell)
        if len(parts) != len(names):
            parts = [cell] * len(names)
        for name, part in zip(names, parts, strict=True):
            per_service = re.split(r",\s+", part)
            for i, service in enumerate(SETTINGS):
                if svc not in (None, service):
                    continue
                # "50051, 50052, 50053": the wallet's, gifting's and payout's.
                out[(service, name)] = per_service[i] if len(per_service) == len(SETTINGS) else part
    return out


def _same_default(doc: str, default: Any) -> bool:
    text = re.sub(r"\s*\(.*\)$", "", doc).strip().strip("`")  # "0 (off)", "unset (operator RPCs refused)"
    if default is PydanticUndefined:
        return text == "required"
    if default is None:
        return text == "unset"
    if default == "":
        return text == "empty"
    if isinstance(default, bool):
        return text == str(default).lower()
    if isinstance(default, int | float):
        return re.fullmatch(r"[0-9][0-9,]*(\.[0-9]+)?", text) is not None and float(text.replace(",", "")) == default
    return text == str(default)


def test_every_setting_is_in_the_readme_table_with_its_default() -> None:
    documented = _documented_defaults()
    missing, wrong = [], []
    for svc, cls in SETTINGS.items():
        for field, info in cls.model_fields.items():
            name = field.upper()
            if (svc, name) not in documented:
                missing.append(f"{svc} {name}")
            elif not _same_default(documented[(svc, name)], info.default):
                wrong.append(f"{svc} {name}: README {documented[(svc, name)]!r}, code {info.default!r}")
    assert not missing, f"settings missing from README's configuration table: {missing}"
    assert not wrong, f"README's configuration table gives other defaults: {wrong}"


def _number(value: float) -> str:
    """10000 -> "10,000", 0.5 -> "0.5": as README writes numbers."""
    return f"{int(value):,}" if float(value).is_integer() else str(value)


def _range_text(info: FieldInfo) -> str:
    """What a setting's field constraints accept, in the words of README's range column."""
    bounds = {type(m).__name__: m for m in info.metadata}
    low = (
        f"above {_number(bounds['Gt'].gt)}"
        if "Gt" in bounds
        else f"{_number(bounds['Ge'].ge)}"
        if "Ge" in bounds
        else None
    )
    high = _number(bounds["Le"].le) if "Le" in bounds else None
    if "MinLen" in bounds:
        return f"at least {bounds['MinLen'].min_length} characters"
    if low and high:
        return f"{low} to {high}" if "Ge" in bounds else f"{low}, at most {high}"
    if low:
        return low if "Gt" in bounds else f"at least {low}"
    return f"at most {high}" if high else "-"


def test_every_setting_range_is_the_one_the_readme_table_gives() -> None:
    # A value outside the range stops start-up: an SRE sizing a pool or a timeout from README
    # must read the bounds the code enforces, and a bound changed in the code must change there.
    wrong = []
    for svc, names, _, cell in _settings_rows():
        for service in [svc] if svc else list(SETTINGS):
            fields = SETTINGS[service].model_fields
            if not all(n.lower() in fields for n in names):
                continue  # test_every_name_in_the_readme_table_is_a_setting_of_its_services says which
            expected = "; ".join(_range_text(fields[n.lower()]) for n in names)
            if cell != expected:
                wrong.append(f"{service} {', '.join(names)}: README {cell!r}, code {expected!r}")
    assert not wrong, "README's configuration table gives other ranges:\n" + "\n".join(wrong)


def test_every_name_in_the_readme_table_is_a_setting_of_its_services() -> None:
    unknown = [
        f"{svc or 'every service'} {name}"
        for svc, names, _ in _settings_table()
        for name in names
        for cls in ([SETTINGS[svc]] if svc else SETTINGS.values())
        if name.lower() not in cls.model_fields
    ]
    assert not unknown, f"README documents settings the code does not read: {unknown}"


def test_every_name_in_the_sre_settings_table_is_a_setting() -> None:
    """docs/sre.md's container settings: common names, or <SVC>_NAME for one service's own."""
    section = SRE.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    names = [
        n
        for line in section.splitlines()
        if line.startswith("| `")
        for n in re.findall(r"`([A-Z0-9_]+)`", line.split("|")[1])
    ]
    assert names, "docs/sre.md has no settings table"
    unknown = []
    for name in names:
        svc, _, rest = name.partition("_")
        if svc.lower() in SETTINGS and rest.lower() in SETTINGS[svc.lower()].model_fields:
            continue
        if name.lower() not in ServiceSettings.model_fields:
            unknown.append(name)
    assert not unknown, f"docs/sre.md's settings table names settings no service reads: {unknown}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_metric_the_docs_name_is_exported_with_the_labels_they_use(doc: str) -> None:
    exported = exported_metrics()
    text = DOCS[doc]
    unknown = sorted({n for n in re.findall(r"\blivegifts_[a-z0-9_]+", text) if n not in exported})
    assert not unknown, f"{doc} names metrics the services do not export: {unknown}"
    bad = []
    for name, selector in re.findall(r"\b(livegifts_[a-z0-9_]+)\{([^}]*)\}", text):
        # {status} lists a label; {method=~"...",code="..."} selects on them.
        for label in re.findall(r"(?:^|,)\s*([a-zA-Z_]\w*)", re.sub(r'"[^"]*"', '""', selector)):
            if label not in exported[name][1]:
                bad.append(f"{name}{{{selector}}}: {label}")
    assert not bad, f"{doc} uses labels these metrics do not have: {bad}"


def test_every_metric_the_services_export_is_named_in_docs_sre() -> None:
    # The runbook is where an SRE learns a metric exists and what to look for in it: one added to
    # the code without a word there is a panel nobody builds.
    named = {exported_metrics()[n][0] for n in re.findall(r"\blivegifts_[a-z0-9_]+", SRE) if n in exported_metrics()}
    unnamed = sorted({name for name, _ in exported_metrics().values()} - named)
    assert not unnamed, f"docs/sre.md does not name these metrics the services export: {unnamed}"


def test_every_rpc_code_that_is_no_grpc_status_is_explained_in_docs_sre() -> None:
    # `sum by (code)` on livegifts_rpc_seconds_count shows whatever the interceptor sets; a value
    # that is no gRPC status (ABORTED_BY_HANDLER: the caller cancelled, or its deadline passed)
    # was on the dashboards with nothing to say what it means or that the error alert skips it.
    source = (REPO / "services" / "common" / "grpcserver.py").read_text()
    own = set(re.findall(r'\bcode = "([A-Z_]+)"', source)) - {c.name for c in grpc.StatusCode}
    assert own, "found no code the interceptor sets: fix the pattern"
    unexplained = [c for c in sorted(own) if f"`{c}` for a call" not in " ".join(SRE.split())]
    assert not unexplained, f'docs/sre.md ("request rate by code") does not say what these mean: {unexplained}'


@pytest.mark.parametrize("doc", DOCS)
def test_every_label_value_a_docs_query_selects_is_one_the_code_sets(doc: str) -> None:
    # A panel or alert selecting `{outcome="provider_error"}` stays empty, silently, when the code
    # calls that outcome something else: the value must be one the services set.
    source = "\n".join(p.read_text() for p in (REPO / "services").rglob("*.py"))
    codes = {c.name for c in grpc.StatusCode} | {"ABORTED_BY_HANDLER"}  # ErrorInterceptor's `code` values
    bad = []
    for name, selector in re.findall(r"\b(livegifts_[a-z0-9_]+)\{([^}]*)\}", DOCS[doc]):
        for label, value in re.findall(r'([a-zA-Z_]\w*)\s*=\s*"([^"]*)"', selector):
            if label == "code" and value in codes:
                continue
            if label == "generation" and value in {"0", "1", "2"}:  # the garbage collector's
                continue
            if f'"{value}"' not in source:
                bad.append(f'{name}{{{label}="{value}"}}')
    assert not bad, f"{doc} selects label values no service sets: {bad}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_label_a_docs_query_groups_by_is_one_its_metrics_have(doc: str) -> None:
    # `sum by (provider, call, outcome) (rate(livegifts_...[5m]))`: a label the metric lacks
    # folds every series into one, and the panel shows a total where it promised a breakdown.
    exported = exported_metrics()
    bad = []
    for labels, rest in re.findall(r"\bby \(([^)]*)\)\s*(\(.*?)(?:`|$)", DOCS[doc], flags=re.M):
        names = re.findall(r"\b(livegifts_[a-z0-9_]+)", rest)
        assert names, f"{doc}: `by ({labels})` groups no livegifts_ metric: {rest!r}"
        have = set().union(*(exported[n][1] for n in names)) | TARGET_LABELS
        bad += [
            f"by ({labels}) {names}: {label}" for label in re.split(r"\s*,\s*", labels.strip()) if label not in have
        ]
    assert not bad, f"{doc} groups by labels these metrics do not have: {bad}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_status_and_reason_pair_the_docs_give_is_raised_by_a_service(doc: str) -> None:
    source = "\n".join(p.read_text() for p in (REPO / "services").rglob("*.py"))
    pairs = re.findall(r"`([A-Z_]+)` ?/ ?`([A-Z_]+)`", DOCS[doc])
    codes = {c.name for c in grpc.StatusCode}
    pairs = [(code, reason) for code, reason in pairs if code in codes]
    assert pairs, f"{doc} gives no `STATUS` / `REASON` pair any more: drop it from this test"
    missing = sorted({reason for _, reason in pairs if f'"{reason}"' not in source})
    assert not missing, f"{doc} lists error reasons no service raises: {missing}"


def _command_lines(text: str) -> list[str]:
    """`livegifts ...` as the docs show it, in code blocks and inline, without comments."""
    lines = re.findall(r"(?:^|`)(?:\.venv/bin/)?livegifts((?: [^`\n]*)?)", text, re.MULTILINE)
    return [line.split("#", 1)[0].strip() for line in lines]


@pytest.mark.parametrize("doc", DOCS)
def test_every_cli_command_line_the_docs_show_exists(doc: str) -> None:
    root = typer.main.get_command(app)
    lines = _command_lines(DOCS[doc])
    assert lines, f"{doc} shows no livegifts command line"
    bad = []
    for line in lines:
        cmd, tokens = root, line.split()
        while hasattr(cmd, "commands") and tokens and not tokens[0].startswith("-"):  # a group
            sub = cmd.commands.get(tokens[0])
            if sub is None:
                bad.append(f"livegifts {line}: no command {tokens[0]!r}")
                break
            cmd, tokens = sub, tokens[1:]
        options = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
        bad += [f"livegifts {line}: no option {t}" for t in tokens if t.startswith("--") and t not in options]
    assert not bad, f"{doc} shows command lines the CLI refuses: {bad}"


def _code_block_command_lines(text: str) -> list[str]:
    """Whole `livegifts ...` lines of the docs' ```sh blocks: what a reader pastes as it stands,
    up to a pipe (`| jq ...` is another program's arguments)."""
    blocks = re.findall(r"^```sh\n(.*?)^```", text, flags=re.M | re.S)
    lines = re.findall(r"^(?:\.venv/bin/)?livegifts( [^\n]*)$", "\n".join(blocks), flags=re.M)
    return [line.split("#", 1)[0].split(" | ", 1)[0].strip() for line in lines]


@pytest.mark.parametrize("doc", DOCS)
def test_every_cli_command_line_in_a_docs_code_block_parses(doc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # An option's name may exist and the line still be refused: a missing argument or required
    # option, a value of the wrong type. Placeholders (<creator_id>, "$TOKEN") stand for a value.
    # A variable the doc exports (`export NATS_URL=...`) is set, as in the shell that runs them.
    for exported in re.findall(r"^export (\w+)=", DOCS[doc], re.MULTILINE):
        monkeypatch.setenv(exported, "x")
    root = typer.main.get_command(app)
    lines = _code_block_command_lines(DOCS[doc])
    assert lines, f"{doc} shows no livegifts command line in a code block"
    bad = []
    for line in lines:
        tokens = [re.sub(r"^(<[^>]*>|\"\$\w+\")", "x", t) for t in line.split()]
        cmd, name = root, "livegifts"
        while hasattr(cmd, "commands") and tokens and not tokens[0].startswith("-"):  # a group
            name, cmd, tokens = tokens[0], cmd.commands[tokens[0]], tokens[1:]
        if "--help" in tokens:
            continue
        try:
            cmd.make_context(name, tokens)  # parses and converts, runs nothing
        except Exception as e:  # typer's own click: its usage errors, a missing argument
            bad.append(f"livegifts {line}: {getattr(e, 'format_message', e.__str__)()}")
    assert not bad, f"{doc} shows command lines the CLI refuses: {bad}"


def _json_commands() -> dict[str, bool]:
    """Every CLI command with `--json` ("dead-letters list"), and whether it prints one object
    per line (its option's help says "one JSON object per ... and line") or one object."""
    found: dict[str, bool] = {}

    def walk(cmd: Any, name: str) -> None:
        for sub_name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{name} {sub_name}".strip())
        for p in getattr(cmd, "params", []):
            if "--json" in p.opts:
                found[name] = re.search(r"one JSON object per .* and line", " ".join(p.help.split())) is not None

    walk(typer.main.get_command(app), "")
    return found


def test_the_readme_says_how_every_command_with_json_prints_it() -> None:
    # `transactions --json` and `gift --json` came after the paragraph, which a script writer
    # reads to know whether to parse one document or a line at a time, and was not told.
    text = " ".join(README.split())
    said = re.search(
        r"With `--json`, a command prints one JSON document on stdout,"
        r" an object \(([^)]*)\) or one object per line \(([^)]*)\)",
        text,
    )
    assert said, "README no longer says what --json prints as this test expects"
    objects, lines = (set(re.findall(r"`([a-z -]+)`", group)) for group in said.groups())
    commands = _json_commands()
    assert commands, "no CLI command has --json any more: drop this test"
    assert objects == {c for c, per_line in commands.items() if not per_line}, objects
    assert lines == {c for c, per_line in commands.items() if per_line}, lines


def test_every_environment_variable_the_cli_reads_is_named_in_the_readme() -> None:
    # `make run` takes no arguments: LIVEGIFTS_VAR_DIR and LIVEGIFTS_RUN_PORT_OFFSET are how a
    # reader moves it off var/ and the default ports, so the README must name them.
    def params(cmd: Any) -> list[Any]:
        subs = cmd.commands.values() if hasattr(cmd, "commands") else []
        return [*cmd.params, *(p for sub in subs for p in params(sub))]

    read = {p.envvar for p in params(typer.main.get_command(app)) if isinstance(p.envvar, str)}
    assert "LIVEGIFTS_RUN_PORT_OFFSET" in read
    missing = sorted(name for name in read if f"`{name}`" not in README and f"{name}=" not in README)
    assert not missing, f"README does not name the environment variables the livegifts CLI reads: {missing}"


def test_the_readme_names_exactly_the_make_targets_make_help_lists() -> None:
    # "make help lists them (...)": a target added, renamed or dropped in the Makefile must be so
    # in README, which is where a new engineer meets them.
    makefile = (REPO / "Makefile").read_text()
    listed = set(re.findall(r"^([a-z-]+):.*## ", makefile, flags=re.M)) - {"help"}
    others = re.search(r"Other targets: `make help` lists them \(([^)]*)\)", " ".join(README.split()))
    assert others, "README no longer lists the other make targets as this test expects"
    named = set(re.findall(r"`([a-z-]+)`", others.group(1))) | set(re.findall(r"^make ([a-z-]+) ", README, flags=re.M))
    assert named == listed, f"README only: {sorted(named - listed)}; Makefile only: {sorted(listed - named)}"


def test_the_python_the_readme_asks_a_fresh_machine_for_is_the_one_the_project_requires() -> None:
    # `make run` builds .venv with whatever `python3` is: an older one fails deep in pip.
    required = re.search(r'requires-python = ">=(\d+\.\d+)"', (REPO / "pyproject.toml").read_text())
    stated = re.search(r"Python (\d+\.\d+) or newer", " ".join(README.split("\n## Two commands\n", 1)[1].split()))
    assert required and stated, 'pyproject.toml or README\'s "Two commands" no longer states the Python it needs'
    assert stated.group(1) == required.group(1), (
        f"README asks for Python {stated.group(1)}, pyproject for {required.group(1)}"
    )


def _string_literals() -> set[str]:
    """Every string literal in services/, implicit concatenations joined (as log messages are)."""
    out = set()
    for path in (REPO / "services").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.add(node.value)
    return out


def test_every_log_line_the_docs_quote_is_one_a_service_logs() -> None:
    # "search the log for ..." is how the runbook sends an SRE to the details: a reworded log call
    # makes that search come back empty in the middle of an incident.
    text = " ".join(" ".join(DOCS.values()).split())
    quoted = re.findall(r'\blog(?:s|ged| line)?(?: [a-z]+){0,2} \(?"([^"]{6,})"', text)
    assert quoted, "the docs quote no log line any more: drop this test"
    literals = _string_literals()
    # A %-format ("refused: its event id was recorded for another %s") matches what it formats.
    formats = [
        re.compile(".+".join(map(re.escape, parts)))
        for s in literals
        if len(parts := re.split(r"%[sdr]", s)) > 1 and len("".join(parts)) >= 10  # not a bare "%s: %s"
    ]
    missing = [q for q in quoted if not any(q in s for s in literals) and not any(f.fullmatch(q) for f in formats)]
    assert not missing, f"the docs quote log lines no service logs: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_repository_path_the_docs_name_exists(doc: str) -> None:
    names = set(re.findall(r"`((?:services|tests|protos|deploy|bench|docs|\.ci)/[\w./<>-]*)`", DOCS[doc]))
    assert names, f"{doc} names no repository path any more: drop it from this test"
    missing = []
    for name in names - {f"deploy/livegifts-{svc}" for svc in SETTINGS}:  # kubectl's deploy/<name>
        # `protos/livegifts/<svc>/v1/`, `deploy/k8s/base/config/<svc>.env`: every service's.
        paths = [name.replace("<svc>", svc) for svc in SETTINGS] if "<svc>" in name else [name]
        missing += [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"{doc} names paths the repository does not have: {missing}"


# Capitalised words in backticks that are neither a setting, a status, an enum value nor a reason.
NOT_REASONS = {"MAX_DELIVER", "CONCURRENTLY", "SELECT", "DB_HOST", "DB_PORT", "DB_NAME"}


@pytest.mark.parametrize("doc", DOCS)
def test_every_error_reason_the_docs_name_is_raised_by_a_service(doc: str) -> None:
    # Reasons named alone (`SELF_GIFT`, `FEED_TOO_SLOW`), not only in `STATUS` / `REASON` pairs:
    # a caller branches on them.
    source = "\n".join(p.read_text() for p in (REPO / "services").rglob("*.py"))
    everything = (
        "\n".join(
            p.read_text(errors="replace")
            for top in ("services", "tests", "bench", "deploy", ".ci")
            for p in (REPO / top).rglob("*")
            if p.is_file() and p.suffix in {".py", ".yaml", ".yml", ".env", ""}
        )
        + (REPO / "docker-compose.yml").read_text()
    )
    protos = "\n".join(p.read_text() for p in (REPO / "protos").rglob("*.proto"))
    codes = {c.name for c in grpc.StatusCode}
    settings = {f.upper() for cls in SETTINGS.values() for f in cls.model_fields}
    unknown = []
    for word in sorted(set(re.findall(r"`([A-Z][A-Z0-9_]{2,})`", DOCS[doc]))):
        svc, _, rest = word.partition("_")
        if word in codes or word in settings or word in NOT_REASONS or re.search(rf"\b{word}\s*=", protos):
            continue
        if svc.lower() in SETTINGS and rest in settings:  # `GIFTING_WALLET_ADDR`: a service's own
            continue
        if word.startswith("LIVEGIFTS_"):  # an environment variable: something must read or set it
            ok = word in everything or any(
                word == f"LIVEGIFTS_{s.upper()}_{name}" for s in SETTINGS for name in settings
            )
        else:  # a reason raised as a string, or a module constant the docs point to
            ok = f'"{word}"' in source or re.search(rf"^{word}\s*(: [^=]+)?=", source, re.M) is not None
        if not ok:
            unknown.append(word)
    assert not unknown, f"{doc} names reasons or variables nothing raises or reads: {unknown}"


# Functions whose return value is an error reason the error mapping answers with (a variable there).
REASON_RETURNING = {"storage_refusal"}
REASON = re.compile(r"[A-Z][A-Z0-9_]+")


def _raised_reasons() -> dict[str, set[str]]:
    """Every reason a service can answer with, read from services/ -> the status codes known for it.

    A reason is the second argument (or `reason=`) of a domain error (services/common/errors.py),
    the reason of `_rich_status` (the error mapping's own: CONFLICT, INTERNAL...), a `reason=` or
    `too_long=` handed to a helper that raises it (provider calls, gifting's title check), or
    what a function of REASON_RETURNING returns; a string or a module constant holding one.
    """
    from services.common import errors

    classes = {
        name: cls
        for name, cls in vars(errors).items()
        if isinstance(cls, type) and issubclass(cls, errors.DomainError) and cls in errors.STATUS_BY_ERROR
    }
    out: dict[str, set[str]] = {}
    for path in (REPO / "services").rglob("*.py"):
        tree = ast.parse(path.read_text())
        constants = {
            target.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign | ast.AnnAssign)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(target, ast.Name)
        }

        def add(node: ast.AST | None, code: str | None, constants: dict[str, str] = constants) -> None:
            value = node.value if isinstance(node, ast.Constant) else None
            if isinstance(node, ast.Name):
                value = constants.get(node.id)
            if isinstance(value, str) and REASON.fullmatch(value):
                out.setdefault(value, set()).update([code] if code else [])

        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in REASON_RETURNING:
                for ret in ast.walk(node):
                    if isinstance(ret, ast.Return):
                        add(ret.value, None)
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            given = {k.arg: k.value for k in node.keywords}
            if name in classes:
                code = errors.STATUS_BY_ERROR[classes[name]].name
                add(node.args[1] if len(node.args) > 1 else given.get("reason"), code)
                if len(node.args) < 2 and "reason" not in given:
                    out.setdefault(classes[name].default_reason, set()).add(code)
            elif name == "_rich_status" and len(node.args) > 2:
                code_arg = node.args[0]
                add(node.args[2], code_arg.attr if isinstance(code_arg, ast.Attribute) else None)
            else:
                add(given.get("reason"), None)
                add(given.get("too_long"), None)
    return out


def _reasons_table() -> dict[str, str]:
    """README's "Error reasons" table: reason -> its status cell."""
    section = README.split("\n## Error reasons\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) < 5:
            continue
        for reason in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0]):
            assert reason not in rows, f"README's error reasons table lists {reason} twice"
            rows[reason] = cells[1]
    assert rows, "README has no error reasons table"
    return rows


def test_every_reason_a_service_raises_is_in_the_readme_table_and_only_those() -> None:
    # A calling team branches on reasons: one raised but missing from the table is a reason it
    # cannot know of; one in the table that nothing raises is a branch that never runs.
    raised, documented = _raised_reasons(), _reasons_table()
    assert {"UNKNOWN_STREAM", "TITLE_TOO_LONG", "STORAGE_FULL", "PAYMENT_PROVIDER_UNAVAILABLE"} <= set(raised)
    missing = sorted(set(raised) - set(documented))
    assert not missing, f'reasons the services raise that README\'s "Error reasons" table lacks: {missing}'
    unknown = sorted(set(documented) - set(raised))
    assert not unknown, f'README\'s "Error reasons" table lists reasons no service raises: {unknown}'
    wrong = sorted(
        f"{reason}: README {documented[reason]!r}, code {sorted(codes)}"
        for reason, codes in raised.items()
        if not all(code in re.split(r",\s*", documented[reason]) for code in codes)
    )
    assert not wrong, f'README\'s "Error reasons" table gives other status codes: {wrong}'


def _pruners() -> dict[str, str]:
    """Every AgePruner the services build: its `pruner` label and its round's log line."""
    out = {}
    for path in (REPO / "services").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            kw = {k.arg: k.value for k in node.keywords}
            if isinstance(kw.get("name"), ast.Constant) and isinstance(kw.get("done_line"), ast.Constant):
                out[kw["name"].value] = kw["done_line"].value
    return out


def test_the_pruner_runbook_names_every_pruner_and_its_failure_line() -> None:
    # LivegiftsPrunerStopped names a `pruner`; the runbook sends the SRE to the log line of that
    # pruner's failed round ("<done line> failed, retrying next round", services/common/loops.py).
    pruners = _pruners()
    assert len(pruners) >= 4, f"found only the pruners {sorted(pruners)}: fix _pruners"
    section = " ".join(SRE.split("\n### A pruner stopped\n", 1)[1].split("\n### ", 1)[0].split())
    missing = [f"`{name}`" for name in pruners if f"`{name}`" not in section]
    missing += [f"`{line} failed" for line in pruners.values() if f"`{line} failed" not in section]
    assert not missing, f'docs/sre.md "A pruner stopped" does not name {missing}'


def test_the_database_url_row_names_every_query_parameter_the_services_take() -> None:
    # Operators paste a libpq URL from their provider: the row is where they look up whether a
    # parameter passes start-up (services/common/db.py refuses every one it does not list).
    row = next(line for line in README.splitlines() if line.startswith("| `DATABASE_URL` |"))
    taken = db._PG_KWARGS | db._PG_DSN_ONLY | {"dbname", "connect_timeout"}
    missing = sorted(p for p in taken if not re.search(rf"`(?:\?)?{re.escape(p)}(?:=[^`]*)?`", row))
    assert not missing, f"README's DATABASE_URL row does not name the URL parameters {missing}"


def test_the_cut_of_the_cli_error_line_readme_gives_is_the_clis() -> None:
    # "Error reasons" tells a script how much of the ErrorInfo metadata a failed call's line
    # holds (tests/unit/test_cli_errors.py holds the line's form to a real server's answer).
    from services.cli.calls import ERROR_METADATA_SHOWN_CHARS_MAX

    text = " ".join(README.split())
    assert f"cut to {ERROR_METADATA_SHOWN_CHARS_MAX} characters, the metadata" in text


def test_the_exit_of_a_closed_pipe_readme_gives_is_the_clis() -> None:
    from services.cli import main

    assert f"ends quietly with exit {main.STDOUT_CLOSED_EXIT} (128 + SIGPIPE)" in " ".join(README.split())


def test_the_cli_deadlines_readme_gives_are_the_clis() -> None:
    # A runbook script bounds how long a command may hang by these numbers.
    import math

    from services.cli import main

    text = " ".join(README.split())
    assert f"Each call the CLI makes has a {main.DEADLINE_S:g} s deadline" in text
    replay_s = main.REPLAY_ATTEMPTS_MAX * main.DEADLINE_S + sum(main.REPLAY_RETRY_PAUSES_S)
    assert f"`balance` or `earnings` after {main.DEADLINE_S:g} s" in text
    assert f"`dead-letters replay` after at most {math.ceil(replay_s)} s" in text


MIGRATION_NAMED = re.compile(r"\b(wallet|gifting|payout)(?:'s)?(?: migrations?)? (\d{4})(?: `(ix_\w+)`)?")


@pytest.mark.parametrize("doc", DOCS)
def test_every_migration_the_docs_number_is_that_services_and_builds_the_index_named(doc: str) -> None:
    # Helpers working in parallel took one number twice and renumbered (payout 0014/0015): an
    # upgrade note or an index's migration quoted under the wrong number sends an SRE astray.
    text = " ".join(DOCS[doc].split())
    named = MIGRATION_NAMED.findall(text)
    assert named, f"{doc} numbers no migration any more: drop it from this test"
    wrong = []
    for svc, number, index in named:
        files = list((REPO / "services" / svc / "migrations" / "versions").glob(f"{number}_*.py"))
        if len(files) != 1:
            wrong.append(f"{svc} {number}: no such migration")
        elif index and index not in files[0].read_text():
            wrong.append(f"{svc} {number} does not build {index}")
    assert not wrong, f"{doc}: {wrong}"


def test_the_readme_tells_a_client_what_an_answer_without_a_reason_is_and_the_limits_behind_it() -> None:
    """gRPC itself refuses a call past the server's concurrent-call limit or a message past its
    size limit with RESOURCE_EXHAUSTED and no ErrorInfo, the code SPENDING_LIMIT_EXCEEDED (show)
    also has: a client must read the README's rule for such answers, with the limits as the code has them."""
    from services.common.grpcserver import CONCURRENT_RPCS_MAX, CONNECTION_AGE_MAX_S, MESSAGE_BYTES_MAX

    section = README.split("\n## Error reasons\n", 1)[1].split("\n| reason |", 1)[0].replace("\n  ", " ")
    assert "Some answers carry no `ErrorInfo`" in section
    assert f"`CONCURRENT_RPCS_MAX` ({CONCURRENT_RPCS_MAX:,}" in section
    assert "`WATCHERS_MAX`" in section
    assert MESSAGE_BYTES_MAX % (1024 * 1024) == 0
    assert f"larger than {MESSAGE_BYTES_MAX // (1024 * 1024)} MiB" in section
    assert f"`CONNECTION_AGE_MAX_S`, {int(CONNECTION_AGE_MAX_S) // 60} minutes" in section


def test_the_readme_drives_the_compose_suite_with_the_secrets_and_ports_it_sets() -> None:
    """A newcomer on docker-compose has no var/ for the CLI to read secrets from: the README gives
    the ones docker-compose.yml defaults to, and the ports it publishes are the CLI's defaults."""
    import yaml

    from services.cli.suite import SuiteConfig

    compose = (REPO / "docker-compose.yml").read_text()
    services = yaml.safe_load(compose)["services"]

    def default(var: str) -> str:
        found = set(re.findall(r"\$\{" + var + r":-([^}]*)\}", compose))
        assert len(found) == 1, (var, found)
        return found.pop()

    secret = default("LIVEGIFTS_WALLET_PAYMENT_WEBHOOK_SECRET")
    token = default("LIVEGIFTS_OPERATOR_TOKEN")
    assert f"livegifts demo --webhook-secret {secret}" in README
    assert f"--operator-token {token}" in README
    defaults = SuiteConfig(var_dir=Path("var"))
    for svc, port in defaults.grpc_ports.items():
        published = services[svc]["ports"]
        assert f"127.0.0.1:{port}:{port}" in published, (svc, published)
        assert f"127.0.0.1:{defaults.metrics_ports[svc]}:{defaults.metrics_ports[svc]}" in published, (svc, published)
    assert "gRPC 50051-50053 and metrics 9101-9103" in README
    assert '"docker-compose (integration tests)"' in README and "## docker-compose (integration tests)" in SRE
