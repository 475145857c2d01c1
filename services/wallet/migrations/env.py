"""Alembic environment of the wallet database."""

from services.common.migrate import run_env
from services.wallet.storage import metadata

run_env(metadata)
