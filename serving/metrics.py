"""Prometheus metrics of the model server, in the text exposition format.

Request counts and latencies use TF Serving's metric names (`:tensorflow:serving:...`, latency
in microseconds); the parameter server's per-table, per-tier counters are read from
`ps.stats(model, table)` at scrape time as `keras_hps_table_*` series.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

# Latency buckets in microseconds (100 us .. 30 s).
LATENCY_BUCKETS_US: tuple[float, ...] = (
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
)

TableSource = Callable[[], Iterable[tuple[str, int, dict[str, Any]]]]


def _labels(**labels: Any) -> str:
    def esc(v: Any) -> str:
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}"


class Metrics:
    """Thread-safe counters and a latency histogram per (model, API, entrypoint)."""

    def __init__(self, table_stats: TableSource | None = None) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = defaultdict(int)
        self._hist: dict[tuple[str, str, str], list[int]] = {}
        self._sums: dict[tuple[str, str, str], float] = defaultdict(float)
        self._table_stats = table_stats

    def observe(self, model: str, api: str, entrypoint: str, code: str, seconds: float) -> None:
        """Record one request: its model, API (predict, ...), REST or GRPC, status, latency."""
        us = seconds * 1e6
        key = (model, api, entrypoint)
        with self._lock:
            self._counts[(model, code)] += 1
            buckets = self._hist.get(key)
            if buckets is None:
                buckets = self._hist[key] = [0] * (len(LATENCY_BUCKETS_US) + 1)
            buckets[bisect.bisect_left(LATENCY_BUCKETS_US, us)] += 1
            self._sums[key] += us

    def request_count(self, model: str, code: str = "OK") -> int:
        """Requests seen for a model that ended with `code`."""
        with self._lock:
            return self._counts.get((model, code), 0)

    def render(self) -> str:
        """All metrics in Prometheus text format."""
        lines = [
            "# TYPE :tensorflow:serving:request_count counter",
        ]
        with self._lock:
            counts = dict(self._counts)
            hist = {k: list(v) for k, v in self._hist.items()}
            sums = dict(self._sums)
        for (model, code), n in sorted(counts.items()):
            lines.append(
                f":tensorflow:serving:request_count{_labels(model_name=model, status=code)} {n}"
            )
        lines.append("# TYPE :tensorflow:serving:request_latency histogram")
        for (model, api, entry), buckets in sorted(hist.items()):
            total = 0
            for bound, n in zip(LATENCY_BUCKETS_US, buckets, strict=False):
                total += n
                lab = _labels(API=api, entrypoint=entry, model_name=model, le=f"{bound:g}")
                lines.append(f":tensorflow:serving:request_latency_bucket{lab} {total}")
            total += buckets[-1]
            lab = _labels(API=api, entrypoint=entry, model_name=model, le="+Inf")
            lines.append(f":tensorflow:serving:request_latency_bucket{lab} {total}")
            lab = _labels(API=api, entrypoint=entry, model_name=model)
            lines.append(
                f":tensorflow:serving:request_latency_sum{lab} {sums[(model, api, entry)]:.1f}"
            )
            lines.append(f":tensorflow:serving:request_latency_count{lab} {total}")
        lines.extend(self._table_lines())
        return "\n".join(lines) + "\n"

    def _table_lines(self) -> list[str]:
        if self._table_stats is None:
            return []
        try:
            tables = list(self._table_stats())
        except Exception as exc:  # a scrape must not fail because one table's stats did
            return [f"# keras-hps table stats unavailable: {type(exc).__name__}: {exc}"]
        series: dict[str, list[str]] = defaultdict(list)
        for model, table, stats in tables:
            for tier, name, value in flatten_stats(stats):
                lab = _labels(model=model, table=table, tier=tier)
                series[name].append(f"keras_hps_table_{name}{lab} {value}")
        lines = []
        for name in sorted(series):
            kind = "counter" if name in ("hits", "misses", "evictions", "lookups") else "gauge"
            lines.append(f"# TYPE keras_hps_table_{name} {kind}")
            lines.extend(series[name])
        return lines


def flatten_stats(stats: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(tier, counter, value) triples of one `ps.stats(model, table)` dict.

    Nested dicts are tiers (`{"gpu": {"hits": 3, ...}, ...}`); numbers at the top level belong
    to the tier "all". Non-numeric values are skipped.
    """
    out = []
    for key, value in stats.items():
        if isinstance(value, dict):
            for name, v in value.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out.append((str(key), _metric_name(name), float(v)))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(("all", _metric_name(key), float(value)))
    return out


def _metric_name(name: Any) -> str:
    text = "".join(c if c.isalnum() else "_" for c in str(name).lower())
    return text or "value"
