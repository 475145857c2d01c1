"""Operator RPCs (catalog, prices, policy, approvals) need the operator token.

Callers send metadata `authorization: Bearer <token>` and `x-operator: <who>` (recorded where
changes are audited). The token is LIVEGIFTS_<SVC>_OPERATOR_TOKEN; when it is unset, operator
RPCs are refused, never open. During a rotation LIVEGIFTS_<SVC>_OPERATOR_TOKEN_PREVIOUS is
accepted too (docs/sre.md "Rotating"), and each call made with it is logged, so the rotation's
end can be seen: nobody uses the old one any more. In production the mesh authenticates the calling workload; this
token is the second lock, not the only one.

Every failed check is counted in livegifts_operator_auth_failures_total{reason} (`missing`, `wrong`)
and logged "operator token refused" with the method, the caller's address and the reason (never
the token), at most once per REFUSED_LOG_INTERVAL_S per caller address, the line saying how many
attempts it stands for: a read that shows operators more (`is_operator`) and was sent a wrong
token is counted and logged too, though it is answered as a non-operator's, not refused.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from pydantic import SecretStr

from services.common.errors import PermissionDenied, Unauthenticated, printable
from services.common.grpcserver import current_method
from services.common.metrics import OPERATOR_AUTH_FAILURES
from services.common.throttle import KeyedLogThrottle

OPERATOR_NAME_MAX = 128
# The `reason` label of livegifts_operator_auth_failures_total, each exported at 0 from the start.
FAILURE_REASONS = ("missing", "wrong")
_REASONS = {"OPERATOR_TOKEN_MISSING": "missing", "OPERATOR_DISABLED": "wrong", "NOT_AN_OPERATOR": "wrong"}
# "operator token refused": one line per caller address per this many seconds, for at most this
# many addresses at once (past it the least recent is forgotten; its next attempt logs at once).
# Shared by every check of the process (the service's own RPCs and its dead-letter RPCs).
REFUSED_LOG_INTERVAL_S = 60.0
REFUSED_LOG_ADDRESSES_MAX = 1024

log = logging.getLogger(__name__)
_refused_log: KeyedLogThrottle[str] = KeyedLogThrottle(REFUSED_LOG_INTERVAL_S, REFUSED_LOG_ADDRESSES_MAX)


class OperatorAuth:
    """Checks the operator token on a call's metadata."""

    def __init__(self, token: SecretStr | None, previous: SecretStr | None = None) -> None:
        self._token = token.get_secret_value().encode() if token else None
        # The previous token only with a current one: alone it would keep open what unsetting
        # the token is documented to close.
        self._previous = previous.get_secret_value().encode() if previous and token else None
        for reason in FAILURE_REASONS:
            OPERATOR_AUTH_FAILURES.labels(reason)

    def require(self, context: Any) -> str:
        """Return who the operator is, or raise UNAUTHENTICATED / PERMISSION_DENIED (counted and
        logged, see the module's doc)."""
        try:
            return self._check(context)
        except (Unauthenticated, PermissionDenied) as refused:
            _refused(context, refused.reason, read=False)
            raise

    def _check(self, context: Any) -> str:
        md = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        # The scheme is case-insensitive (RFC 7235 section 2.1): "bearer <token>" is as good.
        scheme, space, token = md.get("authorization", "").partition(" ")
        if not space or scheme.lower() != "bearer":
            raise Unauthenticated("operator RPCs need 'authorization: Bearer <token>'", "OPERATOR_TOKEN_MISSING")
        if self._token is None:
            raise PermissionDenied("operator RPCs are disabled: no operator token is configured", "OPERATOR_DISABLED")
        sent = token.encode()
        # Both comparisons always run (constant time each, no early exit), so the timing tells
        # nothing of which token matched or whether a previous one is configured.
        current = hmac.compare_digest(sent, self._token)
        previous = hmac.compare_digest(sent, self._previous or self._token) and self._previous is not None
        if not (current or previous):
            raise PermissionDenied("the operator token is not valid", "NOT_AN_OPERATOR")
        who = operator_name(md.get("x-operator", ""))
        if previous and not current:
            log.warning(
                "operator call with the previous operator token: switch to the new one", extra={"operator": who}
            )
        return who

    def identify(self, context: Any) -> str:
        """Who the operator is when the call carries a token (checked as `require` does), else "".

        For RPCs other internal callers may make without the token (the identity service's ages):
        a token that is sent is never ignored, so a wrong one is refused, not logged as no one."""
        md = dict(context.invocation_metadata() or ())
        return self.require(context) if "authorization" in md else ""

    def is_operator(self, context: Any) -> bool:
        """Whether the call carries a valid operator token, for reads that show operators more than
        others: never a refusal (a client's own bearer token, forwarded by a gateway, only means
        "not an operator"), so a read every caller may make stays open to every caller."""
        try:
            self._check(context)
        except Unauthenticated:
            return False  # no bearer token: a caller that claims nothing
        except PermissionDenied as refused:
            _refused(context, refused.reason, read=True)
            return False
        return True


def _refused(context: Any, refusal: str, *, read: bool) -> None:
    """Count a failed check and log it, throttled per caller address (never the token)."""
    reason = _REASONS[refusal]
    OPERATOR_AUTH_FAILURES.labels(reason).inc()
    # Real calls always have a peer ("ipv4:10.1.2.3:51234"); the fakes of some tests do not.
    peer = str(context.peer()) if hasattr(context, "peer") else ""
    if attempts := _refused_log.occurred(peer_address(peer)):
        log.warning(
            "operator token refused",
            extra={
                "method": current_method(),
                "peer": peer,
                "reason": reason,
                "refusal": refusal,
                # a read is answered, as a non-operator's; an operator RPC is refused with `refusal`
                "answered": "as a non-operator" if read else "refused",
                "attempts": attempts,  # from this address, since its previous line, this one included
            },
        )


def peer_address(peer: str) -> str:
    """A gRPC peer's address without its port ("ipv4:10.1.2.3:51234" -> "ipv4:10.1.2.3",
    "ipv6:[fd00::1]:51234" -> "ipv6:[fd00::1]"; any other kind as it is): the refusals' log is
    throttled by it, so a caller that opens a connection per attempt is still one caller."""
    kind, _, address = peer.partition(":")
    host, colon, port = address.rpartition(":")
    if kind in ("ipv4", "ipv6") and colon and port.isdigit():
        return f"{kind}:{host}"
    return peer


def operator_name(header: str) -> str:
    """Who the x-operator header names, as the audit columns and logs keep it.

    gRPC clients send only printable ASCII, but a raw HTTP/2 client may send any byte: a NUL
    (PostgreSQL refuses it, so the operator's change failed INTERNAL), a newline or a terminal
    escape (kept in the audit columns: updated_by, changed_by, reviewed_by). Each such character
    becomes "?"; a name that is empty or blank is "operator"."""
    who = printable(header[:OPERATOR_NAME_MAX]).strip()
    return who or "operator"
