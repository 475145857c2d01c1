"""An index of the withdrawals by status in request order, for the operators' review queue.

`ListWithdrawals` without `creator_id` lists every creator's withdrawals in one status, oldest
requested first, a page at a time in (requested_at_us, withdrawal_id) order: with the index on
status alone each page read every withdrawal of the status (all PAID ones, for a look at the
paid) and sorted them. Built CONCURRENTLY on PostgreSQL: the previous release keeps writing
withdrawals during the rollout. ix_withdrawals_status stays: the previous release's queries use it
while it runs, and a later revision may drop it as a prefix of this one.

Revision ID: 0012
Revises: 0011
"""

from collections.abc import Sequence

from alembic import op

from services.common.migrate import create_index_beside_writers

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    create_index_beside_writers(
        "ix_withdrawals_status_oldest", "withdrawals", ["status", "requested_at_us", "withdrawal_id"]
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_withdrawals_status_oldest", table_name="withdrawals")
