"""Alembic environment of the gifting database."""

from services.common.migrate import run_env
from services.gifting.storage import metadata

run_env(metadata)
