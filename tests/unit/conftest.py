"""Fixtures several unit test modules share; a module's own fixtures stay in it.

pytest finds these by name, so a test module asks for them without importing anything (no
`# noqa: F401` import of another test module, which broke its users when that module moved).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.payout.usecases import Payout
from services.wallet.usecases import Wallet
from tests.support.payout import RecordingProvider, payout_on
from tests.support.wallet import wallet_on


@pytest.fixture
async def wallet(tmp_path: Path) -> AsyncIterator[Wallet]:
    """The wallet's use cases over a migrated SQLite file (tests/support/wallet.py: wallet_on)."""
    async with wallet_on(f"sqlite+aiosqlite:///{tmp_path / 'wallet.db'}", "wallet-test") as w:
        yield w


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[Payout, RecordingProvider, Path]]:
    """Payout's use cases over a migrated SQLite file, its recording provider, and the file's path
    (for a test that commits beside the use cases with sqlite3)."""
    path = tmp_path / "payout.db"
    async with payout_on(f"sqlite+aiosqlite:///{path}") as (payout, provider):
        yield payout, provider, path
