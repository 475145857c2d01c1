"""services/common/gc_tuning.py: what start-up leaves is frozen, the young threshold is set, pauses are measured."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from services.common.config import ServiceSettings
from services.common.gc_tuning import observe_pauses, tune_gc
from services.common.metrics import GC_PAUSE


@pytest.fixture
def restored_gc() -> Iterator[None]:
    """Leave the test process's collector as it found it."""
    thresholds = gc.get_threshold()
    callbacks = list(gc.callbacks)
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    gc.callbacks[:] = callbacks


def _pauses(generation: str) -> float:
    for metric in GC_PAUSE.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count") and sample.labels["generation"] == generation:
                return sample.value
    return 0.0


class _Node:
    """Something a reference cycle and a weak reference can be made of."""

    def __init__(self) -> None:
        self.me = self


def test_tune_gc_freezes_what_start_up_built_and_sets_the_young_threshold(restored_gc: None) -> None:
    gc.unfreeze()
    before = _Node()  # a cycle that exists at start-up
    tune_gc(freeze=True, gen0_threshold=12_345)
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == 12_345
    after = _Node()  # a cycle made while serving
    was_before, was_after = weakref.ref(before), weakref.ref(after)
    del before, after
    gc.collect()
    assert was_after() is None, "what is made after start-up is still collected"
    assert was_before() is not None, "what start-up built is left out of collections"


def test_tune_gc_without_freeze_only_sets_the_threshold(restored_gc: None) -> None:
    gc.unfreeze()
    tune_gc(freeze=False, gen0_threshold=700)
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold()[0] == 700


def test_every_collection_is_measured_by_generation_once(restored_gc: None) -> None:
    observe_pauses()
    observe_pauses()
    assert sum(cb.__module__ == "services.common.gc_tuning" for cb in gc.callbacks) == 1
    before = (_pauses("0"), _pauses("2"))
    gc.collect(0)
    gc.collect(2)
    assert (_pauses("0"), _pauses("2")) == (before[0] + 1, before[1] + 1)


def test_the_young_threshold_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEGIFTS_DATABASE_URL", "sqlite+aiosqlite:///x")
    monkeypatch.setenv("LIVEGIFTS_NATS_URL", "nats://127.0.0.1:1")
    assert ServiceSettings().gc_gen0_threshold == 20_000  # type: ignore[call-arg]
    assert ServiceSettings().gc_freeze is True  # type: ignore[call-arg]
    monkeypatch.setenv("LIVEGIFTS_GC_GEN0_THRESHOLD", "10")
    with pytest.raises(ValueError, match="gc_gen0_threshold"):
        ServiceSettings()  # type: ignore[call-arg]
