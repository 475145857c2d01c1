"""docker-compose.yml: valid against the compose-spec schema, and wired the way the services read it.

No Docker engine is needed. The schema is the copy of compose-spec/compose-spec's
schema/compose-spec.json that the check-jsonschema package vendors (a dev dependency).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from tests.deploy.manifests import (
    REPO,
    SERVICES,
    known_env_names,
    load_settings_from,
    missing_tool,
    required_env_names,
    service_of,
)

COMPOSE = REPO / "docker-compose.yml"
# The names tests/integration/conftest.py reads to target a running deployment.
TEST_TARGET_ENV = (
    "LIVEGIFTS_TEST_TARGET_WALLET",
    "LIVEGIFTS_TEST_TARGET_GIFTING",
    "LIVEGIFTS_TEST_TARGET_PAYOUT",
    "LIVEGIFTS_TEST_TARGET_NATS_URL",
    "LIVEGIFTS_TEST_WEBHOOK_SECRET",
    "LIVEGIFTS_TEST_PAYOUT_WEBHOOK_SECRET",
    "LIVEGIFTS_TEST_OPERATOR_TOKEN",
)
HEALTH_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as compose reads it (YAML anchors and merge keys resolved)."""
    import yaml

    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: str) -> str:
    """Compose interpolation with an empty shell environment: every variable must have a default."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        default = m.group(3)
        assert default is not None, f"${{{name}}} has no default: `docker compose up` must work without setup"
        return default

    return _VAR.sub(sub, value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's environment (mapping or list form), interpolated."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(str(v)) for k, v in env.items()}


def runs(compose: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], str, str]]:
    """(compose service name, definition, livegifts service, subcommand) for every service container."""
    for name, svc in compose["services"].items():
        ran = service_of({"command": svc.get("command")})
        if ran is not None:
            yield name, svc, ran[0], ran[1]


def test_the_compose_file_is_valid_against_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    try:
        import check_jsonschema
        import jsonschema
    except ImportError:
        missing_tool("check-jsonschema (which ships the compose-spec schema) is not installed: make venv")
    schema_path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    assert schema_path.exists(), f"check-jsonschema no longer ships {schema_path.name}"
    schema = json.loads(schema_path.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_every_service_and_its_migration_step_run_the_module_the_image_has(compose: dict[str, Any]) -> None:
    found = {(svc, cmd) for _, _, svc, cmd in runs(compose)}
    assert found == {(s, c) for s in SERVICES for c in ("serve", "migrate")}
    dockerfile = (REPO / "Dockerfile").read_text()
    for name, definition, svc, _ in runs(compose):
        assert definition["build"] == {"context": ".", "target": svc}, name
        assert f"FROM runtime AS {svc}" in dockerfile
        assert definition["image"] == f"livegifts-{svc}:dev", name


def test_every_setting_a_service_requires_is_set_and_every_name_is_one_it_reads(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, definition, svc, _ in runs(compose):
        env = environment(definition)
        ours = {k for k in env if k.startswith("LIVEGIFTS_")}
        unknown = ours - known_env_names(svc)
        assert not unknown, f"{name}: {svc} does not read {sorted(unknown)} (typo?)"
        missing = required_env_names(svc) - ours
        assert not missing, f"{name}: required settings not set: {sorted(missing)}"
        load_settings_from(svc, env, monkeypatch)  # the service's own validation accepts the values


def test_the_settings_point_at_the_composed_peers(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose["services"]
    init = (REPO / "deploy" / "compose" / "postgres-init.sh").read_text()
    assert "for svc in wallet gifting payout" in init
    for name, definition, svc, cmd in runs(compose):
        s = load_settings_from(svc, environment(definition), monkeypatch)
        url = make_url(s.database_url)
        assert url.drivername == "postgresql+asyncpg" and url.host in services and url.port == 5432
        assert url.database == svc and url.username == svc, "one database and owner role per service"
        assert url.password == environment(services[url.host])["LIVEGIFTS_DB_PASSWORD"]
        assert s.nats_url == "nats://nats:4222" and "nats" in services
        assert s.migrate_on_start is False, f"{name}: the {svc}-migrate step runs the migrations"
        if svc == "gifting":
            host, port = s.wallet_addr.rsplit(":", 1)
            assert (
                host == "wallet"
                and int(port) == load_settings_from("wallet", environment(services["wallet"]), monkeypatch).grpc_port
            )
        depends = definition["depends_on"]
        if cmd == "migrate":
            assert name == f"{svc}-migrate"
            assert depends == {"postgres": {"condition": "service_healthy"}}
            assert definition.get("restart") == "no"
            continue
        assert name == svc
        assert environment(services[f"{svc}-migrate"]) == environment(definition), "migrate with the same settings"
        assert depends[f"{svc}-migrate"] == {"condition": "service_completed_successfully"}
        assert depends["nats"] == {"condition": "service_healthy"}
        assert s.grpc_host == "0.0.0.0" and s.metrics_host == "0.0.0.0"
        # The probe port, not the main one: there a check past the limit on calls in progress is refused.
        assert s.probe_port and s.probe_port != s.grpc_port, f"{name}: no probe port of its own"
        assert definition["healthcheck"]["test"][-1] == str(s.probe_port), "the health check probes the probe port"
        assert f"127.0.0.1:{s.grpc_port}:{s.grpc_port}" in definition["ports"]
        grace_s = int(definition["stop_grace_period"].removesuffix("s"))
        assert s.drain_delay_s + s.shutdown_grace_s < grace_s, f"{name}: stop_grace_period too short"


def test_every_dependency_waits_on_a_health_check_or_a_finished_step(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, definition in services.items():
        for dep, how in (definition.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert how["condition"] in ("service_healthy", "service_completed_successfully"), (name, dep)
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy, but it has no check"
    assert services["gifting"]["depends_on"]["wallet"] == {"condition": "service_healthy"}


def test_the_service_containers_are_hardened_like_on_kubernetes(compose: dict[str, Any]) -> None:
    for name, definition, _, _ in runs(compose):
        assert definition["user"] == "10001:10001", name
        assert definition["read_only"] is True, name
        assert definition["tmpfs"] == ["/tmp"], name
        assert definition["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in definition["security_opt"], name


def test_nats_runs_jetstream_on_a_file_store_that_syncs_every_write(compose: dict[str, Any]) -> None:
    nats = compose["services"]["nats"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in nats["volumes"]}
    conf_path = REPO / mounts[nats["command"][-1]]
    conf = conf_path.read_text()
    assert re.search(r"jetstream\s*\{[^}]*store_dir:\s*/data/jetstream", conf)
    assert re.search(r"sync_interval:\s*always", conf)
    assert mounts["/data"] in compose["volumes"], "the store must outlive the container"


def test_the_tests_service_targets_the_composed_services(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    tests = services["tests"]
    assert tests["build"] == {"context": ".", "target": "tests"}
    assert tests["command"][:4] == ["python", "-m", "pytest", "tests/integration"]
    assert tests["profiles"] == ["tests"], "only on `docker compose run tests`"
    env = environment(tests)
    assert set(env) == set(TEST_TARGET_ENV)
    # The integration suite reads exactly these: ask it, rather than trusting a comment.
    from tests.integration import conftest

    with monkeypatch.context() as m:
        for var in TEST_TARGET_ENV:
            m.setenv(var, env[var])
        target = conftest._external()
    assert target is not None, "tests/integration/conftest.py ignored the LIVEGIFTS_TEST_TARGET_* variables"
    assert (target.wallet_addr, target.gifting_addr, target.payout_addr) == tuple(
        env[f"LIVEGIFTS_TEST_TARGET_{s}"] for s in ("WALLET", "GIFTING", "PAYOUT")
    )
    assert target.nats_url == env["LIVEGIFTS_TEST_TARGET_NATS_URL"]
    assert target.webhook_secret == env["LIVEGIFTS_TEST_WEBHOOK_SECRET"]
    assert target.payout_secret == env["LIVEGIFTS_TEST_PAYOUT_WEBHOOK_SECRET"]
    assert target.operator_token == env["LIVEGIFTS_TEST_OPERATOR_TOKEN"]
    for svc in SERVICES:
        s = load_settings_from(svc, environment(services[svc]), monkeypatch)
        assert s.operator_token is not None, f"{svc}: no operator token, so the suite cannot set up its catalog"
        assert s.operator_token.get_secret_value() == env["LIVEGIFTS_TEST_OPERATOR_TOKEN"], svc
    for svc in SERVICES:
        host, port = env[f"LIVEGIFTS_TEST_TARGET_{svc.upper()}"].rsplit(":", 1)
        assert host == svc
        assert int(port) == load_settings_from(svc, environment(services[svc]), monkeypatch).grpc_port
        assert tests["depends_on"][svc] == {"condition": "service_healthy"}
    wallet_env = environment(services["wallet"])
    assert env["LIVEGIFTS_TEST_WEBHOOK_SECRET"] == wallet_env["LIVEGIFTS_WALLET_PAYMENT_WEBHOOK_SECRET"]
    payout_env = environment(services["payout"])
    assert env["LIVEGIFTS_TEST_PAYOUT_WEBHOOK_SECRET"] == payout_env["LIVEGIFTS_PAYOUT_PAYOUT_WEBHOOK_SECRET"]
    assert env["LIVEGIFTS_TEST_TARGET_NATS_URL"] == wallet_env["LIVEGIFTS_WALLET_NATS_URL"]
    # The suite's withdrawals end PAID or FAILED: compose is a dev suite, its development payout
    # provider settles each transfer it takes (the default, and the manifests', settles none).
    payout = load_settings_from("payout", payout_env, monkeypatch)
    assert payout.dev_provider_settles_payouts and payout.dev_provider_auto_callback


@pytest.fixture
def health_server() -> Iterator[tuple[int, Any]]:
    """A gRPC server with only grpc.health.v1, on a free loopback port."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(0)


def test_the_grpc_health_check_command_passes_when_serving_and_fails_otherwise(
    compose: dict[str, Any], health_server: tuple[int, Any]
) -> None:
    """Run the compose health check exactly as written, with the image's `python` swapped for ours."""
    from grpc_health.v1 import health_pb2

    port, servicer = health_server
    test = compose["services"]["wallet"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    argv = [sys.executable, "-c", test[3], str(port)]

    def check() -> int:
        return subprocess.run(argv, capture_output=True, timeout=HEALTH_TIMEOUT_S, check=False).returncode

    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert check() == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert check() == 1
    for name in ("gifting", "payout"):
        assert compose["services"][name]["healthcheck"]["test"][:4] == test[:4], "one health check for all"


def test_the_drain_grace_and_stop_period_docs_sre_gives_for_compose_are_the_files(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # docs/sre.md's settings table gives compose's drain + grace and its stop_grace_period beside
    # the Kubernetes ones (tests/deploy/test_k8s.py holds those): a retuned compose file must say so there.
    sre = (REPO / "docs" / "sre.md").read_text()
    row = next(line for line in sre.splitlines() if line.startswith("| `DRAIN_DELAY_S` + `SHUTDOWN_GRACE_S`"))
    m = re.search(r"compose: ([0-9.]+) \+ ([0-9.]+) \|.*compose `stop_grace_period` \((\d+)s\)", row)
    assert m, f"docs/sre.md's drain row no longer reads as this test expects: {row}"
    drain, grace, stop = float(m.group(1)), float(m.group(2)), m.group(3)
    for name, definition, svc, cmd in runs(compose):
        if cmd != "serve":
            continue
        s = load_settings_from(svc, environment(definition), monkeypatch)
        assert (s.drain_delay_s, s.shutdown_grace_s) == (drain, grace), f"{name}: docs/sre.md says {drain} + {grace}"
        assert definition["stop_grace_period"] == f"{stop}s", f"{name}: docs/sre.md says stop_grace_period {stop}s"
