"""Gifting settings, read once from LIVEGIFTS_GIFTING_* variables."""

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.config import ServiceSettings
from services.gifting.domain import LEADERBOARD_WINDOW_DAYS


class GiftingSettings(ServiceSettings):
    """Configuration of the gifting service."""

    model_config = SettingsConfigDict(env_prefix="LIVEGIFTS_GIFTING_", extra="ignore", frozen=True)

    grpc_port: int = Field(default=50052, ge=0, le=65535)
    wallet_addr: str = Field(description="host:port of the wallet service")
    quantity_max: int = Field(default=9_999, ge=1, le=1_000_000)
    # A gift still PENDING after this long is settled by the sweeper through wallet.CancelSpend.
    # Keep it above the outgoing deadline: a gift swept while its spend is still in flight is
    # cancelled (CancelSpend is the wallet's final word, so the late spend is refused and no coin
    # is lost), but the caller who was about to succeed gets a cancelled gift instead.
    pending_timeout_s: float = Field(default=30.0, gt=0)
    sweep_interval_s: float = Field(default=5.0, gt=0)
    sweep_batch_size_max: int = Field(default=100, ge=1, le=10_000)
    # Tips: a free coin amount up to this, with an optional message of at most this many characters.
    tip_coins_max: int = Field(default=100_000, ge=1, le=10_000_000)
    tip_message_chars_max: int = Field(default=150, ge=0, le=500)
    content_price_coins_max: int = Field(default=1_000_000, ge=1, le=10_000_000)
    # WatchStream: how many feeds one replica serves, how many items may wait for a slow client
    # before its feed is ended (it re-watches from its cursor), and the gap that ends a combo streak.
    watchers_max: int = Field(default=10_000, ge=1, le=1_000_000)
    watch_queue_size_max: int = Field(default=500, ge=1, le=100_000)
    combo_window_s: float = Field(default=10.0, gt=0, le=3600)
    # A WatchStream that resumes after a cursor is sent what it missed only if the cursor's gift was
    # sent within this window and at most this many gifts followed it (RESUME_TOO_OLD otherwise):
    # a resume is a reconnect, not a history read, and its catch-up stays one bounded read. The
    # read back for the combo streaks open at the cursor takes at most as many gifts again.
    watch_resume_window_s: float = Field(default=600.0, gt=0, le=86_400)
    watch_resume_items_max: int = Field(default=1_000, ge=1, le=100_000)
    # Catch-up reads of resumed feeds a replica runs at once: when a replica drains, its overlays
    # all resume on the others together, and unbounded their reads queued on the pool ahead of
    # SendGift's transactions (seconds, near DB_POOL_TIMEOUT_S). Beyond it a read waits its turn.
    watch_resume_reads_max: int = Field(default=2, ge=1, le=200)
    # Group commit: concurrent SendGift, SendTip and UnlockContent calls share the transaction that
    # records them PENDING, one wallet.SpendMany call, and the one that marks them SENT
    # (bench/README.md).
    group_commit: bool = True
    # The eligibility pre-check (age, blocked) caches each user's wallet restrictions this long;
    # the wallet checks sender and creator again inside every spend, so this only decides whether
    # an ineligible gift is refused before it is recorded or cancelled right after. 0 = no cache.
    eligibility_cache_s: float = Field(default=60.0, ge=0, le=3600)
    # Daily leaderboard rows (one per stream or creator, day and sender) are read only for the last
    # LEADERBOARD_WINDOW_DAYS; older days are deleted (readmodels.LeaderboardDailyPruner). At least
    # one day more than the window, for a replica whose clock runs a little ahead.
    leaderboard_daily_retention_days: int = Field(
        default=LEADERBOARD_WINDOW_DAYS + 1, ge=LEADERBOARD_WINDOW_DAYS + 1, le=3650
    )

    @field_validator("watch_resume_items_max")
    @classmethod
    def _a_slow_feed_can_resume(cls, items_max: int, info: ValidationInfo) -> int:
        # A feed ended FEED_TOO_SLOW left a full queue and one more gift unsent, so its overlay's
        # cursor is followed by at least WATCH_QUEUE_SIZE_MAX + 1 gifts, then by those sent while
        # it reconnects: the resume must take as many again, or it is RESUME_TOO_OLD every time.
        queue_max = info.data.get("watch_queue_size_max")
        if queue_max is not None and items_max < 2 * queue_max:
            raise ValueError(
                f"must be at least twice WATCH_QUEUE_SIZE_MAX ({queue_max}): a feed ended as too slow "
                "is that many gifts behind and more come while it reconnects; its resume would be RESUME_TOO_OLD"
            )
        return items_max
