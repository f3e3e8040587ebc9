"""Prometheus metrics on their own: TF Serving's names, types and buckets, the tables' tier
counters, one registry per server, and --monitoring_config_file parsing. (The endpoint on a
real server is tested in test_rest_server.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from keras_hps.errors import ConfigError
from keras_hps.serving.metrics import (
    DEFAULT_METRICS_PATH,
    LATENCY_BUCKETS_US,
    Metrics,
    load_monitoring_config,
    parse_monitoring_config,
)


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def host_stats(hits: int, misses: int) -> dict:
    return {
        "model": "dlrm", "table_id": 3, "lookups": 2, "keys": 40, "unique_keys": 30,
        "host": {"hits": hits, "misses": misses, "evictions": 1, "inserts": 5,
                 "resident_rows": 7, "capacity": 9, "index": "hash"},
        "cold": {"hits": misses - 1, "misses": 1, "rows": 100},
        "default": {"hits": 1},
        "gpu": {"hits": 11, "misses": 2, "hit_rate": 0.84, "mode": "dynamic",
                "devices": ["cuda:0"], "resident": 13, "capacity": 64},
        "resident_rows": 7, "evictions": 1,
    }


def test_request_metrics_have_tf_serving_names_types_help_and_buckets():
    m = Metrics()
    rng = np.random.default_rng(0)
    latencies = rng.uniform(5e-6, 0.2, 200)
    for i, s in enumerate(latencies):
        m.observe("ctr", "predict", "REST" if i % 2 else "GRPC", "OK", s)
    m.observe("ctr", "predict", "REST", "INVALID_ARGUMENT", 1e-4)
    text = m.render()
    assert "# HELP :tensorflow:serving:request_count The total number of requests." in text
    fam = families(text)
    count = fam[":tensorflow:serving:request_count"]
    assert count.type == "counter"
    got = {(s.labels["model_name"], s.labels["status"]): s.value for s in count.samples}
    assert got == {("ctr", "OK"): 200, ("ctr", "INVALID_ARGUMENT"): 1}
    # TF Serving's sample names: no _total suffix, labels in its order
    assert ':tensorflow:serving:request_count{model_name="ctr",status="OK"} 200\n' in text
    hist = fam[":tensorflow:serving:request_latency"]
    assert hist.type == "histogram"
    rest = [s for s in hist.samples if s.labels.get("entrypoint") == "REST"
            and s.labels.get("API") == "predict"]
    buckets = [(float(s.labels["le"]), s.value) for s in rest if s.name.endswith("_bucket")]
    assert [b for b, _ in buckets[:3]] == [10.0, 18.0, 32.4] and buckets[-1][0] == float("inf")
    assert len(buckets) == 34
    us = np.append(latencies[1::2] * 1e6, 100.0)  # the REST requests, in microseconds
    for bound, n in buckets:
        assert n == np.count_nonzero(us <= bound), bound
    (total,) = [s.value for s in rest if s.name.endswith("_sum")]
    assert total == pytest.approx(us.sum(), rel=1e-9)
    assert m.request_count("ctr") == 200 and m.request_count("ctr", "NOT_FOUND") == 0


def test_latency_buckets_are_tensorflows_exponential_10_by_1_8():
    assert len(LATENCY_BUCKETS_US) == 33
    ratios = np.array(LATENCY_BUCKETS_US[1:]) / np.array(LATENCY_BUCKETS_US[:-1])
    np.testing.assert_allclose(ratios, 1.8, rtol=1e-5)


def test_table_stats_become_named_tier_metrics_and_nothing_else():
    m = Metrics(lambda: [("dlrm", 3, host_stats(hits=4, misses=6))])
    fam = families(m.render())
    hits = {s.labels["tier"]: s.value for s in fam["keras_hps_tier_hits"].samples}
    assert hits == {"host": 4, "cold": 5, "default": 1, "gpu": 11}
    assert fam["keras_hps_tier_hits"].type == "counter"
    misses = {s.labels["tier"]: s.value for s in fam["keras_hps_tier_misses"].samples}
    assert misses == {"host": 6, "cold": 1, "gpu": 2}
    resident = {s.labels["tier"]: s.value for s in fam["keras_hps_tier_resident_rows"].samples}
    assert resident == {"host": 7, "gpu": 13}
    assert fam["keras_hps_tier_resident_rows"].type == "gauge"
    assert [s.value for s in fam["keras_hps_table_lookups"].samples] == [2]
    sample = fam["keras_hps_table_keys"].samples[0]
    assert sample.labels == {"model": "dlrm", "table": "3"} and sample.value == 40
    # no series out of identifiers, strings, lists or derived ratios of the stats dict
    names = {s.name for f in fam.values() for s in f.samples}
    assert {n for n in names if n.startswith("keras_hps")} == {
        "keras_hps_table_lookups_total", "keras_hps_table_keys_total",
        "keras_hps_table_unique_keys_total", "keras_hps_tier_hits_total",
        "keras_hps_tier_misses_total", "keras_hps_tier_evictions_total",
        "keras_hps_tier_inserts_total", "keras_hps_tier_resident_rows",
        "keras_hps_tier_capacity_rows", "keras_hps_tier_rows"}
    for f in fam.values():
        assert f.documentation, f.name


def test_two_sources_of_one_table_add_up_and_a_failing_source_leaves_the_scrape_working():
    m = Metrics(lambda: [("dlrm", 0, host_stats(1, 2)), ("dlrm", 0, host_stats(10, 20))])
    fam = families(m.render())
    hits = {s.labels["tier"]: s.value for s in fam["keras_hps_tier_hits"].samples}
    assert hits["host"] == 11
    labelled = Metrics(lambda: [("dlrm", 0, host_stats(1, 2), {"version": 3}),
                                ("dlrm", 0, host_stats(10, 20), {"version": 4})])
    hits = {s.labels["version"]: s.value for s in families(labelled.render())[
        "keras_hps_tier_hits"].samples if s.labels["tier"] == "host"}
    assert hits == {"3": 1, "4": 10}

    def broken():
        raise RuntimeError("parameter server closed")

    m = Metrics(broken)
    m.observe("a", "status", "REST", "OK", 0.001)
    assert "keras_hps" not in m.render()
    assert families(m.render())[":tensorflow:serving:request_count"].samples[0].value == 1


def test_two_servers_in_one_process_do_not_share_counters():
    a, b = Metrics(), Metrics()
    a.observe("m", "predict", "GRPC", "OK", 0.001)
    assert a.request_count("m") == 1 and b.request_count("m") == 0
    assert a.registry is not b.registry
    assert "model_name" not in b.render()


def test_label_values_are_escaped():
    m = Metrics()
    m.observe('we"ird\\name\n', "predict", "REST", "OK", 0.001)
    fam = families(m.render())
    (sample,) = fam[":tensorflow:serving:request_count"].samples
    assert sample.labels["model_name"] == 'we"ird\\name\n'


def test_monitoring_config_text_proto(tmp_path):
    on = parse_monitoring_config(
        'prometheus_config { enable: true, path: "/monitoring/prometheus/metrics2" }')
    assert on.enabled and on.path == "/monitoring/prometheus/metrics2"
    default_path = parse_monitoring_config("prometheus_config { enable: true }")
    assert default_path.enabled and default_path.path == DEFAULT_METRICS_PATH
    assert not parse_monitoring_config("").enabled  # TF Serving: off unless enabled
    assert not parse_monitoring_config("prometheus_config { enable: false }").enabled
    with pytest.raises(ConfigError, match="Invalid protobuf file: 'm.config'"):
        parse_monitoring_config("prometheus_config { enabled: true }", "m.config")
    with pytest.raises(ConfigError, match="Invalid protobuf file"):
        parse_monitoring_config("prometheus_config { enable: 7 }")
    path = tmp_path / "monitoring.config"
    path.write_text('prometheus_config {\n  enable: true\n  path: "/metrics"\n}\n')
    assert load_monitoring_config(str(path)).path == "/metrics"
    assert load_monitoring_config(None).enabled  # no file: keras-hps serves the default path
    with pytest.raises(ConfigError, match="missing.config"):
        load_monitoring_config(str(tmp_path / "missing.config"))
