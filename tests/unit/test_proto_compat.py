"""protos/ against the released API in tests/unit/proto_baseline.json, the way `buf breaking` does.

Other services call our RPCs and decode our NATS events (events.proto) with stubs built from a
released version of these files: removing or renumbering a field, changing its type, label or name
(JSON and reflection callers), removing an RPC, a message, an enum or an enum value, changing an
RPC's request or response type or renaming a package breaks them. buf checks the FILE category
(buf.yaml). Such a change passes only once the baseline is refreshed on purpose (`make
proto-baseline`), which puts it in the diff a reviewer reads.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.proto_baseline import BASELINE, BUF, REPO, build_image

REFRESH = (
    "If the change is deliberate, run `make proto-baseline` and commit tests/unit/proto_baseline.json "
    "with it (README, Calling it)."
)


def _breaking(root: Path) -> subprocess.CompletedProcess[str]:
    """buf breaking of the module at root against the committed baseline."""
    return subprocess.run(
        [BUF, "breaking", "--against", str(BASELINE)],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def _names(image: dict) -> set[str]:
    """Every package, message, field, enum, enum value, service and RPC of the image, fully qualified."""
    out: set[str] = set()

    def enum(prefix: str, e: dict) -> None:
        out.add(f"enum {prefix}{e['name']}")
        out.update(f"enum value {prefix}{e['name']}.{v['name']} = {v['number']}" for v in e.get("value", []))

    def message(prefix: str, m: dict) -> None:
        name = f"{prefix}{m['name']}"
        out.add(f"message {name}")
        out.update(f"field {name}.{f['name']} = {f['number']}" for f in m.get("field", []))
        for nested in m.get("nestedType", []):
            message(f"{name}.", nested)
        for e in m.get("enumType", []):
            enum(f"{name}.", e)

    for f in image["file"]:
        prefix = f"{f['package']}." if f.get("package") else ""
        out.add(f"package {f.get('package', '')} in {f['name']}")
        for m in f.get("messageType", []):
            message(prefix, m)
        for e in f.get("enumType", []):
            enum(prefix, e)
        for s in f.get("service", []):
            out.add(f"service {prefix}{s['name']}")
            out.update(f"rpc {prefix}{s['name']}.{r['name']}" for r in s.get("method", []))
    return out


def test_no_proto_change_breaks_the_released_api() -> None:
    done = _breaking(REPO)
    if done.returncode != 0:
        pytest.fail(
            f"protos/ breaks the released API (tests/unit/proto_baseline.json) for callers and event consumers:\n"
            f"{done.stdout}{done.stderr}\n{REFRESH}",
            pytrace=False,
        )


def test_the_baseline_records_everything_the_protos_now_have() -> None:
    # buf only looks for breaks; a baseline left behind while the API grows stops guarding what
    # was added since (its removal would pass). So any change, an addition too, asks for a refresh.
    current = build_image()
    baseline = json.loads(BASELINE.read_text())
    if current == baseline:
        return
    now, then = _names(current), _names(baseline)
    detail = [f"not yet in the baseline: {', '.join(sorted(now - then))}"] if now - then else []
    detail += [f"in the baseline, gone from protos/: {', '.join(sorted(then - now))}"] if then - now else []
    pytest.fail(
        f"protos/ differ from tests/unit/proto_baseline.json ({'; '.join(detail) or 'an option or a type'}). "
        "Run `make proto-baseline` and commit the baseline with the change, so it stays the record of the "
        "released API.",
        pytrace=False,
    )


# Each break a caller or a consumer would meet, made in a copy of protos/: the guard must name it.
BREAKS = {
    "a field removed": ("gifting/v1/events.proto", "  int64 coins = 8;\n", "", 'field "8" with name "coins"'),
    "a field renumbered": (
        "gifting/v1/events.proto",
        "int64 coins = 8;",
        "int64 coins = 18;",
        'field "8" with name "coins"',
    ),
    "a field's type changed": (
        "gifting/v1/events.proto",
        "int64 coins = 8;",
        "int32 coins = 8;",
        'changed type from "int64" to "int32"',
    ),
    "a field renamed": (
        "gifting/v1/events.proto",
        "int64 coins = 8;",
        "int64 coin_count = 8;",
        'changed name from "coins" to "coin_count"',
    ),
    "an RPC removed": (
        "payout/v1/payout.proto",
        "  rpc GetStatement(GetStatementRequest) returns (Statement);\n",
        "",
        'RPC "GetStatement"',
    ),
    "an enum value removed": (
        "gifting/v1/events.proto",
        "  GIFT_KIND_UNLOCK = 3;\n",
        "",
        'enum value "3" on enum "GiftKind"',
    ),
}


def _copy_with(tmp_path: Path, path: str, old: str, new: str) -> Path:
    """A copy of the buf module with one edit made to protos/livegifts/<path>."""
    shutil.copy(REPO / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(REPO / "protos", tmp_path / "protos")
    proto = tmp_path / "protos" / "livegifts" / path
    text = proto.read_text()
    assert text.count(old) == 1, f"{path} no longer has exactly one {old!r}: pick another example"
    proto.write_text(text.replace(old, new))
    return tmp_path


@pytest.mark.parametrize("edit", BREAKS.values(), ids=BREAKS.keys())
def test_the_guard_names_each_kind_of_break(tmp_path: Path, edit: tuple[str, str, str, str]) -> None:
    path, old, new, named = edit
    done = _breaking(_copy_with(tmp_path, path, old, new))
    assert done.returncode != 0, f"buf breaking let {old.strip()!r} -> {new.strip()!r} pass"
    assert named in done.stdout, done.stdout + done.stderr


def test_the_guard_lets_a_new_field_pass_and_asks_for_the_baseline_to_record_it(tmp_path: Path) -> None:
    root = _copy_with(
        tmp_path, "gifting/v1/events.proto", "int64 coins = 8;", "int64 coins = 8;\n  string guard_probe = 9999;"
    )
    done = _breaking(root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "field livegifts.gifting.v1.GiftSent.guard_probe = 9999" in _names(build_image(root)) - _names(build_image())
