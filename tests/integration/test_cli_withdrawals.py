"""`livegifts withdrawals` against the running suite: the review queue across creators (operator
token), or one creator's withdrawals (no token).

Operators had no command for it: docs/sre.md sent them to payout's database with SQL.
"""

from __future__ import annotations

import json
import subprocess
import sys

from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import wallet_pb2
from tests.integration.conftest import Deployment
from tests.integration.helpers import eventually, uid
from tests.integration.payout_calls import fund, verified_method, withdraw


def _withdrawals(deployment: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "withdrawals", *args, "--payout-addr", deployment.payout_addr],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "300", "PATH": "", "LIVEGIFTS_VAR_DIR": "/nonexistent-livegifts-var"},
    )


async def test_withdrawals_lists_the_review_queue_with_the_operator_token_and_a_creators_own_without(  # type: ignore[no-untyped-def]
    clients, deployment
) -> None:
    creator = uid("creator")
    await fund(clients, deployment, creator, 240_000)  # 120,000 diamonds = $600: reviewed
    method_id = await verified_method(clients, deployment, creator)
    waiting = await clients.payout.RequestWithdrawal(withdraw(creator, 120_000, method_id))

    queue = _withdrawals(deployment, f"--operator-token={deployment.operator_token}", "--limit=100000")
    assert queue.returncode == 0, queue.stdout + queue.stderr
    row = next(line for line in queue.stdout.splitlines() if waiting.withdrawal_id in line)
    assert creator in row and "PENDING_REVIEW" in row and "60000 USD" in row, row
    as_json = _withdrawals(deployment, f"--operator-token={deployment.operator_token}", "--limit=100000", "--json")
    assert as_json.returncode == 0, as_json.stdout + as_json.stderr
    (obj,) = [o for o in map(json.loads, as_json.stdout.splitlines()) if o["withdrawal_id"] == waiting.withdrawal_id]
    assert (obj["creator_id"], obj["status"], obj["hold"], obj["diamonds"]) == (creator, "PENDING_REVIEW", "", 120_000)
    assert obj["gross"] == {"amount_minor": 60_000, "currency_code": "USD"} and obj["method_id"] == method_id, obj
    # Held APPROVED ones are another status: this one is not among them.
    approved = _withdrawals(deployment, "--status=approved", f"--operator-token={deployment.operator_token}")
    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert waiting.withdrawal_id not in approved.stdout

    no_token = _withdrawals(deployment)  # no --operator-token, and no var/ to read one from
    assert no_token.returncode == 1 and "no operator token" in no_token.stderr, no_token
    wrong = _withdrawals(deployment, "--operator-token=not-the-token")
    assert wrong.returncode == 1 and "PERMISSION_DENIED" in wrong.stderr, wrong

    own = _withdrawals(deployment, creator)
    assert own.returncode == 0, own.stdout + own.stderr
    assert waiting.withdrawal_id in own.stdout
    none = _withdrawals(deployment, creator, "--status=PAID")
    assert (none.returncode, none.stdout.strip()) == (0, f"no withdrawals PAID for {creator}")
    typo = _withdrawals(deployment, "--status=WAITING")
    assert typo.returncode == 2 and "unknown status 'WAITING'" in typo.stderr, typo


async def test_withdrawals_shows_why_an_approved_withdrawal_is_held(clients, deployment) -> None:  # type: ignore[no-untyped-def]
    creator = uid("creator")
    await fund(clients, deployment, creator, 240_000)  # 120,000 diamonds = $600: reviewed
    method_id = await verified_method(clients, deployment, creator)
    waiting = await clients.payout.RequestWithdrawal(withdraw(creator, 120_000, method_id))
    await clients.wallet.SetAccountRestrictions(  # trust and safety blocks the creator meanwhile
        wallet_pb2.SetAccountRestrictionsRequest(user_id=creator, blocked=True, idempotency_key=uid("r")),
        metadata=deployment.operator_metadata,
    )
    await clients.payout.ApproveWithdrawal(
        payout_pb2.ApproveWithdrawalRequest(withdrawal_id=waiting.withdrawal_id, idempotency_key=uid("ap")),
        metadata=deployment.operator_metadata,
    )
    held = await eventually(  # the dispatcher asks the wallet, and holds it
        lambda: clients.payout.GetWithdrawal(payout_pb2.GetWithdrawalRequest(withdrawal_id=waiting.withdrawal_id)),
        lambda w: w.hold != payout_pb2.WITHDRAWAL_HOLD_UNSPECIFIED,
    )
    assert (held.status, held.hold) == (
        payout_pb2.WITHDRAWAL_STATUS_APPROVED,
        payout_pb2.WITHDRAWAL_HOLD_ACCOUNT_BLOCKED,
    )

    own = _withdrawals(deployment, creator)
    assert own.returncode == 0, own.stdout + own.stderr
    row = next(line for line in own.stdout.splitlines() if waiting.withdrawal_id in line)
    assert "APPROVED, held: ACCOUNT_BLOCKED" in row, row
