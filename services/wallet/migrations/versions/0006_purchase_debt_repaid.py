"""How many of a purchase's coins repaid a debt when it was credited.

A reversal reports `coins_already_spent`, the coins payout claws back from creators. Coins that
repaid an earlier reversal's debt reached no creator, so a later reversal of that purchase must
not count them as spent. The column is nullable and not backfilled: rows credited before this
revision (or by a pod of the previous release during a rollout) are read from the ledger, whose
PURCHASE posting records the balance after the credit.

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
    op.add_column("purchases", sa.Column("debt_repaid_coins", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("purchases") as batch:
        batch.drop_column("debt_repaid_coins")
