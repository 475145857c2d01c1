"""An index of the PENDING purchases by when they were created, for the reconciler.

The wallet looks up at the payment provider the purchases PENDING for longer than
PURCHASE_RECONCILE_AFTER_S (their callback may be lost) every PURCHASE_RECONCILE_INTERVAL_S, oldest
first. No index had the status: every round read the whole of purchases. Partial on PENDING (the
same text as storage.PENDING_PURCHASES, so PostgreSQL plans on it whatever it does with bound
parameters): a purchase leaves it when its callback lands, so it holds only the checkouts not yet
paid. Built CONCURRENTLY on PostgreSQL: the previous release keeps writing purchases during the
rollout.

Revision ID: 0014
Revises: 0013
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from services.common.migrate import create_index_beside_writers

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PENDING = sa.text("status = 'PENDING'")


def upgrade() -> None:
    """Apply this revision."""
    create_index_beside_writers(
        "ix_purchases_pending",
        "purchases",
        ["created_at_us", "purchase_id"],
        sqlite_where=_PENDING,
        postgresql_where=_PENDING,
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_purchases_pending", table_name="purchases")
