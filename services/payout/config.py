"""Payout settings, read once from LIVEGIFTS_PAYOUT_* variables."""

from typing import ClassVar

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.config import WEBHOOK_SECRET_MIN, ServiceSettings, webhook_secret


class PayoutSettings(ServiceSettings):
    """Configuration of the payout service."""

    model_config = SettingsConfigDict(env_prefix="LIVEGIFTS_PAYOUT_", extra="ignore", frozen=True)

    grpc_port: int = Field(default=50053, ge=0, le=65535)
    # The wallet holds ages and blocks; RequestWithdrawal asks it (with the outgoing deadline).
    wallet_addr: str = Field(description="host:port of the wallet service (eligibility: age, blocked)")
    payout_webhook_secret: SecretStr = Field(
        min_length=WEBHOOK_SECRET_MIN, description="HMAC secret of payout-provider callbacks"
    )
    # The secret before a rotation, accepted on callbacks beside the current one until it is
    # removed (docs/sre.md "Rotating"); fingerprints and request hashes use the current one only.
    payout_webhook_secret_previous: SecretStr | None = None
    payout_signature_tolerance_s: int = Field(default=300, ge=1, le=3600)
    # Whether the development provider settles the transfers it made (a dev suite: `livegifts
    # run`, docker compose, the integration tests' suites set it): its look-up reports each as
    # PAID (FAILED for accounts made to fail), so the reconciler applies that after
    # RECONCILE_AFTER_S. Off, it sends no callback and its look-up knows nothing (the withdrawal
    # stays PROCESSING): the manifests deploy this adapter with a real webhook secret, where a
    # transfer it made up consumed creators' diamonds and no cash was sent.
    dev_provider_settles_payouts: bool = False
    # With DEV_PROVIDER_SETTLES_PAYOUTS, the development provider also calls HandlePayoutEvent's
    # use case back itself at once; off, callbacks come only from outside (tests, `grpcurl`) or the
    # reconciler's look-up. On without it, start-up refuses it (it would settle nothing).
    dev_provider_auto_callback: bool = False
    # How long the development provider takes to answer each call, to rehearse a slow provider.
    dev_provider_latency_s: float = Field(default=0.0, ge=0, le=3600)
    # Deadline of every call to the payout provider (tokenize, submit, status): AddPayoutMethod
    # answers UNAVAILABLE past it; the dispatcher and reconciler leave the withdrawal for a later round.
    provider_timeout_s: float = Field(default=10.0, gt=0, le=120)
    # Payout methods a creator may have that are not FAILED verification (PENDING or VERIFIED);
    # AddPayoutMethod, and VerifyPayoutMethod of a FAILED method, answer RESOURCE_EXHAUSTED /
    # PAYOUT_METHOD_LIMIT past it.
    methods_per_creator_max: int = Field(default=10, ge=1, le=1000)
    dispatch_interval_s: float = Field(default=0.2, gt=0, le=60)
    dispatch_batch_size_max: int = Field(default=50, ge=1, le=1000)
    # A creator the wallet says may not withdraw (blocked, under age), or cannot answer for, has
    # their approved withdrawals held; the dispatcher asks again after this long.
    dispatch_hold_recheck_s: float = Field(default=60.0, gt=0, le=86_400)
    # A withdrawal PROCESSING longer than this is looked up at the provider (its callback may be
    # lost) and the answer applied as a callback; 0 turns the look-ups off.
    reconcile_after_s: float = Field(default=900.0, ge=0, le=30 * 86_400)
    reconcile_interval_s: float = Field(default=60.0, gt=0, le=3600)
    reconcile_batch_size_max: int = Field(default=50, ge=1, le=1000)
    clawback_rows_max: int = Field(default=10_000, ge=1, le=1_000_000)  # earnings rows scanned per reversal
    # How often open clawback shortfalls (a reversal consumed before its gifts' earnings) are settled.
    clawback_settle_interval_s: float = Field(default=5.0, gt=0, le=3600)

    # On PostgreSQL the dispatcher holds one pooled connection over each submission (the
    # transaction of its advisory lock, `Payout._submitting`), beside the outbox relay's over each
    # publish: DB_POOL_SIZE is at least 3 (`ServiceSettings.postgres_pool_min`).
    pool_held_over_waits: ClassVar[tuple[str, ...]] = (
        "the dispatcher holds one connection over each submission to the payout provider (up to PROVIDER_TIMEOUT_S)",
        *ServiceSettings.pool_held_over_waits,
    )

    _webhook_secrets = field_validator("payout_webhook_secret", "payout_webhook_secret_previous")(webhook_secret)

    @field_validator("dev_provider_auto_callback")
    @classmethod
    def _callbacks_only_where_transfers_settle(cls, on: bool, info: ValidationInfo) -> bool:
        if on and not info.data.get("dev_provider_settles_payouts"):
            raise ValueError(
                "needs DEV_PROVIDER_SETTLES_PAYOUTS (a dev suite): without it the development provider settles nothing"
            )
        return on

    def held_over_a_call_s(self) -> float:
        """The dispatcher holds a withdrawal's submission lock (a transaction) over the provider's
        answer (`Payout._submitting`), up to PROVIDER_TIMEOUT_S."""
        return self.provider_timeout_s
