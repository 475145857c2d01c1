"""Cancelled gifts keep their idempotency key.

Cancelling a gift used to clear its idempotency_key, so that a retry could start a new gift; a
different request under that key was then accepted and charged. The code now keeps the key on
the cancelled gift (a retry of the same request moves it to the new gift). This revision gives
the gifts cancelled before it their key back from client_key: for each key, its latest cancelled
gift, unless a gift pending or sent holds it already.

One scan of the cancelled gifts, then look-ups and updates by key and id: no query per row over
the whole table (client_key has no index).

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CHUNK = 500  # keys per look-up, ids per update

_gifts = sa.table(
    "gift_events",
    sa.column("event_id", sa.String),
    sa.column("idempotency_key", sa.String),
    sa.column("client_key", sa.String),
    sa.column("status", sa.String),
    sa.column("created_at_us", sa.BigInteger),
)


def upgrade() -> None:
    """Apply this revision."""
    conn = op.get_bind()
    g = _gifts.c
    latest: dict[str, tuple[int, str]] = {}  # key -> (created at, event id) of its latest cancelled gift
    rows = conn.execute(
        sa.select(g.client_key, g.created_at_us, g.event_id).where(g.status == "CANCELLED", g.idempotency_key.is_(None))
    )
    for key, created, event_id in rows:
        if key not in latest or (created, event_id) > latest[key]:
            latest[key] = (created, event_id)
    keys = list(latest)
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start : start + _CHUNK]
        held = set(conn.execute(sa.select(g.idempotency_key).where(g.idempotency_key.in_(chunk))).scalars())
        back = [{"eid": latest[k][1], "key": k} for k in chunk if k not in held]
        if back:
            conn.execute(
                _gifts.update().where(g.event_id == sa.bindparam("eid")).values(idempotency_key=sa.bindparam("key")),
                back,
            )


def downgrade() -> None:
    """Revert this revision: cancelled gifts hold no key, as the code before it expects."""
    g = _gifts.c
    op.execute(_gifts.update().where(g.status == "CANCELLED").values(idempotency_key=None))
