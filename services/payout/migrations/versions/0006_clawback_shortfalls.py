"""What a reversal could not claw back yet: settled later from earnings that arrive after it.

A `wallet.purchase.reversed` can be consumed before the `gifting.gift.sent` events of the gifts
its coins paid for (the two streams have their own consumers). The coins it could not take are
recorded here and the shortfall settler claws them back once those earnings are credited.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "clawback_shortfalls",
        sa.Column("reversal_event_id", sa.String(length=64), nullable=False),
        sa.Column("purchase_id", sa.String(length=64), nullable=False),
        sa.Column("sender_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("coins_open", sa.BigInteger(), nullable=False),
        sa.Column("reversed_at_us", sa.BigInteger(), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("reversal_event_id"),
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_table("clawback_shortfalls")
