"""Calls to an external provider (payments, payouts): a deadline on each, one error class for failures.

A real provider is an HTTP API. Its adapters are async, so a slow call waits without holding the
event loop (every other RPC of the service goes on), and `call` bounds it with PROVIDER_TIMEOUT_S,
so it waits no longer than that. Adapters translate their transport's errors (a refused
connection, a 5xx answer) into ProviderError at the boundary; a deadline that runs out is a
ProviderTimeout. The use cases decide what a failure means (UNAVAILABLE to the caller, or the
item left for the next round of a background loop); every failure is counted here, in
`livegifts_provider_call_failures_total{provider, call, outcome}`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from typing import TypeVar

from services.common.errors import Unavailable
from services.common.metrics import PROVIDER_CALL_FAILURES

log = logging.getLogger(__name__)
T = TypeVar("T")
# The `outcome` label of livegifts_provider_call_failures_total (`call`).
FAILURE_OUTCOMES = ("timeout", "refused", "error")


class ProviderError(Exception):
    """A provider call that brought no usable answer: unreachable, a 5xx, or no answer in time."""


class ProviderRefused(ProviderError):
    """The provider answered and refused the request for good (a closed account, a token it no
    longer knows: a 4xx, not a 5xx): the same request again cannot succeed, so the use case ends
    the work instead of retrying it (a payout transfer refused this way was never made)."""


class ProviderTimeout(ProviderError):
    """The provider did not answer within the deadline (PROVIDER_TIMEOUT_S)."""


def export_failures_at_zero(provider: str, calls: Iterable[str]) -> None:
    """Export the failure counts of `provider`'s `calls` at 0 (a service's use cases do, as they
    start): the alert takes their rate(), which needs a sample before the first failure, so the
    first burst of failures in a pod's life was missed while the series first appeared with it."""
    for name in calls:
        for outcome in FAILURE_OUTCOMES:
            PROVIDER_CALL_FAILURES.labels(provider=provider, call=name, outcome=outcome)


async def call(provider: str, name: str, request: Awaitable[T], timeout_s: float) -> T:
    """Await one provider call (`request`, the adapter's coroutine) for at most `timeout_s`.

    Raises ProviderTimeout when the deadline runs out (the call is cancelled) and lets any other
    error through unchanged; both are counted, by `provider` (the adapter's name) and `name` (the
    call: create_checkout, tokenize, submit, status).
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await request
    except TimeoutError as exc:
        PROVIDER_CALL_FAILURES.labels(provider=provider, call=name, outcome="timeout").inc()
        raise ProviderTimeout(f"{provider} {name}: no answer within {timeout_s:g} s") from exc
    except ProviderRefused:
        PROVIDER_CALL_FAILURES.labels(provider=provider, call=name, outcome="refused").inc()
        raise
    except Exception:
        PROVIDER_CALL_FAILURES.labels(provider=provider, call=name, outcome="error").inc()
        raise


async def required(
    provider: str, name: str, request: Awaitable[T], timeout_s: float, *, reason: str, message: str, **context: object
) -> T:
    """`call` for an RPC that cannot answer without the provider and has written nothing yet: a
    failure (timeout, error, refusal) is logged with `context` and answered UNAVAILABLE with
    `reason` and `message`, for the caller to retry with the same key."""
    try:
        return await call(provider, name, request, timeout_s)
    except ProviderError as exc:
        log.warning(
            "the provider did not answer a call; nothing was written",
            extra={"provider": provider, "call": name, "error": str(exc), **context},
        )
        raise Unavailable(message, reason) from None
