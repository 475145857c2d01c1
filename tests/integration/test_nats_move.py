"""The suite moved to another NATS deployment (a new JetStream cluster): NATS_URL changed on all
three services.

The databases are the source of truth, but a producer's outbox row is deleted at its PubAck: an
event published to the old NATS and not yet applied by its consumers lives only there. Services
rolled onto the new URL bind new durables on the new streams and never read the old ones again.
These drills run the suite on SQLite with two real nats-servers: the naive roll loses the gifts
published to the old NATS after their consumer left it, and nothing but the audit says so; the
runbook's procedure (docs/sre.md, "Moving the suite to another NATS": seal the old streams, wait
for `livegifts nats-drained`, then roll) credits every gift once and passes the audit.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import nats
from nats.js.api import StreamConfig

from services.cli.suite import Suite
from services.common.bus import STREAMS
from services.common.consumers import PAYOUT_GIFT_SENT
from tests.integration.auditing import audit_cli
from tests.integration.conftest import running_suite
from tests.integration.helpers import BEHIND, counted, earned, gifts_to, log_since, uid
from tests.support.nats import nats_drained, nats_server


def _folder(path: Path) -> Path:
    """`path`, made: the new NATS's configuration and store."""
    path.mkdir()
    return path


def _roll(suite: Suite, services: tuple[str, ...], nats_url: str) -> None:
    """Roll `services` onto the NATS at `nats_url`: each stopped (SIGTERM) and started on it."""
    suite.config.external_nats_url = nats_url
    for svc in services:
        suite.kill(svc, signal.SIGTERM)
        suite.restart(svc)


async def _seal(nats_url: str) -> None:
    """`nats stream seal <stream>` for each of the suite's streams, as the runbook has the operator do."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for name in STREAMS:
            config: StreamConfig = (await js.stream_info(name)).config
            config.sealed = True
            await js.update_stream(config)
    finally:
        await nc.drain()


async def _remove_durable(nats_url: str, stream: str, durable: str) -> None:
    """`nats consumer rm <stream> <durable>`."""
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().delete_consumer(stream, durable)
    finally:
        await nc.drain()


def test_a_naive_roll_to_another_nats_loses_what_was_unread_only_the_audit_says_so_a_pod_on_the_sealed_old_drains_it(
    tmp_path: Path,
) -> None:
    with nats_server(_folder(tmp_path / "new")) as new_url, running_suite("sqlite", tmp_path, "lgtest") as suite:
        old_url = suite.config.nats_url
        viewer, before, during = uid("viewer"), [uid("creator")], [uid("creator")]
        asyncio.run(gifts_to(suite, viewer, before))
        assert asyncio.run(earned(suite, before)) == [350]
        offset = len(log_since(suite, "payout", 0))

        # The roll reaches payout first: gifts sent meanwhile go to the old NATS (wallet and gifting
        # are still there), where payout's old durable no longer reads.
        _roll(suite, ("payout",), new_url)
        asyncio.run(gifts_to(suite, viewer, during))
        assert asyncio.run(counted(suite, during[0])) == 700  # gifting, still on the old NATS, counted them
        _roll(suite, ("wallet", "gifting"), new_url)

        # Lost: payout never credits them; the old durable still holds them, pending.
        assert asyncio.run(earned(suite, during, timeout_s=3)) == [0]
        # Nothing in the services notices: the position check of the new durable (nothing delivered
        # yet) finds nothing behind. The audit does, once its wait runs out.
        assert BEHIND not in log_since(suite, "payout", offset)
        failed = audit_cli(suite, "--detail", "--wait", "2")
        assert failed.returncode == 1 and "not yet credited 2" in failed.stdout, failed.stdout
        # The check the runbook has the SRE run before a roll says the old NATS was not drained:
        # the old durable still holds them.
        check = nats_drained(old_url)
        assert check.returncode == 1, check.stdout + check.stderr
        assert f"durable {PAYOUT_GIFT_SENT} on GIFTING has 2 events not yet delivered" in check.stdout, check.stdout
        assert "stream GIFTING is not sealed" in check.stdout, check.stdout

        # The runbook's repair, while the old NATS still runs: its streams sealed, a payout pod on the
        # old URL drains them (its relay stores nothing there: the pods on the new NATS send its rows).
        asyncio.run(_seal(old_url))
        suite.config.external_nats_url = old_url
        suite.start_service("payout", "payout-old")
        suite.config.external_nats_url = new_url
        assert asyncio.run(earned(suite, before + during)) == [350, 350]
        check = nats_drained(old_url)
        assert check.returncode == 0, check.stdout + check.stderr
        suite.kill("payout-old", signal.SIGTERM)
        ok = audit_cli(suite, "--detail", "--wait", "30")
        assert ok.returncode == 0, ok.stdout + ok.stderr


def test_the_runbooks_move_to_another_nats_seals_drains_and_rolls_and_credits_every_gift_once(tmp_path: Path) -> None:
    with nats_server(_folder(tmp_path / "new")) as new_url, running_suite("sqlite", tmp_path, "lgtest") as suite:
        old_url = suite.config.nats_url
        viewer = uid("viewer")
        before, pending, sealed = [uid("creator")], [uid("creator")], [uid("creator")]
        asyncio.run(gifts_to(suite, viewer, before))
        # Payout lags (down here): gifts wait for it in the old NATS, on its durable.
        suite.kill("payout", signal.SIGTERM)
        asyncio.run(gifts_to(suite, viewer, pending))

        # 1. Seal the suite's streams on the old NATS: calls go on, their events wait in the outboxes.
        asyncio.run(_seal(old_url))
        asyncio.run(gifts_to(suite, viewer, sealed))
        check = nats_drained(old_url)
        assert check.returncode == 1, check.stdout + check.stderr
        assert f"durable {PAYOUT_GIFT_SENT} on GIFTING has 2 events not yet delivered" in check.stdout, check.stdout
        assert "is not sealed" not in check.stdout, check.stdout
        # Its durable removed there (`nats consumer rm`) holds the move up as much: what it would
        # have applied cannot be known to be applied.
        asyncio.run(_remove_durable(old_url, "GIFTING", PAYOUT_GIFT_SENT))
        check = nats_drained(old_url)
        assert check.returncode == 1, check.stdout + check.stderr
        assert f"durable {PAYOUT_GIFT_SENT} is missing on GIFTING" in check.stdout, check.stdout

        # 2. The consumers, still on the old NATS, apply what it holds; the check then passes.
        # Payout makes its durable again from the start of the stream; the inbox skips the gifts
        # it credited already (each is credited once).
        suite.restart("payout")
        assert asyncio.run(earned(suite, before + pending)) == [350, 350]
        assert asyncio.run(counted(suite, pending[0])) == 700
        check = nats_drained(old_url)
        assert check.returncode == 0, check.stdout + check.stderr
        assert asyncio.run(earned(suite, sealed, timeout_s=1)) == [0]  # still in gifting's outbox

        # 3. Roll the services onto the new NATS, in any order: the outboxes go there.
        _roll(suite, ("payout", "gifting", "wallet"), new_url)
        assert asyncio.run(earned(suite, before + pending + sealed)) == [350, 350, 350]
        assert asyncio.run(counted(suite, sealed[0])) == 700
        ok = audit_cli(suite, "--detail", "--wait", "30")
        assert ok.returncode == 0, ok.stdout + ok.stderr
