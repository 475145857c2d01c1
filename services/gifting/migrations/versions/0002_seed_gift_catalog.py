"""Seed the public gift catalog (DOMAIN.md); operators add, reprice and retire gifts later.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A frozen copy: a migration must not change when the domain module does.
CATALOG = [
    ("rose", "Rose", 1),
    ("gg", "GG", 1),
    ("ice-cream-cone", "Ice Cream Cone", 1),
    ("finger-heart", "Finger Heart", 5),
    ("panda", "Panda", 5),
    ("hand-wave", "Hand Wave", 9),
    ("lollipop", "Lollipop", 10),
    ("love-bang", "Love Bang", 25),
    ("sun-cream", "Sun Cream", 50),
    ("rainbow-puke", "Rainbow Puke", 100),
    ("musical-notes", "Musical Notes", 169),
    ("drama-queen", "Drama Queen", 199),
    ("corgi", "Corgi", 299),
    ("concert", "Concert", 500),
    ("galaxy", "Galaxy", 1000),
    ("gold-mine", "Gold Mine", 1000),
    ("private-jet", "Private Jet", 4888),
    ("interstellar", "Interstellar", 10000),
    ("planet", "Planet", 15000),
    ("rocket", "Rocket", 20000),
    ("lion", "Lion", 29999),
    ("universe", "Universe", 34999),
]


def upgrade() -> None:
    """Insert the catalog."""
    table = sa.table(
        "gifts",
        sa.column("gift_id", sa.String),
        sa.column("name", sa.String),
        sa.column("price_coins", sa.BigInteger),
        sa.column("active", sa.Boolean),
        sa.column("updated_at_us", sa.BigInteger),
    )
    op.bulk_insert(
        table,
        [{"gift_id": g, "name": n, "price_coins": p, "active": True, "updated_at_us": 0} for g, n, p in CATALOG],
    )


def downgrade() -> None:
    """Remove the seeded gifts."""
    op.execute("DELETE FROM gifts")
