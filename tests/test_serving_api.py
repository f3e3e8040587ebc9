"""The model server end to end: a real server on loopback, official gRPC stubs, real HTTP.

One server per module (models.config with three models, version policies, labels, batching
on); each test checks answers against the NumPy reference of the version that served them.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests
from serving_models import DIM, VOCAB, copy_version, free_port, reference, save_version

tf = pytest.importorskip("tensorflow")

from tensorflow_serving.apis import (  # noqa: E402
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from keras_hps.serving.batching import BatchingOptions  # noqa: E402
from keras_hps.serving.model_config import load_model_config_file  # noqa: E402
from keras_hps.serving.server import ModelServer, ServerOptions  # noqa: E402

SEEDS = {("ctr", 1): 11, ("ctr", 2): 12, ("live", 1): 21, ("live", 2): 22, ("slow", 1): 31}
MAX_BATCH = 64

CONFIG = """
model_config_list {
  config {
    name: 'ctr'
    base_path: 'ctr'
    model_platform: 'tensorflow'
    model_version_policy { all {} }
    version_labels { key: 'stable' value: 1 }
    version_labels { key: 'canary' value: 2 }
  }
  config { name: 'live' base_path: 'live' model_platform: 'tensorflow' }
  config { name: 'slow' base_path: 'slow' model_platform: 'tensorflow' }
}
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("serving_repo"))
    for (model, version), seed in SEEDS.items():
        if (model, version) == ("live", 2):
            save_version(os.path.join(root, "staging", "live2"), seed)
        else:
            os.makedirs(os.path.join(root, model), exist_ok=True)
            save_version(os.path.join(root, model, str(version)), seed)
    with open(os.path.join(root, "models.config"), "w") as f:
        f.write(CONFIG)
    return root


@pytest.fixture(scope="module")
def server(repo):
    from keras_hps.servable import load_servable

    gate = threading.Event()

    def loader(path: str):
        if os.sep + "slow" + os.sep in path:  # 'slow' stays LOADING until the test opens it
            gate.wait(120)
        return load_servable(path)

    options = ServerOptions(
        port=0,
        rest_api_port=free_port(),
        host="127.0.0.1",
        file_system_poll_wait_seconds=0.2,
        num_load_threads=4,  # 'slow' loads while the others do
        max_num_load_retries=0,  # a version that fails ends at once
        enable_batching=True,
        batching=BatchingOptions(
            max_batch_size=MAX_BATCH,
            batch_timeout_micros=2000,
            num_batch_threads=2,
            max_enqueued_batches=10_000,
        ),
    )
    entries = load_model_config_file(os.path.join(repo, "models.config"))
    srv = ModelServer(entries, options, loader=loader).start(wait_for_models=False)
    assert srv.manager.wait_until_available("ctr", 2, timeout=60)
    assert srv.manager.wait_until_available("live", 1, timeout=60)
    srv.gate = gate
    yield srv
    gate.set()
    srv.stop(grace=5)


@pytest.fixture(scope="module")
def stubs(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield (
        prediction_service_pb2_grpc.PredictionServiceStub(channel),
        model_service_pb2_grpc.ModelServiceStub(channel),
    )
    channel.close()


@pytest.fixture(scope="module")
def url(server):
    return f"http://127.0.0.1:{server.rest_port}"


def batch(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(n, 2), dtype=np.int64)
    ids[0, 1] = ids[0, 0] if n else 0  # a duplicate key within a row
    return ids, rng.normal(size=(n, 3)).astype(np.float32)


def grpc_request(model: str, ids, x, version=None, label=None, signature=None):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    if version is not None:
        req.model_spec.version.value = version
    if label is not None:
        req.model_spec.version_label = label
    if signature is not None:
        req.model_spec.signature_name = signature
    req.inputs["ids"].CopyFrom(tf.make_tensor_proto(ids))
    if x is not None:
        req.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    return req


def check(outputs: dict, model: str, version: int, ids, x) -> None:
    want = reference(SEEDS[(model, version)], ids, x)
    np.testing.assert_allclose(outputs["emb"], want["emb"], rtol=1e-6)
    np.testing.assert_allclose(outputs["score"], want["score"], rtol=1e-5, atol=1e-5)


def grpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=30)
    return info.value


def still_serving(stub, url) -> None:
    ids, x = batch(3, seed=99)
    out = stub.Predict(grpc_request("ctr", ids, x), timeout=30)
    check({k: tf.make_ndarray(v) for k, v in out.outputs.items()}, "ctr", 2, ids, x)
    r = requests.post(f"{url}/v1/models/ctr:predict", json={"inputs": {"ids": ids.tolist(),
                                                                     "x": x.tolist()}})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------- gRPC
def test_grpc_predict_latest_version_and_label(stubs):
    predict, _ = stubs
    ids, x = batch(17)
    for kwargs, version in [({}, 2), ({"version": 1}, 1), ({"label": "stable"}, 1),
                            ({"label": "canary"}, 2)]:
        out = predict.Predict(grpc_request("ctr", ids, x, **kwargs), timeout=30)
        assert out.model_spec.name == "ctr"
        assert out.model_spec.version.value == version
        assert out.model_spec.signature_name == "serving_default"
        check({k: tf.make_ndarray(v) for k, v in out.outputs.items()}, "ctr", version, ids, x)


def test_grpc_output_filter_other_signature_and_empty_batch(stubs):
    predict, _ = stubs
    ids, x = batch(5)
    req = grpc_request("ctr", ids, x)
    req.output_filter.append("score")
    out = predict.Predict(req, timeout=30)
    assert set(out.outputs) == {"score"}
    out = predict.Predict(grpc_request("ctr", ids, None, signature="embed"), timeout=30)
    np.testing.assert_array_equal(tf.make_ndarray(out.outputs["vectors"]),
                                  reference(12, ids, x)["emb"])
    empty_ids, empty_x = np.zeros((0, 2), np.int64), np.zeros((0, 3), np.float32)
    out = predict.Predict(grpc_request("ctr", empty_ids, empty_x), timeout=30)
    assert tf.make_ndarray(out.outputs["emb"]).shape == (0, 2, DIM)


def test_grpc_metadata_and_status(stubs):
    predict, models = stubs
    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = "ctr"
    req.model_spec.version_label = "stable"
    resp = predict.GetModelMetadata(req, timeout=30)
    assert resp.model_spec.version.value == 1
    sigs = get_model_metadata_pb2.SignatureDefMap()
    resp.metadata["signature_def"].Unpack(sigs)
    assert set(sigs.signature_def) == {"serving_default", "embed", "echo"}
    inputs = sigs.signature_def["serving_default"].inputs
    assert inputs["ids"].dtype == tf.int64.as_datatype_enum
    assert [d.size for d in inputs["ids"].tensor_shape.dim] == [-1, 2]

    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "ctr"
    resp = models.GetModelStatus(req, timeout=30)
    got = {s.version: (s.state, s.status.error_code) for s in resp.model_version_status}
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert got == {1: (available, 0), 2: (available, 0)}

    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["nope"])
    req.model_spec.name = "ctr"
    err = grpc_error(predict.GetModelMetadata, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Metadata field nope is not supported" in err.details()


@pytest.mark.parametrize(
    "make, code, message",
    [
        (lambda ids, x: grpc_request("nope", ids, x), "NOT_FOUND",
         "Servable not found for request: Latest(nope)"),
        (lambda ids, x: grpc_request("ctr", ids, x, version=7), "NOT_FOUND",
         "Servable not found for request: Specific(ctr, 7)"),
        (lambda ids, x: grpc_request("ctr", ids, x, label="gold"), "INVALID_ARGUMENT",
         "Unrecognized servable version label: gold"),
        (lambda ids, x: grpc_request("ctr", ids, x, signature="nope"), "FAILED_PRECONDITION",
         'Serving signature key "nope" not found.'),
        (lambda ids, x: grpc_request("ctr", ids, None), "INVALID_ARGUMENT",
         "input size does not match signature"),
        (lambda ids, x: grpc_request("ctr", ids.astype(np.float32), x), "INVALID_ARGUMENT",
         "ids"),  # float keys
        (lambda ids, x: grpc_request("ctr", np.zeros(4, np.int64), x), "INVALID_ARGUMENT",
         "ids"),  # a shape the graph cannot compute (a [4, 3] one it can: see below)
        (lambda ids, x: grpc_request("", ids, x), "INVALID_ARGUMENT",
         "ModelSpec has no name specified."),
        (lambda ids, x: grpc_request("ctr", *batch(MAX_BATCH + 1)), "INVALID_ARGUMENT",
         f"Task size {MAX_BATCH + 1} is larger than maximum input batch size {MAX_BATCH}"),
    ],
    ids=["unknown-model", "unknown-version", "unknown-label", "unknown-signature",
         "missing-input", "float-keys", "wrong-shape", "no-name", "oversized-batch"],
)
def test_grpc_bad_requests(stubs, url, make, code, message):
    predict, _ = stubs
    ids, x = batch(4)
    err = grpc_error(predict.Predict, make(ids, x))
    assert err.code() == getattr(grpc.StatusCode, code), err.details()
    assert message in err.details()
    still_serving(predict, url)


def test_grpc_shape_the_signature_does_not_declare_is_computed(stubs):
    """TF Serving checks no shapes: ids [4, 3] for a signature of [?, 2] runs, since every
    op of the graph can take it (gather, then a sum over the last two axes)."""
    predict, _ = stubs
    ids = np.random.default_rng(3).integers(0, VOCAB, size=(4, 3), dtype=np.int64)
    x = np.ones((4, 3), np.float32)
    resp = predict.Predict(grpc_request("ctr", ids, x, version=1), timeout=60)
    emb = tf.make_ndarray(resp.outputs["emb"])
    np.testing.assert_allclose(emb, reference(SEEDS[("ctr", 1)], ids, x)["emb"], rtol=1e-6)
    np.testing.assert_allclose(tf.make_ndarray(resp.outputs["score"]),
                               reference(SEEDS[("ctr", 1)], ids, x)["score"], rtol=1e-5)


def test_grpc_status_errors_and_classify_on_a_predict_model(stubs):
    predict, models = stubs
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "nope"
    err = grpc_error(models.GetModelStatus, req)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "Could not find any versions of model nope"
    req.model_spec.name = "ctr"
    req.model_spec.version.value = 9
    err = grpc_error(models.GetModelStatus, req)
    assert err.details() == "Could not find version 9 of model ctr"
    err = grpc_error(models.GetModelStatus, get_model_status_pb2.GetModelStatusRequest())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == "Missing ModelSpec"
    from tensorflow_serving.apis import classification_pb2

    # As in TF Serving: Classify checks the signature's shape (serving_default has two
    # inputs), and MultiInference refuses a task of the predict method.
    creq = classification_pb2.ClassificationRequest()
    creq.model_spec.name = "ctr"
    err = grpc_error(predict.Classify, creq)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "Expected one input Tensor."
    from tensorflow_serving.apis import inference_pb2

    mreq = inference_pb2.MultiInferenceRequest()
    mreq.tasks.add(method_name="tensorflow/serving/predict").model_spec.name = "ctr"
    err = grpc_error(predict.MultiInference, mreq)
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert err.details() == "Unsupported signature method_name: tensorflow/serving/predict"


# ---------------------------------------------------------------- REST
def test_rest_row_and_columnar(url):
    ids, x = batch(9, seed=3)
    rows = [{"ids": i.tolist(), "x": v.tolist()} for i, v in zip(ids, x, strict=True)]
    r = requests.post(f"{url}/v1/models/ctr/versions/1:predict", json={"instances": rows})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "application/json"
    preds = r.json()["predictions"]
    assert len(preds) == 9 and set(preds[0]) == {"emb", "score"}
    check({"emb": np.array([p["emb"] for p in preds], np.float32),
           "score": np.array([p["score"] for p in preds], np.float32)}, "ctr", 1, ids, x)

    body = {"signature_name": "serving_default",
            "inputs": {"ids": ids.tolist(), "x": x.tolist()}}
    r = requests.post(f"{url}/v1/models/ctr/labels/canary:predict", json=body)
    assert r.status_code == 200, r.text
    outs = r.json()["outputs"]
    check({k: np.array(v, np.float32) for k, v in outs.items()}, "ctr", 2, ids, x)

    # one input, one output: a plain list in, a plain list out
    r = requests.post(f"{url}/v1/models/ctr:predict",
                      json={"signature_name": "embed", "instances": ids.tolist()})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["predictions"], np.float32),
                               reference(12, ids, x)["emb"], rtol=1e-6)


def test_rest_b64_in_and_out(url):
    words = [b"\x00\xffbinary", "héllo".encode(), b""]
    instances = [{"b64": base64.b64encode(w).decode()} for w in words]
    r = requests.post(f"{url}/v1/models/ctr:predict",
                      json={"signature_name": "echo", "instances": instances})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [base64.b64decode(p["text_bytes"]["b64"]) for p in preds] == words
    assert [p["length"] for p in preds] == [len(w) for w in words]
    # plain strings are text; the _bytes output is still b64
    r = requests.post(f"{url}/v1/models/ctr:predict",
                      json={"signature_name": "echo", "inputs": ["ab", "xyz"]})
    out = r.json()["outputs"]
    assert out["length"] == [2, 3]
    assert [base64.b64decode(o["b64"]) for o in out["text_bytes"]] == [b"ab", b"xyz"]
    r = requests.post(f"{url}/v1/models/ctr:predict",
                      json={"signature_name": "echo", "inputs": [{"b64": "!!!"}]})
    assert r.status_code == 400 and r.json()["error"] == "Unable to base64 decode"


def test_rest_status_and_metadata_routes(url):
    r = requests.get(f"{url}/v1/models/ctr")
    assert r.status_code == 200
    status = {s["version"]: s for s in r.json()["model_version_status"]}
    assert set(status) == {"1", "2"}
    assert status["1"]["state"] == "AVAILABLE"
    assert status["1"]["status"] == {"error_code": "OK", "error_message": ""}
    for suffix, version in [("/versions/1", "1"), ("/labels/canary", "2")]:
        r = requests.get(f"{url}/v1/models/ctr{suffix}")
        assert [s["version"] for s in r.json()["model_version_status"]] == [version]
        r = requests.get(f"{url}/v1/models/ctr{suffix}/metadata")
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["model_spec"]["version"] == version and doc["model_spec"]["name"] == "ctr"
        sig = doc["metadata"]["signature_def"]["signature_def"]["serving_default"]
        assert sig["inputs"]["ids"]["dtype"] == "DT_INT64"
        assert sig["method_name"] == "tensorflow/serving/predict"
    r = requests.get(f"{url}/v1/models/ctr/metadata")
    assert r.json()["model_spec"]["version"] == "2"


@pytest.mark.parametrize(
    "method, path, body, status, message",
    [
        ("POST", "/v1/models/ctr:predict", b"{not json", 400, "JSON Parse error"),
        ("POST", "/v1/models/ctr:predict", b"", 400, "JSON Parse error: The document is empty"),
        ("POST", "/v1/models/ctr:predict", b"[1, 2]", 400, "Is not object"),
        ("POST", "/v1/models/ctr:predict", b'{"instances": [1], "inputs": [1]}', 400,
         "expecting only one of 'inputs' or 'instances' keys to exist"),
        ("POST", "/v1/models/ctr:predict", b'{"signature_name": "x"}', 400,
         'Serving signature name: "x" not found in signature def'),
        ("POST", "/v1/models/ctr:predict", b'{"foo": 1}', 400,
         "Missing 'inputs' or 'instances' key"),
        ("POST", "/v1/models/ctr:predict", b'{"inputs": {"ids": [[1, 2]]}}', 400,
         "Missing named input: x in 'inputs' object."),
        ("POST", "/v1/models/ctr:predict", b'{"instances": [[1, 2]]}', 400,
         "instances is a plain list, but expecting list of objects"),
        ("POST", "/v1/models/ctr:predict",
         b'{"inputs": {"ids": [[1.5, 2]], "x": [[0, 0, 0]]}}', 400,
         "JSON Value: 1.5 Type: Number is not of expected type: int64"),
        ("POST", "/v1/models/ctr:predict",
         b'{"inputs": {"ids": [[1, 2]], "x": [["a", 0, 0]]}}', 400,
         'JSON Value: "a" Type: String is not of expected type: float'),
        ("POST", "/v1/models/ctr:predict",
         b'{"inputs": {"ids": [[1, 2], [3]], "x": [[0, 0, 0], [0, 0, 0]]}}', 400,
         "Encountered list at unexpected size: 1 at level: 1 expected size: 2"),
        ("POST", "/v1/models/ctr:predict",
         b'{"instances": [{"ids": [1, 2], "x": [0, 0, 0]}, {"ids": [1.0, 2], "x": [0, 0, 0]}]}',
         400, "Failed to process element: 1 key: ids of 'instances' list"),
        ("POST", "/v1/models/ctr:predict",
         b'{"inputs": {"ids": [1, 2], "x": [[0, 0, 0], [0, 0, 0]]}}', 400, "ids"),  # graph fails
        ("POST", "/v1/models/ctr:predict",
         json.dumps({"inputs": {"ids": batch(MAX_BATCH + 1)[0].tolist(),
                                "x": batch(MAX_BATCH + 1)[1].tolist()}}).encode(),
         400, f"Task size {MAX_BATCH + 1} is larger than maximum input batch size"),
        ("POST", "/v1/models/nope:predict", b"{}", 404,
         "Servable not found for request: Latest(nope)"),
        ("POST", "/v1/models/ctr/versions/5:predict", b"{}", 404,
         "Servable not found for request: Specific(ctr, 5)"),
        ("POST", "/v1/models/ctr/labels/gold:predict", b"{}", 400,
         "Unrecognized servable version label: gold"),
        ("POST", "/v1/models/ctr/versions/1/labels/stable:predict", b"{}", 400,
         "Malformed request: POST /v1/models/ctr/versions/1/labels/stable:predict"),
        ("GET", "/v1/models/nope", None, 404, "Could not find any versions of model nope"),
        ("GET", "/v1/models/ctr/versions/9", None, 404, "Could not find version 9 of model ctr"),
        ("GET", "/v1/models/nope/metadata", None, 404, "Servable not found for request"),
        ("GET", "/v1/models", None, 400, "Missing model name in request."),
        ("POST", "/v1/models/ctr:classify", b'{"examples": []}', 400,
         "'examples' value is an empty array"),  # json_tensor.cc, before any signature check
        ("POST", "/v1/models/ctr:regress", b'{"examples": [{"x": 1.0}]}', 400,
         "Expected one input Tensor."),  # regressor.cc: ctr's signature is not a regression
        ("PUT", "/v1/models/ctr:predict", b"{}", 400, "Malformed request: PUT"),
        ("GET", "/v1/models/ctr:predict", None, 400, "Malformed request: GET"),
        ("GET", "/not/an/api", None, 404, ""),
    ],
)
def test_rest_bad_requests(stubs, url, method, path, body, status, message):
    r = requests.request(method, url + path, data=body)
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == "application/json"
    assert message in r.json()["error"]
    still_serving(stubs[0], url)


def test_prometheus_metrics(url, stubs):
    still_serving(stubs[0], url)
    r = requests.get(f"{url}/monitoring/prometheus/metrics")
    assert r.status_code == 200
    lines = r.text.splitlines()
    ok = [ln for ln in lines
          if ln.startswith(':tensorflow:serving:request_count{model_name="ctr",status="OK"}')]
    assert ok and int(ok[0].split()[-1]) >= 2
    grpc_count = [ln for ln in lines if ln.startswith(":tensorflow:serving:request_latency_count")
                  and 'entrypoint="GRPC"' in ln and 'model_name="ctr"' in ln]
    assert grpc_count and int(grpc_count[0].split()[-1]) >= 1
    assert any('le="+Inf"' in ln for ln in lines)


# ---------------------------------------------------------------- versions
def test_loading_version_reports_loading_then_available(stubs, url, server):
    _, models = stubs
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "slow"
    resp = models.GetModelStatus(req, timeout=30)
    assert [(s.version, s.state) for s in resp.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.LOADING)]
    r = requests.get(f"{url}/v1/models/slow")
    assert r.json()["model_version_status"][0]["state"] == "LOADING"
    r = requests.post(f"{url}/v1/models/slow:predict", json={"instances": [[1, 2]]})
    assert r.status_code == 404 and "Servable not found" in r.json()["error"]
    server.gate.set()
    assert server.manager.wait_until_available("slow", 1, timeout=60)
    ids, x = batch(2)
    out = stubs[0].Predict(grpc_request("slow", ids, x), timeout=30)
    check({k: tf.make_ndarray(v) for k, v in out.outputs.items()}, "slow", 1, ids, x)


def test_new_version_while_serving_then_failed_version(stubs, url, server, repo):
    """live/2 appears while clients hammer 'live': no request fails and each answer is the
    one of the version that served it; then a broken live/3 leaves live/2 serving."""
    predict, models = stubs
    stop = threading.Event()
    seen, errors = [], []

    def client(k: int) -> None:
        rng = np.random.default_rng(k)
        while not stop.is_set():
            ids = rng.integers(0, VOCAB, size=(3, 2), dtype=np.int64)
            x = rng.normal(size=(3, 3)).astype(np.float32)
            try:
                if k % 2:
                    out = predict.Predict(grpc_request("live", ids, x), timeout=30)
                    version = out.model_spec.version.value
                    outs = {n: tf.make_ndarray(v) for n, v in out.outputs.items()}
                else:
                    r = requests.post(f"{url}/v1/models/live:predict",
                                      json={"inputs": {"ids": ids.tolist(), "x": x.tolist()}})
                    assert r.status_code == 200, r.text
                    outs = {n: np.array(v, np.float32) for n, v in r.json()["outputs"].items()}
                    # REST does not name the version: it must match one of the two
                    version = next(
                        (v for v in (1, 2) if np.allclose(
                            outs["score"], reference(SEEDS[("live", v)], ids, x)["score"],
                            rtol=1e-5, atol=1e-5)), None)
                    assert version is not None, "REST answer matches neither version"
                check(outs, "live", version, ids, x)
                seen.append(version)
            except Exception as exc:  # collected: the test fails below
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    copy_version(os.path.join(repo, "staging", "live2"), os.path.join(repo, "live", "2"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = {v.version: v.state.name for v in server.manager.status("live")}
        if status == {2: "AVAILABLE", 1: "END"}:
            break
        time.sleep(0.05)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert status == {2: "AVAILABLE", 1: "END"}
    assert 1 in seen and 2 in seen and seen[-1] == 2

    broken = os.path.join(repo, "live", "3")
    os.makedirs(broken + ".tmp")
    with open(os.path.join(broken + ".tmp", "saved_model.pb"), "wb") as f:
        f.write(b"this is not a SavedModel")
    os.rename(broken + ".tmp", broken)
    deadline = time.monotonic() + 30
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "live"
    req.model_spec.version.value = 3
    while time.monotonic() < deadline:
        try:
            resp = models.GetModelStatus(req, timeout=30)
            if resp.model_version_status[0].state == get_model_status_pb2.ModelVersionStatus.END:
                break
        except grpc.RpcError:
            pass
        time.sleep(0.05)
    (s3,) = resp.model_version_status
    assert s3.state == get_model_status_pb2.ModelVersionStatus.END
    assert s3.status.error_code != 0 and s3.status.error_message
    r = requests.get(f"{url}/v1/models/live")
    states = {s["version"]: s["state"] for s in r.json()["model_version_status"]}
    assert states == {"3": "END", "2": "AVAILABLE", "1": "END"}
    assert r.json()["model_version_status"][0]["status"]["error_code"] != "OK"
    ids, x = batch(4)
    out = predict.Predict(grpc_request("live", ids, x), timeout=30)
    assert out.model_spec.version.value == 2
    check({k: tf.make_ndarray(v) for k, v in out.outputs.items()}, "live", 2, ids, x)
    shutil.rmtree(broken)  # leave the repository loadable for the tests that follow


def test_thousand_concurrent_requests_all_correct(stubs, url):
    predict, _ = stubs
    rng = np.random.default_rng(7)
    jobs = []
    for i in range(1000):
        n = int(rng.integers(1, 9))
        ids = rng.integers(0, VOCAB, size=(n, 2), dtype=np.int64)
        x = rng.normal(size=(n, 3)).astype(np.float32)
        jobs.append((i, ids, x))
    session = threading.local()

    def one(job):
        i, ids, x = job
        if i % 2:
            out = predict.Predict(grpc_request("ctr", ids, x, version=1 + i % 4 // 2), timeout=60)
            outs = {k: tf.make_ndarray(v) for k, v in out.outputs.items()}
            return out.model_spec.version.value, outs, ids, x
        s = getattr(session, "s", None) or requests.Session()
        session.s = s
        r = s.post(f"{url}/v1/models/ctr:predict",
                   json={"inputs": {"ids": ids.tolist(), "x": x.tolist()}}, timeout=60)
        assert r.status_code == 200, r.text
        return 2, {k: np.array(v, np.float32) for k, v in r.json()["outputs"].items()}, ids, x

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, jobs))
    assert len(results) == 1000
    for version, outs, ids, x in results:
        check(outs, "ctr", version, ids, x)


def test_reload_config_adds_and_removes_models(stubs, repo, server):
    _, models = stubs
    from google.protobuf import text_format

    extra = CONFIG.replace("model_config_list {", "model_config_list {\n  config { name: "
                           f"'extra' base_path: '{os.path.join(repo, 'ctr')}' }}", 1)
    extra = extra.replace("base_path: 'ctr'", f"base_path: '{os.path.join(repo, 'ctr')}'")
    extra = extra.replace("base_path: 'live'", f"base_path: '{os.path.join(repo, 'live')}'")
    extra = extra.replace("base_path: 'slow'", f"base_path: '{os.path.join(repo, 'slow')}'")
    req = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(extra, req.config)
    resp = models.HandleReloadConfigRequest(req, timeout=60)
    assert resp.status.error_code == 0, resp.status.error_message
    ids, x = batch(3)
    out = stubs[0].Predict(grpc_request("extra", ids, x), timeout=30)
    assert out.model_spec.version.value == 2  # latest only (default policy)
    check({k: tf.make_ndarray(v) for k, v in out.outputs.items()}, "ctr", 2, ids, x)
    # drop 'extra' again: it is unloaded, the others keep serving
    req2 = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(CONFIG.replace("base_path: '", f"base_path: '{repo}/"), req2.config)
    resp = models.HandleReloadConfigRequest(req2, timeout=60)
    assert resp.status.error_code == 0, resp.status.error_message
    err = grpc_error(stubs[0].Predict, grpc_request("extra", ids, x))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    out = stubs[0].Predict(grpc_request("ctr", ids, x, label="stable"), timeout=30)
    check({k: tf.make_ndarray(v) for k, v in out.outputs.items()}, "ctr", 1, ids, x)


def test_bench_load_generator_against_the_server(server, capsys):
    """`keras-hps bench` over gRPC and REST: every request succeeds, percentiles ordered."""
    import argparse

    from keras_hps.serving import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    for protocol, port in (("grpc", server.grpc_port), ("rest", server.rest_port)):
        args = parser.parse_args(
            ["--protocol", protocol, "--target", f"127.0.0.1:{port}", "--model", "ctr",
             "--batch-sizes", "1,8", "--concurrency", "2", "--duration", "0.3",
             "--key-range", str(VOCAB)]
        )
        assert bench.run(args) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "req/s" in ln]
    assert len(lines) == 4
    make = bench.grpc_calls(f"127.0.0.1:{server.grpc_port}", "ctr", "serving_default", 8, VOCAB)
    result = bench.measure(make, "grpc", "ctr", 8, 2, 0.3)
    assert result.requests > 0 and result.p50_ms <= result.p90_ms <= result.p99_ms
    assert result.rows_per_s == pytest.approx(result.requests * 8 / result.seconds)
