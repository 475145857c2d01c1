"""The Prometheus metrics every service exports (one registry per process)."""

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# No `<name>_created` series beside each counter's and histogram's label set (prometheus_client's
# default: the Unix time the label set was first used). Prometheus stores each as a series of its
# own, a sixth to a quarter of a service's series (after a mixed load of gifts: wallet 275 to 207,
# gifting 372 to 311, payout 219 to 162, per pod), and nothing reads them: every alert takes
# increase() or rate(), and the counters they watch are exported at 0 from the pod's start
# instead (docs/sre.md "Dashboards and alerts").
disable_created_metrics()

RPC_SECONDS = Histogram(
    "livegifts_rpc_seconds",
    "Server-side gRPC handling time",
    ["method", "code"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
OUTBOX_PUBLISHED = Counter("livegifts_outbox_published_total", "Outbox events published and acked", ["subject"])
OUTBOX_PUBLISH_ERRORS = Counter("livegifts_outbox_publish_errors_total", "Failed publish attempts")
OUTBOX_PENDING = Gauge("livegifts_outbox_pending", "Outbox rows not yet acked by JetStream (last relay pass)")
OUTBOX_OLDEST = Gauge(
    "livegifts_outbox_oldest_seconds",
    "Age of the oldest outbox row waiting to be published, at the relay's last pass (0: none left)",
)
OUTBOX_HELD = Gauge(
    "livegifts_outbox_held_events",
    "Outbox rows this relay holds unsent because they are larger than the NATS servers' max_payload (a producer bug):"
    " by id up to RELAY_HELD_MAX, then also those whose payload alone is larger, counted",
)
STREAMS_RECREATED = Counter(
    "livegifts_streams_recreated_total",
    "JetStream streams found deleted, or not taking the suite's subjects, while the service ran; set up again",
)
STREAM_PURGES = Counter(
    "livegifts_stream_purges_total",
    "Purges of a JetStream stream the service uses, messages deleted from one, or its limits lowered below the"
    " suite's, seen in JetStream's API audit advisories (by hand: the services never do any of them)",
)
CONSUMED = Counter("livegifts_events_consumed_total", "Events handled by consumers", ["consumer", "result"])
# A consumer whose pull or bind fails applies nothing and retries no event, so neither the
# dead-letter nor the stuck-consumer alert saw it: LivegiftsConsumerNotPulling watches this.
CONSUMER_LOOP_FAILURES = Counter(
    "livegifts_consumer_loop_failures_total",
    "Tries of a consumer to bind to its durable or pull from it that failed (logged 'consumer loop failed, retrying')",
    ["consumer"],
)
# Set by each consumer's position check, once per process as it first binds (inbox.py,
# `Consumer.behind`): 1 for what that check found, 0 for the other results, all 0 until it has
# run. A gauge, not a counter: the check runs seconds after the pod starts, before Prometheus's
# first scrape, so a count would first appear at 1 and increase() would never see it; the gauge
# stays 1 for the pod's life, and so does LivegiftsConsumerDatabaseBehind.
CONSUMER_POSITION_CHECK = Gauge(
    "livegifts_consumer_position_check",
    "The result of the consumer's check, as it bound in this process, that its database holds every event its durable"
    " acked: ok, behind (an acked event unknown to the inbox: the database restored to an earlier point),"
    " not_checked (NATS or the database did not answer); 1 for the result, 0 for the others",
    ["consumer", "result"],
)
CONSUMER_BATCH = Histogram(
    "livegifts_consumer_batch_size",
    "Messages per consumer batch",
    ["consumer"],
    buckets=(1, 4, 16, 64, 256, 1024),
)
BATCH_ITEMS = Histogram(
    "livegifts_batch_items",
    "Calls per group-commit batch (one transaction or one wallet call shared by this many)",
    ["batcher"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
# Items a batcher dropped unrun because their callers had gone (a deadline passed while they queued).
BATCH_ITEMS_SKIPPED = Counter(
    "livegifts_batch_items_skipped",
    "Calls whose caller went away (its deadline) while waiting for a group-commit batch, dropped unrun",
    ["batcher"],
)
# Wallet: spend batches PostgreSQL aborted (a deadlock, a serialization failure) and that were run
# again (spending.DEADLOCK_RETRIES): the lock order should leave none, so any is worth a look.
TRANSACTION_RETRIES = Counter(
    "livegifts_transaction_retries_total",
    "Transactions aborted by the database and run again, by operation and reason (deadlock, serialization)",
    ["operation", "reason"],
)
INBOX_PRUNED = Counter("livegifts_inbox_pruned_total", "Inbox rows deleted after the retention")
IDEMPOTENCY_PRUNED = Counter(
    "livegifts_idempotency_records_pruned_total", "Idempotency records deleted after the retention"
)
# Gifting: the keys of unlocks answered by an earlier unlock (KEY_ONLY rows of gift_events),
# deleted after IDEMPOTENCY_RETENTION_DAYS like the idempotency records (services/gifting/keyrows.py).
KEY_ONLY_ROWS_PRUNED = Counter(
    "livegifts_key_only_rows_pruned_total", "Answered unlocks' key rows (KEY_ONLY) deleted after the retention"
)
# Gifting: daily leaderboard rows older than LEADERBOARD_DAILY_RETENTION_DAYS (services/gifting/readmodels.py).
# Every pruner (services/common/pruning.py), by `pruner`: inbox, idempotency, key_only_rows,
# leaderboard_daily. Set when it starts and at each chunk it commits, a round's last included
# (one of no rows when nothing is old enough), so it moves every interval on an idle suite too;
# one that stops moving is a pruner whose rounds fail or whose loop is gone (LivegiftsPrunerStopped).
PRUNER_LAST_SUCCESS = Gauge(
    "livegifts_pruner_last_success_timestamp_seconds",
    "Unix time a pruner last committed a chunk or finished a round (its start before its first), by pruner",
    ["pruner"],
)
LEADERBOARD_DAILY_ROWS_PRUNED = Counter(
    "livegifts_leaderboard_daily_rows_pruned_total", "Daily leaderboard rows deleted after the retention"
)
# Wallet: purchases credited after a failure report (a later attempt took the money); reconcile these.
PURCHASES_SUCCEEDED_AFTER_FAILURE = Counter(
    "livegifts_purchases_succeeded_after_failure_total", "Purchases a success callback credited after they had FAILED"
)
# Wallet: purchases moved to an outcome by a provider callback, by that outcome and the purchase's
# currency, counted once per change after its commit (a duplicate callback, or a failure reported
# after an outcome, changes nothing and counts nothing). CHARGED_BACK over SUCCEEDED is the
# chargeback rate card networks hold a merchant to (LivegiftsChargebackRateHigh). The wallet
# creates every outcome and currency at 0 when it starts; its currencies are a fixed few.
PURCHASE_OUTCOMES = Counter(
    "livegifts_purchase_outcomes_total",
    "Purchases a provider callback moved to an outcome (SUCCEEDED, FAILED, REFUNDED, CHARGED_BACK), by outcome"
    " and currency_code (wallet)",
    ["outcome", "currency_code"],
)
# Wallet: payment.failed callbacks for a purchase that already had an outcome, by that outcome;
# recorded and answered OK, they change nothing (a declined attempt reported late).
LATE_PAYMENT_FAILURES = Counter(
    "livegifts_late_payment_failures_total",
    "Failure callbacks accepted without effect: the purchase was no longer PENDING (wallet)",
    ["status"],
)
# Wallet: purchases a success callback credited to a buyer who may not buy now (blocked, or under
# age, since the purchase was created): the money was taken, so the coins are credited (they
# cannot be spent), and trust and safety refunds the payment; by reason (ACCOUNT_BLOCKED, UNDERAGE).
PURCHASES_CREDITED_RESTRICTED = Counter(
    "livegifts_purchases_credited_restricted_total",
    "Purchases credited to a buyer who may not buy now (blocked or under age), by reason (wallet)",
    ["reason"],
)
# Wallet: spends its own checks refused, counted when the batch deciding them commits, by reason
# (INSUFFICIENT_COINS, SPENDING_LIMIT_EXCEEDED, ACCOUNT_BLOCKED, UNDERAGE) and whose account the
# check was about (sender, or recipient for a gift to a blocked or under-age creator). Gifting
# sends gifts in SpendMany batches that answer OK, so a refused item shows in no status code:
# this is where trust and safety sees bursts against the caps and blocked accounts still trying.
SPENDS_REFUSED = Counter(
    "livegifts_spends_refused_total",
    "Spends the wallet refused: no coins, a spending cap, a blocked or under-age sender or recipient (wallet)",
    ["reason", "role"],
)
# Gifting: gifts, tips and unlocks (SendGift, SendTip, UnlockContent, SendGifts items) its own
# checks refused before any coin was asked of the wallet (step 1 of the saga), by reason
# (services/gifting/usecases.py REFUSALS) and whose account the check was about (sender, or
# creator for a blocked or under-age creator; sender for everything else). The wallet never sees
# these (livegifts_spends_refused_total counts its own refusals, which gifting only passes on and
# does not count again), and SendGifts answers them inside an OK.
GIFTS_REFUSED = Counter(
    "livegifts_gifts_refused_total",
    "Gifts, tips and unlocks gifting's own checks refused before any spend, by reason and role (gifting)",
    ["reason", "role"],
)
# Wallet and payout: signed provider callbacks refused because their event id was recorded
# for another purchase or withdrawal, or another event type of the same one (a provider
# bug; PROVIDER_EVENT_ID_REUSED).
PROVIDER_EVENT_IDS_REUSED = Counter(
    "livegifts_provider_event_ids_reused_total",
    "Provider callbacks refused: their event id was first recorded for another purchase or withdrawal"
    " or another event type",
)
# Wallet and payout: a provider outcome reported again under an event id of its own once that
# outcome was applied, answered as a duplicate and changing nothing, by outcome: a purchase's
# SUCCEEDED (wallet), a withdrawal's PAID or FAILED (payout). Normal when a reconciler's look-up
# applied the outcome before the provider's own callback came (a look-up does not carry the
# webhook's event id), or the provider re-sends an event from its dashboard; a SUCCEEDED or PAID
# beyond those may be money moved twice at the provider (each is logged with its purchase or
# withdrawal). A delivery of the event id that was applied is a duplicate counted nowhere. Each
# service creates its outcomes at 0 when it starts.
PROVIDER_OUTCOMES_REPEATED = Counter(
    "livegifts_provider_outcomes_repeated_total",
    "Provider outcomes reported again under another event id once applied, answered as duplicates, by outcome"
    " (wallet SUCCEEDED, payout PAID and FAILED)",
    ["outcome"],
)
# Payout: coins purchase reversals could not claw back yet (their gifts' earnings had not arrived).
# Payout: signed payout outcomes refused for the withdrawal's status (never submitted, or another
# outcome already), by reason; payout creates both reasons' series at 0 when it starts.
PAYOUT_CALLBACKS_REFUSED = Counter(
    "livegifts_payout_callbacks_refused_total",
    "Signed payout callbacks (or looked-up outcomes) refused for their withdrawal's status, by reason (payout)",
    ["reason"],
)
CLAWBACK_SHORTFALL_OPEN = Gauge(
    "livegifts_clawback_shortfall_open_coins", "Coins reversals have yet to claw back (payout, last settler round)"
)
# Payout: how long the oldest open shortfall has waited for its gifts' earnings (0 when none),
# set with the coins each settler round. Settled within seconds while the gift events flow; an
# old one is gift events that never came (LivegiftsClawbackShortfallOpen).
CLAWBACK_SHORTFALL_OLDEST = Gauge(
    "livegifts_clawback_shortfall_oldest_seconds",
    "How long the oldest open clawback shortfall has been open (payout, last settler round; 0 when none)",
)
CLAWBACK_SHORTFALL_SETTLED = Counter(
    "livegifts_clawback_shortfall_settled_coins_total", "Coins of reversal shortfalls clawed back later"
)
# Payout: withdrawals handed to the payout provider whose outcome callback has not come yet.
WITHDRAWALS_PROCESSING = Gauge(
    "livegifts_withdrawals_processing", "Withdrawals with the payout provider, awaiting its callback (payout)"
)
WITHDRAWALS_PROCESSING_OLDEST = Gauge(
    "livegifts_withdrawal_processing_oldest_seconds",
    "How long the oldest withdrawal has waited for the payout provider's callback (payout; 0 when none)",
)
# Payout: withdrawals not yet handed to the provider, by status: PENDING_REVIEW waits for an
# operator, APPROVED for the dispatcher (seconds) or for what holds it (a wallet hold, a negative
# balance, a method that failed verification), so an old one is a withdrawal nobody moves.
WITHDRAWALS_WAITING = Gauge(
    "livegifts_withdrawals_waiting",
    "Withdrawals not yet handed to the payout provider, by status: PENDING_REVIEW or APPROVED (payout)",
    ["status"],
)
WITHDRAWALS_WAITING_OLDEST = Gauge(
    "livegifts_withdrawal_waiting_oldest_seconds",
    "How long the oldest withdrawal of each status has been in it (payout; 0 when none)",
    ["status"],
)
WITHDRAWALS_HELD = Counter(
    "livegifts_withdrawals_held_total",
    "Approved withdrawals the dispatcher held because the wallet said their creator may not withdraw now",
    ["reason"],
)
WITHDRAWALS_RECONCILED = Counter(
    "livegifts_withdrawals_reconciled_total",
    "Late withdrawals looked up at the payout provider, by what came of it (payout)",
    ["outcome"],
)
PURCHASES_RECONCILED = Counter(
    "livegifts_purchases_reconciled_total",
    "Purchases PENDING past PURCHASE_RECONCILE_AFTER_S looked up at the payment provider, by what came of it (wallet)",
    ["outcome"],
)
# Gifting's sweeper and payout's dispatcher and clawback settler: items of a round that failed on
# their own (services/common/loops.py `ItemFailures`), each logged, the round going on; the
# database unavailable, which ends the round, is not counted. By `loop`: sweeper, dispatcher,
# clawback_settler, each at 0 from the service's start. The reconcilers count theirs as
# outcome "error" of their own counters above.
BACKGROUND_ITEM_FAILURES = Counter(
    "livegifts_background_item_failures_total",
    "Items of a background round that failed on their own and were passed over (a gift the sweeper did not settle,"
    " a withdrawal the dispatcher did not hand over, a clawback shortfall not settled), by loop",
    ["loop"],
)
# Wallet and payout: calls to an external provider (services/common/provider_calls.py) that ended
# without an answer: `timeout` (PROVIDER_TIMEOUT_S ran out) or `error` (the call raised).
PROVIDER_CALL_FAILURES = Counter(
    "livegifts_provider_call_failures_total",
    "Calls to a payment or payout provider that timed out or raised, by provider, call and outcome",
    ["provider", "call", "outcome"],
)
# Every service: operator-token checks that failed (services/common/auth.py), by reason: `missing`
# (an operator RPC without `authorization: Bearer <token>`) or `wrong` (a token that is not the
# operator token, or any token while none is configured), a read that shows operators more and
# was sent a wrong token included (it is answered as a non-operator's). Each is logged too,
# "operator token refused", throttled per caller address. Both reasons at 0 from the start.
OPERATOR_AUTH_FAILURES = Counter(
    "livegifts_operator_auth_failures_total",
    "Operator-token checks that failed, by reason: missing (an operator RPC without a bearer token) or wrong"
    " (a token that is not the operator token; reads answered as a non-operator's included)",
    ["reason"],
)
DEAD_LETTERS = Counter("livegifts_dead_letters_total", "Events parked for an operator", ["consumer"])
# The rows in dead_letters, by consumer, recounted every DEAD_LETTERS_COUNT_INTERVAL_S
# (services/common/deadletters.py): the counter above says when events were parked, and its alert
# clears an hour later; this says how many still wait (replayed or deleted ones leave it).
DEAD_LETTERS_PARKED = Gauge(
    "livegifts_dead_letters_parked", "Events parked in dead_letters awaiting an operator (last count)", ["consumer"]
)
GC_PAUSE = Histogram(
    "livegifts_gc_pause_seconds",
    "Garbage collections by generation: each one stops the event loop this long",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
LOOP_LAG = Histogram(
    "livegifts_event_loop_lag_seconds",
    "How late a timer fired on the service's event loop: what ready work waits when the loop is busy",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
# Gifting: WatchStream feeds this replica holds (services/gifting/feed.py), each until its client
# leaves, its stream ends, or the server's keepalive finds its connection dead (GRPC_KEEPALIVE_*):
# near WATCHERS_MAX, new overlays are refused TOO_MANY_WATCHERS.
FEED_WATCHERS = Gauge("livegifts_feed_watchers", "WatchStream feeds this replica serves (at most WATCHERS_MAX)")
