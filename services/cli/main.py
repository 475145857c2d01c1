"""`livegifts`: run the suite, call it, and check its books."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import secrets
import shlex
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import click
import grpc
import rich.console
import typer
import typer.rich_utils
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from livegifts.common.v1 import audit_pb2, common_pb2
from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.cli.calls import channel, describe
from services.cli.suite import RUN_PROBE_PORTS, Suite, SuiteConfig
from services.common import signing
from services.common.consumers import CONSUMERS
from services.wallet.payments import dev_event_payload, dev_payment_event_id

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

    from livegifts.common.v1 import dead_letters_pb2

app = typer.Typer(help="livegifts: a live-stream gift economy (wallet, gifting, payout).", no_args_is_help=True)


class _Console(Console):
    """A console that leaves each line whole where no terminal shows it: rich wraps text at 80
    columns when its file is not a terminal, so `livegifts balance bob | grep`, a Job's log or
    `demo > out.txt` got "... (+0/10000 of a diamond kept)" and error lines broken in two.
    A terminal still wraps at its width (tables print through _print_table)."""

    def print(self, *objects: object, soft_wrap: bool | None = None, **kwargs: object) -> None:  # type: ignore[override]
        if soft_wrap is None and not self.is_terminal:
            soft_wrap = True
        super().print(*objects, soft_wrap=soft_wrap, **kwargs)  # type: ignore[arg-type]


# `livegifts audit | head -1`: the reader is gone, as `head` meant it to be. Unix tools die of
# SIGPIPE there and the shell shows 128 + 13; so does the CLI, quietly: not 0, which under
# `set -o pipefail` would read an audit cut short as passed, and not 1, a failed audit's code.
STDOUT_CLOSED_EXIT = 128 + signal.SIGPIPE


def _stdout_closed() -> NoReturn:
    """End quietly where the reader of the output is gone (a closed pipe, EPIPE): whatever is
    left to write, and Python's flush at exit, go to /dev/null instead of raising again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.dup2(devnull, sys.stderr.fileno())  # `2>&1 | head`: the same pipe
    raise SystemExit(STDOUT_CLOSED_EXIT)


# Every rich console's, typer's own (help, usage errors) included: rich's default is exit 1.
rich.console.Console.on_broken_pipe = lambda self: _stdout_closed()  # type: ignore[method-assign]


def _echo(text: str) -> None:
    """A line of data on stdout (a JSON document): click's echo ends a closed pipe with exit 1."""
    try:
        typer.echo(text)
    except BrokenPipeError:
        _stdout_closed()


console = _Console()
# Errors and usage errors, and notes beside a command's data: stdout holds only what a command
# answers, for a pipe (`| jq`) or a file (`> report.txt`) to take without them.
err_console = _Console(stderr=True)


def _plain_usage_errors_off_a_terminal() -> None:
    """Usage errors (a bad value, a missing argument) in click's plain lines where stderr is no
    terminal: typer draws them in a box wrapped at 80 columns, so a cron job's log got
    "Invalid value for --detail-since: '5x' is not a duration such as 2h, 90m," and the rest on
    the next line, between box glyphs, and a search for the message found neither half.
    On a terminal they stay typer's. typer looks the function up in its module at each error."""
    boxed = typer.rich_utils.rich_format_error

    def format_error(exc: click.ClickException) -> None:
        # No args at all: typer has printed the help already, and its own function prints nothing.
        if err_console.is_terminal or type(exc).__name__ == "NoArgsIsHelpError":
            boxed(exc)
        else:
            exc.show()

    typer.rich_utils.rich_format_error = format_error


_plain_usage_errors_off_a_terminal()


def _version(value: bool) -> None:
    """`livegifts --version`: the installed package's version, for a script or a bug report."""
    if not value:
        return
    try:
        version = importlib.metadata.version("livegifts")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        err_console.print("[red]livegifts is not installed[/red]: no version to show (make venv installs it)")
        raise typer.Exit(1) from None
    _echo(f"livegifts {version}")
    raise typer.Exit(0)


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_version, help="print the installed livegifts version and exit"
        ),
    ] = False,
) -> None:
    """The options of `livegifts` itself, before a command."""


DEADLINE_S = 10.0
# `dead-letters replay`: calls of one run, all under its key, when the answer is lost or says to
# retry (UNAVAILABLE, ABORTED, DEADLINE_EXCEEDED: the replay may have committed), and the pause
# before the second and third.
REPLAY_ATTEMPTS_MAX = 3
REPLAY_RETRY_PAUSES_S = (0.5, 2.0)
_REPLAY_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED)
# `dead-letters list`: a service that does not answer; the others' parked events are still shown.
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
DEMO_PROGRESS_EVERY_S = 5.0  # `demo`: how often its wait for the creator's diamonds says how far it has come
AUDIT_PROGRESS_EVERY_S = 5.0  # `audit --detail`: how often the read of every id says how far it has come
CHANNELS = ("APP", "WEB")  # `buy` finds a package in either
TABLE_WIDTH_MAX = 100_000  # a table printed to no terminal: its own width, up to this
IN_FLIGHT_EXIT = 3  # `audit`: work still in flight with --wait 0 (2 is click's usage error)


def _enum_name(enum: EnumTypeWrapper, number: int, prefix: str = "") -> str:
    """An enum's name without its prefix ("APPROVED"), or "UNKNOWN(7)" for a number this CLI's
    protos do not have: a newer server's status. protobuf's Name() raises on it, and
    `withdrawals` ended in a traceback at the first such row."""
    value = enum.DESCRIPTOR.values_by_number.get(number)
    return value.name.removeprefix(prefix) if value is not None else f"UNKNOWN({number})"


def _not_empty(
    hint: str, empty: Callable[[], object] | None = None
) -> Callable[[typer.Context, typer.CallbackParam, object], object]:
    """An option's check that refuses it empty, as the option or as its variable: a usage error
    (exit 2) naming which, said in one line before any call or file read. click takes a variable
    set to "" as unset and the default in its place, so `LIVEGIFTS_WALLET_ADDR=$UNSET_THING
    livegifts audit` talked to a local suite, and an empty `LIVEGIFTS_OPERATOR_TOKEN` or
    `LIVEGIFTS_VAR_DIR` (a Secret key that came out empty) read var/'s files without a word;
    the variable is read here as the environment has it. `hint` says what to give instead.
    With `empty`, an empty one is not refused here: the option's value is `empty()`, for the
    command to refuse where it would use it (`_var_dir`)."""

    def check(ctx: typer.Context, param: typer.CallbackParam, value: object) -> object:
        source = ctx.get_parameter_source(param.name or "")
        given = os.environ.get(param.envvar) if isinstance(param.envvar, str) else None
        # By name: typer parses with its own copy of click (typer._click), whose ParameterSource
        # is not click's.
        if getattr(source, "name", None) == "COMMANDLINE":
            # A string as typed; a path or a number is converted already ("" is no number, and
            # a path "" is ".": not told from `--var .`).
            name, text = param.opts[0], value if isinstance(value, str) else None
        elif given is not None:  # from the variable, or the default in place of an empty one
            name, text = str(param.envvar), given
        else:
            return value
        if text is not None and not text.strip():
            if empty is not None:
                return empty()
            _usage_error(f"{name} is empty", hint)
        return value

    return check


def _usage_error(what: str, hint: str) -> NoReturn:
    err_console.print(f"[red]{what}[/red]: {hint}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


class _EmptyVarDir(type(Path())):
    """`LIVEGIFTS_VAR_DIR` set empty: refused by what reads var/ (`_var_dir`), not by a command
    given every secret it would read there."""


_VAR_HINT = "give the folder of `livegifts run`'s state, or leave it out for var/"


def _var_dir(var: Path) -> Path:
    """`var`, to read var/'s files in: an empty `LIVEGIFTS_VAR_DIR` is a usage error (exit 2)."""
    if isinstance(var, _EmptyVarDir):
        _usage_error("LIVEGIFTS_VAR_DIR is empty", _VAR_HINT)
    return var


_address_given = _not_empty("give the service's host:port")
# Where an eager --port-offset leaves its value for the address options parsed after it.
_PORT_OFFSET_META = "livegifts.port_offset"


def _address(ctx: typer.Context, param: typer.CallbackParam, value: object) -> object:
    """An address option's check; its default moved by the --port-offset (LIVEGIFTS_RUN_PORT_OFFSET)
    of the suite to call, as `run` moves its ports: the two variables that started README's second
    suite reach it, where `LIVEGIFTS_RUN_PORT_OFFSET=100 make demo` bought coins and sent gifts on
    the first. An address given, as the option or its variable, is called as it is."""
    value = _address_given(ctx, param, value)
    offset = ctx.meta.get(_PORT_OFFSET_META, 0)
    if not offset or getattr(ctx.get_parameter_source(param.name or ""), "name", None) != "DEFAULT":
        return value
    host, port = str(value).rsplit(":", 1)
    return f"{host}:{int(port) + offset}"


_FROM_VAR = "or leave it out to read the one `livegifts run` keeps in var/"


WalletAddr = Annotated[str, typer.Option(envvar="LIVEGIFTS_WALLET_ADDR", help="wallet host:port", callback=_address)]
GiftingAddr = Annotated[str, typer.Option(envvar="LIVEGIFTS_GIFTING_ADDR", help="gifting host:port", callback=_address)]
PayoutAddr = Annotated[str, typer.Option(envvar="LIVEGIFTS_PAYOUT_ADDR", help="payout host:port", callback=_address)]
VarDir = Annotated[
    Path,
    typer.Option(
        "--var",
        envvar="LIVEGIFTS_VAR_DIR",
        help="state folder of `run`",
        callback=_not_empty(_VAR_HINT, lambda: _EmptyVarDir("var")),
    ),
]
Secret = Annotated[
    str,
    typer.Option(
        envvar="LIVEGIFTS_WALLET_PAYMENT_WEBHOOK_SECRET",
        help="payment webhook secret (default: the one `livegifts run` keeps in var/dev-webhook-secret)",
        callback=_not_empty(f"give the payment webhook secret, {_FROM_VAR}"),
    ),
]


def _state_folder(var_dir: Path) -> None:
    """`run`'s state folder, made ignored by git when `run` makes it: the checkout's .gitignore
    names var/ only, and README's second suite (`--var var2`) would offer its databases and dev
    secrets to the next `git add -A`. A folder that exists is left as it is: it may be the user's."""
    try:
        var_dir.mkdir(parents=True)
    except FileExistsError:
        return
    (var_dir / ".gitignore").write_text("# made by `livegifts run`: its state, never committed\n*\n")


def _dev_secret(var_dir: Path, name: str = "dev-webhook-secret") -> str:
    """`run`'s secret in var/, made on the first run (a suite needs one to start)."""
    path = var_dir / name
    if not path.exists():
        var_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


def _run_secret(var_dir: Path, name: str, option: str, missing: str = "no secret to sign with") -> str:
    """A secret `run` keeps in var/, for a command that calls the suite; never made up here: a
    new one would only be refused by a suite that started with another."""
    path = _var_dir(var_dir) / name
    try:
        return path.read_text().strip()
    except OSError as exc:  # missing, or --var is a file (say, the secret's own), or unreadable
        why = f"no {path}" if isinstance(exc, FileNotFoundError) else f"cannot read {path} ({exc.strerror})"
        err_console.print(
            f"[red]{missing}[/red]: {escape(why)} (`livegifts run` writes it there);"
            f" give {option}, or --var with the folder of the running suite",
            highlight=False,
        )
        raise typer.Exit(1) from None


def _fail(exc: grpc.RpcError) -> None:
    """Say in one line (unwrapped, for a log) which call to which service failed, and exit 1."""
    _say_failed(exc)
    raise typer.Exit(1)


def _say_failed(exc: grpc.RpcError) -> None:
    err_console.print(f"[red]{escape(describe(exc))}[/red]", highlight=False, soft_wrap=True)


_port_offset_given = _not_empty("give a number, or leave it out for 0")
PortOffset = Annotated[
    int,
    typer.Option(
        min=0,
        max=10_000,
        envvar="LIVEGIFTS_RUN_PORT_OFFSET",
        help="added to every port `run` listens on (NATS 4223, gRPC 50051-50053, metrics 9101-9103,"
        " probes 50061-50063)",
        callback=_port_offset_given,
    ),
]


def _port_offset_to_call(ctx: typer.Context, param: typer.CallbackParam, value: object) -> object:
    """A client command's --port-offset, checked as `run`'s and kept for its addresses (`_address`)."""
    value = _port_offset_given(ctx, param, value)
    ctx.meta[_PORT_OFFSET_META] = value
    return value


# A client command's: eager, so it is parsed before the address options that take it.
CallPortOffset = Annotated[
    int,
    typer.Option(
        min=0,
        max=10_000,
        envvar="LIVEGIFTS_RUN_PORT_OFFSET",
        is_eager=True,
        help="the --port-offset of the `run` to call: added to the default addresses' ports"
        " (an address given, as its option or variable, is called as it is)",
        callback=_port_offset_to_call,
    ),
]


class _StopRequested:
    """A signal handler that only sets a flag: a handler runs between two bytecodes of the main
    thread, so one that took a lock (threading.Event.set) could wait forever for a lock the main
    thread holds at that moment: Event.wait holds it on its way in and out, and so does an
    earlier handler's Event.set when a second signal interrupts it."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: object) -> None:
        self.requested = True


@app.command()
def run(var: VarDir = Path("var"), port_offset: PortOffset = 0) -> None:
    """Start nats-server and the three services on SQLite under var/ until Ctrl-C, SIGTERM or SIGHUP."""
    var = _var_dir(var)
    defaults = SuiteConfig(var_dir=var)
    try:
        _state_folder(var)
        webhook_secret, operator_token = _dev_secret(var), _dev_secret(var, "dev-operator-token")
        # Held until this process ends (the services do not inherit it): one suite per var/.
        lock = open(var / "run.lock", "a")  # noqa: SIM115
    except OSError as exc:
        # A --var that is a file, or under one, or not writable: nothing started yet.
        err_console.print(
            f"[red]could not start: cannot keep state in {escape(str(var))}[/red]: {escape(str(exc))}", highlight=False
        )
        raise typer.Exit(1) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # Two nats-servers on one JetStream store and two of each service on one database.
        err_console.print(
            f"[red]could not start: {escape(str(var.resolve()))} is the state of a suite still running[/red];"
            " stop it, or give this one its own --var and --port-offset"
            " (with `make run`: LIVEGIFTS_VAR_DIR and LIVEGIFTS_RUN_PORT_OFFSET)",
            highlight=False,
        )
        raise typer.Exit(1) from None
    config = SuiteConfig(
        var_dir=var.resolve(),
        nats_port=defaults.nats_port + port_offset,
        grpc_ports={svc: port + port_offset for svc, port in defaults.grpc_ports.items()},
        metrics_ports={svc: port + port_offset for svc, port in defaults.metrics_ports.items()},
        probe_ports={svc: port + port_offset for svc, port in RUN_PROBE_PORTS.items()},
        webhook_secret=webhook_secret,
        operator_token=operator_token,
        die_with_parent=True,  # a `run` killed with SIGKILL takes its suite with it, lock and all
    )
    suite = Suite(config)
    # Handlers first: a SIGTERM during the start is honoured once everything has started, rather
    # than killing this process and leaving the services (in their own sessions) running.
    stop = _StopRequested()
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    # A closed terminal or a dropped ssh session: SIGHUP reaches this process but not the services
    # (in sessions of their own), and its default action would end this one and leave them running.
    signal.signal(signal.SIGHUP, stop)
    failed = ""
    try:
        console.print(f"starting nats-server and the services (state in {config.var_dir}) ...", markup=False)
        try:
            suite.start()
        except (RuntimeError, TimeoutError, OSError) as exc:
            # A service that exits while starting (a port taken, a bad setting), or no nats-server:
            # one line and the logs, not a traceback.
            lines = [ln for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
            failed = lines[0].rstrip(":")
            err_console.print(f"[red]could not start: {escape(failed)}[/red] ({escape(_start_log(suite, failed))})")
            if len(lines) > 1:
                err_console.print(f"  last log line: {_log_message(lines[-1])}", markup=False, highlight=False)
        if not stop.requested and not failed:
            _print_running(suite)
        while not stop.requested and not failed:
            time.sleep(0.5)  # a signal's handler sets the flag; the loop sees it within 0.5 s
            for name, proc in suite.procs.items():
                if proc.poll() is not None and not stop.requested:
                    failed = f"{name} exited with code {proc.returncode}"
                    log = escape(str(suite.log_dir / (name + ".log")))
                    err_console.print(f"[red]{failed}; stopping[/red] (its log: {log})")
                    break
    finally:
        # With its terminal closed (SIGHUP, then EIO) or its pipe's reader gone, a print fails:
        # the stop must not go with it, or the services and nats-server stay running.
        _say("stopping ...")
        suite.stop()
        _say("stopped; nothing left running.")
    if failed:
        raise typer.Exit(1)  # a script or supervisor can tell a crash from Ctrl-C


def _start_log(suite: Suite, failed: str) -> str:
    """Where to read why the start failed: the log of the process it names, else the folder."""
    name = failed.split(" ", 1)[0]
    if name in SERVICES:
        return f"its log: {suite.log_dir / (name + '.log')}"
    if name == "nats-server" and " exited with code " in failed:
        return f"its log: {suite.log_dir / 'nats.log'}"
    return f"logs in {suite.log_dir}"


def _log_message(line: str) -> str:
    """A service's log line as its own words: the message of a JSON record, else the line."""
    try:
        record = json.loads(line)
    except ValueError:
        return line.strip()
    return str(record["msg"]) if isinstance(record, dict) and "msg" in record else line.strip()


def _every(seconds: float) -> Callable[[], bool]:
    """A progress line's clock: true once `seconds` have passed since it was made or last true."""
    last = time.monotonic()

    def due() -> bool:
        nonlocal last
        if time.monotonic() - last < seconds:
            return False
        last = time.monotonic()
        return True

    return due


def _say(text: str) -> None:
    """console.print, or nothing where the output is gone: a closed terminal answers EIO, and a
    broken pipe ends in SystemExit(STDOUT_CLOSED_EXIT) (once stdout points at /dev/null)."""
    with contextlib.suppress(OSError, SystemExit):
        console.print(text)


def _table(title: str, *columns: str) -> Table:
    """A table whose cells wrap in a narrow terminal (an id or a path cut to "…" is of no use)."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, overflow="fold")
    return table


def _print_table(table: Table) -> None:
    """On a terminal, at its width; elsewhere (`| cat`, `kubectl exec` without -t, a Job's log),
    rich would assume 80 columns: print it at its own full width, a row per line, nothing cut."""
    if console.is_terminal:
        console.print(table)
        return
    full = Measurement.get(console, console.options.update_width(TABLE_WIDTH_MAX), table).maximum
    Console(file=console.file, width=max(full, console.width)).print(table)


def _program() -> str:
    """The CLI as this shell reaches it: `livegifts` where PATH finds this one, else its path
    (`.venv/bin/livegifts` from the checkout, as `make run` starts it without an activated venv,
    where a bare `livegifts` is "command not found")."""
    mine = Path(sys.executable).parent / "livegifts"
    found = shutil.which("livegifts")
    if not mine.exists() or (found is not None and Path(found).resolve() == mine.resolve()):
        return "livegifts"
    try:
        return shlex.quote(str(mine.relative_to(Path.cwd())))
    except ValueError:  # a venv outside the folder it runs in
        return shlex.quote(str(mine))


def _print_running(suite: Suite) -> None:
    config = suite.config
    table = _table("livegifts is running (Ctrl-C stops everything)", "process", "address", "metrics", "log")
    table.add_row("nats-server", config.nats_url, "", str(suite.log_dir / "nats.log"))
    for svc in ("wallet", "gifting", "payout"):
        table.add_row(
            svc,
            suite.addr(svc),
            f"http://127.0.0.1:{config.metrics_ports[svc]}/metrics",
            str(suite.log_dir / f"{svc}.log"),
        )
    _print_table(table)
    # As it works from here: a suite on another --var or --port-offset is not the commands' default.
    demo = [f"{_program()} demo"]
    if config.var_dir != Path("var").resolve():
        demo.append(f"--var {shlex.quote(str(config.var_dir))}")  # a folder with a space, as typed
    defaults = SuiteConfig(var_dir=config.var_dir).grpc_ports
    offsets = {port - defaults[svc] for svc, port in config.grpc_ports.items()}
    if len(offsets) == 1 and offsets != {0}:
        # `run --port-offset N` moved every port by N: the client commands take the same option.
        demo.append(f"--port-offset {offsets.pop()}")
    elif len(offsets) > 1:
        demo += [f"--{svc}-addr {suite.addr(svc)}" for svc in ("wallet", "gifting", "payout")]
    console.print(
        f"try: [bold]{escape(' '.join(demo))}[/bold]   or   grpcurl -plaintext {suite.addr('gifting')} list"
        "   (grpcurl is a separate tool: not installed with livegifts)",
        highlight=False,
    )


def _package(wallet: wallet_pb2_grpc.WalletServiceStub, package_id: str, region: str) -> wallet_pb2.CoinPackage:
    """The active package of that id in a region (both channels), or exit naming the region's."""
    pkgs = [
        p
        for channel in CHANNELS
        for p in wallet.ListCoinPackages(
            wallet_pb2.ListCoinPackagesRequest(region=region, channel=channel), timeout=DEADLINE_S
        ).packages
    ]
    pkg = next((p for p in pkgs if p.package_id == package_id), None)
    if pkg is None:
        err_console.print(
            f"[red]unknown package {escape(package_id)}[/red]; packages of region {escape(region)}:"
            f" {', '.join(p.package_id for p in pkgs) or 'none'} (another region: --region)",
            highlight=False,
        )
        raise typer.Exit(1)
    return pkg


def _buy(
    wallet: wallet_pb2_grpc.WalletServiceStub, secret: str, user: str, package_id: str, region: str = "US"
) -> wallet_pb2.Purchase:
    """CreatePurchase, then play the development payment provider: a signed success callback."""
    pkg = _package(wallet, package_id, region)
    purchase = wallet.CreatePurchase(
        wallet_pb2.CreatePurchaseRequest(
            user_id=user,
            package_id=pkg.package_id,
            currency_code=pkg.price.currency_code,
            payment_method=wallet_pb2.PAYMENT_METHOD_CARD,
            idempotency_key=f"cli-{uuid.uuid4().hex}",
        ),
        timeout=DEADLINE_S,
    )
    # The development provider's event id of this payment: the wallet's look-up of a purchase
    # whose callback is late reports it under the same id, so the two are applied once.
    payload = dev_event_payload(
        dev_payment_event_id(purchase.purchase_id),
        "payment.succeeded",
        purchase.purchase_id,
        pkg.price.amount_minor,
        pkg.price.currency_code,
    )
    answer = wallet.HandlePaymentEvent(
        wallet_pb2.HandlePaymentEventRequest(
            provider="dev", payload=payload, signature=signing.sign(secret.encode(), payload)
        ),
        timeout=DEADLINE_S,
    )
    return answer.purchase


@app.command()
def buy(
    user: Annotated[str, typer.Argument(help="the buyer's user id (any new id is a new user)")],
    package_id: Annotated[str, typer.Argument(help="e.g. us-usd-700, gb-gbp-660, us-usd-web-700")] = "us-usd-700",
    region: Annotated[
        str, typer.Option(help="the package's region (default: its id's first part, as in gb-gbp-660)")
    ] = "",
    wallet_addr: WalletAddr = "127.0.0.1:50051",
    port_offset: CallPortOffset = 0,  # moves the default addresses (`_address`)
    webhook_secret: Secret = "",
    var: VarDir = Path("var"),
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help='one JSON object: {"purchase": every field of the purchase, "balance": as `balance --json`}',
        ),
    ] = False,
) -> None:
    """Buy a coin package for USER through the development payment provider."""
    secret = webhook_secret or _run_secret(var, "dev-webhook-secret", "--webhook-secret")
    region = (region or package_id.split("-", 1)[0]).upper()
    with channel("wallet", wallet_addr) as ch:
        wallet = wallet_pb2_grpc.WalletServiceStub(ch)
        try:
            p = _buy(wallet, secret, user, package_id, region)
            bal = wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user), timeout=DEADLINE_S)
        except grpc.RpcError as exc:
            _fail(exc)
    if as_json:
        _echo(json.dumps({"purchase": _purchase_fields(p), "balance": _balance_fields(user, bal)}))
        return
    status = _enum_name(wallet_pb2.PurchaseStatus, p.status, "PURCHASE_STATUS_")  # as `withdrawals` prints
    console.print(f"purchase {p.purchase_id}: {status}; {user} has {bal.coins} coins", markup=False)


def _balance_fields(user: str, bal: wallet_pb2.Balance) -> dict[str, object]:
    """Every field of a balance, for `balance --json` and `buy --json`."""
    return {"user_id": bal.user_id or user, "coins": bal.coins, "debt_coins": bal.debt_coins}


def _purchase_fields(p: wallet_pb2.Purchase) -> dict[str, object]:
    """Every field of a purchase, for `buy --json`: enums by the names the lines show (SUCCEEDED,
    CARD), money as `withdrawals --json` has it, times in RFC 3339 (UTC)."""
    return {
        "purchase_id": p.purchase_id,
        "user_id": p.user_id,
        "package_id": p.package_id,
        "region": p.region,
        "coins": p.coins,
        "bonus_coins": p.bonus_coins,
        "promotion_id": p.promotion_id,
        "price": _money_fields(p.price),
        "payment_method": _enum_name(wallet_pb2.PaymentMethod, p.payment_method, "PAYMENT_METHOD_"),
        "status": _enum_name(wallet_pb2.PurchaseStatus, p.status, "PURCHASE_STATUS_"),
        # The checkout's URL only CreatePurchase answers: "" here (wallet.proto, CheckoutSession).
        "checkout": {
            "provider": p.checkout.provider,
            "session_id": p.checkout.session_id,
            "redirect_url": p.checkout.redirect_url,
        },
        "created_at": p.created_at.ToJsonString(),
        "updated_at": p.updated_at.ToJsonString(),
    }


@app.command()
def balance(
    user: Annotated[str, typer.Argument(help="the user's id")],
    wallet_addr: WalletAddr = "127.0.0.1:50051",
    port_offset: CallPortOffset = 0,  # moves the default addresses (`_address`)
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object, every field: user_id, coins, debt_coins")
    ] = False,
) -> None:
    """Show a user's coin balance."""
    with channel("wallet", wallet_addr) as ch:
        try:
            bal = wallet_pb2_grpc.WalletServiceStub(ch).GetBalance(
                wallet_pb2.GetBalanceRequest(user_id=user), timeout=DEADLINE_S
            )
        except grpc.RpcError as exc:
            _fail(exc)
    if as_json:
        _echo(json.dumps(_balance_fields(user, bal)))
        return
    console.print(f"{user}: {bal.coins} coins", markup=False)  # an id is text, not markup: "ann[bold]"


@app.command()
def earnings(
    creator: Annotated[str, typer.Argument(help="the creator's user id")],
    payout_addr: PayoutAddr = "127.0.0.1:50053",
    port_offset: CallPortOffset = 0,  # moves the default addresses (`_address`)
    as_json: Annotated[
        bool,
        typer.Option("--json", help="one JSON object, every field of GetEarnings (cash_available: a list of amounts)"),
    ] = False,
) -> None:
    """Show a creator's diamonds."""
    with channel("payout", payout_addr) as ch:
        try:
            e = payout_pb2_grpc.PayoutServiceStub(ch).GetEarnings(
                payout_pb2.GetEarningsRequest(creator_id=creator), timeout=DEADLINE_S
            )
        except grpc.RpcError as exc:
            _fail(exc)
    if as_json:
        _echo(json.dumps(_earnings_fields(creator, e)))
        return
    console.print(
        f"{creator}: {e.diamonds_available} diamonds available, {e.diamonds_lifetime} lifetime, "
        f"from {e.coins_received} coins (+{e.remainder_units}/10000 of a diamond kept)",
        markup=False,
    )
    # Where the rest went: without it a negative balance after a clawback, or diamonds held by
    # open withdrawals, cannot be told from lost ones (lifetime = available + held + withdrawn +
    # clawed back).
    console.print(
        f"  held in open withdrawals {e.diamonds_held}, withdrawn {e.diamonds_withdrawn}, "
        f"clawed back {e.diamonds_clawed_back}"
    )
    if e.withdrawals_held:
        console.print("  withdrawals held: a clawback left the balance negative; later earnings repay it")


def _earnings_fields(creator: str, e: payout_pb2.Earnings) -> dict[str, object]:
    """Every field of a creator's earnings, for `earnings --json`."""
    return {
        "creator_id": e.creator_id or creator,
        "diamonds_available": e.diamonds_available,
        "diamonds_held": e.diamonds_held,
        "diamonds_withdrawn": e.diamonds_withdrawn,
        "diamonds_clawed_back": e.diamonds_clawed_back,
        "diamonds_lifetime": e.diamonds_lifetime,
        "coins_received": e.coins_received,
        "remainder_units": e.remainder_units,
        "clawback_remainder_units": e.clawback_remainder_units,
        "cash_available": [_money_fields(m) for m in e.cash_available],
        "withdrawals_held": e.withdrawals_held,
    }


@app.command()
def demo(
    wallet_addr: WalletAddr = "127.0.0.1:50051",
    gifting_addr: GiftingAddr = "127.0.0.1:50052",
    payout_addr: PayoutAddr = "127.0.0.1:50053",
    port_offset: CallPortOffset = 0,  # moves the default addresses (`_address`)
    webhook_secret: Secret = "",
    var: VarDir = Path("var"),
    wait_s: Annotated[float, typer.Option(min=0, help="how long to wait for the diamonds")] = 30.0,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="one JSON object at the end: the ids, the purchase, the gifts (each with its gift_event_id),"
            " the expected diamonds and the creator's earnings as `earnings --json` has them (the steps go to stderr)",
        ),
    ] = False,
) -> None:
    """Buy coins, start a stream, send gifts, and show the creator's diamonds."""
    secret = webhook_secret or _run_secret(var, "dev-webhook-secret", "--webhook-secret")
    step = err_console if as_json else console  # --json: stdout holds the one document only
    run_id = uuid.uuid4().hex[:8]
    viewer, creator = f"viewer-{run_id}", f"creator-{run_id}"
    gifts = [("rose", 7), ("panda", 3), ("galaxy", 1), ("love-bang", 2)]
    with (
        channel("wallet", wallet_addr) as wch,
        channel("gifting", gifting_addr) as gch,
        channel("payout", payout_addr) as pch,
    ):
        wallet = wallet_pb2_grpc.WalletServiceStub(wch)
        gifting = gifting_pb2_grpc.GiftingServiceStub(gch)
        payout = payout_pb2_grpc.PayoutServiceStub(pch)
        try:
            purchase = _buy(wallet, secret, viewer, "us-usd-1400")
            step.print(f"1. {viewer} bought {purchase.coins} coins for ${purchase.price.amount_minor / 100:.2f}")
            stream = gifting.StartStream(
                gifting_pb2.StartStreamRequest(
                    creator_id=creator, title="demo stream", idempotency_key=f"demo-{run_id}"
                ),
                timeout=DEADLINE_S,
            )
            step.print(f"2. {creator} is live: stream {stream.stream_id}")
            total = 0
            sent: list[dict[str, object]] = []
            for gift_id, qty in gifts:
                r = gifting.SendGift(
                    gifting_pb2.SendGiftRequest(
                        stream_id=stream.stream_id,
                        sender_id=viewer,
                        gift_id=gift_id,
                        quantity=qty,
                        idempotency_key=f"demo-{run_id}-{gift_id}",
                    ),
                    timeout=DEADLINE_S,
                )
                total += r.coins
                sent.append(
                    {
                        "gift_event_id": r.gift_event_id,  # what `livegifts gift` takes
                        "gift_id": gift_id,
                        "quantity": qty,
                        "coins": r.coins,
                        "sender_balance": r.sender_balance,
                    }
                )
                step.print(f"3. sent {qty} x {gift_id} = {r.coins} coins; {viewer} has {r.sender_balance} left")
            policy = payout.GetPolicy(payout_pb2.GetPolicyRequest(), timeout=DEADLINE_S)
            expected = total * policy.creator_share_bp // 10_000
            started = time.monotonic()
            deadline = started + wait_s
            progress_due = _every(DEMO_PROGRESS_EVERY_S)
            got = None
            while time.monotonic() < deadline:
                try:
                    got = payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator), timeout=DEADLINE_S)
                    if got.diamonds_lifetime >= expected:
                        break
                except grpc.RpcError as exc:
                    # A payout from before GetEarnings answered zeros for a creator it never
                    # credited answers NOT_FOUND until the first credit.
                    if exc.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                        raise
                if progress_due():
                    # Diamonds arrive through payout's consumer: a stopped NATS or payout shows
                    # here as a wait, so say what it waits for (stderr: stdout stays the story).
                    err_console.print(
                        f"waiting for payout to credit {creator}: "
                        f"{got.diamonds_lifetime if got else 0} of {expected} diamonds after "
                        f"{time.monotonic() - started:.0f} s (gives up after {wait_s:g} s)"
                    )
                time.sleep(0.2)
        except grpc.RpcError as exc:
            _fail(exc)
    share = policy.creator_share_bp / 100
    if got is None or got.diamonds_lifetime != expected:
        # The failure, on stderr as every failure of the CLI is: stdout keeps the steps that went.
        err_console.print(
            f"[red]4. {creator} has {got.diamonds_lifetime if got else 0} diamonds, expected {expected}[/red]"
        )
        raise typer.Exit(1)
    step.print(
        f"4. {creator} earned {got.diamonds_lifetime} diamonds = {share:g}% of {total} coins "
        f"(remainder {got.remainder_units}/10000 kept)  [green]OK[/green]"
    )
    if as_json:
        answer = {
            "viewer_id": viewer,
            "creator_id": creator,
            "purchase": _purchase_fields(purchase),
            "stream_id": stream.stream_id,
            "gifts": sent,
            "coins_sent": total,
            "creator_share_bp": policy.creator_share_bp,
            "diamonds_expected": expected,
            "earnings": _earnings_fields(creator, got),
        }
        _echo(json.dumps(answer))


def _paged(call: Callable[[Any], Any], request: Any, field: str) -> Iterator[Any]:
    """The items (`field`) of a paged List call, page after page as the caller takes them: the
    next page is asked for only when the caller wants more than this one held. A failed call exits."""
    while True:
        try:
            page = call(request)
        except grpc.RpcError as exc:
            _fail(exc)
        yield from getattr(page, field)
        if not page.next_page_token:
            return
        request.page_token = page.next_page_token


TRANSACTIONS_PAGE_SIZE = 500  # `transactions`: entries per ListTransactions call (its maximum)


@app.command()
def transactions(
    user: Annotated[str, typer.Argument(help="the user's id")],
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="show at most this many, newest first")] = 50,
    wallet_addr: WalletAddr = "127.0.0.1:50051",
    port_offset: CallPortOffset = 0,  # moves the default addresses (`_address`)
    as_json: Annotated[
        bool,
        typer.Option("--json", help="one JSON object per entry and line, every field (notes go to stderr)"),
    ] = False,
) -> None:
    """List a user's coin history (ListTransactions), newest first: purchases, spends, reversals.

    A SPEND_GIFT, SPEND_TIP or SPEND_UNLOCK entry's reference is its gift event id: give it to
    `livegifts gift` to see where that gift stands. Exit 0 even when none are listed.
    """
    request = wallet_pb2.ListTransactionsRequest(user_id=user, page_size=min(limit + 1, TRANSACTIONS_PAGE_SIZE))
    table = _table(f"{user}'s coin history, newest first", "at (UTC)", "kind", "coins", "balance after", "reference")
    shown, more = 0, False
    with channel("wallet", wallet_addr) as ch:
        stub = wallet_pb2_grpc.WalletServiceStub(ch)
        listed = _paged(lambda r: stub.ListTransactions(r, timeout=DEADLINE_S), request, "transactions")
        for t in listed:
            if shown == limit:
                more = True
                break
            shown += 1
            if as_json:
                _echo(json.dumps(_transaction_fields(t)))
                continue
            table.add_row(
                t.created_at.ToDatetime().isoformat(timespec="seconds"),
                escape(t.kind),
                f"{t.amount:+d}",
                str(t.balance_after),
                escape(t.reference_id),
            )
    notes = err_console if as_json else console  # --json: stdout holds the entries only
    if shown and not as_json:
        _print_table(table)
    elif not shown:
        notes.print(f"no coin history for {escape(user)}")
    if more:
        notes.print(f"[yellow]more entries than --limit {limit}: raise it to see older ones[/yellow]")


def _transaction_fields(t: wallet_pb2.Transaction) -> dict[str, object]:
    """Every field of a history entry, for `transactions --json` (its time in RFC 3339, UTC)."""
    return {
        "entry_id": t.entry_id,
        "kind": t.kind,
        "amount": t.amount,
        "balance_after": t.balance_after,
        "reference_id": t.reference_id,
        "created_at": t.created_at.ToJsonString(),
    }


@app.command()
def gift(
    gift_event_ids: Annotated[
        list[str],
        typer.Argument(
            metavar="GIFT_EVENT_ID...",
            help="gift event ids (GiftReceipt.gift_event_id; the reference of a SPEND_* entry in `transactions`)",
        ),
    ],
    wallet_addr: WalletAddr = "127.0.0.1:50051",
    gifting_addr: GiftingAddr = "127.0.0.1:50052",
    payout_addr: PayoutAddr = "127.0.0.1:50053",
    port_offset: CallPortOffset = 0,  # moves the default addresses (`_address`)
    as_json: Annotated[
        bool,
        typer.Option("--json", help="one JSON object per id and line, every field"),
    ] = False,
) -> None:
    """Where gifts, tips or unlocks stand: the wallet's spend, gifting's gift and payout's credit of each id.

    Reads each service's audit records of those ids (ListAuditRecords, read-only, no token), in
    the audit's order (payout, gifting, wallet, gifting again), and says what each id is waiting
    for: a SENT gift not yet credited is payout behind, or its event parked (`livegifts
    dead-letters list`). Exit 0 once every service answered, whatever the gifts' states.
    """
    from services.cli.audit import records_by_id, unsent, verdicts

    ids = list(dict.fromkeys(gift_event_ids))
    try:
        with channel("payout", payout_addr) as ch:
            earnings_ = records_by_id(ch, "earnings", DEADLINE_S, ids)
        with channel("gifting", gifting_addr) as ch:
            gifts = records_by_id(ch, "gifts", DEADLINE_S, ids)
        with channel("wallet", wallet_addr) as ch:
            spends = records_by_id(ch, "spends", DEADLINE_S, ids)
        # A spend charged since the gift was read: read the gift again, as the audit does, so a
        # gift SENT meanwhile is not taken for one charged without being sent.
        again = unsent(spends, gifts)
        gifts_after: dict[str, audit_pb2.AuditRecord] = {}
        if again:
            with channel("gifting", gifting_addr) as ch:
                gifts_after = records_by_id(ch, "gifts", DEADLINE_S, again)
    except grpc.RpcError as exc:
        _fail(exc)
    table = _table("gifts", "gift event id", "wallet spend", "gifting", "payout credit", "where it stands")
    for i in ids:
        earning, g, spend = earnings_.get(i), gifts_after.get(i) or gifts.get(i), spends.get(i)
        stands = _gift_stands(verdicts(earning, gifts.get(i), spend, gifts_after.get(i)), earning, g, spend)
        if as_json:
            _echo(
                json.dumps(
                    {
                        "gift_event_id": i,
                        "spend": _record_fields(spend, "user_id"),
                        "gift": _record_fields(g, "creator_id"),
                        "credit": _record_fields(earning, "creator_id"),
                        "stands": stands,
                    }
                )
            )
            continue
        table.add_row(
            escape(i),
            _record_text(spend, "by"),
            _record_text(g, "to"),
            _record_text(earning, "to"),
            escape(stands),
        )
    if not as_json:
        _print_table(table)


def _record_fields(r: audit_pb2.AuditRecord | None, party: str) -> dict[str, object] | None:
    return None if r is None else {"status": r.status, "coins": r.amount, party: r.party}


def _record_text(r: audit_pb2.AuditRecord | None, party: str) -> str:
    return "none" if r is None else escape(f"{r.status} {r.amount} coins {party} {r.party}")


def _gift_stands(
    found: list[tuple[str, str, str]],
    earning: audit_pb2.AuditRecord | None,
    gift: audit_pb2.AuditRecord | None,
    spend: audit_pb2.AuditRecord | None,
) -> str:
    """One id's state in words: the audit's verdict on it, or what a settled id is."""
    from services.cli.audit import FAILED

    if found:
        said = "; ".join(f"{status}: {reason}" for _, status, reason in found)
        if any(status == FAILED for _, status, _ in found):
            return f'{said} (an invariant broken: docs/sre.md, "Run the audit")'
        if any(reason == "not yet credited" for _, _, reason in found):
            return f"{said}: payout behind, or its event parked (livegifts dead-letters list)"
        if any(reason == "pending" for _, _, reason in found):
            return f"{said}: gifting's sweeper settles it, sent or cancelled"
        return said
    if earning is not None:
        return f"credited to {earning.party}"
    if gift is not None and gift.status == "CANCELLED":
        return "cancelled: its coins were not kept, nothing to credit"
    if gift is not None and gift.status == "KEY_ONLY":
        return "an unlock's key answered by an earlier unlock: no gift of its own"
    if gift is None and spend is None:
        return "unknown: no service has a record of this id"
    return "settled"


WINDOW_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _window_s(text: str) -> float:
    """`--detail-since`'s duration (2h, 90m, 3600s, 1d) in seconds; refused when not one."""
    number, unit = text[:-1], text[-1:].lower()
    try:
        seconds = float(number) * WINDOW_UNITS_S[unit]
    except (KeyError, ValueError):
        raise typer.BadParameter(
            f"{text!r} is not a duration such as 2h, 90m, 3600s or 1d", param_hint="--detail-since"
        ) from None
    if not 0 < seconds < float("inf"):
        raise typer.BadParameter(f"{text!r} must be a positive duration", param_hint="--detail-since")
    return seconds


@app.command()
def audit(
    wallet_addr: WalletAddr = "127.0.0.1:50051",
    gifting_addr: GiftingAddr = "127.0.0.1:50052",
    payout_addr: PayoutAddr = "127.0.0.1:50053",
    port_offset: CallPortOffset = 0,  # moves the default addresses (`_address`)
    detail: Annotated[bool, typer.Option(help="also compare spends, gifts and credits id by id")] = False,
    wait_s: Annotated[float, typer.Option("--wait", min=0, help="seconds to wait for in-flight work to drain")] = 0.0,
    detail_since: Annotated[
        str,
        typer.Option(
            help="compare id by id only the ids with a record written in this recent window (e.g. 2h, 90m;"
            " implies --detail; the totals still cover all time)"
        ),
    ] = "",
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help='one JSON object per invariant and line: {"invariant", "status" (ok, in flight or FAILED),'
            ' "detail"}; the same exit codes',
        ),
    ] = False,
) -> None:
    """Check the suite's invariants across the three services; exit 1 if one fails (3 if still in flight).

    With --wait, work still in flight when the wait runs out counts as failed. With --detail the
    wait re-reads only the ids in flight at the first look, so it passes under steady traffic.
    With --detail-since the per-id comparison reads only a recent window, its cost bounded by the
    window's traffic; a full --detail (every id) remains the periodic deep check.
    """
    from services.cli.audit import FAILED, OK, collect, wait_until_settled

    window_s = _window_s(detail_since) if detail_since else None
    if window_s is not None:
        detail = True

    progress_due = _every(AUDIT_PROGRESS_EVERY_S)

    def read(ranges: int, ids: int) -> None:
        # A read of every id takes time in proportion to the books: a line every few seconds
        # says how far it has come (stderr, so the report on stdout stays as it was).
        if progress_due():
            err_console.print(f"reading every id: {ids:,} judged in {ranges:,} ranges so far")

    def fetch(ids=None):  # type: ignore[no-untyped-def]
        # The window ends at each first look (a retried first look moves it on with the clock).
        # At least 1: the servers refuse a negative since_us and read 0 as no window at all.
        since_us = None if window_s is None else max(1, int((time.time() - window_s) * 1_000_000))
        return collect(wallet_addr, gifting_addr, payout_addr, DEADLINE_S, detail, ids, read, since_us)

    waiting_due = _every(AUDIT_PROGRESS_EVERY_S)
    said: list[str] = []

    def progress(report) -> None:  # type: ignore[no-untyped-def]
        # It looks every 0.5 s: say what it waits for when that changes, else every few seconds.
        busy = [c.name for c in report if c.status != OK]
        if busy and wait_s > 0 and (busy != said or waiting_due()):
            said[:] = busy
            # Progress, not the report: stderr, so `audit --wait 120 > report.txt` holds only the table.
            err_console.print(f"[yellow]waiting:[/yellow] {escape('; '.join(busy))}")

    try:
        report = wait_until_settled(fetch, wait_s, progress)
    except grpc.RpcError as exc:
        _fail(exc)
    if as_json:
        for row in report:
            _echo(json.dumps({"invariant": row.name, "status": row.status, "detail": row.detail}))
    else:
        table = _table("livegifts audit", "invariant", "status", "detail")
        for row in report:
            colour = {"ok": "green", "in flight": "yellow", "FAILED": "red"}[row.status]
            table.add_row(escape(row.name), f"[{colour}]{row.status}[/{colour}]", escape(row.detail))
        _print_table(table)
    if any(r.status == FAILED for r in report):
        raise typer.Exit(1)
    if any(r.status != OK for r in report):
        raise typer.Exit(IN_FLIGHT_EXIT)


dead_letters = typer.Typer(
    help="Events the services' consumers parked after repeated failures: list them, replay one once fixed.",
    no_args_is_help=True,
)
app.add_typer(dead_letters, name="dead-letters")
Service = Annotated[str, typer.Option(help="wallet, gifting or payout (default: every service)")]
OperatorToken = Annotated[
    str,
    typer.Option(
        envvar="LIVEGIFTS_OPERATOR_TOKEN",
        help="operator token (default: the one `livegifts run` keeps in var/dev-operator-token)",
        callback=_not_empty(f"give the operator token, {_FROM_VAR}"),
    ),
]
SERVICES = ("wallet", "gifting", "payout")


def _operator(token: str, var: Path) -> tuple[tuple[str, str], ...]:
    who = os.environ.get("USER", "") or "cli"
    token = token or _run_secret(var, "dev-operator-token", "--operator-token", "no operator token")
    return (("authorization", f"Bearer {token}"), ("x-operator", who))


def _service_addr(service: str, addrs: dict[str, str]) -> str:
    if service not in addrs:
        err_console.print(f"[red]unknown service {escape(repr(service))}[/red]: one of {', '.join(SERVICES)}")
        raise typer.Exit(2)
    return addrs[service]


def _all_consumers() -> list[str]:
    return [name for names in CONSUMERS.values() for name in names]


def _check_consumer(consumer: str, services: list[str]) -> None:
    """A consumer name none of `services` runs is a usage error (the list would only say "no
    parked events"), naming the ones they run, or the service that runs it."""
    if any(consumer in CONSUMERS.get(svc, ()) for svc in services):
        return
    elsewhere = [svc for svc, names in CONSUMERS.items() if consumer in names]
    if elsewhere:
        what = f"consumer {consumer!r} is not {services[0]}'s"
        why = f"it runs in {elsewhere[0]}: give --service {elsewhere[0]}"
    else:
        known = [f"{name} ({svc})" for svc in services for name in CONSUMERS.get(svc, ())]
        what = f"unknown consumer {consumer!r}"
        why = f"one of {', '.join(known)}" if known else f"{services[0]} runs no consumer"
    err_console.print(f"[red]{escape(what)}[/red]: {why}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@dead_letters.command("list")
def dead_letters_list(
    service: Service = "",
    consumer: Annotated[
        str, typer.Option(help=f"only this consumer's: one of {', '.join(sorted(_all_consumers()))}")
    ] = "",
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="show at most this many per service")] = 1000,
    wallet_addr: WalletAddr = "127.0.0.1:50051",
    gifting_addr: GiftingAddr = "127.0.0.1:50052",
    payout_addr: PayoutAddr = "127.0.0.1:50053",
    port_offset: CallPortOffset = 0,  # moves the default addresses (`_address`)
    operator_token: OperatorToken = "",
    var: VarDir = Path("var"),
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="one JSON object per parked event and line, every field (notes go to stderr, as errors do)",
        ),
    ] = False,
) -> None:
    """List parked events, oldest first (every service's, or --service's); exit 0 even when there are some.

    A service that does not answer is named after the others' events, and the exit is 1.
    """
    from livegifts.common.v1 import dead_letters_pb2, dead_letters_pb2_grpc

    addrs = {"wallet": wallet_addr, "gifting": gifting_addr, "payout": payout_addr}
    services = [service] if service else list(SERVICES)
    notes = err_console if as_json else console  # --json: stdout holds the events only
    for svc in services:
        _service_addr(svc, addrs)  # a typo is a usage error before any token is looked for
    if consumer:
        _check_consumer(consumer, services)
    metadata = _operator(operator_token, var)
    table = _table(
        "parked events", "service", "id", "consumer", "subject", "event id", "parked at (UTC)", "payload bytes", "error"
    )
    shown = more = 0
    unreachable: list[grpc.RpcError] = []
    for svc in services:
        with channel(svc, _service_addr(svc, addrs)) as ch:
            stub = dead_letters_pb2_grpc.DeadLetterServiceStub(ch)
            after, count, cut = 0, 0, False
            while True:
                try:
                    page = stub.ListDeadLetters(
                        dead_letters_pb2.ListDeadLettersRequest(consumer=consumer, after_id=after, page_size=500),
                        metadata=metadata,
                        timeout=DEADLINE_S,
                    )
                except grpc.RpcError as exc:
                    # A service down or hung: what the others parked is still shown (an incident
                    # is when this is run). A refusal (the token, the consumer's name) stops here.
                    if exc.code() not in _UNREACHABLE:  # type: ignore[attr-defined]
                        _fail(exc)
                    unreachable.append(exc)
                    break
                for d in page.dead_letters:
                    if count == limit:
                        cut = True
                        break
                    count += 1
                    if as_json:
                        _echo(json.dumps(_dead_letter_fields(svc, d)))
                        continue
                    when = d.parked_at.ToDatetime().isoformat(timespec="seconds")
                    table.add_row(
                        svc,
                        str(d.id),
                        escape(d.consumer),
                        escape(d.subject),
                        escape(d.event_id) or "(undecodable)",
                        when,
                        str(d.payload_bytes),
                        escape(d.error),
                    )
                # At the limit on a page's last row, the next page says whether there is more.
                if not page.next_after_id or cut:
                    break
                after = page.next_after_id
            shown += count
            more += cut
    if shown and not as_json:
        _print_table(table)
    elif not shown and len(unreachable) < len(services):  # some answered, none with any parked
        notes.print("no parked events" + (" in the services that answered" if unreachable else ""))
    if more:
        notes.print(f"[yellow]more parked events than --limit {limit}: raise it to see them[/yellow]")
    if unreachable:
        for exc in unreachable:
            _say_failed(exc)
        raise typer.Exit(1)


WITHDRAWAL_STATUSES = ("PENDING_REVIEW", "APPROVED", "PROCESSING", "PAID", "FAILED", "REJECTED")
WITHDRAWALS_PAGE_SIZE = 500  # `withdrawals`: rows per ListWithdrawals call (its maximum)


def _withdrawal_status(w: payout_pb2.Withdrawal) -> str:
    """A withdrawal's status, and why it waits while APPROVED and held: "APPROVED, held: BALANCE_NEGATIVE"."""
    status = _enum_name(payout_pb2.WithdrawalStatus, w.status, "WITHDRAWAL_STATUS_")
    if not w.hold:
        return status
    return f"{status}, held: {_enum_name(payout_pb2.WithdrawalHold, w.hold, 'WITHDRAWAL_HOLD_')}"


@app.command()
def withdrawals(
    creator: Annotated[
        str, typer.Argument(help="only this creator's, newest first (default: every creator's, oldest first)")
    ] = "",
    status: Annotated[
        str,
        typer.Option(
            help=f"only this status: {', '.join(WITHDRAWAL_STATUSES)} (default: PENDING_REVIEW across"
            " creators, every status for one creator)"
        ),
    ] = "",
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="show at most this many")] = 1000,
    payout_addr: PayoutAddr = "127.0.0.1:50053",
    port_offset: CallPortOffset = 0,  # moves the default addresses (`_address`)
    operator_token: OperatorToken = "",
    var: VarDir = Path("var"),
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="one JSON object per withdrawal and line, every field (notes go to stderr, as errors do)",
        ),
    ] = False,
) -> None:
    """List withdrawals: every creator's waiting for review (operator token), or one creator's.

    Across creators it is the review queue, oldest requested first. An APPROVED withdrawal the
    dispatcher holds shows why ("APPROVED, held: BALANCE_NEGATIVE"). Exit 0 even when some are listed.
    """
    status = status.upper()
    if status and status not in WITHDRAWAL_STATUSES:
        err_console.print(f"[red]unknown status {status!r}[/red]: one of {', '.join(WITHDRAWAL_STATUSES)}")
        raise typer.Exit(2)
    if not creator:
        status = status or "PENDING_REVIEW"
    # Another creator's withdrawals need the operator token; one creator's are theirs to read,
    # with the reviewers' names when a token is given (without one each shows as "operator").
    metadata = _operator(operator_token, var) if operator_token or not creator else ()
    request = payout_pb2.ListWithdrawalsRequest(
        creator_id=creator,
        status=payout_pb2.WithdrawalStatus.Value(f"WITHDRAWAL_STATUS_{status}") if status else 0,
        page_size=min(limit + 1, WITHDRAWALS_PAGE_SIZE),
    )
    title = f"{creator}'s withdrawals, newest first" if creator else "withdrawals of every creator, oldest first"
    table = _table(
        title + (f" ({status})" if status else ""),
        "withdrawal id",
        "creator",
        "status",
        "gross",
        "requested at (UTC)",
        "updated at (UTC)",
        "reviewed by",
        "failure reason",
    )
    shown, more = 0, False
    with channel("payout", payout_addr) as ch:
        stub = payout_pb2_grpc.PayoutServiceStub(ch)
        listed = _paged(
            lambda r: stub.ListWithdrawals(r, metadata=metadata, timeout=DEADLINE_S), request, "withdrawals"
        )
        for w in listed:
            if shown == limit:
                more = True
                break
            shown += 1
            if as_json:
                _echo(json.dumps(_withdrawal_fields(w)))
                continue
            table.add_row(
                escape(w.withdrawal_id),
                escape(w.creator_id),
                _withdrawal_status(w),
                f"{w.gross.amount_minor} {w.gross.currency_code} minor",
                w.requested_at.ToDatetime().isoformat(timespec="seconds"),
                w.updated_at.ToDatetime().isoformat(timespec="seconds"),
                escape(w.reviewed_by),
                escape(w.failure_reason),
            )
    notes = err_console if as_json else console  # --json: stdout holds the withdrawals only
    if shown and not as_json:
        _print_table(table)
    elif not shown:
        # Whose, as `transactions` says it: across creators there is nobody to name.
        notes.print(
            "no withdrawals" + (f" {status}" if status else "") + (f" for {escape(creator)}" if creator else "")
        )
    if more:
        notes.print(f"[yellow]more withdrawals than --limit {limit}: raise it to see them[/yellow]")


def _money_fields(m: common_pb2.Money) -> dict[str, object]:
    return {"amount_minor": m.amount_minor, "currency_code": m.currency_code}


def _withdrawal_fields(w: payout_pb2.Withdrawal) -> dict[str, object]:
    """Every field of a withdrawal, for `withdrawals --json`: status and hold by the names the
    table shows (APPROVED, BALANCE_NEGATIVE; "" when nothing holds it), times in RFC 3339 (UTC)."""
    status, _, hold = _withdrawal_status(w).partition(", held: ")
    return {
        "withdrawal_id": w.withdrawal_id,
        "creator_id": w.creator_id,
        "method_id": w.method_id,
        "diamonds": w.diamonds,
        "gross": _money_fields(w.gross),
        "fee": _money_fields(w.fee),
        "net": _money_fields(w.net),
        "status": status,
        "hold": hold,
        "policy_version": w.policy_version,
        "reviewed_by": w.reviewed_by,
        "failure_reason": w.failure_reason,
        "provider_ref": w.provider_ref,
        "requested_at": w.requested_at.ToJsonString(),
        "updated_at": w.updated_at.ToJsonString(),
        "paid_at": w.paid_at.ToJsonString() if w.HasField("paid_at") else None,  # null until PAID
    }


def _dead_letter_fields(service: str, d: dead_letters_pb2.DeadLetter) -> dict[str, object]:
    """Every field of a parked event and the service that holds it, for `dead-letters list --json`."""
    return {
        "service": service,
        "id": d.id,
        "consumer": d.consumer,
        "subject": d.subject,
        "event_id": d.event_id,  # "" when the payload could not be decoded
        "parked_at": d.parked_at.ToJsonString(),  # RFC 3339, UTC
        "payload_bytes": d.payload_bytes,
        "error": d.error,
    }


@dead_letters.command("replay")
def dead_letters_replay(
    # An int64 in the request (dead_letters.proto), from 1: a row's id, never 0.
    dead_letter_id: Annotated[
        int, typer.Argument(metavar="ID", min=1, max=2**63 - 1, help="the id `dead-letters list` shows")
    ],
    service: Annotated[str, typer.Option(help="the service that parked it: wallet, gifting or payout")],
    wallet_addr: WalletAddr = "127.0.0.1:50051",
    gifting_addr: GiftingAddr = "127.0.0.1:50052",
    payout_addr: PayoutAddr = "127.0.0.1:50053",
    port_offset: CallPortOffset = 0,  # moves the default addresses (`_address`)
    operator_token: OperatorToken = "",
    var: VarDir = Path("var"),
    idempotency_key: Annotated[
        str,
        typer.Option(
            help="the replay's key (default: a new one); give the one a failed run printed to retry it safely"
        ),
    ] = "",
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help='one JSON object: {"outcome" (APPLIED or DUPLICATE), "idempotency_key", "dead_letter":'
            " the replayed event as `dead-letters list --json` shows it}",
        ),
    ] = False,
) -> None:
    """Apply one parked event again through its consumer, once; exit 1 if it fails again (it stays parked)."""
    from livegifts.common.v1 import dead_letters_pb2, dead_letters_pb2_grpc

    addrs = {"wallet": wallet_addr, "gifting": gifting_addr, "payout": payout_addr}
    # One key for every call of this run (and for a later run given it): a retry of a replay that
    # went through answers as it did instead of NOT_FOUND.
    key = idempotency_key or f"cli-replay-{uuid.uuid4().hex}"
    request = dead_letters_pb2.ReplayDeadLetterRequest(id=dead_letter_id, idempotency_key=key)
    addr = _service_addr(service, addrs)  # a typo is a usage error before any token is looked for
    metadata = _operator(operator_token, var)
    with channel(service, addr) as ch:
        stub = dead_letters_pb2_grpc.DeadLetterServiceStub(ch)
        for attempt in range(REPLAY_ATTEMPTS_MAX):
            try:
                answer = stub.ReplayDeadLetter(request, metadata=metadata, timeout=DEADLINE_S)
                break
            except grpc.RpcError as exc:
                if exc.code() not in _REPLAY_RETRYABLE:  # type: ignore[attr-defined]
                    _fail(exc)
                if attempt + 1 == REPLAY_ATTEMPTS_MAX:
                    _say_failed(exc)
                    err_console.print(
                        f"to try again without replaying twice: --idempotency-key {key}",
                        highlight=False,
                        soft_wrap=True,
                    )
                    raise typer.Exit(1) from None
                time.sleep(REPLAY_RETRY_PAUSES_S[attempt])
    d = answer.dead_letter
    replayed = dead_letters_pb2.ReplayDeadLetterResponse
    if as_json:
        outcome = _enum_name(replayed.Outcome, answer.outcome, "OUTCOME_")
        fields = {"outcome": outcome, "idempotency_key": key, "dead_letter": _dead_letter_fields(service, d)}
        _echo(json.dumps(fields))
        return
    if answer.outcome == replayed.OUTCOME_APPLIED:
        console.print(f"replayed {d.id}: event {d.event_id} applied by {d.consumer}", markup=False)
    elif answer.outcome == replayed.OUTCOME_DUPLICATE:
        console.print(
            f"replayed {d.id}: {d.consumer} had applied event {d.event_id} already; nothing changed", markup=False
        )
    else:  # an outcome this CLI's protos do not know (a newer service) is no "applied already"
        outcome = _enum_name(replayed.Outcome, answer.outcome, "OUTCOME_")
        console.print(f"replayed {d.id}: event {d.event_id}, {d.consumer}: outcome {outcome}", markup=False)


@app.command("nats-drained")
def nats_drained(
    nats_url: Annotated[
        str,
        typer.Argument(
            help="the NATS the suite leaves, as the services' NATS_URL names it; from $NATS_URL when left out"
            " (as the nats CLI reads it: a URL with the operator's password stays out of the process list)",
            envvar="NATS_URL",
            show_envvar=False,
        ),
    ],
) -> None:
    """Whether the suite may leave this NATS for another: every suite stream there sealed, every
    durable on them with nothing pending, and the suite's own durables on each stream of theirs that
    holds events; exit 0 if so, 1 if not or if it cannot be read.

    See docs/sre.md, "Moving the suite to another NATS".
    """
    import asyncio

    from services.cli.drained import missing, problems, read_streams
    from services.common.bus import described

    try:
        states = asyncio.run(read_streams(nats_url, DEADLINE_S))
    except Exception as exc:  # noqa: BLE001 - unreachable, refused, not JetStream: said, exit 1
        err_console.print(f"[red]could not read the streams: {escape(described(exc))}[/red]", highlight=False)
        raise typer.Exit(1) from None
    table = _table("the suite's streams", "stream", "sealed", "messages", "durable", "not delivered", "not acked")
    for s in states:
        if not s.present:
            table.add_row(s.name, "-", "absent", "", "", "")
            continue
        rows = [(escape(d.name), str(d.not_delivered), str(d.not_acked)) for d in s.durables]
        rows += [(f"{name} (missing)", "-", "-") for name in missing(s)]  # the suite's own, not there
        for i, row in enumerate(rows or [("(none)", "", "")]):
            head = (s.name, "yes" if s.sealed else "no", str(s.messages)) if i == 0 else ("", "", "")
            table.add_row(*head, *row)
    _print_table(table)
    found = problems(states)
    for problem in found:
        console.print(f"[red]{escape(problem)}[/red]", highlight=False)
    if found:
        raise typer.Exit(1)
    console.print("drained: nothing more is stored here and every durable applied what it holds", highlight=False)


def main() -> None:
    """The commands, once services.cli.main (services/cli/__init__.py) has set up the process.

    No GRPC_ENABLE_FORK_SUPPORT: gRPC reads it when imported (too late here), and the CLI forks
    only in `run`, to exec nats-server and the services, and `run` makes no gRPC call.
    """
    try:
        app()
    except OSError as exc:
        # What a command could not write (`> report.txt` on a full disk, a closed terminal): one
        # line and exit 1, not typer's page of rich's internals. A closed pipe (`| head`) ends
        # quietly with STDOUT_CLOSED_EXIT (141); the commands' own files say what went wrong already.
        with contextlib.suppress(OSError, ValueError):
            # Its unwritten rest goes nowhere: Python's flush at exit would fail again, and say so.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        with contextlib.suppress(OSError):
            err_console.print(f"[red]could not finish: {escape(str(exc))}[/red]", highlight=False)
        raise SystemExit(1) from None
