"""Payout tables (SQLAlchemy Core)."""

from sqlalchemy import BigInteger, Column, Index, Integer, MetaData, String, Table, Text, text

from services.common.sql import code_point_index
from services.common.tables import add_common_tables

metadata = MetaData()
common = add_common_tables(metadata)

# Versioned policy: the newest row is in force; old rows stay as the record of who changed what.
policies = Table(
    "policies",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("creator_share_bp", Integer, nullable=False),
    Column("changed_by", String(128), nullable=False),
    Column("changed_at_us", BigInteger, nullable=False),
    Column("fee_bp", Integer, nullable=False, server_default="0"),
    # JSON list of CurrencyTerms (cash value, limits, fixed fee, auto-approve threshold per currency).
    Column("terms_json", Text, nullable=False),
)

# One row per creator, written once per consumed batch (not once per gift).
# earned_units = sum over events of coins * share_bp; diamonds credited = earned_units // 10000,
# so the fractional remainder (earned_units % 10000) is kept, never lost, and the result does not
# depend on the order events arrive in.
creators = Table(
    "creators",
    metadata,
    Column("creator_id", String(128), primary_key=True),
    Column("coins_received", BigInteger, nullable=False),
    Column("earned_units", BigInteger, nullable=False),
    Column("diamonds_credited", BigInteger, nullable=False),
    Column("diamonds_available", BigInteger, nullable=False),
    Column("diamonds_held", BigInteger, nullable=False),
    Column("diamonds_withdrawn", BigInteger, nullable=False),
    Column("diamonds_clawed_back", BigInteger, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
    # Clawbacks accumulate like credits: clawed_units = sum of coins * share_bp taken back;
    # diamonds_clawed_back = clawed_units // 10000, the remainder kept for the next whole diamond.
    Column("clawed_units", BigInteger, nullable=False, server_default="0"),
    # Why the wallet's word holds the creator's APPROVED withdrawals (ACCOUNT_BLOCKED, UNDERAGE,
    # WALLET_UNAVAILABLE; '' none): the dispatcher's last answer from the wallet, written when it
    # changes (migration 0014), read as Withdrawal.hold.
    Column("wallet_hold", String(32), nullable=False, server_default=""),
)

# One row per consumed gift/tip/unlock event: the creator's earnings history.
earnings = Table(
    "earnings",
    metadata,
    Column("event_id", String(64), primary_key=True),
    Column("creator_id", String(128), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("sender_id", String(128), nullable=False),
    Column("stream_id", String(64), nullable=False),
    Column("coins", BigInteger, nullable=False),
    Column("share_bp", Integer, nullable=False),
    Column("units", BigInteger, nullable=False),
    Column("occurred_at_us", BigInteger, nullable=False),
    # When gifting recorded the gift, before its coins were spent (NULL: events from before the
    # field, or from an older gifting): what a purchase reversal's time is compared with.
    Column("recorded_at_us", BigInteger, nullable=True),
    Column("credited_at_us", BigInteger, nullable=False),
    # Coins of this event already taken back by purchase reversals (never more than `coins`).
    Column("coins_clawed_back", BigInteger, nullable=False, server_default="0"),
    Index("ix_earnings_sender_newest", "sender_id", "occurred_at_us"),
    Index("ix_earnings_creator_credited", "creator_id", "credited_at_us"),
    # The audit's recent window (`livegifts audit --detail-since`) in credit order (migration 0010).
    Index("ix_earnings_credited", "credited_at_us", "event_id"),
)
# The audit's full read (`livegifts audit --detail`) in code point order, on PostgreSQL (migration 0015).
code_point_index("ix_earnings_id_code_point", earnings.c.event_id)

# Payout methods: only a mask for display, a keyed fingerprint and the provider's token are
# stored; the full account number or e-mail is handed to the provider and never kept or logged.
payout_methods = Table(
    "payout_methods",
    metadata,
    Column("method_id", String(64), primary_key=True),
    Column("creator_id", String(128), nullable=False, index=True),
    Column("kind", String(16), nullable=False),
    Column("masked", String(64), nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("provider_token", String(128), nullable=False),
    Column("currency_code", String(3), nullable=False),
    Column("verification", String(16), nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
)

withdrawals = Table(
    "withdrawals",
    metadata,
    Column("withdrawal_id", String(64), primary_key=True),
    Column("creator_id", String(128), nullable=False),
    Column("method_id", String(64), nullable=False),
    Column("diamonds", BigInteger, nullable=False),
    Column("currency_code", String(3), nullable=False),
    Column("gross_minor", BigInteger, nullable=False),
    Column("fee_minor", BigInteger, nullable=False),
    Column("net_minor", BigInteger, nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("policy_version", Integer, nullable=False),
    Column("day", String(10), nullable=False),  # UTC date the daily maximum was counted on
    Column("reviewed_by", String(128), nullable=False, server_default=""),
    Column("failure_reason", String(200), nullable=False, server_default=""),
    Column("provider_ref", String(128), nullable=False, server_default=""),
    Column("requested_at_us", BigInteger, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
    Column("paid_at_us", BigInteger, nullable=True),
    Index("ix_withdrawals_creator_newest", "creator_id", "requested_at_us"),
    # ListWithdrawals across creators (the review queue): one status, oldest requested first.
    Index("ix_withdrawals_status_oldest", "status", "requested_at_us", "withdrawal_id"),
)

# Gross requested per creator per UTC day and currency: the daily maximum is enforced by one
# conditional UPDATE on this row, so concurrent requests cannot together exceed it.
daily_withdrawals = Table(
    "daily_withdrawals",
    metadata,
    Column("creator_id", String(128), primary_key=True),
    Column("day", String(10), primary_key=True),
    Column("currency_code", String(3), primary_key=True),
    Column("gross_minor", BigInteger, nullable=False),
)

# Payout-provider callbacks seen: the primary key makes a re-sent callback a no-op.
payout_events = Table(
    "payout_events",
    metadata,
    Column("provider", String(32), primary_key=True),
    Column("provider_event_id", String(128), primary_key=True),
    Column("withdrawal_id", String(64), nullable=False),
    Column("event_type", String(32), nullable=False),
    Column("received_at_us", BigInteger, nullable=False),
)

# What a reversal could not claw back when it was consumed: its gifts' earnings had not arrived
# yet (the gift consumer behind, a gift left PENDING until the sweeper, an event parked and
# replayed) or lay beyond CLAWBACK_ROWS_MAX. The shortfall settler takes the open coins from
# the sender's earnings that arrive later, among gifts recorded before the reversal.
#
# The open ones' predicate (ix_clawback_shortfalls_open) as text, identical to the index's, so
# PostgreSQL plans a read of them on the partial index whatever it does with bound parameters.
OPEN_SHORTFALLS = "coins_open > 0"
clawback_shortfalls = Table(
    "clawback_shortfalls",
    metadata,
    Column("reversal_event_id", String(64), primary_key=True),
    Column("purchase_id", String(64), nullable=False),
    Column("sender_id", String(128), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("coins_open", BigInteger, nullable=False),  # never negative; 0 once settled
    Column("reversed_at_us", BigInteger, nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
    # The open ones only: settled rows stay as a record but are never read again.
    Index(
        "ix_clawback_shortfalls_open",
        "reversal_event_id",
        postgresql_where=text(OPEN_SHORTFALLS),
        sqlite_where=text(OPEN_SHORTFALLS),
    ),
)

# One entry per reversal per creator: the diamonds a wallet.purchase.reversed took back. A later
# settlement of the reversal's shortfall is an entry of its own, keyed by a fresh id in
# `reversal_event_id` (its purchase_id is the reversed purchase's).
clawbacks = Table(
    "clawbacks",
    metadata,
    Column("reversal_event_id", String(64), primary_key=True),
    Column("creator_id", String(128), primary_key=True),
    Column("purchase_id", String(64), nullable=False),
    Column("sender_id", String(128), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("coins", BigInteger, nullable=False),
    Column("units", BigInteger, nullable=False),
    Column("diamonds", BigInteger, nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    # When the reversal the entry is for happened (its occurred_at): what an older reversal
    # applied after it may take in its place (`Payout._stand_in_takes`). NULL on entries written
    # before migration 0016, which free nothing.
    Column("reversed_at_us", BigInteger, nullable=True),
    Index("ix_clawbacks_creator", "creator_id", "created_at_us"),
    Index("ix_clawbacks_sender_reversed", "sender_id", "reversed_at_us"),
)
