"""Signed payout callbacks a withdrawal's status cannot take: refused, nothing recorded, and said.

An APPROVED withdrawal has never reached the provider (the dispatcher claims it, APPROVED ->
PROCESSING, before it submits it), so a PAID or FAILED callback for it is not true of any transfer
of ours: it is refused WITHDRAWAL_NOT_SUBMITTED. A submission whose answer was lost (payout died
after the provider took it, before storing its reference) leaves the withdrawal PROCESSING, and its
callback applies from there. A FAILED callback after PAID (a payout the bank returned) is not
modelled: refused INVALID_WITHDRAWAL_TRANSITION, as before, but now with a warning and a count.
A delivery of a recorded event id is a duplicate only when it is that event (its withdrawal, type,
amount and currency), and an error that recorded nothing is never answered as a duplicate.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from livegifts.payout.v1 import payout_pb2
from services.common import signing
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.metrics import PROVIDER_EVENT_IDS_REUSED
from services.payout.providers import dev_payout_payload
from services.payout.storage import payout_events
from services.payout.usecases import Payout
from tests.support.callbacks import unseen_at_first
from tests.support.payout import SECRET, approved_withdrawal, callback, status_of

REPO = Path(__file__).resolve().parents[2]
LOGGER = "services.payout.usecases"


def refused(reason: str) -> float:
    return REGISTRY.get_sample_value("livegifts_payout_callbacks_refused_total", {"reason": reason}) or 0.0


async def processing_withdrawal(payout: Payout) -> str:
    """A withdrawal of creator-a the dispatcher has submitted to the provider (PROCESSING)."""
    withdrawal_id = await approved_withdrawal(payout, "creator-a")
    assert await payout.dispatch_once() == 1
    return withdrawal_id


def refusal_line(caplog: pytest.LogCaptureFixture, text: str) -> logging.LogRecord:
    (record,) = [r for r in caplog.records if text in r.getMessage()]
    assert record.levelno == logging.WARNING
    return record


@pytest.mark.parametrize("event_type", ["payout.paid", "payout.failed"])
async def test_a_callback_for_a_withdrawal_never_submitted_is_refused_until_it_is(  # type: ignore[no-untyped-def]
    setup, caplog: pytest.LogCaptureFixture, event_type: str
) -> None:
    payout, provider, _path = setup
    withdrawal_id = await approved_withdrawal(payout, "creator-a")
    before = await payout.get_earnings("creator-a")
    counted = refused("WITHDRAWAL_NOT_SUBMITTED")

    for attempt in range(2):  # the provider's retries: each refused, each said
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            with pytest.raises(FailedPrecondition) as err:
                await callback(payout, withdrawal_id, "evt-early", event_type)
        assert err.value.reason == "WITHDRAWAL_NOT_SUBMITTED"
        record = refusal_line(caplog, "never submitted to the provider")
        assert (record.withdrawal_id, record.provider_event_id) == (withdrawal_id, "evt-early")  # type: ignore[attr-defined]
        assert record.status == "APPROVED"  # type: ignore[attr-defined]
        assert refused("WITHDRAWAL_NOT_SUBMITTED") == counted + attempt + 1
    assert await status_of(payout, withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_APPROVED
    assert await payout.get_earnings("creator-a") == before  # no diamond moved

    # Nothing was recorded under the event id: once the dispatcher has submitted the withdrawal,
    # the provider's next retry of the same event applies.
    assert await payout.dispatch_once() == 1 and provider.submitted == [withdrawal_id]
    done = await callback(payout, withdrawal_id, "evt-early", event_type)
    assert not done.duplicate
    target = payout_pb2.WITHDRAWAL_STATUS_PAID if event_type == "payout.paid" else payout_pb2.WITHDRAWAL_STATUS_FAILED
    assert done.withdrawal.status == target


async def test_a_callback_for_a_withdrawal_whose_reference_was_never_stored_applies(setup) -> None:  # type: ignore[no-untyped-def]
    """The fault "payout dies after the provider took a withdrawal, before storing its reference":
    the provider has the transfer and may call back before any resubmission, while the withdrawal
    is PROCESSING with no provider_ref. That ordering is why PROCESSING (not APPROVED) takes it."""
    payout, provider, _path = setup
    withdrawal_id = await approved_withdrawal(payout, "creator-a")

    def answer_lost() -> None:  # the provider takes the transfer; its answer never comes back
        raise ConnectionResetError("connection lost after the provider took the transfer")

    provider.on_submit.append(answer_lost)
    assert await payout.dispatch_once() == 0
    row = await payout.get_withdrawal(withdrawal_id)
    assert (row.status, row.provider_ref) == (payout_pb2.WITHDRAWAL_STATUS_PROCESSING, "")
    done = await callback(payout, withdrawal_id, "evt-taken", "payout.paid")
    assert done.withdrawal.status == payout_pb2.WITHDRAWAL_STATUS_PAID and not done.duplicate
    assert (await payout.get_earnings("creator-a")).diamonds_withdrawn == 20_000


async def test_a_failure_reported_after_a_withdrawal_was_paid_is_refused_logged_and_counted(  # type: ignore[no-untyped-def]
    setup, caplog: pytest.LogCaptureFixture
) -> None:
    payout, _provider, _path = setup
    withdrawal_id = await processing_withdrawal(payout)
    paid = await callback(payout, withdrawal_id, "evt-paid", "payout.paid")
    assert paid.withdrawal.status == payout_pb2.WITHDRAWAL_STATUS_PAID
    before = await payout.get_earnings("creator-a")
    counted = refused("INVALID_WITHDRAWAL_TRANSITION")

    for attempt in range(2):  # the bank returned the payout: the provider retries its FAILED event
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            with pytest.raises(FailedPrecondition) as err:
                await callback(payout, withdrawal_id, "evt-returned", "payout.failed")
        assert err.value.reason == "INVALID_WITHDRAWAL_TRANSITION"
        record = refusal_line(caplog, "already has another outcome")
        assert (record.withdrawal_id, record.provider_event_id) == (withdrawal_id, "evt-returned")  # type: ignore[attr-defined]
        assert (record.status, record.event_type) == ("PAID", "payout.failed")  # type: ignore[attr-defined]
        assert record.provider_ref == paid.withdrawal.provider_ref  # type: ignore[attr-defined]
        assert refused("INVALID_WITHDRAWAL_TRANSITION") == counted + attempt + 1
    # Returned payouts are not modelled: the withdrawal stays PAID, its diamonds withdrawn.
    assert await status_of(payout, withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_PAID
    assert await payout.get_earnings("creator-a") == before
    # The PAID event again is still a duplicate, neither logged nor counted as refused.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert (await callback(payout, withdrawal_id, "evt-paid", "payout.paid")).duplicate
    assert not [r for r in caplog.records if "payout callback refused" in r.getMessage()]
    assert refused("INVALID_WITHDRAWAL_TRANSITION") == counted + 2


@pytest.mark.parametrize("event_type", ["payout.paid", "payout.failed"])
async def test_the_outcome_a_withdrawal_has_reported_again_for_another_amount_is_refused_not_a_duplicate(  # type: ignore[no-untyped-def]
    setup, caplog: pytest.LogCaptureFixture, event_type: str
) -> None:
    payout, _provider, _path = setup
    withdrawal_id = await processing_withdrawal(payout)
    await callback(payout, withdrawal_id, "evt-first", event_type)
    row = await payout.get_withdrawal(withdrawal_id)

    for amount, currency in ((row.net.amount_minor * 10, row.net.currency_code), (row.net.amount_minor, "EUR")):
        # Under a new event id the provider says it moved another amount: not what we know, said.
        payload = dev_payout_payload("evt-other", event_type, withdrawal_id, amount, currency)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            with pytest.raises(InvalidArgument) as err:
                await payout.handle_payout_event(
                    payout_pb2.HandlePayoutEventRequest(
                        provider="dev", payload=payload, signature=signing.sign(SECRET, payload)
                    )
                )
        assert err.value.reason == "AMOUNT_MISMATCH"
        # The answer says what the callback must carry: the withdrawal's net and its currency.
        assert err.value.metadata == {
            "expected_amount_minor": str(row.net.amount_minor),
            "expected_currency_code": row.net.currency_code,
        }
        refusal_line(caplog, "amount or currency differs")
    assert await payout.get_withdrawal(withdrawal_id) == row  # nothing changed
    # The same outcome for the same amount under another event id is still a duplicate.
    assert (await callback(payout, withdrawal_id, "evt-again", event_type)).duplicate


def test_refused_payout_callbacks_are_exported_at_zero_from_the_start() -> None:
    # A series that first appears at 1 shows no increase() in Prometheus, so the alert would miss
    # the first refusal in a pod's life. A fresh process: in this one other tests have made them.
    code = """
from prometheus_client import REGISTRY
import services.payout.usecases
for reason in ("WITHDRAWAL_NOT_SUBMITTED", "INVALID_WITHDRAWAL_TRANSITION"):
    value = REGISTRY.get_sample_value("livegifts_payout_callbacks_refused_total", {"reason": reason})
    assert value == 0.0, (reason, value)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "gen")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


async def test_an_unknown_payout_provider_is_echoed_printable_and_cut_to_32_characters(setup) -> None:  # type: ignore[no-untyped-def]
    payout, _provider, _path = setup
    payload = dev_payout_payload("evt-1", "payout.paid", "w-1", 100, "USD")
    with pytest.raises(InvalidArgument) as err:
        await payout.handle_payout_event(
            payout_pb2.HandlePayoutEventRequest(
                provider="\x1b[2J\r\nlevel=ERROR" + "x" * 100, payload=payload, signature=signing.sign(SECRET, payload)
            )
        )
    assert err.value.reason == "UNKNOWN_PROVIDER"
    assert err.value.metadata["provider"] == "?[2J??level=ERROR" + "x" * 15


async def signed(
    payout: Payout, withdrawal_id: str, event_id: str, event_type: str, amount: int, currency: str
) -> payout_pb2.HandlePayoutEventResponse:
    """Deliver a signed callback of the development provider for `amount` in `currency`."""
    payload = dev_payout_payload(event_id, event_type, withdrawal_id, amount, currency)
    return await payout.handle_payout_event(
        payout_pb2.HandlePayoutEventRequest(provider="dev", payload=payload, signature=signing.sign(SECRET, payload))
    )


async def recorded_events(payout: Payout) -> int:
    async with payout.db.unit_of_work(readonly=True) as uow:
        return (await uow.conn.execute(select(func.count()).select_from(payout_events))).scalar_one()


@pytest.mark.parametrize(("first", "then"), [("payout.failed", "payout.paid"), ("payout.paid", "payout.failed")])
async def test_the_other_outcome_under_the_event_id_of_the_first_is_refused_not_answered_as_a_duplicate(  # type: ignore[no-untyped-def]
    setup, caplog: pytest.LogCaptureFixture, first: str, then: str
) -> None:
    # Was: duplicate=true whatever the type, so a PAID under the FAILED's event id was
    # acknowledged silently: the money went out and the creator had the diamonds back.
    payout, _provider, _path = setup
    withdrawal_id = await processing_withdrawal(payout)
    settled = await callback(payout, withdrawal_id, "evt-1", first)
    earned = await payout.get_earnings("creator-a")
    reused_before = PROVIDER_EVENT_IDS_REUSED._value.get()
    for _ in range(2):  # refused on every retry
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="services.common.signing"):
            with pytest.raises(FailedPrecondition) as err:
                await callback(payout, withdrawal_id, "evt-1", then)
        assert err.value.reason == "PROVIDER_EVENT_ID_REUSED"
        assert err.value.metadata == {"provider_event_id": "evt-1", "withdrawal_id": withdrawal_id, "event_type": first}
        record = refusal_line(caplog, "recorded for another event type")
        assert (record.first_event_type, record.named_event_type) == (first, then)  # type: ignore[attr-defined]
    assert PROVIDER_EVENT_IDS_REUSED._value.get() == reused_before + 2
    assert await payout.get_withdrawal(withdrawal_id) == settled.withdrawal
    assert await payout.get_earnings("creator-a") == earned and await recorded_events(payout) == 1
    # The id stays the first outcome's: its retry is a duplicate.
    again = await callback(payout, withdrawal_id, "evt-1", first)
    assert again.duplicate and again.withdrawal == settled.withdrawal


async def test_a_recorded_event_id_sent_with_another_amount_or_currency_is_refused_not_a_duplicate(  # type: ignore[no-untyped-def]
    setup,
) -> None:
    # Was: duplicate=true, an OK for a transfer of an amount nothing applied; now refused as a
    # new event id with that amount is, with what the callback must carry.
    payout, _provider, _path = setup
    withdrawal_id = await processing_withdrawal(payout)
    paid = await callback(payout, withdrawal_id, "evt-1", "payout.paid")
    net = paid.withdrawal.net
    for amount, currency in ((net.amount_minor * 10, net.currency_code), (net.amount_minor, "EUR")):
        with pytest.raises(InvalidArgument) as err:
            await signed(payout, withdrawal_id, "evt-1", "payout.paid", amount, currency)
        assert err.value.reason == "AMOUNT_MISMATCH"
        assert err.value.metadata == {
            "expected_amount_minor": str(net.amount_minor),
            "expected_currency_code": net.currency_code,
        }
    assert (await callback(payout, withdrawal_id, "evt-1", "payout.paid")).duplicate


async def test_a_concurrent_delivery_of_the_id_as_the_other_outcome_is_refused_not_a_duplicate(  # type: ignore[no-untyped-def]
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race on PostgreSQL: the look-up saw no record, the insert hit the one a concurrent
    # delivery committed meanwhile (IntegrityError). Was: answered a duplicate whatever its type.
    payout, _provider, _path = setup
    withdrawal_id = await processing_withdrawal(payout)
    await callback(payout, withdrawal_id, "evt-1", "payout.failed")
    failed = await payout.get_withdrawal(withdrawal_id)
    looks: list[int] = []
    monkeypatch.setattr(Payout, "_event_recorded_for", unseen_at_first(Payout._event_recorded_for, looks))
    # And the withdrawal as that delivery read it, before the concurrent FAILED committed.
    monkeypatch.setattr(Payout, "_load_withdrawal", _as_processing(Payout._load_withdrawal))
    with pytest.raises(FailedPrecondition) as err:
        await callback(payout, withdrawal_id, "evt-1", "payout.paid")
    assert err.value.reason == "PROVIDER_EVENT_ID_REUSED" and len(looks) == 2
    assert err.value.metadata["event_type"] == "payout.failed"
    monkeypatch.undo()
    assert await payout.get_withdrawal(withdrawal_id) == failed


def _as_processing(load: Any) -> Any:
    """`_load_withdrawal` answering the row as it was before its outcome (PROCESSING)."""

    async def loaded(self: Payout, *args: Any, **kwargs: Any) -> Any:
        row = await load(self, *args, **kwargs)
        return SimpleNamespace(**{**row._asdict(), "status": "PROCESSING"})

    return loaded


async def test_an_integrity_error_that_recorded_no_event_is_not_answered_ok(  # type: ignore[no-untyped-def]
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: any IntegrityError was taken for a concurrent delivery's event id and answered
    # duplicate=true although nothing was recorded: the provider stopped, the withdrawal stayed
    # PROCESSING (its diamonds held) for a transfer that went out.
    payout, _provider, _path = setup
    withdrawal_id = await processing_withdrawal(payout)
    add = payout.outbox.add

    async def failing_add(*args: Any, **kwargs: Any) -> None:
        raise IntegrityError("INSERT INTO outbox", {}, Exception("UNIQUE constraint failed: outbox.event_id"))

    monkeypatch.setattr(payout.outbox, "add", failing_add)
    with pytest.raises(IntegrityError):
        await callback(payout, withdrawal_id, "evt-1", "payout.paid")
    assert await status_of(payout, withdrawal_id) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING
    assert await recorded_events(payout) == 0
    monkeypatch.setattr(payout.outbox, "add", add)
    retried = await callback(payout, withdrawal_id, "evt-1", "payout.paid")  # the provider's retry
    assert (retried.duplicate, retried.withdrawal.status) == (False, payout_pb2.WITHDRAWAL_STATUS_PAID)
    assert (await payout.get_earnings("creator-a")).diamonds_withdrawn == 20_000


async def test_a_duplicate_read_before_the_outcome_committed_answers_the_withdrawal_as_it_now_stands(  # type: ignore[no-untyped-def]
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race on PostgreSQL (READ COMMITTED, a snapshot per statement): the withdrawal was read
    # before a concurrent delivery of the same event committed, its event row after. Was: the
    # duplicate answered that stale row, a PAID withdrawal shown as still PROCESSING.
    payout, _provider, _path = setup
    withdrawal_id = await processing_withdrawal(payout)
    paid = await callback(payout, withdrawal_id, "evt-1", "payout.paid")
    stale = _as_processing(Payout._load_withdrawal)
    loads: list[int] = []

    async def stale_once(self: Payout, *args: Any, **kwargs: Any) -> Any:
        loads.append(1)
        return await (stale if len(loads) == 1 else load)(self, *args, **kwargs)

    load = Payout._load_withdrawal
    monkeypatch.setattr(Payout, "_load_withdrawal", stale_once)
    net = paid.withdrawal.net
    again = await signed(payout, withdrawal_id, "evt-1", "payout.paid", net.amount_minor, net.currency_code)
    assert len(loads) >= 1
    assert again.duplicate and again.withdrawal.status == payout_pb2.WITHDRAWAL_STATUS_PAID
    assert again.withdrawal == paid.withdrawal


def repeated(outcome: str) -> float:
    return REGISTRY.get_sample_value("livegifts_provider_outcomes_repeated_total", {"outcome": outcome}) or 0.0


@pytest.mark.parametrize(("event_type", "outcome"), [("payout.paid", "PAID"), ("payout.failed", "FAILED")])
async def test_the_outcome_a_withdrawal_has_reported_again_under_another_event_id_is_counted_and_logged(  # type: ignore[no-untyped-def]
    setup, caplog: pytest.LogCaptureFixture, event_type: str, outcome: str
) -> None:
    # A PAID after PAID under a new event id was answered as a duplicate without a trace: a second
    # transfer at the provider for the one withdrawal looked like a resend or a look-up's echo.
    payout, _provider, _path = setup
    withdrawal_id = await processing_withdrawal(payout)
    before = repeated(outcome)
    assert not (await callback(payout, withdrawal_id, "evt-first", event_type)).duplicate
    assert (await callback(payout, withdrawal_id, "evt-first", event_type)).duplicate
    assert repeated(outcome) == before, "the applied event delivered again is no repeated outcome"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert (await callback(payout, withdrawal_id, "evt-again", event_type)).duplicate
    assert repeated(outcome) == before + 1
    (line,) = [r for r in caplog.records if "reported again under another event id" in r.getMessage()]
    assert (line.withdrawal_id, line.provider_event_id, line.status) == (withdrawal_id, "evt-again", outcome)  # type: ignore[attr-defined]
