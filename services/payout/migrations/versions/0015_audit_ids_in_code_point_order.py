"""An index of the earnings by id in code point order, for the audit's full read.

`livegifts audit --detail` reads every record range of ids by range, ranges it cuts by code
point (Python's str order); ListAuditRecords now orders and bounds ids COLLATE "C" on
PostgreSQL, so a database collation that sorts "a1" before "B1" (en_US, ICU) no longer lets an
id fall between two ranges (earning ids interleave there with the spends' keys, their callers'
own text). The primary key's index is in the database's collation and cannot serve that order:
without this one each page read and sorted the whole table. PostgreSQL only (SQLite compares
BINARY, which is code point order, on the primary key's index); built CONCURRENTLY, as the
previous release keeps writing the table during the rollout.

Revision ID: 0015
Revises: 0014
"""

from collections.abc import Sequence

from services.common.migrate import create_code_point_index, drop_code_point_index

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    create_code_point_index("ix_earnings_id_code_point", "earnings", "event_id")


def downgrade() -> None:
    """Revert this revision."""
    drop_code_point_index("ix_earnings_id_code_point", "earnings")
