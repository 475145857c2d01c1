"""`livegifts earnings` against the running suite: every bucket of a creator's diamonds.

It printed only available and lifetime: a creator at -8,000 available after a clawback, or with
diamonds in open withdrawals, could not be told from one whose diamonds were lost.
"""

from __future__ import annotations

import subprocess
import sys

from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import wallet_pb2
from tests.integration.conftest import Deployment
from tests.integration.helpers import buy_coins, eventually, gift_700_coins, signed_callback, uid


def _earnings(deployment: Deployment, creator: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "earnings", creator, "--payout-addr", deployment.payout_addr],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": ""},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return " ".join(out.stdout.split())


async def test_earnings_shows_what_a_clawback_took_and_that_withdrawals_are_held(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    viewer, creator = uid("viewer"), uid("creator")
    purchase = await buy_coins(clients.wallet, deployment.webhook_secret, viewer)
    await gift_700_coins(clients.gifting, viewer, creator)
    await eventually(
        lambda: clients.payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator)),
        lambda e: e.diamonds_lifetime == 350,
    )
    assert "350 diamonds available" in _earnings(deployment, creator)
    refunded = await clients.wallet.HandlePaymentEvent(
        signed_callback(deployment.webhook_secret, "charge.refunded", purchase)
    )
    assert refunded.purchase.status == wallet_pb2.PURCHASE_STATUS_REFUNDED
    await eventually(
        lambda: clients.payout.GetEarnings(payout_pb2.GetEarningsRequest(creator_id=creator)),
        lambda e: e.diamonds_clawed_back == 350,
    )
    shown = _earnings(deployment, creator)
    assert "0 diamonds available, 350 lifetime" in shown
    assert "held in open withdrawals 0, withdrawn 0, clawed back 350" in shown, shown
