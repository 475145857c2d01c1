"""Payout settings, read once from LIVEGIFTS_PAYOUT_* variables."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.config import ServiceSettings


class PayoutSettings(ServiceSettings):
    """Configuration of the payout service."""

    model_config = SettingsConfigDict(env_prefix="LIVEGIFTS_PAYOUT_", extra="ignore", frozen=True)

    grpc_port: int = Field(default=50053, ge=0, le=65535)
