"""What the docs tests read: the repository, docs/sre.md, and the metrics the services export."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from services.common import metrics

REPO = Path(__file__).resolve().parents[2]
SRE = (REPO / "docs" / "sre.md").read_text()
# Labels Prometheus adds to every series from the scrape target, not from the code.
TARGET_LABELS = {"pod", "instance", "job", "namespace", "container", "service"}


def exported_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every name a query may use for the services' metrics -> (metric name, its label names)."""
    out = {}
    for m in vars(metrics).values():
        if not isinstance(m, MetricWrapperBase):
            continue
        # The family's own name (as the docs name a histogram), and the samples a query reads.
        suffixes = {"counter": ["", "_total"], "histogram": ["", "_bucket", "_sum", "_count"]}.get(m._type, [""])
        for suffix in suffixes:
            out[m._name + suffix] = (m._name, tuple(m._labelnames) + (("le",) if suffix == "_bucket" else ()))
    return out
