"""Each version serves its own tables: version pinning at export, the registry of parameter
servers, a hot swap under load, two repositories in one server, and old manifests.

Versions are exported with `export_for_serving` (external placement) from a small Keras
model whose weights are set, not trained; answers are checked against a NumPy forward pass
of the weights of the version that answered.
"""

from __future__ import annotations

import json
import os
import threading
import time

import grpc
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from tensorflow_serving.apis import (  # noqa: E402
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from keras_hps.export import export_for_serving  # noqa: E402
from keras_hps.servable import MANIFEST_NAME, load_servable, version_tables  # noqa: E402
from keras_hps.serving.model_config import ModelEntry  # noqa: E402
from keras_hps.serving.server import ModelServer, ServerOptions  # noqa: E402
from keras_hps.serving.tables import ParameterServers  # noqa: E402

keras = pytest.importorskip("keras")

USERS, DIM = 30, 4
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE


def _model() -> keras.Model:
    user = keras.Input(shape=(1,), dtype="int64", name="user")
    x = keras.layers.Flatten()(keras.layers.Embedding(USERS, DIM, name="emb")(user))
    return keras.Model(user, keras.layers.Dense(1, name="out")(x))


def _weights(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((USERS, DIM)).astype(np.float32),
            rng.standard_normal((DIM, 1)).astype(np.float32),
            rng.standard_normal(1).astype(np.float32)]


def _forward(weights: list[np.ndarray], users: np.ndarray) -> np.ndarray:
    table, kernel, bias = weights
    return table[users[:, 0]] @ kernel + bias


def _export(repo, name: str, weights: list[np.ndarray], version: int | None = None):
    model = _model()
    model.get_layer("emb").set_weights([weights[0]])
    model.get_layer("out").set_weights(weights[1:])
    return export_for_serving(model, repo, name, version=version, tables="external",
                              warmup_records=1)


USERS_IN = np.arange(USERS, dtype=np.int64).reshape(-1, 1)


def test_versions_pin_their_tables_and_equal_tables_share_a_parameter_server(tmp_path):
    repo = tmp_path / "repo"
    w1, w2 = _weights(1), _weights(2)
    dense_only = [w2[0], *_weights(3)[1:]]  # version 3 retrains only the dense layer
    v1, v2, v3 = (_export(repo, "m", w) for w in (w1, w2, dense_only))
    pins = [json.loads(open(os.path.join(r.version_dir, "hps.json")).read())
            for r in (v1, v2, v3)]
    for result, pin in zip((v1, v2, v3), pins, strict=True):
        (table,) = pin["models"][0]["sparse_files"]
        assert os.path.normpath(os.path.join(result.version_dir, table)) == \
            result.table_files[0]  # each version names its own table file
        manifest = json.loads(open(os.path.join(result.version_dir, MANIFEST_NAME)).read())
        assert manifest["hps_config"] == "hps.json" and len(manifest["tables"]) == 1
    t1, t2, t3 = (version_tables(r.version_dir) for r in (v1, v2, v3))
    assert t1.key != t2.key and t2.key == t3.key  # equal content, other files: same key
    assert not (t1.shared or t2.shared or t3.shared)

    built: list = []

    def factory(path):
        from keras_hps.parameter_server import ParameterServer

        built.append(ParameterServer(path))
        return built[-1]

    registry = ParameterServers(factory)
    leases = [registry.acquire(t) for t in (t1, t2, t3)]
    assert len(built) == 2 and len(registry) == 2
    assert leases[1].parameter_server is leases[2].parameter_server
    servables = [load_servable(r.version_dir, lease.parameter_server, on_close=lease.release)
                 for r, lease in zip((v1, v2, v3), leases, strict=True)]
    for servable, weights in zip(servables, (w1, w2, dense_only), strict=True):
        got = next(iter(servable.run({"user": USERS_IN}).values()))
        np.testing.assert_allclose(got, _forward(weights, USERS_IN), rtol=1e-5, atol=1e-5)
    servables[1].close()  # version 3 still holds the shared parameter server
    got = next(iter(servables[2].run({"user": USERS_IN}).values()))
    np.testing.assert_allclose(got, _forward(dense_only, USERS_IN), rtol=1e-5, atol=1e-5)
    assert len(registry) == 2
    servables[2].close()
    assert len(registry) == 1
    with pytest.raises(RuntimeError, match="closed"):
        built[1].lookup("m", 0, np.array([1]))
    servables[0].close()
    assert len(registry) == 0
    with pytest.raises(RuntimeError, match="closed"):
        built[0].lookup("m", 0, np.array([1]))


def test_a_failed_build_reaches_every_waiter_and_leaves_nothing(tmp_path):
    from keras_hps.servable import VersionTables

    calls = []
    gate = threading.Event()

    def factory(path):
        calls.append(path)
        gate.wait(10)
        raise OSError(f"cannot open {path}")

    registry = ParameterServers(factory)
    tables = VersionTables("/nowhere/hps.json", "key", False)
    errors = []

    def acquire():
        try:
            registry.acquire(tables)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=acquire) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join()
    assert calls == ["/nowhere/hps.json"] and len(errors) == 3 and len(registry) == 0


def _predict(stub, name: str, users: np.ndarray, version: int | None = None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["user"].CopyFrom(tf.make_tensor_proto(users))
    response = stub.Predict(request, timeout=30)
    (out,) = response.outputs.values()
    return response.model_spec.version.value, tf.make_ndarray(out)


def _status(models, name: str) -> dict[int, int]:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    return {s.version: s.state for s in models.GetModelStatus(request).model_version_status}


def test_hot_swap_to_new_tables_under_load(tmp_path):
    """Version 2 (new tables) replaces version 1 while clients keep asking: no request
    fails, each answer matches the tables of the version that gave it, and once version 2
    is AVAILABLE no request that starts gets version 1's answer."""
    repo = tmp_path / "repo"
    w1, w2 = _weights(11), _weights(12)
    _export(repo, "m", w1)
    options = ServerOptions(port=0, host="127.0.0.1", file_system_poll_wait_seconds=0.1,
                            max_num_load_retries=0)
    server = ModelServer([ModelEntry("m", str(repo / "m"))], options).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    answers: list[tuple[float, int, np.ndarray]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            users = rng.integers(0, USERS, (8, 1)).astype(np.int64)
            started = time.monotonic()
            try:
                version, out = _predict(stub, "m", users)
            except grpc.RpcError as exc:
                failures.append(exc)
                continue
            answers.append((started, version, np.abs(out - _forward((w1, w2)[version - 1],
                                                                     users)).max()))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        _export(repo, "m", w2)
        deadline = time.monotonic() + 60
        while _status(models, "m").get(2) != AVAILABLE:
            assert time.monotonic() < deadline, _status(models, "m")
            time.sleep(0.01)
        available_at = time.monotonic()
        while not (len(_status(models, "m")) == 2 and 1 not in {
                v for v, s in _status(models, "m").items() if s == AVAILABLE}):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
        channel.close()
    try:
        assert not failures, failures[0]
        assert {v for _, v, _ in answers} == {1, 2}
        assert max(err for _, _, err in answers) < 1e-4  # every answer from its own tables
        late = [v for started, v, _ in answers if started > available_at]
        assert late and set(late) == {2}
        assert len(server.parameter_servers) == 1  # version 1's tables were let go
    finally:
        server.stop(grace=5)
    assert len(server.parameter_servers) == 0


def test_two_repositories_and_an_old_manifest_in_one_server(tmp_path, caplog):
    """Two repositories, each with its own hps.json, in one models.config; and a version
    written before pinning (its manifest names the repository's hps.json)."""
    wa, wb, wc = _weights(21), _weights(22), _weights(23)
    _export(tmp_path / "repo_a", "alpha", wa)
    _export(tmp_path / "repo_b", "beta", wb)
    old = _export(tmp_path / "repo_c", "gamma", wc)
    manifest_path = os.path.join(old.version_dir, MANIFEST_NAME)
    manifest = json.loads(open(manifest_path).read())
    manifest["hps_config"] = "../../hps.json"
    del manifest["tables"]
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    os.unlink(os.path.join(old.version_dir, "hps.json"))
    config = tmp_path / "models.config"
    config.write_text("model_config_list {\n" + "".join(
        f"  config {{ name: '{n}' base_path: '{tmp_path / r / n}' model_platform: "
        f"'tensorflow' }}\n" for n, r in (("alpha", "repo_a"), ("beta", "repo_b"),
                                          ("gamma", "repo_c"))) + "}\n")
    from keras_hps.serving.model_config import load_model_config_file

    options = ServerOptions(port=0, rest_api_port=0, host="127.0.0.1",
                            file_system_poll_wait_seconds=0, max_num_load_retries=0)
    with caplog.at_level("WARNING", logger="keras_hps.serving"):
        server = ModelServer(load_model_config_file(str(config)), options).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
        for name, weights in (("alpha", wa), ("beta", wb), ("gamma", wc)):
            version, out = _predict(stub, name, USERS_IN)
            assert version == 1
            np.testing.assert_allclose(out, _forward(weights, USERS_IN), rtol=1e-5, atol=1e-5)
        assert len(server.parameter_servers) == 3
        assert any("exported before versions pinned their tables" in r.message
                   for r in caplog.records)
    finally:
        channel.close()
        server.stop(grace=5)


def test_hps_config_flag_serves_every_version_from_one_config(tmp_path):
    """--hps_config: one parameter-server config for every external version (its tables,
    not the ones the versions pin), loaded once."""
    repo = tmp_path / "repo"
    w1, w2 = _weights(31), _weights(32)
    _export(repo, "m", w1)
    _export(repo, "m", w2)  # the repository hps.json now names version 2's tables
    options = ServerOptions(port=0, host="127.0.0.1", file_system_poll_wait_seconds=0,
                            hps_config=str(repo / "hps.json"))
    entry = ModelEntry("m", str(repo / "m"), policy=_all_versions())
    server = ModelServer([entry], options).start()
    try:
        for version in (1, 2):
            with server.manager.acquire("m", version) as handle:
                out = next(iter(handle.servable.run({"user": USERS_IN}).values()))
            dense = (w1, w2)[version - 1][1:]
            np.testing.assert_allclose(out, _forward([w2[0], *dense], USERS_IN), rtol=1e-5,
                                       atol=1e-5)
        assert len(server.parameter_servers) == 1
    finally:
        server.stop(grace=5)


def _all_versions():
    from keras_hps.serving.model_config import VersionPolicy

    return VersionPolicy("all")


@pytest.mark.parametrize("placement", ["replicate", "shard"])
def test_a_server_uses_every_gpu_its_model_lists(tmp_path, monkeypatch, placement):
    """A model on two GPUs (virtual: GPU 0, or the CPU through Triton's interpreter):
    concurrent gRPC requests are answered from its tables, replicated requests run on both
    GPUs, and a sharded table's rows are split over them."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    monkeypatch.setenv("KERAS_HPS_GPU_TIER",
                       "virtual" if torch.cuda.is_available() else "interpret")
    repo = tmp_path / "repo"
    w = _weights(41)
    _export(repo, "m", w)
    cfg = json.loads((repo / "hps.json").read_text())
    cfg["models"][0].update(deployed_device_list=[0, 1], gpucache=True, gpucacheper=1.0,
                            hit_rate_threshold=1.0, gpu_placement=placement)
    (repo / "gpus.json").write_text(json.dumps(cfg))
    options = ServerOptions(port=0, host="127.0.0.1", file_system_poll_wait_seconds=0,
                            hps_config=str(repo / "gpus.json"))
    server = ModelServer([ModelEntry("m", str(repo / "m"))], options).start()
    clients = 6
    barrier = threading.Barrier(clients)
    errors: list[float | BaseException] = []

    def client(seed: int) -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        rng = np.random.default_rng(seed)
        try:
            barrier.wait(timeout=60)
            for _ in range(3):
                users = rng.integers(0, USERS, (8, 1)).astype(np.int64)
                _version, out = _predict(stub, "m", users)
                errors.append(float(np.abs(out - _forward(w, users)).max()))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            channel.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(errors) == 3 * clients and max(errors) < 1e-4, errors
        (ps,) = server.parameter_servers.loaded()
        tier = ps.table("m", 0).gpu
        assert tier.placement == placement and len(tier.devices) == 2
        if placement == "replicate":  # both GPUs looked keys up
            used = [r.cache.stats() for r in tier._replicas]
            assert all(s["hits"] + s["misses"] > 0 for s in used), used
        else:  # each shard holds only its own keys' rows
            sizes = [s.size for s in tier._replicas[0].cache.shards]
            assert all(n > 0 for n in sizes) and sum(sizes) == tier.stats()["resident"]
    finally:
        server.stop(grace=5)
