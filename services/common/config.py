"""Settings every service reads once, from the environment, at start-up."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from services.common import faults
from services.common.db import MULTI_HOST_FORM, is_sqlite, normalize_url, postgres_connect_args
from services.common.gc_tuning import GEN0_THRESHOLD
from services.common.migrate import MIGRATION_LOCK_GIVE_UP_S, MIGRATION_LOCK_TIMEOUT_S

SamplerName = Literal["parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio", "always_off"]
# OpenTelemetry's sampler names (OTEL_TRACES_SAMPLER) the services take, and the sampler each
# gets: the non-parent-based ones are taken as their parent-based ones (a warning at start), so a
# trace is recorded whole across the services; always_off records nothing, whole too.
TRACE_SAMPLERS: dict[str, SamplerName] = {
    "parentbased_always_on": "parentbased_always_on",
    "parentbased_always_off": "parentbased_always_off",
    "parentbased_traceidratio": "parentbased_traceidratio",
    "always_on": "parentbased_always_on",
    "traceidratio": "parentbased_traceidratio",
    "always_off": "always_off",
}


@dataclass(frozen=True)
class TraceSampling:
    """`ServiceSettings.trace_sampling`: the sampler, its ratio (parentbased_traceidratio's), and
    what start-up logs a WARNING for."""

    sampler: SamplerName
    ratio: float
    warnings: list[str]


# How long JetStream keeps an event (services/common/bus.py): a consumer that was down, or one
# reset to replay, can receive an event this long after it was published.
STREAM_MAX_AGE_S = 30 * 24 * 3600
# Idempotency records (services/common/idempotency.py) kept for less are refused at start.
IDEMPOTENCY_RETENTION_DAYS_MIN = 1
# Callback HMAC keys (wallet payments, payout provider): shorter ones are refused at start.
WEBHOOK_SECRET_MIN = 16
# The operator token (services/common/auth.py): shorter ones are refused at start.
OPERATOR_TOKEN_MIN = 16
# The gRPC server's keepalive defaults (GRPC_KEEPALIVE_TIME_S, _TIMEOUT_S below): a client gone
# without a word is let go within about 80 s, for a ping a minute on a quiet connection.
GRPC_KEEPALIVE_TIME_S = 60.0
GRPC_KEEPALIVE_TIMEOUT_S = 20.0


def secret_bytes(secret: SecretStr | None) -> bytes:
    """A secret setting as the HMAC key the code uses; b"" when it is unset (an optional one)."""
    return secret.get_secret_value().encode() if secret is not None else b""


def webhook_secret(secret: SecretStr | None) -> SecretStr | None:
    """A callback HMAC key as a provider signs with it (a field validator of the services that
    take callbacks): an empty one is none (the previous secret, unset); one with leading or
    trailing whitespace is refused, as a file's newline would make every callback's signature
    differ, found only as UNAUTHENTICATED callbacks. The length is the field's (min_length)."""
    value = secret.get_secret_value() if secret is not None else ""
    if not value:
        return secret
    if value != value.strip():
        raise ValueError("has leading or trailing whitespace (a file's newline?): no provider signs with it")
    if len(value) < WEBHOOK_SECRET_MIN:
        raise ValueError(f"must be at least {WEBHOOK_SECRET_MIN} characters")
    return secret


class MigrationSettings(BaseSettings):
    """What `python -m services.<svc> migrate` reads: the database, the migration lock and the log.

    A migration Job is given these alone: it connects to nothing else, so it needs no NATS URL,
    secret or address of another service. Each service reads them with its own env prefix.
    """

    model_config = SettingsConfigDict(env_prefix="LIVEGIFTS_", extra="ignore", frozen=True)

    # Required: no default, so a missing value stops start-up with its name.
    database_url: str = Field(description="SQLAlchemy URL: sqlite+aiosqlite:///path or postgresql+asyncpg://")
    log_level: Literal["NOTSET", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    # PostgreSQL migrations (services/common/migrate.py): one statement waits at most this long
    # for a table lock, as every later query of that table queues behind it (live traffic stops);
    # past it the step is rolled back and tried again, with a backoff, for at most
    # MIGRATION_LOCK_GIVE_UP_S, then the migration exits non-zero naming who held the lock.
    migration_lock_timeout_s: float = Field(default=MIGRATION_LOCK_TIMEOUT_S, gt=0, le=60)
    migration_lock_give_up_s: float = Field(default=MIGRATION_LOCK_GIVE_UP_S, ge=0, le=3600)

    @field_validator("database_url")
    @classmethod
    def _a_database_we_drive(cls, url: str) -> str:
        try:
            parsed = make_url(normalize_url(url))
        except ArgumentError:
            raise ValueError("not a database URL (sqlite:///path or postgresql://user@host/db)") from None
        except ValueError:
            # A port that is not a number, as in libpq's list of hosts (h1:5432,h2:5432): int()'s
            # own message quoted a piece of the URL and said nothing of the form that works.
            raise ValueError(f"its port is not a number ({MULTI_HOST_FORM})") from None
        driver = parsed.drivername
        if parsed.host and "@" in parsed.host:
            # The URL is split at its first "@" (SQLAlchemy, as libpq): the password's rest would be
            # the host, never reached, and shown in the error. The message names no part of it.
            raise ValueError('its password holds an "@": write it percent-encoded, as %40')
        if driver not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
            raise ValueError(f"{driver!r} is not supported: sqlite:///path or postgresql://user@host/db")
        postgres_connect_args(url)  # a query parameter asyncpg cannot honour: refused here, by name
        return url

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_name(cls, level: object) -> object:
        if not isinstance(level, str):
            return level
        name = level.strip().upper()
        return {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(name, name)  # logging's own aliases


class ServiceSettings(MigrationSettings):
    """What every service needs to serve; each service subclasses it with its own env prefix."""

    # Required: no default, so a missing value stops start-up with its name.
    nats_url: str = Field(description="NATS server URL(s), comma separated")

    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0 disables the /metrics endpoint")
    # grpc.health.v1 alone, on a server of its own, for the kubelet's liveness, readiness and
    # startup probes: the main port's limit on calls in progress (CONCURRENT_RPCS_MAX) counts
    # health checks too, so calls past it (overload, or calls whose body never comes) failed the
    # probes and got loaded pods restarted. Its status is the main port's (NOT_SERVING while
    # draining). 0 turns it off; the main port serves grpc.health.v1 either way.
    probe_host: str = "127.0.0.1"
    probe_port: int = Field(default=0, ge=0, le=65535, description="0 disables the probe port")

    otel_exporter: Literal["none", "console", "file", "otlp"] = "none"
    otel_file: str = ""  # for otel_exporter=file: JSON lines, one span a line
    otlp_endpoint: str = "http://127.0.0.1:4317"
    # Which traces are recorded (with an exporter): OpenTelemetry's own variables, unprefixed, as
    # every SDK and collector reads them (`trace_sampling` reads them). Always parent-based: a call
    # or event that comes with a trace context follows its sampled flag, so a trace is recorded
    # whole across gRPC and NATS or not at all; a root (a call without traceparent, a background
    # item) is sampled at the ratio. The SDK's other names (always_on, traceidratio) are taken
    # as their parent-based ones, with a warning at start; always_off records nothing. The SDK
    # reads them too when given no sampler, but falls back to everything, with a warning, on a
    # value it does not know: here a bad one stops start-up (a warning with OTEL_EXPORTER=none,
    # where it decides nothing).
    otel_traces_sampler: str = Field(default="parentbased_always_on", validation_alias="OTEL_TRACES_SAMPLER")
    # The ratio of new traces parentbased_traceidratio records (1.0, all, when unset)
    # (0 to 1, checked with an exporter only: not a field bound)
    otel_traces_sampler_arg: str | None = Field(default=None, validation_alias="OTEL_TRACES_SAMPLER_ARG")

    db_pool_size: int = Field(default=10, ge=1, le=200)
    db_pool_timeout_s: float = Field(default=10.0, gt=0)
    # What holds a pooled connection over a slow wait outside the database on PostgreSQL, one
    # connection each, said as DB_POOL_SIZE's refusal says it: every service's outbox relay (its
    # batch claimed FOR UPDATE until JetStream has stored it: the claim is what keeps each event
    # published once and in order); payout adds its dispatcher. DB_POOL_SIZE is at least one more
    # (`postgres_pool_min`), for the calls, consumers and other loops. SQLite holds none over either.
    pool_held_over_waits: ClassVar[tuple[str, ...]] = (
        "the outbox relay holds one connection over each publish to JetStream (up to OUTGOING_DEADLINE_S"
        " a try while NATS is down)",
    )
    # PostgreSQL: a statement or commit unanswered this long fails (UNAVAILABLE) and its connection
    # is replaced, so a primary lost without closing its connections cannot hang a batch for good.
    # Above the longest statement we run (an audit's sums, a relay waiting its turn).
    db_statement_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    migrate_on_start: bool = True
    # Graceful shutdown: how long health reports NOT_SERVING before the server stops taking calls,
    # then how long in-flight calls may finish. Their sum must stay below the pod's grace period.
    drain_delay_s: float = Field(default=0.0, ge=0, le=60)
    shutdown_grace_s: float = Field(default=10.0, ge=0, le=120)

    # Outbox relay and consumers: explicit limits.
    relay_batch_size_max: int = Field(default=256, ge=1, le=10_000)
    relay_poll_interval_s: float = Field(default=0.5, gt=0, le=60)
    relay_backoff_max_s: float = Field(default=5.0, gt=0, le=300)
    # Linger: after a partial batch of more than one event (load), wait this long before the
    # next, so that it carries the events of several commits (fewer transactions, publishes and
    # fetches per event) at the cost of at most this much more lag on the asynchronous path.
    # A batch of one (a quiet system) never waits. 0 turns it off.
    relay_linger_s: float = Field(default=0.05, ge=0, le=1)
    # Rows a relay holds unsent because their event is larger than NATS takes (a producer bug):
    # each held id is read again at every pass. Beyond this, such a row fails the relay's pass.
    relay_held_max: int = Field(default=10_000, ge=1, le=100_000)
    consumer_batch_size_max: int = Field(default=256, ge=1, le=10_000)
    consumer_fetch_timeout_s: float = Field(default=0.5, gt=0, le=60)
    consumer_max_deliver: int = Field(default=20, ge=1, le=1000)
    consumer_linger_s: float = Field(default=0.1, ge=0, le=1)
    nats_duplicate_window_s: float = Field(default=120.0, gt=0)
    # An inbox row is what makes a redelivered event a no-op, so it is kept longer than the
    # streams keep the event (STREAM_MAX_AGE_S, 30 days); older rows are deleted every
    # INBOX_PRUNE_INTERVAL_S in short transactions. 0 keeps every row forever.
    inbox_retention_days: float = Field(default=45.0, ge=0, le=3650)
    inbox_prune_interval_s: float = Field(default=600.0, gt=0, le=86_400)
    # An idempotency record answers a retry under its key as the first call did; after this many
    # days it is deleted (every IDEMPOTENCY_PRUNE_INTERVAL_S, in short transactions) and the key
    # is free again. At least a day, what a client's retries after an outage may take. 0 keeps
    # every record forever.
    idempotency_retention_days: float = Field(default=30.0, ge=0, le=3650)
    idempotency_prune_interval_s: float = Field(default=600.0, gt=0, le=86_400)
    # The pruners (inbox, idempotency records, gifting's KEY_ONLY rows) pause this long after each
    # full chunk (5,000 rows) before the next, so a large backlog (the first round after a
    # retention is introduced: millions of rows) is deleted at a pace beside live traffic instead
    # of in one burst of WAL and lock traffic. A chunk takes tens of milliseconds (22 ms on an idle
    # PostgreSQL), so 0.25 s keeps the pruner to about a tenth of one connection's time, and a
    # million rows still go in about a minute. 0 turns it off (a catch-up in a quiet window); at
    # most 10 s, so a backlog still ends within hours.
    prune_pause_s: float = Field(default=0.25, ge=0, le=10)
    nats_stream_replicas: int = Field(default=1, ge=1, le=5)

    # Bearer token for operator RPCs (services/common/auth.py); unset = operator RPCs refused.
    operator_token: SecretStr | None = None
    # During a rotation, the token before it, accepted too (never alone: without operator_token
    # operator RPCs are refused), so operators' tooling keeps working while pods roll.
    operator_token_previous: SecretStr | None = None

    outgoing_deadline_s: float = Field(default=5.0, gt=0, le=120)

    # The gRPC server pings each client connection that has a call open every this many seconds
    # it hears nothing on it, and closes the connection when a ping is not answered within the
    # timeout: a client whose network vanished without a FIN or RST (a phone off the network, a
    # NAT that dropped its state: a half-open connection) has its calls cancelled then, and a
    # WatchStream its feed slot (WATCHERS_MAX) freed, instead of after gRPC's default of 2 hours.
    # The pings (a few dozen bytes) also keep quiet feeds alive through NATs and load balancers
    # that drop a connection after minutes of silence (AWS NLB 350 s, GCP 600 s).
    grpc_keepalive_time_s: float = Field(default=GRPC_KEEPALIVE_TIME_S, ge=1, le=7200)
    grpc_keepalive_timeout_s: float = Field(default=GRPC_KEEPALIVE_TIMEOUT_S, ge=1, le=600)

    # The garbage collector (services/common/gc_tuning.py): freeze what start-up built, so full
    # collections walk only what came after; collect the young generation every this many new
    # container objects (CPython's default is 700).
    gc_freeze: bool = True
    gc_gen0_threshold: int = Field(default=GEN0_THRESHOLD, ge=100, le=1_000_000)

    # The event loop's lag (services/common/looplag.py, livegifts_event_loop_lag_seconds): a
    # timer every this many seconds measures how late it fires. 0 turns it off.
    loop_lag_probe_s: float = Field(default=0.1, ge=0, le=60)

    # Named fault points to arm (comma separated); only for fault tests. See services/common/faults.py.
    faults: str = ""

    @field_validator("otel_file")
    @classmethod
    def _file_for_the_file_exporter(cls, path: str, info: ValidationInfo) -> str:
        if info.data.get("otel_exporter") == "file" and not path:
            raise ValueError("required when OTEL_EXPORTER is file")
        return path

    @field_validator("otel_traces_sampler", "otel_traces_sampler_arg", mode="before")
    @classmethod
    def _sampling_as_the_sdk_reads_it(cls, value: object, info: ValidationInfo) -> object:
        # Names are case-insensitive; an empty variable is an unset one
        if not isinstance(value, str) or value.strip():
            return value.strip().lower() if isinstance(value, str) else value
        return cls.model_fields[info.field_name or ""].default

    @field_validator("otel_traces_sampler")
    @classmethod
    def _a_sampler_the_services_take(cls, name: str, info: ValidationInfo) -> str:
        if name in TRACE_SAMPLERS or info.data.get("otel_exporter") == "none":
            return name  # an unknown one with no exporter: a warning at start (trace_sampling)
        raise ValueError(f"{name!r} is not one of {', '.join(TRACE_SAMPLERS)}")

    @field_validator("otel_traces_sampler_arg")
    @classmethod
    def _a_ratio(cls, arg: str | None, info: ValidationInfo) -> str | None:
        if not arg or _ratio(arg) is not None or info.data.get("otel_exporter") == "none":
            return arg
        raise ValueError(f"{arg!r} is not a number from 0 to 1")

    def trace_sampling(self) -> TraceSampling:
        """The sampler the spans get (OTEL_TRACES_SAMPLER, _ARG as validated), and what start-up
        warns of: a non-parent-based name taken as its parent-based one, a ratio no sampler reads,
        or, with OTEL_EXPORTER=none, a value that would stop start-up with an exporter."""
        given, arg = self.otel_traces_sampler, self.otel_traces_sampler_arg
        ratio = _ratio(arg) if arg else None
        if self.otel_exporter == "none":  # no span is recorded: the sampler decides nothing
            bad = [f"OTEL_TRACES_SAMPLER={given!r}"] if given not in TRACE_SAMPLERS else []
            bad += [f"OTEL_TRACES_SAMPLER_ARG={arg!r}"] if arg and ratio is None else []
            said = f"{', '.join(bad)} ignored: OTEL_EXPORTER is none, so no trace is recorded; with an exporter it "
            said += "would stop start-up (README, Configuration)"
            return TraceSampling(
                TRACE_SAMPLERS.get(given, "parentbased_always_on"),
                1.0 if ratio is None else ratio,
                [said] if bad else [],
            )
        name = TRACE_SAMPLERS[given]
        warnings = []
        if name != given:
            warnings.append(
                f"OTEL_TRACES_SAMPLER={given} taken as {name}: a call or event that comes with a trace context "
                "follows its sampled flag, so a trace is recorded whole across the services or not at all"
            )
        if ratio is not None and name != "parentbased_traceidratio":
            warnings.append(
                f"OTEL_TRACES_SAMPLER_ARG={arg} ignored: only OTEL_TRACES_SAMPLER=parentbased_traceidratio "
                f"reads it (the sampler is {name})"
            )
        return TraceSampling(name, 1.0 if ratio is None else ratio, warnings)

    @field_validator("operator_token", "operator_token_previous")
    @classmethod
    def _a_token_an_operator_can_send(cls, token: SecretStr | None) -> SecretStr | None:
        # A token read from a file often ends in a newline: no `authorization` header can carry
        # it, so every operator call would be refused for good. A short one is a guessable lock.
        value = token.get_secret_value() if token is not None else ""
        if not value:
            return token  # unset or empty: operator RPCs are refused
        if value != value.strip():
            raise ValueError("has leading or trailing whitespace (a file's newline?): no operator could send it")
        # gRPC metadata values are printable ASCII: a client refuses to send any other character
        # ("Invalid metadata"), so a token with an accent or a control character opens nothing.
        if not (value.isascii() and value.isprintable()):
            raise ValueError("must be printable ASCII (gRPC metadata carries nothing else): no operator could send it")
        if len(value) < OPERATOR_TOKEN_MIN:
            raise ValueError(f"must be at least {OPERATOR_TOKEN_MIN} characters, or empty to refuse operator RPCs")
        return token

    @classmethod
    def postgres_pool_min(cls) -> int:
        """The fewest pooled connections the service takes on PostgreSQL: one for each holder of
        `pool_held_over_waits`, and one for everything else."""
        return len(cls.pool_held_over_waits) + 1

    @field_validator("db_pool_size")
    @classmethod
    def _a_connection_beside_those_held_over_waits(cls, size: int, info: ValidationInfo) -> int:
        # With no connection beside those held over a slow wait (a NATS outage, a slow provider),
        # every call, consumer and loop waited for one of them and failed UNAVAILABLE past
        # DB_POOL_TIMEOUT_S.
        url = info.data.get("database_url")
        least = cls.postgres_pool_min()
        if size < least and url is not None and not is_sqlite(url):
            raise ValueError(
                f"at least {least} on PostgreSQL: {', '.join(cls.pool_held_over_waits)}, and the service's"
                " calls, consumers and loops need another"
            )
        return size

    @field_validator("faults")
    @classmethod
    def _known_fault_points(cls, spec: str) -> str:
        faults.parse(spec)  # ValueError names the bad point
        return spec

    @field_validator("inbox_retention_days")
    @classmethod
    def _inbox_outlives_the_streams(cls, days: float) -> float:
        if 0 < days * 86_400 <= STREAM_MAX_AGE_S:
            raise ValueError(
                f"must be more than the {STREAM_MAX_AGE_S // 86_400} days the streams keep events "
                "(a replayed event could be applied twice), or 0 to keep inbox rows forever"
            )
        return days

    @field_validator("idempotency_retention_days")
    @classmethod
    def _keys_outlive_a_retry(cls, days: float) -> float:
        if 0 < days < IDEMPOTENCY_RETENTION_DAYS_MIN:
            raise ValueError(
                f"must be at least {IDEMPOTENCY_RETENTION_DAYS_MIN} day (a client retrying after an outage "
                "would do its command twice), or 0 to keep idempotency records forever"
            )
        return days

    def held_over_a_call_s(self) -> float:
        """How long a transaction of this service may wait, open, for a call outside the database
        (besides the outbox relay's publish): none here; see `app.idle_in_transaction_timeout_s`."""
        return 0.0


def _ratio(arg: str) -> float | None:
    """OTEL_TRACES_SAMPLER_ARG as a ratio, or None if it is not a number from 0 to 1."""
    try:
        ratio = float(arg)
    except ValueError:
        return None
    return ratio if 0 <= ratio <= 1 else None  # (NaN is neither)


T = TypeVar("T", bound=MigrationSettings)


def load_settings(cls: type[T], env_prefix: str | None = None) -> T:
    """Read settings once (with `env_prefix`, another than the class's: a service's for
    MigrationSettings); on a missing or bad value print which variable and exit(2)."""
    prefix = env_prefix if env_prefix is not None else cls.model_config.get("env_prefix", "")
    try:
        return cls(_env_prefix=prefix)  # type: ignore[call-arg]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = str(err["loc"][0]) if err["loc"] else ""
            # A field read under a variable of its own (OTEL_TRACES_SAMPLER) is named as it is
            name = loc if loc and loc not in cls.model_fields else (prefix + loc).upper()
            lines.append(f"  {name}: {err['msg']}")
        sys.stderr.write(f"{cls.__name__}: invalid configuration\n" + "\n".join(lines) + "\n")
        raise SystemExit(2) from None
