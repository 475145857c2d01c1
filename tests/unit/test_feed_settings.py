"""WatchStream settings that cannot work together are refused at start-up."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.common.config import load_settings
from services.gifting.config import GiftingSettings

REQUIRED = {"database_url": "sqlite+aiosqlite:///x.db", "nats_url": "nats://127.0.0.1:1", "wallet_addr": "x:1"}


def test_the_defaults_let_a_feed_ended_too_slow_resume() -> None:
    settings = GiftingSettings(**REQUIRED)
    assert settings.watch_resume_items_max >= 2 * settings.watch_queue_size_max


@pytest.mark.parametrize(
    ("queue_max", "items_max", "ok"), [(500, 1_000, True), (501, 1_000, False), (1_000, 1_000, False)]
)
def test_a_resume_limit_under_twice_the_feed_queue_is_refused_naming_both(
    queue_max: int, items_max: int, ok: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A feed ended FEED_TOO_SLOW is a full queue and one more gift behind its overlay's cursor: a
    resume limit that cannot take that and the gifts sent while it reconnects answers every such
    resume RESUME_TOO_OLD (the defaults were 1,000 and 1,000)."""
    values = {"watch_queue_size_max": queue_max, "watch_resume_items_max": items_max}
    if ok:
        assert GiftingSettings(**REQUIRED, **values).watch_queue_size_max == queue_max
        return
    with pytest.raises(ValidationError, match="watch_resume_items_max(.|\n)*twice WATCH_QUEUE_SIZE_MAX"):
        GiftingSettings(**REQUIRED, **values)
    for name, value in {**REQUIRED, **values}.items():
        monkeypatch.setenv(f"LIVEGIFTS_GIFTING_{name.upper()}", str(value))
    with pytest.raises(SystemExit):
        load_settings(GiftingSettings)
    err = capsys.readouterr().err
    assert "LIVEGIFTS_GIFTING_WATCH_RESUME_ITEMS_MAX" in err and f"WATCH_QUEUE_SIZE_MAX ({queue_max})" in err, err
