"""The suite on a NATS with the manifests' users and permissions (deploy/k8s/nats/auth.conf, which
both overlays' nats.conf include): the very file, with test passwords in the environment variables
it reads, as the NATS StatefulSet gives them from its Secrets.

Each service connects as its own user and a gift goes end to end to the creator's diamonds, the
leaderboard counts it, its purchase's chargeback claws them back, and the operators' `livegifts
nats-drained` reads the streams: a grant missing for something the code does fails here (the
event never arrives, or the server's "Permissions Violation" reaches a service's log). Then each
user is refused what it must not do, by the server, and the streams and durables are untouched:
a grant too wide fails here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
import pytest
from nats.aio.client import Client

from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2_grpc
from services.cli.suite import Suite, _wait_port, free_port
from services.common.bus import Bus
from services.common.config import ServiceSettings
from services.common.consumers import GIFTING_LEADERBOARDS, PAYOUT_GIFT_SENT, PAYOUT_PURCHASE_REVERSED
from tests.integration.conftest import WEBHOOK_SECRET, running_suite
from tests.integration.helpers import counted, earned, eventually, gifts_to, signed_callback, uid
from tests.support.nats import nats_conf, nats_drained, start_nats, stop_nats

AUTH_CONF = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "nats" / "auth.conf"
USERS = ("wallet", "gifting", "payout", "operator")
VIOLATION = "permissions violation"
REFUSAL_WAIT_S = 5.0


@dataclass
class SecuredNats:
    """A nats-server of the test's own under auth.conf, and each user's password."""

    port: int
    passwords: dict[str, str]
    log: Path

    def url(self, user: str, password: str | None = None) -> str:
        return f"nats://{user}:{password or self.passwords[user]}@127.0.0.1:{self.port}"


@dataclass
class Secured:
    suite: Suite
    nats: SecuredNats
    creator: str


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """NATS under auth.conf and the suite (SQLite) on it, each service as its own user; a gift sent,
    credited, counted and charged back, and another after gifting and payout restarted."""
    var_dir = tmp_path_factory.mktemp("nats-auth")
    conf_dir = var_dir / "nats-conf"
    conf_dir.mkdir()
    shutil.copy(AUTH_CONF, conf_dir / "auth.conf")
    (conf_dir / "nats.conf").write_text(nats_conf(var_dir / "js") + "include ./auth.conf\n")
    passwords = {u: secrets.token_hex(16) for u in USERS}
    port = free_port()
    log = var_dir / "nats-auth.log"
    server = start_nats(
        conf_dir / "nats.conf", port, log, env={f"NATS_{u.upper()}_PASSWORD": pw for u, pw in passwords.items()}
    )
    try:
        _wait_port(port, 20, server, f"nats-server ({log})")
        secured_nats = SecuredNats(port, passwords, log)
        extra = {s: {f"LIVEGIFTS_{s.upper()}_NATS_URL": secured_nats.url(s)} for s in ("wallet", "gifting", "payout")}
        with running_suite("sqlite", var_dir / "suite", "lgnatsauth", extra) as suite:
            creator = uid("creator")
            asyncio.run(_gift_credit_and_claw_back(suite, creator))
            yield Secured(suite, secured_nats, creator)
    finally:
        stop_nats(server)


async def _gift_credit_and_claw_back(suite: Suite, creator: str) -> None:
    viewer = uid("viewer")
    # GIFTING -> payout-gift-sent (diamonds) and gifting-leaderboards (the board).
    (purchase,) = await gifts_to(suite, viewer, [creator])
    assert await earned(suite, [creator]) == [350]
    assert await counted(suite, creator) == 700
    # WALLET -> payout-purchase-reversed: the chargeback claws the diamonds back.
    async with grpc.aio.insecure_channel(suite.addr("wallet")) as ch:
        wallet = wallet_pb2_grpc.WalletServiceStub(ch)
        await wallet.HandlePaymentEvent(signed_callback(WEBHOOK_SECRET, "charge.dispute.lost", purchase))
    async with grpc.aio.insecure_channel(suite.addr("payout")) as ch:
        payout = payout_pb2_grpc.PayoutServiceStub(ch)
        earnings = await eventually(
            lambda: payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator)),
            lambda e: e.diamonds_clawed_back > 0,
        )
    assert earnings.diamonds_clawed_back == 350
    # Bound again over what they acked: the consumers' position check reads the stream's events.
    for svc in ("gifting", "payout"):
        suite.kill(svc, signal.SIGTERM)
        suite.restart(svc)
    again = uid("creator")
    await gifts_to(suite, uid("viewer"), [again])  # the first viewer owes the chargeback
    assert await earned(suite, [again]) == [350]
    assert await counted(suite, again) == 700


def test_the_suite_and_the_operators_tool_work_as_the_manifests_users(secured: Secured) -> None:
    # The fixture's gift, credit, count and clawback went through; the services met no refusal.
    for log in sorted(secured.suite.log_dir.iterdir()):
        assert VIOLATION not in log.read_text(errors="replace").lower(), log

    drained = nats_drained(secured.nats.url("operator"))
    assert drained.returncode == 1, drained  # the streams are not sealed: read, and said so
    assert "could not read" not in drained.stderr, drained.stderr
    assert "stream GIFTING is not sealed" in drained.stdout, drained.stdout
    for durable in (GIFTING_LEADERBOARDS, PAYOUT_GIFT_SENT, PAYOUT_PURCHASE_REVERSED):
        assert durable in drained.stdout and f"{durable} (missing)" not in drained.stdout, drained.stdout

    wrong = nats_drained(secured.nats.url("operator", "not-" + secured.nats.passwords["operator"]))
    assert wrong.returncode == 1 and "could not read the streams" in wrong.stderr, wrong
    # Nobody logs a password: the services (their URLs carry theirs), NATS, the CLI's refusal.
    logs = [p.read_text(errors="replace") for p in sorted(secured.suite.log_dir.iterdir())]
    logs += [secured.nats.log.read_text(errors="replace"), drained.stdout + drained.stderr, wrong.stdout + wrong.stderr]
    for password in [*secured.nats.passwords.values(), "not-" + secured.nats.passwords["operator"]]:
        assert not any(password in text for text in logs)


# What each user must not do, each a subject the server must refuse it: forge another service's
# events (a gift payout turns into diamonds), purge or delete a stream, delete another's durable,
# ack another's deliveries, make a consumer of its own.
REFUSED: dict[str, tuple[str, ...]] = {
    "wallet": (
        "gifting.gift.sent",
        "payout.earnings.credited",
        "$JS.API.STREAM.PURGE.WALLET",
        "$JS.API.STREAM.DELETE.WALLET",
        "$JS.API.STREAM.MSG.DELETE.WALLET",
        "$JS.API.STREAM.UPDATE.GIFTING",
        f"$JS.API.CONSUMER.DELETE.GIFTING.{PAYOUT_GIFT_SENT}",
        "$JS.API.CONSUMER.CREATE.GIFTING.wallet-reads-gifts.gifting.gift.sent",
    ),
    "gifting": (
        "wallet.purchase.reversed",
        "payout.earnings.credited",
        "$JS.API.STREAM.PURGE.GIFTING",
        "$JS.API.STREAM.DELETE.GIFTING",
        "$JS.API.STREAM.UPDATE.WALLET",
        f"$JS.API.CONSUMER.DELETE.GIFTING.{PAYOUT_GIFT_SENT}",
        f"$JS.API.CONSUMER.DELETE.GIFTING.{GIFTING_LEADERBOARDS}",
        f"$JS.API.CONSUMER.MSG.NEXT.GIFTING.{PAYOUT_GIFT_SENT}",
        f"$JS.ACK.GIFTING.{PAYOUT_GIFT_SENT}.1.1.1.1.0",
    ),
    "payout": (
        "gifting.gift.sent",
        "wallet.purchase.completed",
        "$JS.API.STREAM.PURGE.GIFTING",
        "$JS.API.STREAM.PURGE.PAYOUT",
        "$JS.API.STREAM.DELETE.GIFTING",
        "$JS.API.STREAM.MSG.DELETE.GIFTING",
        f"$JS.API.CONSUMER.DELETE.GIFTING.{GIFTING_LEADERBOARDS}",
        f"$JS.API.CONSUMER.DELETE.GIFTING.{PAYOUT_GIFT_SENT}",
        f"$JS.ACK.GIFTING.{GIFTING_LEADERBOARDS}.1.1.1.1.0",
    ),
    "operator": (
        "gifting.gift.sent",
        "wallet.purchase.reversed",
        "$JS.API.STREAM.PURGE.GIFTING",
        "$JS.API.STREAM.MSG.DELETE.GIFTING",
        "$JS.API.CONSUMER.CREATE.GIFTING.mine.gifting.gift.sent",
        f"$JS.ACK.GIFTING.{PAYOUT_GIFT_SENT}.1.1.1.1.0",
    ),
}
# What a user must not read: another's deliveries' subjects, or events it does not consume.
NOT_SUBSCRIBED: dict[str, tuple[str, ...]] = {
    # Another service's inboxes: its pulled deliveries and its API answers.
    "wallet": (
        "gifting.gift.sent",
        "$JS.EVENT.ADVISORY.CONSUMER.DELETED.GIFTING.payout-gift-sent",
        "_INBOX.livegifts-payout.>",
    ),
    "gifting": ("wallet.>", "payout.>", "_INBOX.>"),
    "payout": ("gifting.gift.sent", ">", "_INBOX.livegifts-gifting.>"),
    "operator": ("gifting.>",),
}


async def _state(url: str) -> dict[str, tuple[int, tuple[str, ...]]]:
    """Each suite stream's message count and durables, as the operator reads them."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        out = {}
        for stream in ("WALLET", "GIFTING", "PAYOUT"):
            info = await js.stream_info(stream)
            out[stream] = (info.state.messages, tuple(sorted(c.name for c in await js.consumers_info(stream))))
        return out
    finally:
        await nc.close()


async def _refused(nc: Client, errors: list[str], what: str, subject: str) -> None:
    """`what` ("Publish", "Subscription") of `subject` answered by the server's permissions violation."""
    needle = f'{VIOLATION} for {what.lower()} to "{subject.lower()}"'
    deadline = time.monotonic() + REFUSAL_WAIT_S
    while not any(needle in e for e in errors):
        assert time.monotonic() < deadline, f"{what} to {subject!r} was not refused; errors: {errors}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("user", USERS)
async def test_each_user_is_refused_what_it_must_not_do(secured: Secured, user: str) -> None:
    before = await _state(secured.nats.url("operator"))
    assert before["GIFTING"][0] > 0 and PAYOUT_GIFT_SENT in before["GIFTING"][1], before
    errors: list[str] = []

    async def collect(exc: Exception) -> None:
        errors.append(str(exc).lower())

    nc = await nats.connect(secured.nats.url(user), error_cb=collect, allow_reconnect=False, name="refusal-probe")
    try:
        for subject in REFUSED[user]:
            await nc.publish(subject, b"{}", reply=nc.new_inbox())
            await nc.flush()
            await _refused(nc, errors, "Publish", subject)
        for subject in NOT_SUBSCRIBED[user]:
            await nc.subscribe(subject)
            await nc.flush()
            await _refused(nc, errors, "Subscription", subject)
        assert nc.is_connected  # refused, not disconnected: a service goes on with what it may do
    finally:
        await nc.close()
    # Nothing forged, purged or deleted got through.
    assert await _state(secured.nats.url("operator")) == before


async def test_the_operator_may_do_the_runbooks_writes(secured: Secured) -> None:
    # docs/sre.md's runbooks: `nats stream seal` (moving to another NATS), `nats consumer rm`
    # (restoring a database), `nats stream rm` (an old NATS once drained). Last in this module:
    # it leaves PAYOUT gone and a durable removed (payout makes both again as it needs them).
    nc = await nats.connect(secured.nats.url("operator"))
    try:
        js = nc.jetstream(timeout=5)
        config = (await js.stream_info("PAYOUT")).config
        config.sealed = True
        assert (await js.update_stream(config)).config.sealed
        assert await js.delete_consumer("WALLET", PAYOUT_PURCHASE_REVERSED)
        assert await js.delete_stream("PAYOUT")
    finally:
        await nc.close()


async def test_a_service_with_a_wrong_nats_password_says_so_without_the_password(
    secured: Secured, caplog: pytest.LogCaptureFixture
) -> None:
    # As after a rotation that reached NATS and not yet the service (docs/sre.md, "Rotating").
    wrong = "not-" + secured.nats.passwords["wallet"]
    settings = ServiceSettings(database_url="sqlite+aiosqlite:///unused.db", nats_url=secured.nats.url("wallet", wrong))  # type: ignore[call-arg]
    bus = Bus(settings, "wallet")
    caplog.set_level(logging.INFO, logger="services.common.bus")
    connecting = asyncio.create_task(bus.connect(asyncio.Event(), ["WALLET"]))
    try:
        deadline = time.monotonic() + 10
        while not any("authorization violation" in str(r.__dict__).lower() for r in caplog.records):
            assert time.monotonic() < deadline, caplog.text
            await asyncio.sleep(0.05)
    finally:
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await connecting
        await bus.close()
    assert not bus.connected.is_set()
    assert not any(wrong in str(r.__dict__) for r in caplog.records)
