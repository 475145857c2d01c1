"""AuditRecord.status names every status a service answers in ListAuditRecords.

Support and other teams read `ListAuditRecords` by gift event id to trace a gift across the
services (docs/sre.md "Support: answering a user's ticket"); a status the contract does not name
(gifting's `KEY_ONLY` rows, the keys of unlocks answered by an earlier unlock) reads as a gift in
an unknown state.
"""

from __future__ import annotations

import re
from pathlib import Path

from services.gifting.domain import KEY_ONLY, GiftStatus
from services.wallet.spending import CANCELLED, SPENT

AUDIT_PROTO = Path(__file__).resolve().parents[2] / "protos" / "livegifts" / "common" / "v1" / "audit.proto"


def _status_comment() -> str:
    """The comment of AuditRecord.status, with the comment lines that follow it."""
    message = AUDIT_PROTO.read_text().split("message AuditRecord {", 1)[1].split("\n}", 1)[0]
    lines = message.split("\n")
    start = next(i for i, line in enumerate(lines) if re.search(r"\bstring status = 3;", line))
    comment = [lines[start].split("//", 1)[1]]
    comment += [line.strip().removeprefix("//") for line in lines[start + 1 :] if line.strip().startswith("//")]
    return " ".join(comment)


def test_the_status_comment_names_every_status_a_service_answers() -> None:
    answered = {"wallet": {SPENT, CANCELLED}, "gifting": {s.value for s in GiftStatus} | {KEY_ONLY}}
    answered["payout"] = {"CREDITED"}  # services/payout/__main__.py: table_query(..., status="CREDITED")
    comment = _status_comment()
    missing = {
        svc: sorted(s for s in statuses if not re.search(rf"\b{s}\b", comment)) for svc, statuses in answered.items()
    }
    assert not any(missing.values()), f"AuditRecord.status does not name: {missing} ({comment!r})"
