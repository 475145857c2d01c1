"""An index to find old idempotency records: the IdempotencyPruner deletes them after IDEMPOTENCY_RETENTION_DAYS.

The same index in every service (services/common/migrate.py create_idempotency_age_index).

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

from services.common.migrate import create_idempotency_age_index, drop_idempotency_age_index

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    create_idempotency_age_index()


def downgrade() -> None:
    """Revert this revision."""
    drop_idempotency_age_index()
