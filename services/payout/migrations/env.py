"""Alembic environment of the payout database."""

from services.common.migrate import run_env
from services.payout.storage import metadata

run_env(metadata)
