"""Operator RPCs (catalog, prices, policy, approvals) need the operator token.

Callers send metadata `authorization: Bearer <token>` and `x-operator: <who>` (recorded where
changes are audited). The token is LIVEGIFTS_<SVC>_OPERATOR_TOKEN; when it is unset, operator
RPCs are refused, never open. During a rotation LIVEGIFTS_<SVC>_OPERATOR_TOKEN_PREVIOUS is
accepted too (docs/sre.md "Rotating"), and each call made with it is logged, so the rotation's
end can be seen: nobody uses the old one any more. In production the mesh authenticates the calling workload; this
token is the second lock, not the only one.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from pydantic import SecretStr

from services.common.errors import PermissionDenied, Unauthenticated, printable

OPERATOR_NAME_MAX = 128

log = logging.getLogger(__name__)


class OperatorAuth:
    """Checks the operator token on a call's metadata."""

    def __init__(self, token: SecretStr | None, previous: SecretStr | None = None) -> None:
        self._token = token.get_secret_value().encode() if token else None
        # The previous token only with a current one: alone it would keep open what unsetting
        # the token is documented to close.
        self._previous = previous.get_secret_value().encode() if previous and token else None

    def require(self, context: Any) -> str:
        """Return who the operator is, or raise UNAUTHENTICATED / PERMISSION_DENIED."""
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
            self.require(context)
        except (Unauthenticated, PermissionDenied):
            return False
        return True


def operator_name(header: str) -> str:
    """Who the x-operator header names, as the audit columns and logs keep it.

    gRPC clients send only printable ASCII, but a raw HTTP/2 client may send any byte: a NUL
    (PostgreSQL refuses it, so the operator's change failed INTERNAL), a newline or a terminal
    escape (kept in the audit columns: updated_by, changed_by, reviewed_by). Each such character
    becomes "?"; a name that is empty or blank is "operator"."""
    who = printable(header[:OPERATOR_NAME_MAX]).strip()
    return who or "operator"
