"""Two `keras-hps serve` processes on one real Redis Cluster (3 masters, every write on disk),
serving one exported external-placement model, queried with TF Serving's gRPC stubs and
REST: they answer identically, `keras-hps update` (a third process) reaches both, a killed
master gives UNAVAILABLE (gRPC 14, HTTP 503) and never a wrong row, and serving recovers when
it returns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import requests
from redis.crc import key_slot
from redis_cluster import cluster_fixture
from serving_models import free_port

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

from keras_hps.config import load_config  # noqa: E402
from keras_hps.export import export_for_serving  # noqa: E402
from keras_hps.redis_tier import partition_of, table_content_id, table_namespace  # noqa: E402

redis_cluster = cluster_fixture(masters=3, persistence=True)

VOCAB, DIM = 64, 4


def _model(weights: np.ndarray):
    ids = keras.Input((2,), dtype="int64", name="ids")
    emb = keras.layers.Embedding(VOCAB, DIM, name="emb")(ids)
    model = keras.Model(ids, keras.layers.Flatten()(emb))
    model.get_layer("emb").set_weights([weights])
    return model


def _start(repo, root, i):
    grpc_port, rest_port = free_port(), free_port()
    log = open(root / f"server{i}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "keras_hps.cli", "serve", f"--port={grpc_port}",
         f"--rest_api_port={rest_port}", "--host=127.0.0.1",
         f"--model_config_file={repo / 'models.config'}", "--file_system_poll_wait_seconds=0"],
        stdout=log, stderr=subprocess.STDOUT, cwd=str(root),
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_HPS_GPU_TIER="off"))
    return proc, log, f"http://127.0.0.1:{rest_port}", grpc_port


def _available(url) -> bool:
    try:
        status = requests.get(f"{url}/v1/models/emb", timeout=5).json()
    except (requests.ConnectionError, ValueError):
        return False
    return [v.get("state") for v in status.get("model_version_status", [])] == ["AVAILABLE"]


@pytest.fixture(scope="module")
def servers(redis_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_redis")
    repo = root / "repo"
    repo.mkdir()
    # the repository's parameter-server settings, which every export pins into its version
    (repo / "hps.json").write_text(json.dumps({"models": [], "volatile_db": {
        "type": "redis_cluster", "address": redis_cluster.address, "num_partitions": 6,
        "socket_timeout": 1.0, "host_cache_rate": 0.5}}))
    weights = np.random.default_rng(0).standard_normal((VOCAB, DIM)).astype(np.float32)
    result = export_for_serving(_model(weights), repo, "emb", tables="external",
                                warmup_records=0)
    started = [_start(repo, root, i) for i in range(2)]
    deadline = time.monotonic() + 180
    while not all(_available(s[2]) for s in started):
        for proc, *_ in started:
            assert proc.poll() is None, (root / "server0.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the servers did not load the model"
        time.sleep(0.3)
    channels = [grpc.insecure_channel(f"127.0.0.1:{s[3]}") for s in started]
    try:
        # what every key must answer: the rows, then zeros (updates change it)
        want = np.concatenate([weights, np.zeros((128 - VOCAB, DIM), np.float32)])
        yield {"want": want, "config": os.path.join(result.version_dir, "hps.json"),
               "root": root, "urls": [s[2] for s in started],
               "stubs": [prediction_service_pb2_grpc.PredictionServiceStub(c) for c in channels]}
    finally:
        for c in channels:
            c.close()
        for proc, log, *_ in started:
            proc.terminate()
            proc.wait(30)
            log.close()


def _ask(servers, i, ids):
    """server i's answer over REST and over gRPC (both must agree): [n, 2 * DIM]."""
    r = requests.post(f"{servers['urls'][i]}/v1/models/emb:predict",
                      json={"instances": ids.tolist()}, timeout=30)
    assert r.status_code == 200, r.text
    rest = np.array(r.json()["predictions"], np.float32)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "emb"
    request.inputs["ids"].CopyFrom(tf.make_tensor_proto(ids.astype(np.int64)))
    reply = servers["stubs"][i].Predict(request, timeout=30)
    got = tf.make_ndarray(next(iter(reply.outputs.values()))).astype(np.float32)
    np.testing.assert_array_equal(got, rest)
    return rest


def _update(servers, keys, rows):
    path = servers["root"] / "rows.npz"
    np.savez(path, keys=keys, vectors=rows)
    out = subprocess.run([sys.executable, "-m", "keras_hps.cli", "update", "--config",
                          servers["config"], "--model", "emb", "--table", "0", "--npz",
                          str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "announced on the update stream of model 'emb'" in out.stdout


def test_two_servers_answer_identically_and_both_take_an_update(servers):
    w = servers["want"]
    ids = np.random.default_rng(1).integers(0, VOCAB, (40, 2))
    for i in (0, 1):
        np.testing.assert_array_equal(_ask(servers, i, ids), w[ids].reshape(40, -1))
    new_rows = np.full((3, DIM), 7.5, np.float32) + np.arange(3, dtype=np.float32)[:, None]
    _update(servers, np.array([ids[0, 0], ids[0, 1], 70]), new_rows)  # 70: a new key
    w[[ids[0, 0], ids[0, 1], 70]] = new_rows  # (a repeated id: its last row)
    asked = np.r_[ids, [[70, 1]]]
    for i in (0, 1):
        deadline = time.monotonic() + 5
        while not np.array_equal(_ask(servers, i, asked), w[asked].reshape(len(asked), -1)):
            assert time.monotonic() < deadline, f"server {i} never answered the update"
            time.sleep(0.02)


def _node_of(servers, key: int) -> int:
    """Index of the master holding `key`'s partition of the served table."""
    m = load_config(servers["config"]).models[0]
    ns = table_namespace("emb", m.table_name(0), table_content_id(m.sparse_files[0], DIM))
    p = int(partition_of(np.array([key]), 6)[0])
    slot = key_slot(f"khps:{{{ns}/p{p}}}:v".encode())
    return min(slot // (16384 // 3), 2)  # tests/redis_cluster.py's even slot ranges


def test_killed_master_is_unavailable_never_wrong_and_recovers(servers, redis_cluster):
    want = servers["want"]
    _update(servers, np.array([1]), want[[1]] * 2)  # an updated table: no stand-in below
    want[1] *= 2
    probe = 100  # in no table: never cached, so a lookup of it always asks its partition
    ids = np.r_[np.arange(VOCAB), probe, 1].reshape(-1, 2)
    redis_cluster.kill(_node_of(servers, probe))
    try:
        for i in (0, 1):
            for part in np.array_split(ids, 6):  # each request: UNAVAILABLE, or exact rows
                r = requests.post(f"{servers['urls'][i]}/v1/models/emb:predict",
                                  json={"instances": part.tolist()}, timeout=30)
                if r.status_code == 200:
                    np.testing.assert_array_equal(np.array(r.json()["predictions"], np.float32),
                                                  want[part].reshape(len(part), -1))
                else:
                    assert r.status_code == 503, r.text
                    assert set(r.json()) == {"error"} and "Redis Cluster" in r.json()["error"]
            assert r.status_code == 503  # the probe's request
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "emb"
            request.inputs["ids"].CopyFrom(tf.make_tensor_proto(np.array([[probe, 2]])))
            with pytest.raises(grpc.RpcError) as e:
                servers["stubs"][i].Predict(request, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        redis_cluster.restart(_node_of(servers, probe))
    for i in (0, 1):
        deadline = time.monotonic() + 20
        while True:
            r = requests.post(f"{servers['urls'][i]}/v1/models/emb:predict",
                              json={"instances": ids.tolist()}, timeout=30)
            if r.status_code == 200:
                break
            assert r.status_code == 503 and time.monotonic() < deadline, r.text
            time.sleep(0.2)
        np.testing.assert_array_equal(np.array(r.json()["predictions"], np.float32),
                                      want[ids].reshape(len(ids), -1))
