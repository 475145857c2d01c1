"""Find, cheaply, the cancelled gifts an older release left without their idempotency key.

Migration 0007 gave the gifts cancelled before it their key back, once, in the init container.
During the rolling update the previous release's pods keep serving and still cancel gifts the
old way (idempotency_key = NULL), after 0007 ran: the new release repairs those rows itself
(`Gifting.restore_keys_once`, a loop beside the sweeper). This revision gives it what it needs:

- key_moved_at_us: when a cancelled gift's key moved to a later gift (a retry of its request).
  A moved key leaves the row with idempotency_key NULL for good and on purpose; this column
  tells such a row from one the old release cancelled. NULL on every other gift, so it costs
  no storage and no statement on the hot path (SendGift does not write it).
- ix_gift_events_key_lost: a partial index of the rows left to repair (CANCELLED, no key, not
  moved). It is empty but for the gifts old pods cancel during a rollout (and the moves an older
  release made, which the repair marks), so the repair's look-up is one probe of an empty index.

The upgrade marks the moves made before it: every cancelled gift without a key whose key a later
gift holds (retries under 4f92b45's code, and the gifts 0007 left keyless because a retry held
their key). One scan of the cancelled gifts with a probe of the unique key index each, as 0007's
scan; without it they would all start in the index and the repair would work through them first.

On PostgreSQL the old pods keep reading and writing gift_events throughout: the column is added
and committed at once (a nullable column without a default is a catalog change, no rewrite; its
moment of ACCESS EXCLUSIVE lock waits at most the migration connection's lock_timeout,
MIGRATION_LOCK_TIMEOUT_S, for transactions in flight, else the step is rolled back and tried
again, see services/common/migrate.py), the index is built CONCURRENTLY (a scan of the table that
holds no writes, with no lock timeout: it waits for older transactions by design), and the
marking UPDATE locks only the rows it marks. On SQLite the service is one process, stopped while
it migrates. Old pods insert and select by column name, so the new column is invisible to them.
A retry after an interrupted attempt finds what that attempt committed and builds again an index
it left INVALID.

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from services.common.migrate import create_index_beside_writers

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The same text as storage.KEY_LOST: PostgreSQL uses a partial index only for a query whose
# WHERE implies its predicate.
_KEY_LOST = sa.text("status = 'CANCELLED' AND idempotency_key IS NULL AND key_moved_at_us IS NULL")


def _add_column_and_index() -> None:
    index = {"unique": False, "sqlite_where": _KEY_LOST, "postgresql_where": _KEY_LOST}
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table("gift_events", schema=None) as batch_op:
            batch_op.add_column(sa.Column("key_moved_at_us", sa.BigInteger(), nullable=True))
        op.create_index("ix_gift_events_key_lost", "gift_events", ["created_at_us"], **index)
        return
    # Outside the migrations' transaction, so that no lock on gift_events outlives its statement.
    # Each step commits by itself, so an attempt stopped after one of them (a crash, a lock
    # timeout) leaves it done while the revision is not stamped: the retry skips what is there
    # and builds again an index an interrupted CONCURRENTLY build left INVALID. (This revision
    # once set its own lock_timeout of 10 s for the ALTER and RESET it before the build; the
    # migration connection's MIGRATION_LOCK_TIMEOUT_S now bounds every migration's lock waits,
    # and create_index_beside_writers lifts it for the build.)
    with op.get_context().autocommit_block():
        op.execute("ALTER TABLE gift_events ADD COLUMN IF NOT EXISTS key_moved_at_us BIGINT")
    create_index_beside_writers("ix_gift_events_key_lost", "gift_events", ["created_at_us"], **index)


def upgrade() -> None:
    """Apply this revision."""
    _add_column_and_index()
    op.execute(
        "UPDATE gift_events SET key_moved_at_us = updated_at_us"
        " WHERE status = 'CANCELLED' AND idempotency_key IS NULL"
        " AND EXISTS (SELECT 1 FROM gift_events AS holder WHERE holder.idempotency_key = gift_events.client_key)"
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_gift_events_key_lost", table_name="gift_events")
    with op.batch_alter_table("gift_events", schema=None) as batch_op:
        batch_op.drop_column("key_moved_at_us")
