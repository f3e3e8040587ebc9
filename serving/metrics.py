"""Prometheus metrics of one model server, exported as TF Serving exports them.

Each `Metrics` owns a `prometheus_client.CollectorRegistry`: two servers in one process never
share a series. Request metrics carry TF Serving's names, labels and units (defined in
`servables/tensorflow/util.cc`, exported by `util/prometheus_exporter.cc` with `/` turned into
`:`); the parameter server's tables are read at scrape time:

    :tensorflow:serving:request_count{model_name, status}               counter
    :tensorflow:serving:request_latency{model_name, API, entrypoint}    histogram (microseconds)
    keras_hps_table_{lookups,keys,unique_keys}_total{model, table}      counter
    keras_hps_tier_{hits,misses,evictions,inserts,...}_total{model, table, tier}  counter
    keras_hps_tier_{resident_rows,capacity_rows,rows}{model, table, tier}         gauge

`--monitoring_config_file` (a MonitoringConfig text proto) switches the endpoint and its path.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from keras_hps.errors import ConfigError

DEFAULT_METRICS_PATH = "/monitoring/prometheus/metrics"  # PrometheusExporter::kPrometheusPath
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _exponential_buckets(scale: float, growth: float, count: int) -> tuple[float, ...]:
    """TensorFlow's monitoring::Buckets::Exponential limits, at the six significant digits
    TF Serving prints them with."""
    limits, bound = [], scale
    for _ in range(count):
        limits.append(float(f"{bound:.6g}"))
        bound *= growth
    return tuple(limits)


# request_latency: Buckets::Exponential(10, 1.8, 33), i.e. 10 us .. about 25 minutes.
LATENCY_BUCKETS_US: tuple[float, ...] = _exponential_buckets(10.0, 1.8, 33)

REQUEST_COUNT = ":tensorflow:serving:request_count"
REQUEST_LATENCY = ":tensorflow:serving:request_latency"

# (model, table id, ps.stats(model, table)[, extra labels]) for every table served.
TableSource = Callable[[], Iterable[tuple[Any, ...]]]


class Metrics:
    """Request counts and latencies of one server, plus its tables' tier counters."""

    def __init__(self, table_stats: TableSource | None = None) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._latency: dict[tuple[str, str, str], _Histogram] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_RequestCollector(self))
        if table_stats is not None:
            self.registry.register(_TableCollector(table_stats))

    def observe(self, model: str, api: str, entrypoint: str, code: str, seconds: float) -> None:
        """Record one request: its model, API (predict, ...), REST or GRPC, status, latency."""
        key = (model, api, entrypoint)
        with self._lock:
            self._counts[(model, code)] = self._counts.get((model, code), 0) + 1
            hist = self._latency.get(key)
            if hist is None:
                hist = self._latency[key] = _Histogram(LATENCY_BUCKETS_US)
            hist.add(seconds * 1e6)

    def request_count(self, model: str, code: str = "OK") -> int:
        """Requests seen for a model that ended with `code`."""
        with self._lock:
            return self._counts.get((model, code), 0)

    def snapshot(self) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str, str], Any]]:
        """Copies of the request counts and latency histograms (taken under the lock)."""
        with self._lock:
            counts = dict(self._counts)
            latency = {k: h.copy() for k, h in self._latency.items()}
        return counts, latency

    def render(self) -> str:
        """Every metric of this server in Prometheus' text format (version 0.0.4)."""
        return render(self.registry)


class _Histogram:
    """Cumulative-on-read bucket counts and a sum, as a TensorFlow Sampler cell keeps them."""

    def __init__(self, limits: tuple[float, ...]) -> None:
        self.limits = limits
        self.counts = [0] * (len(limits) + 1)
        self.total = 0.0

    def add(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.limits, value)] += 1
        self.total += value

    def copy(self) -> _Histogram:
        other = _Histogram(self.limits)
        other.counts, other.total = list(self.counts), self.total
        return other


class _RequestCollector(Collector):
    """TF Serving's request_count and request_latency families."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        counts, latency = self._metrics.snapshot()
        count = Metric(REQUEST_COUNT, "The total number of requests.", "counter")
        for (model, code), n in sorted(counts.items()):
            count.add_sample(REQUEST_COUNT, {"model_name": model, "status": code}, n)
        yield count
        hist = Metric(
            REQUEST_LATENCY,
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            "histogram",
        )
        for (model, api, entry), cell in sorted(latency.items()):
            labels = {"model_name": model, "API": api, "entrypoint": entry}
            running = 0
            for bound, n in zip((*cell.limits, float("inf")), cell.counts, strict=True):
                running += n
                hist.add_sample(
                    REQUEST_LATENCY + "_bucket", {**labels, "le": floatToGoString(bound)}, running
                )
            hist.add_sample(REQUEST_LATENCY + "_sum", labels, cell.total)
            hist.add_sample(REQUEST_LATENCY + "_count", labels, running)
        yield hist


# ps.stats(): per-tier keys -> (family, kind, help); unknown or non-numeric keys are not exported.
_TIER_FAMILIES: dict[str, tuple[str, str, str]] = {
    "hits": ("keras_hps_tier_hits_total", "counter", "Keys found in the tier."),
    "misses": ("keras_hps_tier_misses_total", "counter", "Keys looked up in the tier and "
               "not found there."),
    "evictions": ("keras_hps_tier_evictions_total", "counter", "Rows evicted from the tier."),
    "inserts": ("keras_hps_tier_inserts_total", "counter", "Rows inserted into the tier."),
    "uvm_hits": ("keras_hps_tier_uvm_hits_total", "counter", "GPU-tier misses served from "
                 "pinned host memory (UVM mode)."),
    "fetched": ("keras_hps_tier_fetched_total", "counter", "Rows the tier fetched from the "
                "tiers below it."),
    "resident_rows": ("keras_hps_tier_resident_rows", "gauge", "Rows held by the tier now."),
    "resident": ("keras_hps_tier_resident_rows", "gauge", "Rows held by the tier now."),
    "capacity": ("keras_hps_tier_capacity_rows", "gauge", "Rows the tier can hold."),
    "rows": ("keras_hps_tier_rows", "gauge", "Rows stored in the tier's table file."),
}
_TABLE_FAMILIES: dict[str, tuple[str, str, str]] = {
    "lookups": ("keras_hps_table_lookups_total", "counter", "Lookup calls on the table."),
    "keys": ("keras_hps_table_keys_total", "counter", "Keys looked up in the table."),
    "unique_keys": ("keras_hps_table_unique_keys_total", "counter", "Distinct keys per lookup, "
                    "summed over lookups."),
}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class _TableCollector(Collector):
    """The parameter server's per-table and per-tier counters, read at scrape time."""

    def __init__(self, table_stats: TableSource) -> None:
        self._table_stats = table_stats

    def collect(self) -> Iterator[Metric]:
        # family name -> (kind, help, {label tuple: value}); series of two sources with the
        # same labels (two versions' servers of one table, without a version label) add up.
        families: dict[str, tuple[str, str, dict[tuple, float]]] = {}

        def put(spec: tuple[str, str, str], labels: dict[str, str], value: float) -> None:
            name, kind, doc = spec
            series = families.setdefault(name, (kind, doc, {}))[2]
            key = tuple(labels.items())
            series[key] = series.get(key, 0.0) + value

        for entry in self._tables():
            model, table, stats = entry[0], entry[1], entry[2]
            extra = {str(k): str(v) for k, v in (entry[3] if len(entry) > 3 else {}).items()}
            base = {"model": str(model), "table": str(table), **extra}
            for key, value in stats.items():
                if isinstance(value, dict):
                    for name, v in value.items():
                        number = _number(v)
                        if name in _TIER_FAMILIES and number is not None:
                            put(_TIER_FAMILIES[name], {**base, "tier": str(key)}, number)
                elif key in _TABLE_FAMILIES and _number(value) is not None:
                    put(_TABLE_FAMILIES[key], base, float(value))
        for name in sorted(families):
            kind, doc, series = families[name]
            metric = Metric(name, doc, kind)
            for labels, value in sorted(series.items()):
                metric.add_sample(name, dict(labels), value)
            yield metric

    def _tables(self) -> list[tuple[Any, ...]]:
        try:
            return list(self._table_stats())
        except Exception:  # a scrape must not fail because one table's stats did
            return []


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _value(value: float) -> str:
    if value == value and abs(value) != float("inf") and value == int(value) and abs(value) < 2**63:
        return str(int(value))
    return floatToGoString(value)


def render(registry: CollectorRegistry) -> str:
    """A registry's families in Prometheus' text format 0.0.4, as TF Serving writes them:
    `# HELP` and `# TYPE` lines, sample names as collected (TF Serving's counters have no
    `_total` suffix), labels in their declared order, whole numbers without a decimal point."""
    lines = []
    for family in registry.collect():
        doc = family.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"# HELP {family.name} {doc}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for sample in family.samples:
            labels = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sample.labels.items())
            lines.append(f"{sample.name}{{{labels}}} {_value(sample.value)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- --monitoring_config_file
@dataclass(frozen=True)
class PrometheusExport:
    """Whether the REST port serves Prometheus metrics, and at which path."""

    enabled: bool = True
    path: str = DEFAULT_METRICS_PATH


_MONITORING_CONFIG: Any = None


def _monitoring_config_class() -> Any:
    """tensorflow.serving.MonitoringConfig (config/monitoring_config.proto), built from its
    definition: the tensorflow-serving-api wheel does not ship this proto."""
    global _MONITORING_CONFIG
    if _MONITORING_CONFIG is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        proto = descriptor_pb2.FileDescriptorProto(
            name="keras_hps/monitoring_config.proto", package="tensorflow.serving",
            syntax="proto3",
        )
        field = descriptor_pb2.FieldDescriptorProto
        prom = proto.message_type.add(name="PrometheusConfig")
        prom.field.add(name="enable", number=1, type=field.TYPE_BOOL, label=field.LABEL_OPTIONAL)
        prom.field.add(name="path", number=2, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
        mon = proto.message_type.add(name="MonitoringConfig")
        mon.field.add(
            name="prometheus_config", number=1, type=field.TYPE_MESSAGE,
            type_name=".tensorflow.serving.PrometheusConfig", label=field.LABEL_OPTIONAL,
        )
        pool = descriptor_pool.DescriptorPool()
        pool.Add(proto)
        descriptor = pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig")
        _MONITORING_CONFIG = message_factory.GetMessageClass(descriptor)
    return _MONITORING_CONFIG


def parse_monitoring_config(text: str, source: str = "<text>") -> PrometheusExport:
    """The Prometheus settings of a MonitoringConfig text proto, e.g.
    `prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }`.
    As in TF Serving, metrics are off unless `enable: true`; an empty path is the default."""
    from google.protobuf import text_format

    message = _monitoring_config_class()()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise ConfigError(f"Invalid protobuf file: '{source}': {exc}") from None
    prom = message.prometheus_config
    return PrometheusExport(enabled=prom.enable, path=prom.path or DEFAULT_METRICS_PATH)


def load_monitoring_config(path: str | None) -> PrometheusExport:
    """`--monitoring_config_file`: the file's settings; with no file, metrics are served at
    the default path (keras-hps's default; TF Serving serves none without the file)."""
    if not path:
        return PrometheusExport()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--monitoring_config_file={path}: {exc}") from None
    return parse_monitoring_config(text, path)
