"""Provider callback signatures (HMAC-SHA256 over timestamp + payload, with a tolerance window) and bodies."""

import json

import pytest

from services.common import signing
from services.common.errors import InvalidArgument, Unauthenticated
from services.payout.providers import DevPayoutProvider, dev_payout_payload
from services.wallet.payments import DevProvider, dev_event_payload

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
    [
        ("short-token", "at least 16"),
        ("a-token-read-from-a-file\n", "whitespace"),
        ("   " * 8, "whitespace"),
        ("a-token-with-an-accent-\u00e9-inside", "printable ASCII"),
        ("a-token-with-a-tab\tinside-it", "printable ASCII"),
    ],
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


OLD = b"the-secret-before-rotation"


def test_during_a_rotation_on_our_side_callbacks_signed_with_the_previous_secret_verify() -> None:
    """*_WEBHOOK_SECRET_PREVIOUS: the provider switches when it will; callbacks signed with the
    old secret or the new one both verify until the previous one is removed, and no other."""
    wallet = DevProvider(SECRET, 300, previous_secret=OLD)
    payout = DevPayoutProvider(SECRET, 300, auto_callback=False, previous_secret=OLD)
    paid = dev_event_payload("e1", "payment.succeeded", "pur_1", 700, "USD")
    sent = dev_payout_payload("e2", "payout.paid", "wd_1", 9_500, "USD")
    for key in (SECRET, OLD):
        assert wallet.parse_callback(paid, signing.sign(key, paid)).purchase_id == "pur_1"
        assert payout.parse_callback(sent, signing.sign(key, sent)).withdrawal_id == "wd_1"
    for provider, body in ((wallet, paid), (payout, sent)):
        with pytest.raises(Unauthenticated) as err:
            provider.parse_callback(body, signing.sign(b"a-third-secret", body))  # type: ignore[attr-defined]
        assert err.value.reason == "SIGNATURE_INVALID"
    # Without a previous secret, the old one is refused.
    with pytest.raises(Unauthenticated):
        DevProvider(SECRET, 300).parse_callback(paid, signing.sign(OLD, paid))
    # The signatures payout's provider makes itself are the current secret's.
    body, signature = DevPayoutProvider(SECRET, 300, True, previous_secret=OLD)._outcome(
        "po_dev_wd_1", "wd_1", "tok_dev_x", 9_500, "USD"
    )
    assert signing.verify(SECRET, body, signature, 300)
    with pytest.raises(Unauthenticated):
        signing.verify(OLD, body, signature, 300)


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("webhook_secret", "a-secret-read-from-a-file\n", "whitespace"),
        ("webhook_secret", " " * 20, "whitespace"),
        ("webhook_secret_previous", "a-secret-read-from-a-file\n", "whitespace"),
        ("webhook_secret_previous", "short-secret", "at least 16"),
    ],
)
def test_a_webhook_secret_no_provider_signs_with_is_refused_at_start(
    field: str, value: str, why: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A secret with a file's trailing newline made every callback UNAUTHENTICATED, found only
    when purchases stayed PENDING. The refusal names the variable, never the secret."""
    from pydantic import ValidationError

    from services.common.config import load_settings
    from services.payout.config import PayoutSettings
    from services.wallet.config import WalletSettings

    common = {"database_url": "sqlite+aiosqlite:///x.db", "nats_url": "nats://127.0.0.1:1"}
    good = "g" * 16
    wallet = {"payment_webhook_secret": good, f"payment_{field}": value}
    payout = {"payout_webhook_secret": good, f"payout_{field}": value, "wallet_addr": "x:1"}
    with pytest.raises(ValidationError, match=f"payment_{field}(.|\n)*{why}"):
        WalletSettings(**common, **wallet)
    with pytest.raises(ValidationError, match=f"payout_{field}(.|\n)*{why}"):
        PayoutSettings(**common, **payout)
    for name, val in {**common, **wallet}.items():
        monkeypatch.setenv(f"LIVEGIFTS_WALLET_{name.upper()}", val)
    with pytest.raises(SystemExit):
        load_settings(WalletSettings)
    err = capsys.readouterr().err
    assert f"LIVEGIFTS_WALLET_PAYMENT_{field.upper()}" in err, err
    assert not value.strip() or value.strip() not in err, err


def test_an_empty_previous_webhook_secret_is_none_and_a_set_one_is_kept() -> None:
    from services.payout.config import PayoutSettings
    from services.wallet.config import WalletSettings

    common = {"database_url": "sqlite+aiosqlite:///x.db", "nats_url": "nats://127.0.0.1:1"}
    w = WalletSettings(**common, payment_webhook_secret="g" * 16, payment_webhook_secret_previous="")
    assert not (w.payment_webhook_secret_previous and w.payment_webhook_secret_previous.get_secret_value())
    p = PayoutSettings(
        **common, wallet_addr="x:1", payout_webhook_secret="g" * 16, payout_webhook_secret_previous="o" * 16
    )
    assert p.payout_webhook_secret_previous is not None
    assert p.payout_webhook_secret_previous.get_secret_value() == "o" * 16
