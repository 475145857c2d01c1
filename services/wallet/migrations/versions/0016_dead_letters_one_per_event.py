"""One dead letter per (consumer, event_id), and on SQLite dead-letter ids never reused.

Two replicas parking one event at the same moment both inserted it (a look-up, then an insert):
two rows, two alerts, two replays. The park is now an insert-if-absent on a unique
`ux_dead_letters_consumer_event`; duplicates already parked are deleted first, the oldest (lowest
id) of each kept. It replaces `ix_dead_letters_consumer_event`, same columns. Built CONCURRENTLY
on PostgreSQL: the previous release keeps parking events during the rollout (and after a
rollback); a park of its that the new index refuses (its look-up and another replica's insert
raced) fails with an IntegrityError, the rest of its batch is nak'ed uncounted, and the event's
redelivery finds the row and terminates its copy. Undecodable rows (no event id, NULL) stay one
per delivery: NULLs are distinct in a unique index on both backends.

SQLite: a replay deletes its row, and without AUTOINCREMENT the next park took the same id again,
so an old log line or a `dead-letters replay <id>` from shell history named another event. The
table is rebuilt with AUTOINCREMENT, rows and ids kept. PostgreSQL's identity never reuses an id.

Revision ID: 0016
Revises: 0015
"""

from collections.abc import Sequence

from services.common.migrate import make_dead_letters_unique, unmake_dead_letters_unique

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    make_dead_letters_unique()


def downgrade() -> None:
    """Revert this revision."""
    unmake_dead_letters_unique()
