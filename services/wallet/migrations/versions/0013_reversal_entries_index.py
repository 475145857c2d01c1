"""An index of the reversals' ledger entries by purchase, for the audit's total of their claims.

The audit sums what every reversal claimed (`coins_claimed_by_reversals`); a reversal from before
revision 0007 recorded nothing, and its claim is read from the balance its ledger entry left,
found by the purchase it reverses (`journal_entries.reference_id`). No index had that column:
every audit run read the whole of journal_entries, one entry per spend. Partial on the reversal
kinds (the same text as storage.REVERSAL_ENTRIES, so PostgreSQL plans on it whatever it does
with bound parameters): spends and purchases never enter it. Built CONCURRENTLY on PostgreSQL:
the previous release keeps writing journal_entries during the rollout.

Revision ID: 0013
Revises: 0012
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from services.common.migrate import create_index_beside_writers

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_REVERSALS = sa.text("kind IN ('REVERSAL_REFUNDED', 'REVERSAL_CHARGED_BACK')")


def upgrade() -> None:
    """Apply this revision."""
    create_index_beside_writers(
        "ix_journal_entries_reversal",
        "journal_entries",
        ["reference_id"],
        sqlite_where=_REVERSALS,
        postgresql_where=_REVERSALS,
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_journal_entries_reversal", table_name="journal_entries")
