"""Provider callback signatures (HMAC-SHA256 over timestamp + payload, with a tolerance window) and bodies."""

import json

import pytest

from services.common import signing
from services.common.errors import InvalidArgument, Unauthenticated
from services.payout.providers import DevPayoutProvider, dev_payout_payload

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


def test_a_payout_callback_body_must_be_the_event_it_claims_yet_keeps_any_failure_reason() -> None:
    provider = DevPayoutProvider(SECRET, 300, auto_callback=False)

    def parse(body: bytes):  # type: ignore[no-untyped-def]
        return provider.parse_callback(body, signing.sign(SECRET, body))

    good = dev_payout_payload("e1", "payout.failed", "wd_1", 9_500, "USD", "account\nclosed\x00")
    assert parse(good).failure_reason == "account closed "  # the provider's words, storable
    for reason, kept in (
        (None, ""),
        (4012, "4012"),
        ("bad\ud800card", "bad card"),
    ):  # an unset reason, a provider's numeric code
        body = good.replace(b'"account\\nclosed\\u0000"', json.dumps(reason).encode())
        assert parse(body).failure_reason == kept
    for odd in (
        b"[" * 10_000 + b"]" * 10_000,
        good.replace(b'"amount_minor":9500', b'"amount_minor":9500.5'),
        good.replace(b'"amount_minor":9500', b'"amount_minor":true'),
        good.replace(b'"withdrawal_id":"wd_1"', b'"withdrawal_id":"wd_1\\u0000"'),
        good.replace(b'"withdrawal_id":"wd_1"', b'"withdrawal_id":"wd_1\\ud800"'),
        b'"just a string"',
    ):
        with pytest.raises(InvalidArgument) as exc:
            parse(odd)
        assert exc.value.reason == "MALFORMED_PAYLOAD", odd[:60]


@pytest.mark.parametrize(
    ("token", "why"),
    [("short-token", "at least 16"), ("a-token-read-from-a-file\n", "whitespace"), ("   " * 8, "whitespace")],
)
def test_an_operator_token_no_operator_could_send_or_a_short_one_is_refused_at_start(token: str, why: str) -> None:
    """A token with a file's trailing newline cannot travel in an `authorization` header: every
    operator call would be refused, found only when an operator first needs one."""
    from pydantic import ValidationError

    from services.gifting.config import GiftingSettings

    common = {"database_url": "sqlite+aiosqlite:///x.db", "nats_url": "nats://127.0.0.1:1", "wallet_addr": "x:1"}
    with pytest.raises(ValidationError, match=f"operator_token(.|\n)*{why}"):
        GiftingSettings(**common, operator_token=token)
    assert GiftingSettings(**common, operator_token="").operator_token is not None  # empty: operator RPCs refused
    assert GiftingSettings(**common, operator_token="t" * 16).operator_token.get_secret_value() == "t" * 16
