"""Full policy, payout methods, withdrawals, daily totals, provider callbacks, clawbacks.

Revision ID: 0003
Revises: 0002
"""

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# DOMAIN.md: 200 diamonds = $1, $100 minimum, $1,000 a day, no fee, up to $500 approved at once.
DEFAULT_TERMS = [
    {
        "currency_code": "USD",
        "diamonds": 200,
        "amount_minor": 100,
        "withdrawal_min_minor": 10_000,
        "daily_max_minor": 100_000,
        "fee_fixed_minor": 0,
        "auto_approve_below_minor": 50_000,
    }
]


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("policies") as b:
        b.add_column(sa.Column("fee_bp", sa.Integer(), nullable=False, server_default="0"))
        b.add_column(sa.Column("terms_json", sa.Text(), nullable=False, server_default=json.dumps(DEFAULT_TERMS)))
    with op.batch_alter_table("creators") as b:
        b.add_column(sa.Column("clawed_units", sa.BigInteger(), nullable=False, server_default="0"))
    with op.batch_alter_table("earnings") as b:
        b.add_column(sa.Column("coins_clawed_back", sa.BigInteger(), nullable=False, server_default="0"))
        b.create_index("ix_earnings_sender_newest", ["sender_id", "occurred_at_us"])
        b.create_index("ix_earnings_creator_credited", ["creator_id", "credited_at_us"])

    op.create_table(
        "payout_methods",
        sa.Column("method_id", sa.String(64), primary_key=True),
        sa.Column("creator_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("masked", sa.String(64), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("provider_token", sa.String(128), nullable=False),
        sa.Column("currency_code", sa.String(3), nullable=False),
        sa.Column("verification", sa.String(16), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_us", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_payout_methods_creator_id", "payout_methods", ["creator_id"])
    op.create_table(
        "withdrawals",
        sa.Column("withdrawal_id", sa.String(64), primary_key=True),
        sa.Column("creator_id", sa.String(128), nullable=False),
        sa.Column("method_id", sa.String(64), nullable=False),
        sa.Column("diamonds", sa.BigInteger(), nullable=False),
        sa.Column("currency_code", sa.String(3), nullable=False),
        sa.Column("gross_minor", sa.BigInteger(), nullable=False),
        sa.Column("fee_minor", sa.BigInteger(), nullable=False),
        sa.Column("net_minor", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("policy_version", sa.Integer(), nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("reviewed_by", sa.String(128), nullable=False, server_default=""),
        sa.Column("failure_reason", sa.String(200), nullable=False, server_default=""),
        sa.Column("provider_ref", sa.String(128), nullable=False, server_default=""),
        sa.Column("requested_at_us", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_us", sa.BigInteger(), nullable=False),
        sa.Column("paid_at_us", sa.BigInteger(), nullable=True),
    )
    op.create_index("ix_withdrawals_status", "withdrawals", ["status"])
    op.create_index("ix_withdrawals_creator_newest", "withdrawals", ["creator_id", "requested_at_us"])
    op.create_table(
        "daily_withdrawals",
        sa.Column("creator_id", sa.String(128), primary_key=True),
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("currency_code", sa.String(3), primary_key=True),
        sa.Column("gross_minor", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "payout_events",
        sa.Column("provider", sa.String(32), primary_key=True),
        sa.Column("provider_event_id", sa.String(128), primary_key=True),
        sa.Column("withdrawal_id", sa.String(64), nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("received_at_us", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "clawbacks",
        sa.Column("reversal_event_id", sa.String(64), primary_key=True),
        sa.Column("creator_id", sa.String(128), primary_key=True),
        sa.Column("purchase_id", sa.String(64), nullable=False),
        sa.Column("sender_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("coins", sa.BigInteger(), nullable=False),
        sa.Column("units", sa.BigInteger(), nullable=False),
        sa.Column("diamonds", sa.BigInteger(), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_clawbacks_creator", "clawbacks", ["creator_id", "created_at_us"])


def downgrade() -> None:
    """Revert this revision."""
    for name in ("clawbacks", "payout_events", "daily_withdrawals", "withdrawals", "payout_methods"):
        op.drop_table(name)
    with op.batch_alter_table("earnings") as b:
        b.drop_index("ix_earnings_creator_credited")
        b.drop_index("ix_earnings_sender_newest")
        b.drop_column("coins_clawed_back")
    with op.batch_alter_table("creators") as b:
        b.drop_column("clawed_units")
    with op.batch_alter_table("policies") as b:
        b.drop_column("terms_json")
        b.drop_column("fee_bp")
