"""Stored PayPal masks hide the domain too.

A PayPal method's mask ended with the whole domain (j•••@janedoe.dev): a domain of one's own is
nearly the address. New masks show only the first letter of the domain and its top-level domain
(j•••@j•••.dev); this revision rewrites the masks stored before it the same way. The masking is
copied here, not imported: a revision keeps doing what it did when the code changes. A mask
already in the new form comes out unchanged, so a retry after a partial run is harmless.

One-way: the downgrade cannot bring a domain back, and the code before it shows either form.

Revision ID: 0011
Revises: 0010
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CHUNK = 1_000  # methods read and rewritten at a time, in method id order

_methods = sa.table(
    "payout_methods",
    sa.column("method_id", sa.String),
    sa.column("kind", sa.String),
    sa.column("masked", sa.String),
)


def _first_of(part: str) -> str:
    return part[0] if len(part) > 1 else ""


def remask(masked: str) -> str:
    """A stored PayPal mask ("j•••@example.com") with its domain hidden ("j•••@e•••.com")."""
    shown, at, host = masked.rpartition("@")
    label, dot, _ = host.partition(".")
    if not at or not dot or label.endswith("•"):
        return masked  # hidden already, or not a mask this code wrote: left as it is
    return f"{shown}@{_first_of(label)}•••.{host.rsplit('.', 1)[1]}"


def upgrade() -> None:
    """Apply this revision."""
    conn = op.get_bind()
    m = _methods.c
    after = ""
    while True:
        rows = conn.execute(
            sa.select(m.method_id, m.masked)
            .where(m.kind == "PAYPAL", m.method_id > after)
            .order_by(m.method_id)
            .limit(_CHUNK)
        ).all()
        if not rows:
            return
        changed = [{"mid": mid, "new": remask(old)} for mid, old in rows if remask(old) != old]
        if changed:
            update = _methods.update().where(m.method_id == sa.bindparam("mid")).values(masked=sa.bindparam("new"))
            conn.execute(update, changed)
        after = rows[-1][0]


def downgrade() -> None:
    """Revert this revision: nothing to do (the domain is gone; the code before shows either form)."""
