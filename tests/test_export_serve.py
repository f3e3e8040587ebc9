"""Exports served by `keras-hps serve` (a subprocess, TF Serving's flags), queried over REST
(row and columnar) and gRPC with the official stubs: each answer equals the trained model's,
keys-step versions (manifest format 2) and external requests larger than one lookup included.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import requests
from export_models import CASES
from serving_models import free_port

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

from keras_hps.export import export_for_serving  # noqa: E402

SHAPES = ("dict_two_tables", "dlrm_slices", "string_lookup", "two_tower")


def _predict(model, inputs):
    tensors = {k: tf.constant(v) for k, v in inputs.items()}
    return np.asarray(model(tensors if isinstance(model.input, dict) else
                            next(iter(tensors.values())), training=False), np.float32)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    repo = root / "repo"
    models = {}
    for name in SHAPES:
        keras.utils.set_random_seed(5)
        model = CASES[name].build()
        models[name] = model
        for placement in ("embedded", "external"):
            export_for_serving(model, repo, f"{name}_{placement}", tables=placement,
                               warmup_records=1)
    grpc_port, rest_port = free_port(), free_port()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "keras_hps.cli", "serve", f"--port={grpc_port}",
         f"--rest_api_port={rest_port}", "--host=127.0.0.1",
         f"--model_config_file={repo / 'models.config'}", "--file_system_poll_wait_seconds=0"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(root))
    url = f"http://127.0.0.1:{rest_port}"
    deadline = time.monotonic() + 240
    pending = {f"{n}_{p}" for n in SHAPES for p in ("embedded", "external")}
    while pending and time.monotonic() < deadline and proc.poll() is None:
        for name in list(pending):
            try:
                status = requests.get(f"{url}/v1/models/{name}", timeout=5).json()
            except (requests.ConnectionError, ValueError):
                break
            states = [v.get("state") for v in status.get("model_version_status", [])]
            if states and all(s in ("AVAILABLE", "END") for s in states):
                pending.discard(name)
        time.sleep(0.5)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        yield (models, url, prediction_service_pb2_grpc.PredictionServiceStub(channel),
               grpc_port)
    finally:
        channel.close()
        proc.terminate()
        proc.wait(30)
        log.close()


def _rest_value(v: np.ndarray) -> list:
    """An array as REST JSON: strings as text."""
    if v.dtype == object:
        v = np.vectorize(lambda b: b.decode(), otypes=[object])(v)
    return v.tolist()


def _ask(served, name, placement, rows=7, seed=3):
    """The trained model's answer and the server's over REST rows, REST columns and gRPC,
    for `rows` fresh rows of model shape `name`."""
    inputs = CASES[name].inputs(np.random.default_rng(seed), rows)
    models, url, stub, _ = served
    want = _predict(models[name], inputs)
    served_name = f"{name}_{placement}"
    columns = {k: _rest_value(v) for k, v in inputs.items()}
    instances = [{k: c[i] for k, c in columns.items()} for i in range(len(want))]
    answers = {}
    for how, body, key in (("rest rows", {"instances": instances}, "predictions"),
                           ("rest columns", {"inputs": columns}, "outputs")):
        r = requests.post(f"{url}/v1/models/{served_name}:predict", json=body, timeout=60)
        assert r.status_code == 200, r.text
        answers[how] = np.array(r.json()[key], np.float32)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = served_name
    for k, v in inputs.items():
        request.inputs[k].CopyFrom(tf.make_tensor_proto(v.astype("S") if v.dtype == object
                                                        else v))
    reply = stub.Predict(request, timeout=60)
    answers["grpc"] = tf.make_ndarray(next(iter(reply.outputs.values()))).astype(np.float32)
    for how, got in answers.items():
        np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5,
                                   err_msg=how)


@pytest.mark.parametrize("name", SHAPES)
def test_embedded_served(served, name):
    _ask(served, name, "embedded")


def test_external_with_direct_keys_served(served):
    _ask(served, "dict_two_tables", "external")


@pytest.mark.parametrize("name", ["dlrm_slices", "string_lookup", "two_tower"])
def test_external_with_a_keys_step_served(served, name):
    _ask(served, name, "external")


def test_embedded_takes_2000_rows(served):
    _ask(served, "dict_two_tables", "embedded", rows=2000, seed=4)


def test_external_takes_the_2000_rows_the_embedded_takes(served):
    _ask(served, "dict_two_tables", "external", rows=2000, seed=4)


@pytest.mark.parametrize("placement", [
    "embedded", "external"])
def test_bench_defaults_against_a_default_export(served, placement):
    """`keras-hps bench` with its default batch sizes (32 and 4096) against a default export
    (hps.json's max_batch_size 1024 for the external one), over gRPC."""
    from keras_hps.cli import main

    target = f"127.0.0.1:{served[3]}"
    assert main(["bench", "--target", target, "--model", f"dict_two_tables_{placement}",
                 "--duration", "0.2", "--key-range", "20"]) == 0
