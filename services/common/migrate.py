"""Alembic, one history per service, run at start (or by `python -m services.<svc> migrate`)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from alembic import command, context, op
from alembic.config import Config
from sqlalchemy import MetaData, pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import async_engine_from_config

from services.common.db import ensure_sqlite_dir, normalize_url

log = logging.getLogger(__name__)

MIGRATION_LOCK_KEY = 7301163  # the PostgreSQL advisory lock migrations take, per database
MIGRATION_LOCK_POLL_S = 0.5  # how often a replica tries again for it while another migrates
# How often a replica waiting for it says so: an init container that waits shows only `Init:0/1`.
MIGRATION_LOCK_LOG_EVERY_S = 30.0


def alembic_config(migrations_dir: Path, url: str) -> Config:
    """An Alembic config for one service's migrations folder and database."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


async def upgrade_head(migrations_dir: Path, url: str) -> None:
    """Bring the database to the newest revision (Alembic runs its own loop in a thread)."""
    ensure_sqlite_dir(url)
    cfg = alembic_config(migrations_dir, url)
    await asyncio.to_thread(command.upgrade, cfg, "head")
    log.info("migrations applied", extra={"migrations": str(migrations_dir)})


def _run_sync(connection: Connection, metadata: MetaData) -> None:
    sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=sqlite,  # SQLite can only ALTER through table copies
        compare_type=True,
    )
    postgresql = connection.dialect.name == "postgresql"
    if postgresql:
        # Replicas starting together: one migrates, the others wait and then find nothing to do.
        # A session lock, not a transaction's: a migration that must run outside the transaction
        # (CREATE INDEX CONCURRENTLY, in an autocommit block) commits it, and the lock must stay.
        # The others wait between short tries, in no transaction: a CONCURRENTLY build waits for
        # every older snapshot to end, so one held while blocked on this lock would wait forever.
        started = time.monotonic()
        said = None
        while True:
            got = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            held = bool(got.scalar_one())
            connection.commit()
            if held:
                break
            now = time.monotonic()
            if said is None or now - said >= MIGRATION_LOCK_LOG_EVERY_S:
                waited_s = round(now - started, 1)
                log.info("waiting for the migration lock: another replica is migrating", extra={"waited_s": waited_s})
                said = now
            time.sleep(MIGRATION_LOCK_POLL_S)
    with context.begin_transaction():
        context.run_migrations()
    if postgresql:  # (a failure closes the connection, which ends the lock with the session)
        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
        connection.commit()


async def _run_async(metadata: MetaData) -> None:
    cfg = context.config
    engine = async_engine_from_config(
        cfg.get_section(cfg.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    async with engine.connect() as conn:
        await conn.run_sync(_run_sync, metadata)
    await engine.dispose()


def run_env(metadata: MetaData) -> None:
    """Body of every service's migrations/env.py (online mode only: we always have the database)."""
    asyncio.run(_run_async(metadata))


def rebuild_sqlite_outbox(autoincrement: bool) -> None:
    """In a migration: rebuild the outbox table on SQLite with (or without) AUTOINCREMENT, rows
    and ids kept; on PostgreSQL nothing (an identity never reuses an id)."""
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("outbox", recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}):
        pass


def create_index_beside_writers(name: str, table: str, columns: list[str], **kw: Any) -> None:
    """In a migration: create an index without holding up the table's writers.

    On PostgreSQL the previous release keeps writing the table while the new one migrates (a
    rolling update), and a plain CREATE INDEX blocks every write for the whole scan: it is built
    CONCURRENTLY, outside the migrations' transaction, and an attempt stopped part way (leaving
    the index INVALID, the revision unstamped) is built again by the retry. On SQLite the service
    is one process, stopped while it migrates.
    """
    if op.get_bind().dialect.name != "postgresql":
        op.create_index(name, table, columns, **kw)
        return
    with op.get_context().autocommit_block():
        invalid = op.get_bind().execute(
            text("SELECT count(*) FROM pg_index WHERE indexrelid = to_regclass(:name) AND NOT indisvalid"),
            {"name": name},
        )
        if invalid.scalar_one():
            op.execute(f'DROP INDEX CONCURRENTLY "{name}"')
        op.create_index(name, table, columns, postgresql_concurrently=True, if_not_exists=True, **kw)


IDEMPOTENCY_AGE_INDEX = "ix_idempotency_keys_created_at"


def create_idempotency_age_index() -> None:
    """In a migration of each service: the index the IdempotencyPruner finds old records by.

    BRIN on PostgreSQL, as the inbox's (0005): records are written in created order, so a few
    summary pages find the old ones and a command's insert writes no index entry of its own.
    SQLite has B-trees only. Built beside the writers (`create_index_beside_writers`): the table
    has grown since the service began, and the previous release keeps recording its commands'
    answers during the rollout.
    """
    create_index_beside_writers(
        IDEMPOTENCY_AGE_INDEX,
        "idempotency_keys",
        ["created_at_us"],
        postgresql_using="brin",
        postgresql_with={"autosummarize": "on"},
    )


def drop_idempotency_age_index() -> None:
    """Undo create_idempotency_age_index."""
    op.drop_index(IDEMPOTENCY_AGE_INDEX, table_name="idempotency_keys")
