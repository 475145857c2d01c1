"""Payment-provider adapters: checkout sessions out, signed callbacks in.

The development provider behaves like a real one: CreatePurchase gets a checkout session from
it, and the provider later calls HandlePaymentEvent with a signed JSON body. The CLI
(`livegifts buy`) and the tests play that provider's part, signing with the shared webhook secret.
Each payment method is routed to an adapter by PaymentRouter (LIVEGIFTS_WALLET_PAYMENT_ROUTES).

Opening a checkout and looking a payment up (a purchase whose callback never came) are network
calls at a real provider, so they are async and the wallet gives each a deadline
(PROVIDER_TIMEOUT_S, services/common/provider_calls.py) outside any transaction. Verifying a
callback is local (an HMAC) and stays synchronous.

The development provider's look-up, in a dev suite (DEV_PROVIDER_SETTLES_CHECKOUTS, which
`livegifts run` turns on): a checkout it opened counts as paid, at the price it was opened for,
under one event id per purchase (`dev_payment_event_id`), the id `livegifts buy` signs its
callback with; so a purchase left PENDING (its callback never sent) is credited by the wallet's
reconciler after PURCHASE_RECONCILE_AFTER_S, and the callback sent after that is a duplicate. A
checkout it did not open (another session id) is unknown to it: None. Off (the default, and the
deploy manifests'), every look-up is None: only a signed callback credits a purchase.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Protocol

from services.common import signing
from services.common.errors import FailedPrecondition, InvalidArgument
from services.wallet.domain import PurchaseStatus

PAYLOAD_BYTES_MAX = 64 * 1024

# Provider event types -> the purchase status they lead to.
EVENT_TYPES: dict[str, PurchaseStatus] = {
    "payment.succeeded": PurchaseStatus.SUCCEEDED,
    "payment.failed": PurchaseStatus.FAILED,
    "charge.refunded": PurchaseStatus.REFUNDED,
    "charge.dispute.lost": PurchaseStatus.CHARGED_BACK,
}


@dataclass(frozen=True)
class CheckoutSession:
    """Where the payer completes the payment."""

    provider: str
    session_id: str
    redirect_url: str


@dataclass(frozen=True)
class ProviderEvent:
    """A verified, parsed provider callback."""

    provider_event_id: str
    event_type: str
    target: PurchaseStatus
    purchase_id: str
    amount_minor: int
    currency_code: str


class PaymentProvider(Protocol):
    """What the wallet needs of a payment provider."""

    name: str

    async def create_checkout(
        self, purchase_id: str, amount_minor: int, currency_code: str, method: str
    ) -> CheckoutSession:
        """Open a checkout session for a purchase (the purchase id is the provider's idempotency key).

        A network call: raise ProviderError (services/common/provider_calls.py) when the provider
        cannot be reached or fails; the caller bounds it with its deadline."""
        ...

    async def status(
        self, purchase_id: str, session_id: str, amount_minor: int, currency_code: str
    ) -> ProviderEvent | None:
        """Look a payment up when its callback is late: its outcome as the event a callback
        carries (same event id, amount and currency as the provider's record), applied through
        the callback's own path; None while the buyer has not paid (or the provider does not know
        the checkout). A network call: raise ProviderError when the provider cannot answer."""
        ...

    def parse_callback(self, payload: bytes, signature: str) -> ProviderEvent:
        """Verify and parse a callback, or raise UNAUTHENTICATED / INVALID_ARGUMENT."""
        ...


class DevProvider:
    """A development provider with real signatures (HMAC-SHA256, timestamp tolerance)."""

    name = "dev"

    def __init__(
        self,
        secret: bytes,
        tolerance_s: int,
        latency_s: float = 0.0,
        *,
        previous_secret: bytes = b"",
        settles_checkouts: bool = False,
    ) -> None:
        self.secret = secret
        # Callbacks verify with the current secret, or the previous one during a rotation.
        self.secrets = (secret, previous_secret) if previous_secret else (secret,)
        self.tolerance_s = tolerance_s
        self.latency_s = latency_s  # DEV_PROVIDER_LATENCY_S: how long each checkout takes to open
        # DEV_PROVIDER_SETTLES_CHECKOUTS: whether a look-up reports a checkout it opened as paid
        # (a dev suite). Off, only a signed callback says money arrived: the manifests deploy this
        # adapter with a real webhook secret, where a look-up that made up a payment credited
        # every checkout left unpaid (free coins after PURCHASE_RECONCILE_AFTER_S).
        self.settles_checkouts = settles_checkouts

    async def create_checkout(
        self, purchase_id: str, amount_minor: int, currency_code: str, method: str
    ) -> CheckoutSession:
        """A session id derived from the purchase, so opening it again for the same purchase is the same one."""
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        sid = _dev_session_id(purchase_id)
        return CheckoutSession(self.name, sid, f"https://checkout.dev.invalid/pay/{sid}?method={method}")

    async def status(
        self, purchase_id: str, session_id: str, amount_minor: int, currency_code: str
    ) -> ProviderEvent | None:
        """With `settles_checkouts` (a dev suite), a checkout this provider opened counts as paid, at
        the price it was opened for, under the purchase's one event id (what `livegifts buy` sends
        too); one it never opened is None. Without it every answer is None: this adapter keeps no
        record of payments, and only a signed callback says the money arrived."""
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if not self.settles_checkouts or session_id != _dev_session_id(purchase_id):
            return None
        return ProviderEvent(
            provider_event_id=dev_payment_event_id(purchase_id),
            event_type="payment.succeeded",
            target=EVENT_TYPES["payment.succeeded"],
            purchase_id=purchase_id,
            amount_minor=amount_minor,
            currency_code=currency_code,
        )

    def parse_callback(self, payload: bytes, signature: str) -> ProviderEvent:
        """Verify the signature first, then the body's shape."""
        if len(payload) > PAYLOAD_BYTES_MAX:
            raise InvalidArgument("payload too large", "MALFORMED_PAYLOAD")
        signing.verify(self.secrets, payload, signature, self.tolerance_s)
        try:
            body = signing.json_body(payload)
            event = ProviderEvent(
                provider_event_id=signing.text_field(body, "id"),
                event_type=signing.text_field(body, "type"),
                target=EVENT_TYPES[body["type"]],
                purchase_id=signing.text_field(body, "purchase_id"),
                amount_minor=signing.int_field(body, "amount_minor"),
                currency_code=signing.text_field(body, "currency_code"),
            )
        except (ValueError, KeyError, TypeError, OverflowError):
            raise InvalidArgument("callback body is not a valid payment event", "MALFORMED_PAYLOAD") from None
        if not event.provider_event_id or len(event.provider_event_id) > 128:
            raise InvalidArgument("callback event id missing or too long", "MALFORMED_PAYLOAD")
        return event


PAYMENT_METHODS = ("CARD", "PAYPAL", "APPLE_PAY", "GOOGLE_PAY")


def parse_routes(spec: str) -> dict[str, str]:
    """'CARD=dev,PAYPAL=dev' -> {'CARD': 'dev', 'PAYPAL': 'dev'}; ValueError on an unknown method."""
    routes: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        method, sep, provider = item.partition("=")
        method = method.strip().upper()
        if not sep or method not in PAYMENT_METHODS or not provider.strip():
            raise ValueError(f"bad payment route {item!r}: want METHOD=provider, METHOD one of {PAYMENT_METHODS}")
        routes[method] = provider.strip()
    return routes


class PaymentRouter:
    """Routes each payment method to the provider adapter that takes it, and callbacks back by name."""

    def __init__(self, providers: list[PaymentProvider], routes: dict[str, str]) -> None:
        self.providers = {p.name: p for p in providers}
        unknown = sorted(set(routes.values()) - set(self.providers))
        if unknown:
            raise ValueError(f"payment routes name unknown providers: {', '.join(unknown)}")
        self.routes = dict(routes)

    def for_method(self, method: str) -> PaymentProvider:
        """The provider for a method, or FAILED_PRECONDITION/PAYMENT_METHOD_UNAVAILABLE."""
        name = self.routes.get(method)
        if name is None:
            raise FailedPrecondition(f"payment method {method} is not offered", "PAYMENT_METHOD_UNAVAILABLE")
        return self.providers[name]

    def by_name(self, name: str) -> PaymentProvider:
        """The provider that sent a callback, or INVALID_ARGUMENT/UNKNOWN_PROVIDER."""
        provider = self.providers.get(name)
        if provider is None:
            raise InvalidArgument("unknown payment provider", "UNKNOWN_PROVIDER", provider=name[:32])
        return provider


def _dev_session_id(purchase_id: str) -> str:
    """The development provider's checkout session of a purchase (one per purchase)."""
    return f"cs_dev_{purchase_id}"


def dev_payment_event_id(purchase_id: str) -> str:
    """The development provider's event id of a purchase's payment: its callback (`livegifts buy`)
    and its look-up (`DevProvider.status`) carry the same one, so the wallet applies it once."""
    return f"evt_cs_dev_{purchase_id}"


def dev_event_payload(event_id: str, event_type: str, purchase_id: str, amount_minor: int, currency_code: str) -> bytes:
    """The body the development provider sends (used by `livegifts buy` and tests)."""
    return json.dumps(
        {
            "id": event_id,
            "type": event_type,
            "purchase_id": purchase_id,
            "amount_minor": amount_minor,
            "currency_code": currency_code,
        },
        separators=(",", ":"),
    ).encode()
