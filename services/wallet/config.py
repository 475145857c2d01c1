"""Wallet settings, read once from LIVEGIFTS_WALLET_* variables."""

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.config import WEBHOOK_SECRET_MIN, ServiceSettings, webhook_secret
from services.wallet.domain import parse_region_ages
from services.wallet.payments import parse_routes

PROVIDERS = ("dev",)  # the payment-provider adapters this build has (services/wallet/payments.py)


class WalletSettings(ServiceSettings):
    """Configuration of the wallet service."""

    model_config = SettingsConfigDict(env_prefix="LIVEGIFTS_WALLET_", extra="ignore", frozen=True)

    grpc_port: int = Field(default=50051, ge=0, le=65535)
    # Shared secret the payment provider signs its callbacks with (HMAC-SHA256). Required; a
    # short (or empty) key would let anyone forge callbacks.
    payment_webhook_secret: SecretStr = Field(min_length=WEBHOOK_SECRET_MIN)
    # The secret before a rotation, accepted on callbacks beside the current one until it is
    # removed (docs/sre.md "Rotating"); unset or empty: only the current one.
    payment_webhook_secret_previous: SecretStr | None = None
    payment_signature_tolerance_s: int = Field(default=300, ge=1, le=3600)
    payment_provider: Literal["dev"] = "dev"
    # Deadline of every call to a payment provider (CreatePurchase's checkout session): a provider
    # that does not answer within it answers UNAVAILABLE / PAYMENT_PROVIDER_UNAVAILABLE; the
    # reconciler's look-up of a late purchase is asked again in a later round.
    provider_timeout_s: float = Field(default=10.0, gt=0, le=120)
    # A purchase PENDING longer than this is looked up at its payment provider (its callback may
    # be lost: a provider retries for a limited time only) and the answer applied as its callback
    # would be; 0 turns the look-ups off.
    purchase_reconcile_after_s: float = Field(default=900.0, ge=0, le=30 * 86_400)
    purchase_reconcile_interval_s: float = Field(default=60.0, gt=0, le=3600)
    purchase_reconcile_batch_size_max: int = Field(default=50, ge=1, le=1000)
    # How long the development provider takes to answer, to rehearse a slow provider (0: at once).
    dev_provider_latency_s: float = Field(default=0.0, ge=0, le=3600)
    # Whether the development provider's look-up reports a checkout it opened as paid (a dev
    # suite: `livegifts run` sets it). Off, a look-up knows nothing and only a signed callback
    # credits a purchase; on with real buyers, every checkout left unpaid is credited.
    dev_provider_settles_checkouts: bool = False
    # Which provider adapter takes each payment method; a method left out is not offered.
    payment_routes: str = "CARD=dev,PAYPAL=dev,APPLE_PAY=dev,GOOGLE_PAY=dev"
    default_region: str = "US"
    adult_age_years: int = Field(default=18, ge=0, le=30)
    # Regions whose adult age differs, e.g. "KR=19,XX=21".
    adult_age_by_region: str = "KR=19"
    spend_amount_max: int = Field(default=10_000_000, ge=1)
    # How long a raised (or removed) spending limit waits before it applies; lowering is immediate.
    spending_limit_cooloff_s: int = Field(default=86_400, ge=0, le=90 * 86_400)
    # Group commit: concurrent Spend calls share one transaction (each keeps its own key and
    # answer); SpendMany is the same path for callers that batch themselves (bench/README.md).
    group_commit: bool = True

    _webhook_secrets = field_validator("payment_webhook_secret", "payment_webhook_secret_previous")(webhook_secret)

    @field_validator("payment_routes")
    @classmethod
    def _routes_to_known_providers(cls, spec: str) -> str:
        unknown = sorted(set(parse_routes(spec).values()) - set(PROVIDERS))  # ValueError on a bad route
        if unknown:
            raise ValueError(f"unknown providers {unknown}; known: {list(PROVIDERS)}")
        return spec

    @field_validator("adult_age_by_region")
    @classmethod
    def _region_ages(cls, spec: str) -> str:
        parse_region_ages(spec)  # ValueError names the bad item
        return spec
