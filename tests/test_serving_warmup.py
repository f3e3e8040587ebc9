"""Warmup replay at load against the real server: records run before a version is
AVAILABLE, and a bad warmup file fails that version's load (status names the error) while
the version already serving keeps serving."""

from __future__ import annotations

import os
import shutil
import time

import grpc
import numpy as np
import pytest
from serving_models import VOCAB, reference, save_version

tf = pytest.importorskip("tensorflow")

from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)

from keras_hps.servable import load_servable  # noqa: E402
from keras_hps.serving.model_config import ModelEntry  # noqa: E402
from keras_hps.serving.server import ModelServer, ServerOptions  # noqa: E402
from keras_hps.serving.warmup import MAX_RECORDS, WARMUP_FILE  # noqa: E402

ITERATIONS = 2
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END


def predict_log(inputs: dict, signature: str = "", output_filter=()) -> bytes:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "ignored-by-warmup"
    if signature:
        request.model_spec.signature_name = signature
    for name, array in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
    request.output_filter.extend(output_filter)
    log = prediction_log_pb2.PredictLog(request=request)
    return prediction_log_pb2.PredictionLog(predict_log=log).SerializeToString()


def write_records(version_dir: str, records: list[bytes]) -> None:
    path = os.path.join(version_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)


def random_inputs(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "ids": rng.integers(0, VOCAB, size=(n, 2)).astype(np.int64),
        "x": rng.normal(size=(n, 3)).astype(np.float32),
    }


def staged_version(root: str, name: str, seed: int, records: list[bytes]) -> str:
    """A complete version folder (model + warmup file) under a temporary name."""
    tmp = os.path.join(root, "staging", name)
    save_version(tmp, seed)
    write_records(tmp, records)
    return tmp


class Recording:
    """A loaded version that records each run and the version's state at that moment."""

    def __init__(self, servable, state_of) -> None:
        self.servable = servable
        self.state_of = state_of
        self.calls: list[tuple] = []

    def __getattr__(self, name: str):
        return getattr(self.servable, name)

    def run(self, inputs, signature_name="serving_default", output_keys=None):
        self.calls.append((signature_name, {k: np.array(v) for k, v in inputs.items()},
                           output_keys, self.state_of()))
        return self.servable.run(inputs, signature_name, output_keys)

    def close(self) -> None:
        self.servable.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("warmup_repo"))
    rng = np.random.default_rng(7)
    warm_inputs = [random_inputs(rng, n) for n in (1, 5)]
    embed_ids = rng.integers(0, VOCAB, size=(3, 2)).astype(np.int64)
    records = [
        predict_log(warm_inputs[0]),
        predict_log(warm_inputs[1], "serving_default", ["score"]),
        prediction_log_pb2.PredictionLog().SerializeToString(),  # no log type: skipped
        predict_log({"ids": embed_ids}, "embed"),
    ]
    os.makedirs(os.path.join(root, "warm"))
    os.rename(staged_version(root, "warm1", 41, records), os.path.join(root, "warm", "1"))
    # TF Serving replays classify logs too: against a model without a classification
    # signature, the record fails the load with Classify's own error.
    classify = prediction_log_pb2.PredictionLog(
        classify_log=prediction_log_pb2.ClassifyLog(
            request=classification_pb2.ClassificationRequest()
        )
    ).SerializeToString()
    session_run = prediction_log_pb2.PredictionLog(
        session_run_log=prediction_log_pb2.SessionRunLog()
    ).SerializeToString()
    bad = {
        "corrupt": None,
        "toomany": [prediction_log_pb2.PredictionLog().SerializeToString()] * (MAX_RECORDS + 1),
        "classify": [classify],
        "sessionrun": [session_run],
        "nosig": [predict_log(warm_inputs[0], "no_such_signature")],
    }
    for name, recs in bad.items():
        version = os.path.join(root, name, "1")
        save_version(version, 51)
        if recs is None:
            os.makedirs(os.path.join(version, "assets.extra"))
            with open(os.path.join(version, WARMUP_FILE), "wb") as f:
                f.write(b"these bytes are not a TFRecord file")
        else:
            write_records(version, recs)

    loaded: dict[str, Recording] = {}
    holder: list[ModelServer] = []

    def loader(path: str) -> Recording:
        model, version = os.path.basename(os.path.dirname(path)), int(os.path.basename(path))

        def state_of() -> str:
            return holder[0].manager.status(model, version)[0].state.name

        loaded[path] = Recording(load_servable(path), state_of)
        return loaded[path]

    entries = [ModelEntry(n, os.path.join(root, n)) for n in ("warm", *bad)]
    options = ServerOptions(port=0, rest_api_port=0, host="127.0.0.1",
                            file_system_poll_wait_seconds=0.2, max_num_load_retries=0,
                            num_request_iterations_for_warmup=ITERATIONS)
    server = ModelServer(entries, options, loader=loader)
    holder.append(server)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield {
        "root": root, "server": server, "loaded": loaded, "rng": rng,
        "records": (warm_inputs, embed_ids),
        "predict": prediction_service_pb2_grpc.PredictionServiceStub(channel),
        "models": model_service_pb2_grpc.ModelServiceStub(channel),
    }
    channel.close()
    server.stop(grace=5)


def status(env, model: str, version: int):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    request.model_spec.version.value = version
    (s,) = env["models"].GetModelStatus(request, timeout=30).model_version_status
    return s


def predict(env, model: str, inputs: dict):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for name, array in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
    response = env["predict"].Predict(request, timeout=30)
    return response.model_spec.version.value, {
        k: tf.make_ndarray(v) for k, v in response.outputs.items()
    }


def test_records_replay_before_the_version_is_available(env):
    recording = env["loaded"][os.path.join(env["root"], "warm", "1")]
    warm_inputs, embed_ids = env["records"]
    expected = [("serving_default", warm_inputs[0], None),
                ("serving_default", warm_inputs[1], ["score"]),
                ("embed", {"ids": embed_ids}, None)]
    expected = [e for e in expected for _ in range(ITERATIONS)]  # each record ITERATIONS times
    calls = recording.calls[: len(expected)]
    assert len(calls) == len(expected)
    for (signature, inputs, keys, state), (want_sig, want_inputs, want_keys) in zip(
        calls, expected, strict=True
    ):
        assert (signature, keys, state) == (want_sig, want_keys, "LOADING")
        assert inputs.keys() == want_inputs.keys()
        for name in inputs:
            np.testing.assert_array_equal(inputs[name], want_inputs[name])
            assert inputs[name].dtype == want_inputs[name].dtype
    s = status(env, "warm", 1)
    assert s.state == AVAILABLE and s.status.error_code == 0
    inputs = random_inputs(env["rng"], 4)
    version, out = predict(env, "warm", inputs)
    want = reference(41, inputs["ids"], inputs["x"])
    assert version == 1
    np.testing.assert_allclose(out["score"], want["score"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["emb"], want["emb"], rtol=1e-6)


@pytest.mark.parametrize(
    "model, code, message",
    [
        ("corrupt", "DATA_LOSS", "Please verify your warmup data is in TFRecord format"),
        ("toomany", "INVALID_ARGUMENT",
         f"Number of warmup records exceeds the maximum ({MAX_RECORDS})"),
        ("sessionrun", "UNIMPLEMENTED", "Unsupported log_type for warmup: session_run_log"),
        ("classify", "INVALID_ARGUMENT", "Expected one input Tensor."),
        ("nosig", "FAILED_PRECONDITION", 'Serving signature key "no_such_signature" not found'),
    ],
)
def test_bad_warmup_fails_the_load_with_its_error(env, model, code, message):
    from tensorflow.core.protobuf import error_codes_pb2

    s = status(env, model, 1)
    assert s.state == END
    assert error_codes_pb2.Code.Name(s.status.error_code) == code
    assert message in s.status.error_message
    assert os.path.join(env["root"], model) in s.status.error_message  # names the file
    with pytest.raises(grpc.RpcError) as err:
        predict(env, model, random_inputs(env["rng"], 2))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # the loaded graph of the failed version was released
    recording = env["loaded"][os.path.join(env["root"], model, "1")]
    assert recording.servable._closed


def test_failing_warmup_of_a_new_version_leaves_the_old_one_serving(env):
    root = env["root"]
    rng = np.random.default_rng(3)
    good = random_inputs(rng, 2)
    wrong_dtype = dict(good, x=good["x"].astype(np.float64))
    staged = staged_version(root, "warm2", 42, [predict_log(good), predict_log(wrong_dtype)])
    os.rename(staged, os.path.join(root, "warm", "2"))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if status(env, "warm", 2).state == END:
                    break
            except grpc.RpcError:  # not seen by the poller yet
                pass
            time.sleep(0.05)
        s = status(env, "warm", 2)
        assert s.state == END
        assert s.status.error_code == 3  # INVALID_ARGUMENT
        assert "warmup record 2" in s.status.error_message
        assert "input 'x'" in s.status.error_message and "float64" in s.status.error_message
        # the first record ran (LOADING) before the second one failed
        calls = env["loaded"][os.path.join(root, "warm", "2")].calls
        assert [c[3] for c in calls] == ["LOADING"] * (ITERATIONS + 1)
        inputs = random_inputs(rng, 3)
        version, out = predict(env, "warm", inputs)
        assert version == 1
        want = reference(41, inputs["ids"], inputs["x"])["score"]
        np.testing.assert_allclose(out["score"], want, rtol=1e-5, atol=1e-5)
        assert status(env, "warm", 1).state == AVAILABLE
    finally:
        shutil.rmtree(os.path.join(root, "warm", "2"))


def test_warmup_off_loads_despite_a_bad_file(env):
    """--enable_model_warmup=false: the warmup file is not read at all."""
    base = os.path.join(env["root"], "corrupt")
    options = ServerOptions(port=0, rest_api_port=0, host="127.0.0.1",
                            file_system_poll_wait_seconds=0, enable_model_warmup=False)
    server = ModelServer([ModelEntry("corrupt", base)], options).start()
    try:
        (s,) = server.manager.status("corrupt", 1)
        assert s.state.name == "AVAILABLE" and s.error is None
    finally:
        server.stop(grace=5)
