"""Payout-provider adapters: account tokens and transfers out, signed callbacks in.

Mirrors the wallet's payment provider. The development provider behaves like a real one: it
tokenizes an account (the full number never reaches our database), accepts a transfer keyed by
the withdrawal id (so a repeated submission is harmless) and, in a dev suite
(DEV_PROVIDER_SETTLES_PAYOUTS, which `livegifts run`, docker compose and the integration tests'
suites turn on), reports the outcome (PAID, or FAILED for accounts made to fail: an e-mail at
`fail.invalid`, or a bank account ending in 0000) to a look-up of a transfer whose callback is
late, and with DEV_PROVIDER_AUTO_CALLBACK also at once as a signed callback, the same event. Off
(the default, and the deploy manifests'), it settles nothing: no callback, and every look-up is
None, so a withdrawal it took stays PROCESSING; it sends no money, so it must not say it did.

Tokenizing, submitting and looking up are network calls at a real provider, so they are async
and payout gives each a deadline (PROVIDER_TIMEOUT_S, services/common/provider_calls.py) outside
any transaction. Verifying a callback is local (an HMAC) and stays synchronous.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass
from typing import Protocol

from services.common import signing
from services.common.errors import InvalidArgument, is_text
from services.payout.domain import REASON_CHARS_MAX, WithdrawalStatus

PAYLOAD_BYTES_MAX = 64 * 1024

# Provider event types -> the withdrawal status they lead to.
EVENT_TYPES: dict[str, WithdrawalStatus] = {
    "payout.paid": WithdrawalStatus.PAID,
    "payout.failed": WithdrawalStatus.FAILED,
}


@dataclass(frozen=True)
class Submission:
    """The provider's answer to a transfer, and (dev only) the callback it will send."""

    provider_ref: str
    callback: tuple[bytes, str] | None  # (payload, signature)


@dataclass(frozen=True)
class PayoutEvent:
    """A verified, parsed payout callback."""

    provider_event_id: str
    event_type: str
    target: WithdrawalStatus
    withdrawal_id: str
    amount_minor: int
    currency_code: str
    failure_reason: str


class PayoutProvider(Protocol):
    """What payout needs of a payout provider.

    tokenize, submit and status are network calls: they raise ProviderError
    (services/common/provider_calls.py) when the provider cannot be reached or fails, and the
    caller bounds each with its deadline.
    """

    name: str

    async def tokenize(self, kind: str, account: str) -> str:
        """Vault an account and return the token transfers are made to."""
        ...

    async def submit(self, withdrawal_id: str, token: str, amount_minor: int, currency_code: str) -> Submission:
        """Start a transfer, idempotent by withdrawal id (a submission that timed out is made again)."""
        ...

    async def status(
        self, provider_ref: str, withdrawal_id: str, token: str, amount_minor: int, currency_code: str
    ) -> tuple[bytes, str] | None:
        """Look a transfer up when its callback is late: the outcome as the signed event a callback
        carries (payload, signature), applied through the same checks; None while it is under way."""
        ...

    def parse_callback(self, payload: bytes, signature: str) -> PayoutEvent:
        """Verify and parse a callback, or raise UNAUTHENTICATED / INVALID_ARGUMENT."""
        ...


class DevPayoutProvider:
    """A development provider with real signatures and deterministic outcomes."""

    name = "dev"

    def __init__(
        self,
        secret: bytes,
        tolerance_s: int,
        auto_callback: bool,
        latency_s: float = 0.0,
        *,
        previous_secret: bytes = b"",
        settles_payouts: bool = False,
    ) -> None:
        self.secret = secret
        # Callbacks verify with the current secret, or the previous one during a rotation.
        self.secrets = (secret, previous_secret) if previous_secret else (secret,)
        self.tolerance_s = tolerance_s
        # DEV_PROVIDER_SETTLES_PAYOUTS: whether it reports the transfers it made as settled (a dev
        # suite). Off, it says nothing of them: the manifests deploy this adapter with a real
        # webhook secret, where a made-up PAID consumed creators' diamonds with no cash sent.
        self.settles_payouts = settles_payouts
        # DEV_PROVIDER_AUTO_CALLBACK: it also calls back at once, only where transfers settle.
        self.auto_callback = auto_callback and settles_payouts
        self.latency_s = latency_s  # DEV_PROVIDER_LATENCY_S: how long each call takes to answer

    async def _network(self) -> None:
        """Where a real provider's round trip would be: DEV_PROVIDER_LATENCY_S, if set."""
        if self.latency_s:
            await asyncio.sleep(self.latency_s)

    async def tokenize(self, kind: str, account: str) -> str:
        """A keyed digest stands in for the provider's vault; `_fail` marks accounts made to fail."""
        await self._network()
        digest = hmac.new(self.secret, f"{kind}:{account}".encode(), hashlib.sha256).hexdigest()[:32]
        fails = account.endswith("@fail.invalid") or account.endswith("0000")
        return f"tok_dev_{'fail_' if fails else ''}{digest}"

    async def submit(self, withdrawal_id: str, token: str, amount_minor: int, currency_code: str) -> Submission:
        """The transfer reference derives from the withdrawal, so a retried submission is the same one."""
        await self._network()
        ref = f"po_dev_{withdrawal_id}"
        if not self.auto_callback:
            return Submission(ref, None)
        return Submission(ref, self._outcome(ref, withdrawal_id, token, amount_minor, currency_code))

    async def status(
        self, provider_ref: str, withdrawal_id: str, token: str, amount_minor: int, currency_code: str
    ) -> tuple[bytes, str] | None:
        """With `settles_payouts` (a dev suite), a transfer this provider made settles at once, as
        its callback says (even when that callback was never sent: auto_callback off); one it never
        made is unknown (None). Without it every answer is None: it sent no money."""
        await self._network()
        if not self.settles_payouts or provider_ref != f"po_dev_{withdrawal_id}":
            return None
        return self._outcome(provider_ref, withdrawal_id, token, amount_minor, currency_code)

    def _outcome(
        self, ref: str, withdrawal_id: str, token: str, amount_minor: int, currency_code: str
    ) -> tuple[bytes, str]:
        """The signed event of a transfer's outcome; one event id per transfer, so the callback and
        a later look-up are one event to payout."""
        fails = token.startswith("tok_dev_fail_")
        payload = dev_payout_payload(
            f"evt_{ref}",
            "payout.failed" if fails else "payout.paid",
            withdrawal_id,
            amount_minor,
            currency_code,
            "account closed" if fails else "",
        )
        return payload, signing.sign(self.secret, payload)

    def parse_callback(self, payload: bytes, signature: str) -> PayoutEvent:
        """Verify the signature first, then the body's shape."""
        if len(payload) > PAYLOAD_BYTES_MAX:
            raise InvalidArgument("payload too large", "MALFORMED_PAYLOAD")
        signing.verify(self.secrets, payload, signature, self.tolerance_s)
        try:
            body = signing.json_body(payload)
            event = PayoutEvent(
                provider_event_id=signing.text_field(body, "id"),
                event_type=signing.text_field(body, "type"),
                target=EVENT_TYPES[body["type"]],
                withdrawal_id=signing.text_field(body, "withdrawal_id"),
                amount_minor=signing.int_field(body, "amount_minor"),
                currency_code=signing.text_field(body, "currency_code"),
                failure_reason=_reason_text(body.get("failure_reason", "")),
            )
        except (ValueError, KeyError, TypeError):
            raise InvalidArgument("callback body is not a valid payout event", "MALFORMED_PAYLOAD") from None
        if not event.provider_event_id or len(event.provider_event_id) > 128:
            raise InvalidArgument("callback event id missing or too long", "MALFORMED_PAYLOAD")
        return event


def _reason_text(reason: object) -> str:
    """The provider's words on a failure, kept whatever they hold (null is none, a number its
    text): what is not text (`errors.is_text`: a NUL, say) becomes a space, at most REASON_CHARS_MAX characters.
    Refusing them instead would leave the withdrawal PROCESSING for good."""
    if reason is None:
        return ""
    if not isinstance(reason, str):
        reason = json.dumps(reason)  # a numeric code, say: kept as the provider sent it
    return "".join(ch if is_text(ch) else " " for ch in reason[:REASON_CHARS_MAX])


def dev_payout_payload(
    event_id: str, event_type: str, withdrawal_id: str, amount_minor: int, currency_code: str, failure_reason: str = ""
) -> bytes:
    """The body the development payout provider sends (used by the provider itself and tests)."""
    return json.dumps(
        {
            "id": event_id or uuid.uuid4().hex,
            "type": event_type,
            "withdrawal_id": withdrawal_id,
            "amount_minor": amount_minor,
            "currency_code": currency_code,
            "failure_reason": failure_reason,
        },
        separators=(",", ":"),
    ).encode()
