"""services/common: error table, settings, fault points, gift rules."""

import os
import re
import subprocess
import sys
import unicodedata
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased
from pydantic import ValidationError

from services.common import errors, faults, telemetry
from services.common.config import ServiceSettings, load_settings
from services.gifting import domain as gifting
from services.gifting.config import GiftingSettings
from services.payout.config import PayoutSettings
from services.wallet.config import WalletSettings


def test_every_domain_error_class_has_a_status_code() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.DomainError)]
    for cls in classes:
        if cls is errors.DomainError:
            continue
        assert errors.status_for(cls("x")) != grpc.StatusCode.INTERNAL, cls
    assert (
        errors.status_for(errors.FailedPrecondition("x", "INSUFFICIENT_COINS")) == grpc.StatusCode.FAILED_PRECONDITION
    )


def test_an_errors_metadata_values_are_cut_so_the_trailers_stay_small() -> None:
    # A value may echo a caller's input; whole, it could push the trailers past what a client takes.
    err = errors.InvalidArgument("unknown provider", "UNKNOWN_PROVIDER", provider="p" * 100_000, n=7)
    assert err.metadata == {"provider": "p" * errors.ERROR_METADATA_VALUE_CHARS_MAX, "n": "7"}


def test_an_errors_metadata_values_echo_a_callers_input_as_printable_text() -> None:
    # A raw HTTP/2 caller may send any byte; a client that logs or shows the ErrorInfo must not get
    # a forged log line, a terminal escape or a right-to-left override from it.
    err = errors.InvalidArgument("x", "UNKNOWN_PROVIDER", provider="a\x00b\nlevel=ERROR \x1b[2J\u202egpj.exe", n=7)
    assert err.metadata == {"provider": "a?b?level=ERROR ?[2J?gpj.exe", "n": "7"}


def test_is_text_walks_the_characters_in_python_only_for_a_value_that_is_not_all_printable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every consumed event's id is checked (inbox._id_problem): a walk of unicodedata.category in
    # Python took ~3 us an id, eight times its decode. The answers stay the same either way.
    cases = {
        "0f" * 16: True,
        "gift \u00e9\U0001f381": True,
        "\U0001f468\u200d\U0001f469\u200d\U0001f467": True,  # a family: format characters stay
        "\u202eright-to-left": True,
        "": True,
        "a\x00b": False,
        "line\n": False,
        "\ud800": False,
    }
    assert {value: errors.is_text(value) for value in cases} == cases
    walked: list[str] = []

    class Counting:
        @staticmethod
        def category(ch: str) -> str:
            walked.append(ch)
            return unicodedata.category(ch)

    monkeypatch.setattr(errors, "unicodedata", Counting)
    assert errors.is_text("0f" * 16) and errors.is_text("gift \u00e9\U0001f381")
    assert walked == [], "a printable value is not walked in Python"
    assert not errors.is_text("a\x00b") and walked


def test_checks_survive_python_dash_O() -> None:
    code = (
        "from services.common.errors import check\ntry:\n    check(False, 'x')\nexcept AssertionError:\n    print('ok')"
    )
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_a_missing_required_setting_stops_start_up_naming_the_variable() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEGIFTS_")}
    env["LIVEGIFTS_WALLET_NATS_URL"] = "nats://127.0.0.1:1"
    out = subprocess.run([sys.executable, "-m", "services.wallet"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2
    assert "LIVEGIFTS_WALLET_DATABASE_URL" in out.stderr
    assert "LIVEGIFTS_WALLET_PAYMENT_WEBHOOK_SECRET" in out.stderr
    assert "LIVEGIFTS_WALLET_NATS_URL" not in out.stderr


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("LOG_LEVEL", "VERBOSE", "'DEBUG', 'INFO'"),
        ("OTEL_EXPORTER", "file", "LIVEGIFTS_WALLET_OTEL_FILE: Value error, required when OTEL_EXPORTER is file"),
        ("FAULTS", "nonsense", "unknown fault point 'nonsense'"),
        ("FAULTS", "relay.after_puback_before_mark@0", "whole number from 1"),
        ("DATABASE_URL", "notaurl", "not a database URL"),
        ("DATABASE_URL", "mysql://db/wallet", "'mysql' is not supported"),
        ("DATABASE_URL", "postgresql://app:s3cr@tPart@db/wallet", 'password holds an "@": write it percent-encoded'),
        ("ADULT_AGE_BY_REGION", "KR", "bad region age 'KR'"),
        ("PAYMENT_ROUTES", "CARD=stripe", "unknown providers ['stripe']"),
        ("PAYMENT_PROVIDER", "stripe", "Input should be 'dev'"),
    ],
)
def test_a_bad_setting_stops_start_up_in_one_line_naming_the_variable(setting: str, value: str, says: str) -> None:
    """Checked with the other settings before anything starts: exit 2 and no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEGIFTS_")}
    env |= {
        "LIVEGIFTS_WALLET_NATS_URL": "nats://127.0.0.1:1",
        "LIVEGIFTS_WALLET_DATABASE_URL": "sqlite:////nonexistent/never-created.db",
        "LIVEGIFTS_WALLET_PAYMENT_WEBHOOK_SECRET": "0123456789abcdef",
        f"LIVEGIFTS_WALLET_{setting}": value,
    }
    out = subprocess.run([sys.executable, "-m", "services.wallet"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2, out.stderr
    assert says in out.stderr
    assert f"LIVEGIFTS_WALLET_{setting}" in out.stderr or setting == "OTEL_EXPORTER"  # that one names OTEL_FILE
    assert "Traceback" not in out.stderr
    assert "tPart" not in out.stderr, "no part of a password is shown"


@pytest.mark.parametrize(
    ("sampler", "ratio", "says"),
    [
        ("jaeger_remote", "", "OTEL_TRACES_SAMPLER: Value error, 'jaeger_remote' is not one of parentbased_always_on"),
        ("parentbased_traceidratio", "1%", "OTEL_TRACES_SAMPLER_ARG: Value error, '1%' is not a number from 0 to 1"),
        ("traceidratio", "2", "OTEL_TRACES_SAMPLER_ARG: Value error, '2' is not a number from 0 to 1"),
    ],
)
def test_a_bad_trace_sampler_stops_start_up_naming_opentelemetrys_variable(sampler: str, ratio: str, says: str) -> None:
    """The SDK, left to read these, records every trace on a value it does not know (a warning
    at most): an operator's 1% would be 100% at the trace store. Only with an exporter: with
    none, the sampler decides nothing (test_a_sampler_value_of_no_use_is_a_warning_not_an_exit)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIVEGIFTS_", "OTEL_"))}
    env |= {
        "LIVEGIFTS_WALLET_NATS_URL": "nats://127.0.0.1:1",
        "LIVEGIFTS_WALLET_DATABASE_URL": "sqlite:////nonexistent/never-created.db",
        "LIVEGIFTS_WALLET_PAYMENT_WEBHOOK_SECRET": "0123456789abcdef",
        "LIVEGIFTS_WALLET_OTEL_EXPORTER": "console",
        "OTEL_TRACES_SAMPLER": sampler,
        "OTEL_TRACES_SAMPLER_ARG": ratio,
    }
    out = subprocess.run([sys.executable, "-m", "services.wallet"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2, out.stderr
    assert f"\n  {says}" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("exporter", "given", "sampled_by", "warns"),
    [
        # OpenTelemetry's own names, as a platform's injected env or a developer's shell has them
        ("console", {"OTEL_TRACES_SAMPLER": "always_on"}, ParentBased(ALWAYS_ON), ["always_on taken as parentbased_"]),
        (
            "otlp",
            {"OTEL_TRACES_SAMPLER": "TraceIdRatio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
            ParentBased(TraceIdRatioBased(0.1)),
            ["traceidratio taken as parentbased_traceidratio"],
        ),
        ("console", {"OTEL_TRACES_SAMPLER": "always_off"}, ALWAYS_OFF, []),
        ("console", {"OTEL_TRACES_SAMPLER": " ", "OTEL_TRACES_SAMPLER_ARG": ""}, ParentBased(ALWAYS_ON), []),  # unset
        (
            "console",
            {"OTEL_TRACES_SAMPLER_ARG": "0.1"},
            ParentBased(ALWAYS_ON),
            ["OTEL_TRACES_SAMPLER_ARG=0.1 ignored: only OTEL_TRACES_SAMPLER=parentbased_traceidratio reads it"],
        ),
        # With no exporter nothing is recorded: a bad value is harmless, said, and not fatal.
        (
            "none",
            {"OTEL_TRACES_SAMPLER": "jaeger_remote", "OTEL_TRACES_SAMPLER_ARG": "1%"},
            ParentBased(ALWAYS_ON),
            ["OTEL_TRACES_SAMPLER='jaeger_remote', OTEL_TRACES_SAMPLER_ARG='1%' ignored: OTEL_EXPORTER is none"],
        ),
        ("none", {"OTEL_TRACES_SAMPLER": "always_on", "OTEL_TRACES_SAMPLER_ARG": "0.1"}, ParentBased(ALWAYS_ON), []),
    ],
)
def test_a_sampler_value_of_no_use_is_a_warning_not_an_exit(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    exporter: str,
    given: dict[str, str],
    sampled_by: Any,
    warns: list[str],
) -> None:
    """OpenTelemetry's usual values exited 2, so an operator's or platform's OTel env took the
    pods down (with OTEL_EXPORTER=none too, where no trace is recorded at all)."""
    for name in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"):
        monkeypatch.delenv(name, raising=False)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LIVEGIFTS_WALLET_OTEL_EXPORTER", exporter)
    monkeypatch.setenv("LIVEGIFTS_WALLET_DATABASE_URL", "sqlite:///w.db")
    monkeypatch.setenv("LIVEGIFTS_WALLET_NATS_URL", "nats://x")
    monkeypatch.setenv("LIVEGIFTS_WALLET_PAYMENT_WEBHOOK_SECRET", "0123456789abcdef")
    settings = load_settings(WalletSettings)
    assert telemetry.sampler(settings).get_description() == sampled_by.get_description()
    with caplog.at_level("WARNING", logger="services.common.telemetry"):
        telemetry.warn_of_sampling(settings)  # (setup_tracing's, which would install a global provider)
    said = [r.getMessage() for r in caplog.records if r.name == "services.common.telemetry"]
    assert len(said) == len(warns), said
    assert all(part in line for part, line in zip(warns, said, strict=True)), said


def test_the_trace_sampler_is_read_from_opentelemetrys_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the services' spans are sampled by (the SDK's own reading of the variables, which
    falls back to everything on a bad value, is not relied on): parent-based, everything unset."""
    base = {"database_url": "sqlite:///w.db", "nats_url": "nats://x", "payment_webhook_secret": "0123456789abcdef"}

    def sampled_by(**given: str) -> str:
        provider = telemetry.tracer_provider("wallet", WalletSettings(**base, **given))
        provider.shutdown()
        return str(provider.sampler.get_description())

    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER_ARG", raising=False)
    assert sampled_by() == ParentBased(ALWAYS_ON).get_description()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "ParentBased_TraceIdRatio")
    assert sampled_by() == ParentBased(TraceIdRatioBased(1.0)).get_description()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.01")
    assert sampled_by() == ParentBased(TraceIdRatioBased(0.01)).get_description()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_off")
    monkeypatch.delenv("OTEL_TRACES_SAMPLER_ARG")
    assert sampled_by() == ParentBased(ALWAYS_OFF).get_description()
    # The settings read at start decide, not what the SDK would read from the environment now.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    assert sampled_by(OTEL_TRACES_SAMPLER="parentbased_always_on") == ParentBased(ALWAYS_ON).get_description()


@pytest.mark.parametrize(
    ("service", "least", "required"),
    [
        (WalletSettings, 2, {"payment_webhook_secret": "0123456789abcdef"}),
        (GiftingSettings, 2, {"wallet_addr": "127.0.0.1:1"}),
        (PayoutSettings, 3, {"wallet_addr": "127.0.0.1:1", "payout_webhook_secret": "0123456789abcdef"}),
    ],
)
def test_a_pool_on_postgresql_keeps_a_connection_beside_those_its_loops_hold_over_slow_waits(
    service: type[ServiceSettings], least: int, required: dict[str, str]
) -> None:
    # Every service's outbox relay holds a pooled connection over each publish (its batch claimed
    # FOR UPDATE, up to OUTGOING_DEADLINE_S a try while NATS is down), and payout's dispatcher
    # another over each submission (its advisory lock, up to PROVIDER_TIMEOUT_S): with no
    # connection beside them, every call, consumer and loop waited for NATS's or the provider's
    # answer and failed UNAVAILABLE past DB_POOL_TIMEOUT_S (tests/integration/test_pool_minimum.py,
    # test_payout_claims.py). SQLite holds none over either.
    def settings(url: str, pool: int) -> ServiceSettings:
        return service(database_url=url, nats_url="nats://127.0.0.1:1", db_pool_size=pool, **required)  # type: ignore[arg-type]

    assert service.postgres_pool_min() == least
    for refused in range(1, least):
        with pytest.raises(ValidationError, match=f"db_pool_size(.|\n)*at least {least} on PostgreSQL: .*outbox relay"):
            settings("postgresql://app@db/svc", refused)
    assert settings("postgresql://app@db/svc", least).db_pool_size == least
    assert settings("sqlite+aiosqlite:///svc.db", 1).db_pool_size == 1


def test_log_levels_take_loggings_names_and_aliases_in_any_case() -> None:
    base = {"database_url": "sqlite:///w.db", "nats_url": "nats://x", "payment_webhook_secret": "0123456789abcdef"}
    for given, level in (("warn", "WARNING"), ("Fatal", "CRITICAL"), ("debug", "DEBUG"), ("NOTSET", "NOTSET")):
        assert WalletSettings(**base, log_level=given).log_level == level  # type: ignore[arg-type]


def test_every_service_command_has_help() -> None:
    for svc in ("wallet", "gifting", "payout"):
        out = subprocess.run(
            [sys.executable, "-m", f"services.{svc}", "--help"], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0 and "migrate" in out.stdout
        # Each command says what it does, and migrate what it reads.
        help_text = " ".join(out.stdout.split())
        assert "serve: migrate the database to the latest schema" in help_text, help_text
        assert "migrate: bring the database to the latest schema and exit" in help_text, help_text
        assert f"it reads only LIVEGIFTS_{svc.upper()}_DATABASE_URL" in help_text, help_text
    # The `livegifts` command also runs as a module, for images or venvs without its script.
    out = subprocess.run([sys.executable, "-m", "services.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "audit" in out.stdout and "run" in out.stdout


def test_an_unknown_fault_point_is_an_error_not_a_silent_no_op() -> None:
    with pytest.raises(ValueError, match="unknown fault point"):
        faults.arm("gifting.no_such_point")
    faults.arm("relay.after_puback_before_mark@3")
    faults.point("relay.after_puback_before_mark")  # 1st and 2nd hits do nothing
    faults.point("relay.after_puback_before_mark")
    faults.arm("")


def test_the_fault_spec_the_module_shows_is_one_it_accepts() -> None:
    """README sends readers to faults.py for the points to arm: its example must start a service."""
    shown = re.search(r'_FAULTS="([^"]+)"', faults.__doc__ or "")
    assert shown, "faults.py no longer shows an example spec"
    assert len(faults.parse(shown.group(1))) == 2


def test_gift_cost_is_price_times_quantity_within_limits() -> None:
    assert gifting.gift_cost(5, 3, 100) == 15
    for q in (0, -1, 101):
        with pytest.raises(errors.InvalidArgument):
            gifting.gift_cost(5, q, 100)


def test_self_gifts_and_ended_streams_are_refused() -> None:
    with pytest.raises(errors.FailedPrecondition) as err:
        gifting.check_can_gift("LIVE", "c", "c")
    assert err.value.reason == "SELF_GIFT"
    with pytest.raises(errors.FailedPrecondition) as err:
        gifting.check_can_gift("ENDED", "c", "v")
    assert err.value.reason == "STREAM_NOT_LIVE"


class _Ctx:
    def __init__(self, md: tuple[tuple[str, str], ...]) -> None:
        self.md = md

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.md


def test_operator_rpcs_need_the_configured_token() -> None:
    from pydantic import SecretStr

    from services.common.auth import OperatorAuth

    auth = OperatorAuth(SecretStr("t0k"))
    assert auth.require(_Ctx((("authorization", "Bearer t0k"), ("x-operator", "alice")))) == "alice"
    with pytest.raises(errors.Unauthenticated):
        auth.require(_Ctx(()))
    with pytest.raises(errors.PermissionDenied) as err:
        auth.require(_Ctx((("authorization", "Bearer nope"),)))
    assert err.value.reason == "NOT_AN_OPERATOR"
    with pytest.raises(errors.PermissionDenied) as err:
        OperatorAuth(None).require(_Ctx((("authorization", "Bearer t0k"),)))
    assert err.value.reason == "OPERATOR_DISABLED"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_operator_tokens_scheme_is_case_insensitive(scheme: str) -> None:
    # RFC 7235 section 2.1: an auth scheme is case-insensitive; "bearer <token>" answered
    # OPERATOR_TOKEN_MISSING, as if no token had been sent.
    from pydantic import SecretStr

    from services.common.auth import OperatorAuth

    auth = OperatorAuth(SecretStr("t0k"))
    assert auth.require(_Ctx((("authorization", f"{scheme} t0k"), ("x-operator", "alice")))) == "alice"
    with pytest.raises(errors.PermissionDenied) as err:
        auth.require(_Ctx((("authorization", f"{scheme} nope"),)))
    assert err.value.reason == "NOT_AN_OPERATOR"
    for header in ("Basic t0k", "Bearert0k", "t0k", scheme):
        with pytest.raises(errors.Unauthenticated) as missing:
            auth.require(_Ctx((("authorization", header),)))
        assert missing.value.reason == "OPERATOR_TOKEN_MISSING"


@pytest.mark.parametrize(
    ("header", "recorded"),
    [
        ("alice", "alice"),
        ("a\x00b", "a?b"),  # PostgreSQL cannot store a NUL: the change failed INTERNAL
        ("eve\nlevel=ERROR forged line", "eve?level=ERROR forged line"),
        ("\x1b[31mred", "?[31mred"),
        ("   ", "operator"),
        ("", "operator"),
        ("x" * 1000, "x" * 128),
    ],
)
def test_the_operator_name_is_recorded_as_printable_text_of_at_most_128_characters(header: str, recorded: str) -> None:
    # A raw HTTP/2 client can send any byte in x-operator; grpc passes it through to the handler.
    from pydantic import SecretStr

    from services.common.auth import OperatorAuth

    ctx = _Ctx((("authorization", "Bearer t0k"), ("x-operator", header)))
    assert OperatorAuth(SecretStr("t0k")).require(ctx) == recorded


def test_open_streams_take_the_health_checks_slots_unless_the_limit_leaves_room() -> None:
    """What the gRPC server's concurrent-call limit counts: a stream holds its slot while it
    streams, and a health check past the limit is refused (so a probe fails). A gifting pod's
    limit therefore leaves room beyond its live feeds (tests/deploy checks it as deployed)."""
    import asyncio

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common.grpcserver import ServiceRegistration, create_server

    async def hold(request: bytes, context: grpc.aio.ServicerContext) -> Any:
        yield b"watching"  # like a WatchStream feed: one item, then the call stays open
        await asyncio.Event().wait()

    def add(servicer: object, server: grpc.aio.Server) -> None:
        handler = grpc.unary_stream_rpc_method_handler(hold)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Feed", {"Watch": handler}),))

    async def check_with_streams_open(limit: int, streams: int) -> grpc.StatusCode:
        feed = ServiceRegistration(add, None, "test.Feed")
        running = await create_server([feed], "127.0.0.1", 0, "livegifts.test", concurrent_rpcs_max=limit)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            watch = channel.unary_stream("/test.Feed/Watch")
            calls = [watch(b"") for _ in range(streams)]
            for call in calls:
                assert await call.read() == b"watching"  # each stream is in progress, holding its slot
            try:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            for call in calls:
                call.cancel()
        await running.server.stop(0)
        return code

    assert asyncio.run(check_with_streams_open(limit=3, streams=3)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert asyncio.run(check_with_streams_open(limit=4, streams=3)) == grpc.StatusCode.OK


def test_the_probe_port_answers_while_calls_whose_body_never_comes_hold_every_slot_of_the_main_one() -> None:
    """The main server's limit counts a call from its headers on, whether or not its body ever
    comes: calls enough (a hostile client's, or honest overload) refused every health check
    there, so the kubelet's liveness probe restarted pods exactly when they were loaded. The
    probe port (PROBE_PORT) answers beside it, with the main port's status, draining included."""
    import asyncio

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common.grpcserver import create_server

    async def check(channel: grpc.aio.Channel) -> grpc.StatusCode | int:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return int(answer.status)

    async def until(channel: grpc.aio.Channel, done: Callable[[grpc.StatusCode | int], bool]) -> grpc.StatusCode | int:
        """Check's first answer that is `done`, or its last within 20 s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:
            answer = await check(channel)
            if done(answer) or loop.time() > deadline:
                return answer
            await asyncio.sleep(0.1)

    async def answers() -> list[grpc.StatusCode | int]:
        running = await create_server([], "127.0.0.1", 0, "livegifts.test", concurrent_rpcs_max=2)
        probe_port = await running.serve_probes("127.0.0.1", 0)
        got = []
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as main,
            grpc.aio.insecure_channel(f"127.0.0.1:{probe_port}") as probe,
        ):
            got.append(await check(probe))  # SERVING
            # A unary method called as a client stream that writes nothing: its headers go, its
            # body never does, and it has no deadline.
            held = [main.stream_unary("/grpc.health.v1.Health/Check")() for _ in range(2)]
            # RESOURCE_EXHAUSTED once the server has both calls' headers and both slots are held:
            # asked until then (a fixed 0.5 s was too short for a loaded machine), within a bound.
            got.append(await until(main, lambda code: code == grpc.StatusCode.RESOURCE_EXHAUSTED))
            got.append(await check(probe))  # SERVING all the same
            await running.set_serving(False)  # a drain starts
            got.append(await check(probe))  # NOT_SERVING, in step with the main port
            for call in held:
                call.cancel()
            # NOT_SERVING there too, once the cancels have freed a slot (asked until then)
            got.append(await until(main, lambda code: code != grpc.StatusCode.RESOURCE_EXHAUSTED))
        await running.stop(0)
        return got

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert asyncio.run(answers()) == [
        serving,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        serving,
        not_serving,
        not_serving,
    ]


def test_the_probe_port_answers_check_while_as_many_watch_streams_as_its_limit_were_asked_for() -> None:
    """The probe port serves Check alone: a Watch stream there (the full health servicer's) never
    ended, so PROBE_CONCURRENT_RPCS_MAX of them refused every Check RESOURCE_EXHAUSTED and the
    kubelet's liveness probe restarted the pod, the failure the probe port is there to prevent."""
    import asyncio

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common.grpcserver import PROBE_CONCURRENT_RPCS_MAX, create_server

    async def answers() -> tuple[set[grpc.StatusCode | int], int]:
        running = await create_server([], "127.0.0.1", 0, "livegifts.test")
        probe_port = await running.serve_probes("127.0.0.1", 0)
        await running.set_serving(True)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{probe_port}") as probe:
            stub = health_pb2_grpc.HealthStub(probe)
            watches = [
                stub.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(PROBE_CONCURRENT_RPCS_MAX)
            ]
            watched: set[grpc.StatusCode | int] = set()
            for watch in watches:
                try:
                    watched.add(int((await watch.read()).status))  # the stream is open, holding its slot
                except grpc.aio.AioRpcError as exc:
                    watched.add(exc.code())
            try:
                checked = int((await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status)
            except grpc.aio.AioRpcError as exc:
                checked = exc.code().value[0]
            for watch in watches:
                watch.cancel()
        await running.stop(0)
        return watched, checked

    assert asyncio.run(answers()) == ({grpc.StatusCode.UNIMPLEMENTED}, health_pb2.HealthCheckResponse.SERVING)


def test_probe_port_slots_held_by_calls_whose_body_never_comes_are_freed_within_the_connection_age(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PROBE_CONCURRENT_RPCS_MAX calls whose request never comes held every slot of the probe
    server for as long as their connection stayed open: every Check refused RESOURCE_EXHAUSTED,
    and the liveness probe restarted the pod. The probe server's connections now end after
    PROBE_CONNECTION_AGE_MAX_S plus _GRACE_S (shortened here), their calls with them."""
    import asyncio

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common import grpcserver

    age_s = 2.0  # the probe connections' age, shortened
    monkeypatch.setattr(grpcserver, "PROBE_CONNECTION_AGE_MAX_S", age_s)
    monkeypatch.setattr(grpcserver, "PROBE_CONNECTION_AGE_GRACE_S", 0.5)
    bound_s = age_s * 1.1 + 0.5 + 3.0  # the age with gRPC's jitter, the grace, and room

    async def check(port: int) -> grpc.StatusCode | int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as probe:  # a connection a probe
            try:
                answer = await health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return int(answer.status)

    async def ended_with(call: grpc.aio.StreamUnaryCall) -> grpc.StatusCode | None:
        try:
            return await asyncio.wait_for(call.code(), 5)
        except TimeoutError:
            return None

    async def answers() -> tuple[grpc.StatusCode | int, list[grpc.StatusCode | int], set[grpc.StatusCode | None]]:
        running = await grpcserver.create_server([], "127.0.0.1", 0, "livegifts.test")
        probe_port = await running.serve_probes("127.0.0.1", 0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{probe_port}") as stray:
            # Check called as a client stream that writes nothing: its headers go, its body never does.
            held = [
                stray.stream_unary("/grpc.health.v1.Health/Check")()
                for _ in range(grpcserver.PROBE_CONCURRENT_RPCS_MAX)
            ]
            # Refused once the server has every call's headers (asked until then, not after a fixed
            # wait: a loaded machine sends them later), well before the connection's age.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + age_s / 2
            while True:
                full = await check(probe_port)
                if full == grpc.StatusCode.RESOURCE_EXHAUSTED or loop.time() > deadline:
                    break
                await asyncio.sleep(0.05)
            later: list[grpc.StatusCode | int] = []
            deadline = loop.time() + bound_s
            while loop.time() < deadline:
                later.append(await check(probe_port))
                if later[-1] == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.2)
            # What the held calls ended with (none, while their connection stays open): the server
            # freed their slots as it closed the connection, the client may see that a moment later.
            ended = set(await asyncio.gather(*(ended_with(call) for call in held)))
            for call in held:
                call.cancel()
        await running.stop(0)
        return full, later, ended

    full, later, ended = asyncio.run(answers())
    assert full == grpc.StatusCode.RESOURCE_EXHAUSTED, "every slot is held"
    assert later[-1] == health_pb2.HealthCheckResponse.SERVING, later
    assert ended == {grpc.StatusCode.UNAVAILABLE}, "the held calls ended with their connection"


@pytest.mark.parametrize("trace_spans", [False, True])
def test_health_watch_streams_the_status_like_check_answers_it(trace_spans: bool) -> None:
    """grpc.health.v1 Watch (what client-side health checking and some meshes use) is a handler
    that writes with context.write instead of yielding; the error interceptor must pass it on,
    also to the OpenTelemetry interceptor in front when spans are recorded (which iterates it)."""
    import asyncio

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common.grpcserver import create_server

    async def first_watched_status() -> int:
        running = await create_server([], "127.0.0.1", 0, "livegifts.test", trace_spans=trace_spans)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
            status = (await call.read()).status
            call.cancel()
        await running.server.stop(0)
        return int(status)

    assert asyncio.run(first_watched_status()) == health_pb2.HealthCheckResponse.SERVING


def test_a_request_body_that_is_not_the_message_is_refused_with_a_reason_not_unknown() -> None:
    """Invalid UTF-8 in a string field (HealthCheckRequest.service here) cannot be decoded; grpc
    answered UNKNOWN naming Python's DecodeError, with no ErrorInfo, before any handler ran."""
    import asyncio

    from services.common.clients import error_reason
    from services.common.grpcserver import create_server

    async def answers() -> list[tuple[grpc.StatusCode, str | None]]:
        running = await create_server([], "127.0.0.1", 0, "livegifts.test")
        got = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            for body in (b"\x0a\x02\xff\xfe", b"\x0a\x10truncated"):
                for call in (
                    channel.unary_unary("/grpc.health.v1.Health/Check")(body, timeout=5),
                    channel.unary_stream("/grpc.health.v1.Health/Watch")(body, timeout=5).read(),
                ):
                    try:
                        await call
                        got.append((grpc.StatusCode.OK, None))
                    except grpc.aio.AioRpcError as exc:
                        got.append((exc.code(), error_reason(exc)))
        await running.server.stop(0)
        return got

    assert asyncio.run(answers()) == [(grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")] * 4


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:pw@db:5432/wallet", "postgresql://app:***@db:5432/wallet"),
        (
            "postgresql+asyncpg://app@db/wallet?password=pw&sslmode=require&sslpassword=key-pw",
            "postgresql+asyncpg://app@db/wallet?password=***&sslmode=require&sslpassword=***",
        ),
        ("postgresql://app@db/wallet?PASSWORD=pw&password=pw2", "postgresql://app@db/wallet?PASSWORD=***&password=***"),
        ("sqlite+aiosqlite:///var/wallet.db", "sqlite+aiosqlite:///var/wallet.db"),
        # A password with an "@" not percent-encoded: the URL is split at its first "@" (SQLAlchemy,
        # as libpq), so the password's rest went to the host, and the start-up error showed it.
        ("postgresql+asyncpg://app:s3cr@tPart@db:5432/wallet", "postgresql+asyncpg://app:***@db:5432/wallet"),
        (
            "postgresql+asyncpg://app:p@r@t@db/wallet?sslmode=require",
            "postgresql+asyncpg://app:***@db/wallet?sslmode=require",
        ),
        ("postgresql+asyncpg://app:@tPart@db/wallet", "postgresql+asyncpg://app:***@db/wallet"),
    ],
)
def test_a_database_url_in_a_message_hides_every_password_also_in_its_query_string(url: str, shown: str) -> None:
    from services.common.db import url_for_messages

    assert url_for_messages(url) == shown
