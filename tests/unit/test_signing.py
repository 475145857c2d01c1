"""Provider callback signatures: HMAC-SHA256 over timestamp + payload, with a tolerance window."""

import pytest

from services.common import signing
from services.common.errors import Unauthenticated

SECRET = b"s3cret"
PAYLOAD = b'{"id":"evt_1"}'


def test_a_fresh_signature_verifies_and_returns_its_timestamp() -> None:
    header = signing.sign(SECRET, PAYLOAD, 1_000_000)
    assert signing.verify(SECRET, PAYLOAD, header, tolerance_s=300, now_s=1_000_100) == 1_000_000


@pytest.mark.parametrize(
    ("header", "payload", "secret", "now", "reason"),
    [
        ("", PAYLOAD, SECRET, 1_000_000, "SIGNATURE_MISSING"),
        ("v1=abc", PAYLOAD, SECRET, 1_000_000, "SIGNATURE_MALFORMED"),
        ("t=notanumber,v1=abc", PAYLOAD, SECRET, 1_000_000, "SIGNATURE_MALFORMED"),
        (signing.sign(SECRET, PAYLOAD, 1_000_000), PAYLOAD, SECRET, 1_000_301, "SIGNATURE_EXPIRED"),
        (signing.sign(SECRET, PAYLOAD, 1_000_000), PAYLOAD, SECRET, 999_600, "SIGNATURE_EXPIRED"),
        (signing.sign(b"other", PAYLOAD, 1_000_000), PAYLOAD, SECRET, 1_000_000, "SIGNATURE_INVALID"),
        (signing.sign(SECRET, PAYLOAD, 1_000_000), PAYLOAD + b" ", SECRET, 1_000_000, "SIGNATURE_INVALID"),
        ("t=1000000,v1=" + "0" * 64, PAYLOAD, SECRET, 1_000_000, "SIGNATURE_INVALID"),
        ("x" * 2000, PAYLOAD, SECRET, 1_000_000, "SIGNATURE_MISSING"),
        ("t=1000000,v1=" + "\u00e9" * 64, PAYLOAD, SECRET, 1_000_000, "SIGNATURE_INVALID"),  # not ASCII
        ("t=1" + "0" * 400 + ",v1=00", PAYLOAD, SECRET, 1_000_000, "SIGNATURE_MALFORMED"),  # no float holds it
        ("t=1_000_000,v1=00", PAYLOAD, SECRET, 1_000_000, "SIGNATURE_MALFORMED"),
        ("t=+1000000,v1=00", PAYLOAD, SECRET, 1_000_000, "SIGNATURE_MALFORMED"),
        ("t=\u0661\u0660\u0660\u0660\u0660\u0660\u0660,v1=00", PAYLOAD, SECRET, 1_000_000, "SIGNATURE_MALFORMED"),
    ],
)
def test_forged_stale_and_malformed_signatures_are_refused(header, payload, secret, now, reason) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(Unauthenticated) as err:
        signing.verify(secret, payload, header, tolerance_s=300, now_s=now)
    assert err.value.reason == reason


def test_a_header_carrying_old_and_new_secret_signatures_verifies_during_rotation() -> None:
    old = signing.sign(b"old", PAYLOAD, 1_000_000)
    new = signing.sign(SECRET, PAYLOAD, 1_000_000)
    both = old + "," + new.split(",")[1]
    assert signing.verify(SECRET, PAYLOAD, both, tolerance_s=300, now_s=1_000_000) == 1_000_000


@pytest.mark.parametrize("secret", ["", "short-secret"])
def test_a_webhook_secret_shorter_than_16_characters_is_refused_at_start(secret: str) -> None:
    from pydantic import ValidationError

    from services.payout.config import PayoutSettings
    from services.wallet.config import WalletSettings

    common = {"database_url": "sqlite+aiosqlite:///x.db", "nats_url": "nats://127.0.0.1:1"}
    with pytest.raises(ValidationError, match="payment_webhook_secret"):
        WalletSettings(**common, payment_webhook_secret=secret)
    with pytest.raises(ValidationError, match="payout_webhook_secret"):
        PayoutSettings(**common, wallet_addr="127.0.0.1:1", payout_webhook_secret=secret)
    assert WalletSettings(**common, payment_webhook_secret="x" * 16).payment_webhook_secret.get_secret_value()
