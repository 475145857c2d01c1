"""What gifts cost the log store, Prometheus and the trace store, at production volume.

At the peak a famous stream takes thousands of gifts a second (docs/sre.md "Capacity"): a log
line per gift at INFO is thousands of lines a second to ship, index and keep, and a metric label
or span name taken from a request (a user, creator, gift or stream id, a method or provider name
a caller made up, an error's text) is a new time series or span name per value, until Prometheus
runs out of memory. So, on the whole suite: gifts of every kind, refused ones included, write
(almost) no log line, and nothing a caller sends, valid or hostile, becomes a label value or a
span name.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from livegifts.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from livegifts.payout.v1 import payout_pb2, payout_pb2_grpc
from livegifts.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.cli.suite import READY_PREFIX, Suite
from tests.integration import conftest, pg
from tests.integration.helpers import buy_coins, eventually, live_stream, signed_callback, uid
from tests.support.ports import free_ports

SERVICES = ("wallet", "gifting", "payout")
VIEWERS = 8
GIFTS = 200  # SendGift calls in the measured window, beside the mixed calls below
MIXED = 100  # tips, SendGifts of 2, unlocks and refused gifts, a fifth of each
CONCURRENCY = 32
# At most one line per this many gifts, per service: the window's lines are then the background's
# (a pruner's round, a reconnect), not the gifts'. A line per gift, or per group-commit batch of a
# few, breaks it.
GIFTS_PER_LINE_MIN = 20


@dataclass
class Observed:
    """What one suite wrote while it took the gifts, and what it exported after hostile calls."""

    gifts: int = 0
    lines: dict[str, list[dict[str, object]]] = field(default_factory=dict)  # service -> the window's lines
    metrics: dict[str, str] = field(default_factory=dict)  # service -> /metrics text
    span_names: set[str] = field(default_factory=set)
    sent: set[str] = field(default_factory=set)  # every id and made-up name the callers sent


def _log_size(suite: Suite, svc: str) -> int:
    return (suite.log_dir / f"{svc}.log").stat().st_size


def _lines_since(suite: Suite, svc: str, offset: int) -> list[dict[str, object]]:
    with open(suite.log_dir / f"{svc}.log", "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    out: list[dict[str, object]] = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"level": "RAW", "msg": line[:200]})  # a library's own stderr: counted too
    return out


def _scrape(suite: Suite, svc: str) -> str:
    out = (suite.log_dir / f"{svc}.out").read_text()
    ready = json.loads(next(line for line in out.splitlines() if line.startswith(READY_PREFIX))[len(READY_PREFIX) :])
    with urllib.request.urlopen(f"http://127.0.0.1:{ready['metrics_port']}/metrics", timeout=10) as r:
        return str(r.read().decode())


async def _refused(call: object) -> None:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError:
        pass


async def _load(suite: Suite, seen: Observed) -> None:
    channels = [grpc.aio.insecure_channel(suite.addr(s)) for s in SERVICES]
    wallet = wallet_pb2_grpc.WalletServiceStub(channels[0])
    gifting = gifting_pb2_grpc.GiftingServiceStub(channels[1])
    payout = payout_pb2_grpc.PayoutServiceStub(channels[2])
    creator = uid("creator")
    viewers = [uid("viewer") for _ in range(VIEWERS)]
    seen.sent |= {creator, *viewers}
    try:
        for viewer in viewers:
            await buy_coins(wallet, conftest.WEBHOOK_SECRET, viewer)
        stream = await live_stream(gifting, creator)
        content = await gifting.CreateContent(
            gifting_pb2.CreateContentRequest(creator_id=creator, title="x", price_coins=2, idempotency_key=uid("k"))
        )
        seen.sent |= {stream.stream_id, content.content_id}

        def gift(sender: str, gift_id: str = "rose", stream_id: str = stream.stream_id) -> gifting_pb2.SendGiftRequest:
            return gifting_pb2.SendGiftRequest(
                stream_id=stream_id, sender_id=sender, gift_id=gift_id, quantity=1, idempotency_key=uid("g")
            )

        async def credited(coins: int) -> None:
            earnings = await eventually(
                lambda: payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator)),
                lambda e: e.coins_received >= coins,
                90,
            )
            assert earnings.coins_received == coins
            board = await eventually(
                lambda: gifting.GetLeaderboard(gifting_pb2.GetLeaderboardRequest(stream_id=stream.stream_id)),
                lambda b: b.coins_total >= coins - unlocked,
                90,
            )
            assert board.coins_total == coins - unlocked  # an unlock is no gift on the stream's board

        unlocked = 0
        # Warm-up: the first calls' lines (a connection, a statement prepared) are not the gifts'.
        await asyncio.gather(*(gifting.SendGift(gift(v)) for v in viewers))
        await credited(VIEWERS)
        await asyncio.sleep(1.0)
        offsets = {svc: _log_size(suite, svc) for svc in SERVICES}

        gate = asyncio.Semaphore(CONCURRENCY)
        receipts: list[str] = []
        unlocks: set[str] = set()  # one per viewer: a second unlock is answered by the first, no coins

        async def send(i: int) -> None:
            async with gate:
                receipts.append((await gifting.SendGift(gift(viewers[i % VIEWERS]))).gift_event_id)

        async def mixed(i: int) -> None:
            viewer = viewers[i % VIEWERS]
            async with gate:
                kind = i % 5
                if kind == 0:
                    tip = gifting_pb2.SendTipRequest(
                        stream_id=stream.stream_id, sender_id=viewer, coins=1, message="gg", idempotency_key=uid("t")
                    )
                    receipts.append((await gifting.SendTip(tip)).gift_event_id)
                elif kind == 1:
                    many = await gifting.SendGifts(gifting_pb2.SendGiftsRequest(gifts=[gift(viewer), gift(viewer)]))
                    receipts.extend(r.receipt.gift_event_id for r in many.results)
                elif kind == 2:
                    unlock = gifting_pb2.UnlockContentRequest(
                        user_id=viewer, content_id=content.content_id, idempotency_key=uid("u")
                    )
                    unlocks.add((await gifting.UnlockContent(unlock)).gift_event_id)
                elif kind == 3:  # refused by the wallet: a sender with no coins
                    await _refused(gifting.SendGift(gift(uid("poor"))))
                else:  # refused by gifting: a gift the catalog does not have
                    await _refused(gifting.SendGift(gift(viewer, gift_id=uid("no-such-gift"))))

        await asyncio.gather(*(send(i) for i in range(GIFTS)), *(mixed(i) for i in range(MIXED)))
        unlocked = 2 * len(unlocks)  # of 2 coins each
        seen.gifts = GIFTS + MIXED
        seen.sent |= {*receipts, *unlocks}
        await credited(VIEWERS + GIFTS + (MIXED // 5) * (1 + 2) + unlocked)
        await asyncio.sleep(1.0)  # what the last events' consumers log after their commits
        seen.lines = {svc: _lines_since(suite, svc, offsets[svc]) for svc in SERVICES}

        await _hostile(wallet, gifting, payout, channels, stream.stream_id, seen)
        seen.metrics = {svc: _scrape(suite, svc) for svc in SERVICES}
    finally:
        await asyncio.gather(*(c.close() for c in channels))


async def _hostile(
    wallet: wallet_pb2_grpc.WalletServiceStub,
    gifting: gifting_pb2_grpc.GiftingServiceStub,
    payout: payout_pb2_grpc.PayoutServiceStub,
    channels: list[grpc.aio.Channel],
    stream_id: str,
    seen: Observed,
) -> None:
    """Calls a prober or a broken client makes: every free-form field and name made up."""
    made_up = [uid("hostile") for _ in range(12)]
    seen.sent |= set(made_up)
    a, b, c, d, e, f, g, h, i, j, k, m = made_up
    operator = (("authorization", f"Bearer {a}"), ("x-operator", b), ("user-agent", c))
    calls = [
        gifting.SendGift(
            gifting_pb2.SendGiftRequest(stream_id=d, sender_id=e, gift_id="rose", quantity=1, idempotency_key=f)
        ),
        gifting.SendGift(
            gifting_pb2.SendGiftRequest(stream_id=stream_id, sender_id=e, gift_id=g, quantity=1, idempotency_key=f)
        ),
        wallet.CreatePurchase(
            wallet_pb2.CreatePurchaseRequest(
                user_id=e, package_id=h, currency_code="XQZ", payment_method=1, idempotency_key=i
            )
        ),
        wallet.HandlePaymentEvent(
            wallet_pb2.HandlePaymentEventRequest(provider=j, payload=b"{}", signature="t=1,v1=00")
        ),
        wallet.HandlePaymentEvent(
            signed_callback("not-the-secret", "payment.succeeded", wallet_pb2.Purchase(purchase_id=k))
        ),
        payout.HandlePayoutEvent(payout_pb2.HandlePayoutEventRequest(provider=j, payload=b"{}", signature="x")),
        payout.SetPolicy(payout_pb2.SetPolicyRequest(), metadata=operator),
        wallet.UpsertCoinPackage(wallet_pb2.UpsertCoinPackageRequest(package_id=h), metadata=operator),
    ]
    for channel, service in zip(
        channels, ("wallet.v1.WalletService", "gifting.v1.GiftingService", "payout.v1.PayoutService"), strict=True
    ):
        for method in (f"/livegifts.{service}/{m}", f"/{m}.v1.Probe/{m}", f"/livegifts.{service}/{m}/{m}"):
            calls.append(channel.unary_unary(method)(m.encode(), metadata=operator, timeout=5))
    await asyncio.gather(*(_refused(call) for call in calls))


@pytest.fixture(scope="module", params=conftest.BACKENDS)
def observed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    """One suite (its /metrics served, its spans in files) after the gifts and the hostile calls."""
    var_dir = tmp_path_factory.mktemp(f"volume-{request.param}")
    databases: contextlib.AbstractContextManager[dict[str, str]] = (
        pg.service_databases("lgvolume") if request.param == "postgres" else contextlib.nullcontext({})
    )
    seen = Observed()
    with databases as urls:
        config = conftest.suite_config(var_dir, urls)
        # 0 would turn /metrics off; each apart from the others and from NATS's port.
        *metrics, config.nats_port = free_ports(len(config.metrics_ports) + 1)
        config.metrics_ports = dict(zip(config.metrics_ports, metrics, strict=True))
        suite = Suite(config)
        try:
            suite.start()
            asyncio.run(_load(suite, seen))
        finally:
            suite.stop()
    # After the stop: each service's span processor flushed what it held.
    for svc in SERVICES:
        path = var_dir / f"{svc}.spans.jsonl"
        if path.exists():
            seen.span_names |= {json.loads(line)["name"] for line in path.read_text().splitlines() if line.strip()}
    yield seen


def test_gifts_of_every_kind_write_almost_no_log_line_at_info(observed: Observed) -> None:
    gifts = observed.gifts
    for svc, lines in observed.lines.items():
        written = len(lines)
        by_message = collections.Counter((line.get("level"), line.get("msg")) for line in lines).most_common(10)
        assert written * GIFTS_PER_LINE_MIN <= gifts, f"{svc} wrote {written} lines for {gifts} gifts: {by_message}"


def test_nothing_a_caller_sends_becomes_a_metric_label_value(observed: Observed) -> None:
    leaked = [
        f"{svc}: {sample.name}{sample.labels}"
        for svc, text in observed.metrics.items()
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        for value in sample.labels.values()
        if any(sent in value for sent in observed.sent)
    ]
    assert not leaked, f"label values taken from requests (a new series per value): {leaked[:10]}"
    methods = {
        sample.labels["method"]
        for text in observed.metrics.values()
        for family in text_string_to_metric_families(text)
        if family.name == "livegifts_rpc_seconds"
        for sample in family.samples
    }
    assert methods and all(m.startswith(("/livegifts.", "/grpc.health.v1.")) for m in methods), methods


def test_nothing_a_caller_sends_becomes_a_span_name(observed: Observed) -> None:
    assert observed.span_names, "no span recorded: the suite's file exporter wrote nothing"
    named = sorted(name for name in observed.span_names if any(sent in name for sent in observed.sent))
    assert not named, f"span names carrying ids or made-up names (one per value in the trace store): {named[:10]}"
