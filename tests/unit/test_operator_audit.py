"""Who may change a user's safety state or a withdrawal's fate, and the trail each change leaves.

Trust and safety found that `SetAccountRestrictions` logged nothing: no one could tell who had
blocked, unblocked or aged a user (it needs no operator token: the contract lists it among the
RPCs internal services call; a token sent is checked and names who). Finance found that approving or
rejecting a withdrawal left no log line with the operator and the trace id.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from livegifts.payout.v1 import payout_pb2
from livegifts.wallet.v1 import wallet_pb2
from services.common import errors
from services.common.auth import OperatorAuth
from services.payout.server import PayoutServicer
from services.payout.usecases import Payout
from services.wallet.server import WalletServicer
from services.wallet.usecases import Wallet
from tests.support.payout import reviewed_withdrawal

TOKEN = "t0k-t0k-t0k-t0k-t0k"


class Ctx:
    def __init__(self, *md: tuple[str, str]) -> None:
        self.md = md

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.md


OPERATOR = Ctx(("authorization", f"Bearer {TOKEN}"), ("x-operator", "tns-alice"))


def restrict(user: str, **fields: object) -> wallet_pb2.SetAccountRestrictionsRequest:
    return wallet_pb2.SetAccountRestrictionsRequest(user_id=user, idempotency_key=uuid.uuid4().hex, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("blocked", [True, False])
async def test_a_block_or_unblock_with_a_wrong_token_is_refused_and_one_without_is_the_contracts(
    wallet: Wallet,
    blocked: bool,
) -> None:
    # SetAccountRestrictions is not an operator RPC in ARCHITECTURE.md: internal callers block
    # without a token. A token that is sent is checked, so a wrong one never passes as no one's.
    servicer = WalletServicer(wallet, OperatorAuth(SecretStr(TOKEN)))
    await servicer.SetAccountRestrictions(restrict("u1", blocked=not blocked), OPERATOR)
    with pytest.raises(errors.PermissionDenied) as wrong:
        await servicer.SetAccountRestrictions(restrict("u1", blocked=blocked), Ctx(("authorization", "Bearer nope")))
    assert wrong.value.reason == "NOT_AN_OPERATOR"
    assert (await wallet.get_restrictions("u1")).blocked is (not blocked)  # the refused call changed nothing
    assert (await servicer.SetAccountRestrictions(restrict("u1", blocked=blocked), Ctx())).blocked is blocked


async def test_the_identity_service_records_an_age_without_the_token_but_a_wrong_token_is_refused(
    wallet: Wallet,
) -> None:
    servicer = WalletServicer(wallet, OperatorAuth(SecretStr(TOKEN)))
    assert (await servicer.SetAccountRestrictions(restrict("teen", is_minor=True), Ctx())).is_minor
    with pytest.raises(errors.PermissionDenied):  # a token sent is checked, never ignored
        await servicer.SetAccountRestrictions(restrict("teen", is_minor=False), Ctx(("authorization", "Bearer nope")))
    assert (await wallet.get_restrictions("teen")).is_minor


async def test_every_restriction_change_is_logged_once_with_who_made_it_and_no_birth_date(
    wallet: Wallet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    servicer = WalletServicer(wallet, OperatorAuth(SecretStr(TOKEN)))
    block = restrict("u2", blocked=True)
    with caplog.at_level("INFO", logger="services.wallet.usecases"):
        await servicer.SetAccountRestrictions(block, OPERATOR)
        await servicer.SetAccountRestrictions(block, OPERATOR)  # a retry: answered from its record, not logged
        await servicer.SetAccountRestrictions(restrict("u2", blocked=False), OPERATOR)
        await servicer.SetAccountRestrictions(restrict("u2", birth_date="2001-02-03"), Ctx())
    logged = [r.__dict__ for r in caplog.records if r.getMessage() == "account restrictions set"]
    assert [(r["operator"], r["user_id"], r.get("blocked"), r.get("birth_date_set")) for r in logged] == [
        ("tns-alice", "u2", True, None),
        ("tns-alice", "u2", False, None),
        ("", "u2", None, True),  # the identity service: no operator
    ]
    assert "2001-02-03" not in caplog.text  # personal data stays in the users row


async def test_approving_and_rejecting_a_withdrawal_are_logged_with_the_operator(  # type: ignore[no-untyped-def]
    setup,
    caplog: pytest.LogCaptureFixture,
) -> None:
    payout: Payout = setup[0]
    approved = await reviewed_withdrawal(payout, "creator-a")
    rejected = await reviewed_withdrawal(payout, "creator-b")
    with caplog.at_level("INFO", logger="services.payout.usecases"):
        await payout.approve_withdrawal(
            payout_pb2.ApproveWithdrawalRequest(withdrawal_id=approved.withdrawal_id, idempotency_key="a"), "fin-bob"
        )
        await payout.reject_withdrawal(
            payout_pb2.RejectWithdrawalRequest(withdrawal_id=rejected.withdrawal_id, idempotency_key="r"), "fin-eve"
        )
    logged = [
        (r.getMessage(), r.__dict__["operator"], r.__dict__["withdrawal_id"])
        for r in caplog.records
        if "by an operator" in r.getMessage()
    ]
    assert logged == [
        ("withdrawal approved by an operator", "fin-bob", approved.withdrawal_id),
        ("withdrawal rejected by an operator", "fin-eve", rejected.withdrawal_id),
    ]


async def test_an_operators_name_is_read_only_with_the_operator_token(  # type: ignore[no-untyped-def]
    setup,
) -> None:
    # A withdrawal's reviewed_by and the policy's changed_by hold the x-operator header (a
    # person's login or e-mail), and GetWithdrawal, a creator's ListWithdrawals and GetPolicy
    # need no token: a creator learned by name who rejected their payout, and any client who
    # last changed the policy. Operators still read the name; the row and the log keep it.
    payout: Payout = setup[0]
    servicer = PayoutServicer(payout, OperatorAuth(SecretStr(TOKEN)))
    op = Ctx(("authorization", f"Bearer {TOKEN}"), ("x-operator", "fin-bob@corp.example"))
    wd = await reviewed_withdrawal(payout, "creator-r")
    reject = payout_pb2.RejectWithdrawalRequest(withdrawal_id=wd.withdrawal_id, reason="docs", idempotency_key="r")
    assert (await servicer.RejectWithdrawal(reject, op)).reviewed_by == "fin-bob@corp.example"
    get = payout_pb2.GetWithdrawalRequest(withdrawal_id=wd.withdrawal_id)
    mine = payout_pb2.ListWithdrawalsRequest(creator_id="creator-r")
    # A client's own bearer token (a gateway forwarding the user's) is no operator's, and no refusal.
    for caller in (Ctx(), Ctx(("authorization", "Bearer the-creators-own-jwt"))):
        assert (await servicer.GetWithdrawal(get, caller)).reviewed_by == "operator"
        assert [w.reviewed_by for w in (await servicer.ListWithdrawals(mine, caller)).withdrawals] == ["operator"]
    assert (await servicer.GetWithdrawal(get, op)).reviewed_by == "fin-bob@corp.example"
    assert [w.reviewed_by for w in (await servicer.ListWithdrawals(mine, op)).withdrawals] == ["fin-bob@corp.example"]
    queue = payout_pb2.ListWithdrawalsRequest(status=payout_pb2.WITHDRAWAL_STATUS_REJECTED)
    assert [w.reviewed_by for w in (await servicer.ListWithdrawals(queue, op)).withdrawals] == ["fin-bob@corp.example"]

    assert (await servicer.GetPolicy(payout_pb2.GetPolicyRequest(), Ctx())).changed_by == "migration"  # no person
    policy = await payout.get_policy()
    change = payout_pb2.SetPolicyRequest(
        creator_share_bp=policy.creator_share_bp,
        fee_bp=policy.fee_bp,
        currencies=policy.currencies,
        idempotency_key="p",
    )
    assert (await servicer.SetPolicy(change, op)).changed_by == "fin-bob@corp.example"
    assert (await servicer.GetPolicy(payout_pb2.GetPolicyRequest(), Ctx())).changed_by == "operator"
    assert (await servicer.GetPolicy(payout_pb2.GetPolicyRequest(), op)).changed_by == "fin-bob@corp.example"


def test_during_a_rotation_the_previous_operator_token_is_accepted_and_its_use_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Rotating the token was "change the Secret, restart": while pods rolled, half of them refused
    # the operators' new token (or old one), as the webhook secrets' _PREVIOUS had long avoided.
    old, new = "old-token-old-token", "new-token-new-token"
    auth = OperatorAuth(SecretStr(new), SecretStr(old))
    with caplog.at_level("WARNING", logger="services.common.auth"):
        assert auth.require(Ctx(("authorization", f"Bearer {new}"), ("x-operator", "alice"))) == "alice"
        assert auth.require(Ctx(("authorization", f"Bearer {old}"), ("x-operator", "bob"))) == "bob"
    assert [(r.getMessage(), r.__dict__["operator"]) for r in caplog.records] == [
        ("operator call with the previous operator token: switch to the new one", "bob")
    ]
    assert old not in caplog.text and new not in caplog.text
    with pytest.raises(errors.PermissionDenied) as wrong:
        auth.require(Ctx(("authorization", "Bearer neither-token-at-all")))
    assert wrong.value.reason == "NOT_AN_OPERATOR"


def test_a_previous_operator_token_alone_opens_nothing() -> None:
    # Unsetting the token is documented to refuse operator RPCs; a leftover previous must not keep them open.
    with pytest.raises(errors.PermissionDenied) as refused:
        OperatorAuth(None, SecretStr("old-token-old-token")).require(
            Ctx(("authorization", "Bearer old-token-old-token"))
        )
    assert refused.value.reason == "OPERATOR_DISABLED"


def test_the_previous_operator_token_is_read_and_checked_like_the_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.common.config import ServiceSettings, load_settings

    monkeypatch.setenv("LIVEGIFTS_DATABASE_URL", "sqlite+aiosqlite:///x.db")
    monkeypatch.setenv("LIVEGIFTS_NATS_URL", "nats://127.0.0.1:1")
    monkeypatch.setenv("LIVEGIFTS_OPERATOR_TOKEN", "new-token-new-token")
    monkeypatch.setenv("LIVEGIFTS_OPERATOR_TOKEN_PREVIOUS", "old-token-old-token\n")  # a file's newline
    with pytest.raises(SystemExit):
        load_settings(ServiceSettings)
    err = capsys.readouterr().err
    assert "LIVEGIFTS_OPERATOR_TOKEN_PREVIOUS: Value error, has leading or trailing whitespace" in err
    assert "old-token" not in err  # the refusal names the setting, never its value
    monkeypatch.setenv("LIVEGIFTS_OPERATOR_TOKEN_PREVIOUS", "old-token-old-token")
    settings = load_settings(ServiceSettings)
    assert settings.operator_token_previous is not None
    assert settings.operator_token_previous.get_secret_value() == "old-token-old-token"


async def test_an_operator_change_rolled_back_leaves_no_trail_line(  # type: ignore[no-untyped-def]
    setup,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two first calls with one key both run on PostgreSQL; the loser's transaction rolls back at
    # its idempotency record. "payout method verified" and "policy changed" were logged inside
    # the transaction: the trail named an operator's change that never took effect.
    from sqlalchemy.exc import IntegrityError

    from services.common import idempotency

    payout: Payout = setup[0]
    method = await payout.add_payout_method(
        payout_pb2.AddPayoutMethodRequest(
            creator_id="creator-c",
            kind=payout_pb2.PAYOUT_METHOD_KIND_PAYPAL,
            paypal_email="c@example.com",
            idempotency_key=uuid.uuid4().hex,
        )
    )
    policy = await payout.get_policy()

    async def lost_the_race(*args: object, **kwargs: object) -> None:
        raise IntegrityError("insert", {}, Exception("UNIQUE constraint failed: idempotency_keys"))

    monkeypatch.setattr(idempotency, "record", lost_the_race)
    with caplog.at_level("INFO", logger="services.payout.usecases"):
        with pytest.raises(errors.DomainError):
            await payout.verify_payout_method(
                payout_pb2.VerifyPayoutMethodRequest(method_id=method.method_id, verified=True, idempotency_key="v"),
                "fin-bob",
            )
        with pytest.raises(errors.DomainError):
            await payout.set_policy(
                payout_pb2.SetPolicyRequest(
                    creator_share_bp=policy.creator_share_bp,
                    fee_bp=policy.fee_bp,
                    currencies=policy.currencies,
                    idempotency_key="p",
                ),
                "fin-bob",
            )
    assert [r.getMessage() for r in caplog.records if "operator" in r.__dict__] == []
    monkeypatch.undo()
    assert (await payout.get_policy()).version == policy.version  # nothing took effect


async def test_a_gift_catalog_change_rolled_back_leaves_no_trail_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import IntegrityError

    from livegifts.gifting.v1 import gifting_pb2
    from services.common import idempotency
    from tests.support.gifting import RestrictingWallet, gifting_on

    async def lost_the_race(*args: object, **kwargs: object) -> None:
        raise IntegrityError("insert", {}, Exception("UNIQUE constraint failed: idempotency_keys"))

    async with gifting_on(tmp_path, RestrictingWallet(), group_commit=False) as (gifting, _db):
        monkeypatch.setattr(idempotency, "record", lost_the_race)
        req = gifting_pb2.UpsertGiftRequest(gift_id="comet", name="Comet", price_coins=9, idempotency_key="g")
        with caplog.at_level("INFO", logger="services.gifting.usecases"), pytest.raises(errors.DomainError):
            await gifting.upsert_gift(req, "cat-ops")
        monkeypatch.undo()
        assert "comet" not in {g.gift_id for g in (await gifting.list_gifts(True)).gifts}
    assert [r.getMessage() for r in caplog.records if r.getMessage() == "gift catalog changed"] == []
