"""SQLite: outbox ids are never reused (AUTOINCREMENT); PostgreSQL's identity never reuses them.

The relay deletes a row once JetStream has stored its event. Without AUTOINCREMENT, SQLite gives a
new row the highest id present plus one, so once the table drains, ids start again from 1, and
GetAudit's `outbox_last_id` ("the highest id written so far") was not: an audit that waited for
the rows written before its first look waited on rows written after it. The table is rebuilt
with AUTOINCREMENT, its rows and ids kept.

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

from services.common.migrate import rebuild_sqlite_outbox

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    rebuild_sqlite_outbox(True)


def downgrade() -> None:
    """Revert this revision."""
    rebuild_sqlite_outbox(False)
