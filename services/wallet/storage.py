"""Wallet tables (SQLAlchemy Core). The domain never sees these."""

from sqlalchemy import BigInteger, Boolean, Column, Index, Integer, MetaData, String, Table, text

from services.common.sql import code_point_index
from services.common.tables import BigId, add_common_tables

metadata = MetaData()
common = add_common_tables(metadata)

# O(1) balance reads: one row per user account, changed only together with its postings.
# System accounts (issued, spent:<reason>, reversed) have no row: their balance is the sum of
# their postings, so no hot row is written by every spend.
accounts = Table(
    "accounts",
    metadata,
    Column("account_id", String(160), primary_key=True),
    Column("user_id", String(128), nullable=False, unique=True),
    Column("balance", BigInteger, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("birth_date", String(10), nullable=True),
    Column("is_minor", Boolean, nullable=False),
    Column("blocked", Boolean, nullable=False),
    Column("region", String(8), nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
)

journal_entries = Table(
    "journal_entries",
    metadata,
    Column("entry_id", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("reference_id", String(128), nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
)

postings = Table(
    "postings",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("entry_id", String(64), nullable=False, index=True),
    Column("account_id", String(160), nullable=False),
    Column("amount", BigInteger, nullable=False),  # signed; the postings of an entry sum to zero
    Column("balance_after", BigInteger, nullable=True),  # for user accounts
    Column("created_at_us", BigInteger, nullable=False),
)
Index("ix_postings_account", postings.c.account_id, postings.c.id)
# The reversals' entries by the purchase they reverse (migration 0013): the audit's total of what
# reversals from before migration 0007 claimed reads each one's entry by its purchase. Partial: a
# spend or a purchase never enters it, so it is as small as the reversals and costs a spend
# nothing. The predicate as text, identical to the index's, so PostgreSQL plans on the partial
# index whatever it does with bound parameters (and `kind` is journal_entries' own: no other
# table the audit joins has one).
REVERSAL_ENTRIES = "kind IN ('REVERSAL_REFUNDED', 'REVERSAL_CHARGED_BACK')"
Index(
    "ix_journal_entries_reversal",
    journal_entries.c.reference_id,
    sqlite_where=text(REVERSAL_ENTRIES),
    postgresql_where=text(REVERSAL_ENTRIES),
)

coin_packages = Table(
    "coin_packages",
    metadata,
    Column("package_id", String(64), primary_key=True),
    Column("region", String(8), nullable=False),
    Column("currency_code", String(3), nullable=False),
    Column("coins", BigInteger, nullable=False),
    Column("price_minor", BigInteger, nullable=False),
    Column("active", Boolean, nullable=False),
    Column("channel", String(8), nullable=False, server_default="APP"),  # APP or WEB
)

purchases = Table(
    "purchases",
    metadata,
    Column("purchase_id", String(64), primary_key=True),
    Column("user_id", String(128), nullable=False, index=True),
    Column("package_id", String(64), nullable=False),
    Column("coins", BigInteger, nullable=False),
    Column("currency_code", String(3), nullable=False),
    Column("amount_minor", BigInteger, nullable=False),  # price frozen at creation
    Column("payment_method", String(32), nullable=False),
    Column("provider", String(32), nullable=False),
    Column("checkout_session_id", String(128), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
    Column("bonus_coins", BigInteger, nullable=False, server_default="0"),  # part of `coins`
    Column("promotion_id", String(64), nullable=False, server_default=""),
    Column("region", String(8), nullable=False, server_default=""),
    # Of `coins`, how many repaid a debt when credited (NULL: credited before migration 0006).
    Column("debt_repaid_coins", BigInteger, nullable=True),
    # Once reversed: the coins_already_spent its reversal reported (NULL: before migration 0007).
    Column("coins_claimed", BigInteger, nullable=True),
)

# PENDING purchases by when they were created (migration 0014): the reconciler's read of those
# whose callback is late. Partial: a purchase leaves it when its callback lands, so it holds only
# the checkouts not yet paid. The predicate as text, identical to the index's (see REVERSAL_ENTRIES).
PENDING_PURCHASES = "status = 'PENDING'"
Index(
    "ix_purchases_pending",
    purchases.c.created_at_us,
    purchases.c.purchase_id,
    sqlite_where=text(PENDING_PURCHASES),
    postgresql_where=text(PENDING_PURCHASES),
)

payment_events = Table(
    "payment_events",
    metadata,
    Column("provider", String(32), primary_key=True),
    Column("provider_event_id", String(128), primary_key=True),
    Column("purchase_id", String(64), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("received_at_us", BigInteger, nullable=False),
)

# The arbiter of every spend: one row per idempotency key, SPENT or CANCELLED, never both.
spends = Table(
    "spends",
    metadata,
    Column("idempotency_key", String(128), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("entry_id", String(64), nullable=True),
    Column("user_id", String(128), nullable=True),
    Column("amount", BigInteger, nullable=True),
    Column("reason", String(16), nullable=True),
    Column("reference_id", String(128), nullable=True),
    Column("request_hash", String(64), nullable=True),
    Column("balance_after", BigInteger, nullable=True),
    Column("created_at_us", BigInteger, nullable=False),
)
# The audit's recent window (`livegifts audit --detail-since`) in creation order (migration 0010).
Index("ix_spends_created", spends.c.created_at_us, spends.c.idempotency_key)
# The audit's full read (`livegifts audit --detail`) in code point order, on PostgreSQL (migration 0012).
code_point_index("ix_spends_key_code_point", spends.c.idempotency_key)

# A promotion changes what a package gives (bonus coins) or costs (discount) inside a window.
promotions = Table(
    "promotions",
    metadata,
    Column("promotion_id", String(64), primary_key=True),
    Column("package_id", String(64), nullable=False, index=True),
    Column("bonus_coins", BigInteger, nullable=False),
    Column("discount_bps", Integer, nullable=False),
    Column("starts_at_us", BigInteger, nullable=False),
    Column("ends_at_us", BigInteger, nullable=False),
    Column("active", Boolean, nullable=False),
    Column("updated_by", String(128), nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
)

# One cap per user, setter (USER or OPERATOR) and period; NULL limit = no cap. A raise waits in
# pending_* until pending_at_us (the cooling-off period).
spending_limits = Table(
    "spending_limits",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("setter", String(16), primary_key=True),
    Column("period", String(8), primary_key=True),
    Column("limit_coins", BigInteger, nullable=True),
    Column("pending_limit_coins", BigInteger, nullable=True),
    Column("pending_at_us", BigInteger, nullable=True),
    Column("updated_at_us", BigInteger, nullable=False),
)

# Coins spent per user and period (UTC day, ISO week, month), written by every spend batch in its
# own transaction: the batch locks its senders' accounts, then their rows (FOR UPDATE on
# PostgreSQL, in sorted order; SQLite serializes writers), adds each spend to the totals it read and
# checks the caps, so concurrent spends queue on the rows and cannot pass a cap together
# (services/wallet/spending.py).
spend_counters = Table(
    "spend_counters",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("period", String(8), primary_key=True),
    Column("period_key", String(16), primary_key=True),
    Column("spent_coins", BigInteger, nullable=False),
)
