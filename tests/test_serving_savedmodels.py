"""SavedModels TF Serving serves, served the way it serves them, over gRPC on loopback.

Three models built here: TF Serving's own half_plus_two test model as its generator script
builds it (a TF1 graph with predict, regress and classify signatures), a TF2
`tf.saved_model.save` model with classify and regress signatures over `tf.Example`s, and a
Keras `model.export`. Every method (Predict, Classify, Regress, MultiInference) is queried
with the official stubs, and Predict, `:classify` and `:regress` over REST with TF Serving's
JSON, and compared with TensorFlow's own answer for the same input (a TF1 session for the
graph model, `tf.saved_model.load` for the TF2 one); errors carry TF Serving's wording
(classifier.cc, regressor.cc, multi_inference.cc, predict_util.cc, json_tensor.cc).
"""

from __future__ import annotations

import os

import grpc
import numpy as np
import pytest
import requests
from serving_models import (
    TF2_B,
    TF2_W,
    free_port,
    save_tf1_half_plus_two,
    save_tf2_classify_regress,
)

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    get_model_status_pb2,
    inference_pb2,
    input_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from keras_hps.serving.model_config import ModelEntry  # noqa: E402
from keras_hps.serving.server import ModelServer, ServerOptions  # noqa: E402
from keras_hps.serving.warmup import WARMUP_FILE  # noqa: E402

CLASSIFY = "tensorflow/serving/classify"
REGRESS = "tensorflow/serving/regress"


def example(**features: list[float]) -> tf.train.Example:
    return tf.train.Example(features=tf.train.Features(feature={
        k: tf.train.Feature(float_list=tf.train.FloatList(value=v)) for k, v in features.items()
    }))


def example_list(*examples) -> input_pb2.Input:
    return input_pb2.Input(example_list=input_pb2.ExampleList(examples=list(examples)))


def with_context(context, *examples) -> input_pb2.Input:
    return input_pb2.Input(example_list_with_context=input_pb2.ExampleListWithContext(
        context=context, examples=list(examples)))


def classify_request(model: str, signature: str, inp) -> classification_pb2.ClassificationRequest:
    request = classification_pb2.ClassificationRequest(input=inp)
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    return request


def regress_request(model: str, signature: str, inp) -> regression_pb2.RegressionRequest:
    request = regression_pb2.RegressionRequest(input=inp)
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    return request


def _write_warmup(version_dir: str, records: list) -> None:
    os.makedirs(os.path.join(version_dir, "assets.extra"), exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(version_dir, WARMUP_FILE)) as writer:
        for record in records:
            writer.write(record.SerializeToString())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("savedmodels")
    half = str(root / "half" / "1")
    save_tf1_half_plus_two(half)
    # TF Serving replays classify, regress and multi-inference warmup records too
    warm_input = example_list(example(x=[1.0]))
    _write_warmup(half, [
        prediction_log_pb2.PredictionLog(regress_log=prediction_log_pb2.RegressLog(
            request=regress_request("half", "regress_x_to_y", warm_input))),
        prediction_log_pb2.PredictionLog(classify_log=prediction_log_pb2.ClassifyLog(
            request=classify_request("half", "classify_x_to_y", warm_input))),
    ])
    tf2 = str(root / "tf2" / "1")
    save_tf2_classify_regress(tf2)
    keras.utils.set_random_seed(3)
    inp = keras.Input(shape=(3,), name="features")
    kmodel = keras.Model(inp, keras.layers.Dense(2, name="out")(inp))
    kmodel.export(str(root / "keras" / "1"), verbose=False)
    options = ServerOptions(port=0, rest_api_port=free_port(), host="127.0.0.1",
                            file_system_poll_wait_seconds=0, max_num_load_retries=0)
    entries = [ModelEntry(n, str(root / n)) for n in ("half", "tf2", "keras")]
    server = ModelServer(entries, options).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield {
        "server": server, "half": half, "tf2": tf2, "keras": kmodel,
        "rest": f"http://127.0.0.1:{server.rest_port}/v1/models",
        "predict": prediction_service_pb2_grpc.PredictionServiceStub(channel),
        "models": model_service_pb2_grpc.ModelServiceStub(channel),
    }
    channel.close()
    server.stop(grace=5)


@pytest.fixture(scope="module")
def tf1_session(env):
    """TensorFlow's own answer for the TF1 model: its graph in a TF1 session."""
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph)
    with graph.as_default():
        tf.compat.v1.saved_model.loader.load(session, ["serve"], env["half"])
    yield session
    session.close()


def _error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    return info.value


def test_every_version_loaded_with_its_warmup(env):
    for name in ("half", "tf2", "keras"):
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        (status,) = env["models"].GetModelStatus(request).model_version_status
        assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE, status


def test_predict_computes_shapes_tf_serving_computes(env, tf1_session):
    """TF Serving's README example: {"instances": [1.0, 2.0, 5.0]} is a [3] tensor for a
    signature of x [?, 1], and the graph answers [2.5, 3.0, 4.5]."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([1.0, 2.0, 5.0], np.float32)))
    response = env["predict"].Predict(request, timeout=30)
    assert response.model_spec.signature_name == "serving_default"
    assert response.model_spec.version.value == 1
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["y"]), [2.5, 3.0, 4.5])
    column = np.array([[1.0], [2.0], [5.0]], np.float32)
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(column))
    got = tf.make_ndarray(env["predict"].Predict(request, timeout=30).outputs["y"])
    np.testing.assert_allclose(got, tf1_session.run("y:0", {"x:0": column}))


def test_predict_runs_regress_and_classify_signatures_and_honours_output_filter(
        env, tf1_session):
    serialized = np.array([example(x=[v]).SerializeToString() for v in (1.0, 4.0)], object)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half"
    request.model_spec.signature_name = "classify_x_to_classes"
    request.inputs["inputs"].CopyFrom(tf.make_tensor_proto(serialized))
    request.output_filter.append("scores")
    response = env["predict"].Predict(request, timeout=30)
    assert set(response.outputs) == {"scores"}
    want = tf1_session.run("scores:0", {"tf_example:0": serialized})
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["scores"]), want)
    request.output_filter.append("nope")
    err = _error(env["predict"].Predict, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output tensor alias not found in signature: nope" in err.details()
    del request.output_filter[:]
    request.output_filter.extend(["scores", "scores"])
    err = _error(env["predict"].Predict, request)
    assert err.details() == "duplicate output tensor alias: scores"


@pytest.mark.parametrize("signature, tensor", [("regress_x_to_y", "y:0"),
                                               ("regress_x_to_y2", "y2:0")])
def test_tf1_regress_matches_the_graph(env, tf1_session, signature, tensor):
    values = [1.0, -3.5, 7.25]
    inp = example_list(*(example(x=[v]) for v in values))
    response = env["predict"].Regress(regress_request("half", signature, inp), timeout=30)
    assert (response.model_spec.name, response.model_spec.signature_name) == ("half", signature)
    assert response.model_spec.version.value == 1
    got = [r.value for r in response.result.regressions]
    serialized = [e.SerializeToString() for e in inp.example_list.examples]
    want = tf1_session.run(tensor, {"tf_example:0": serialized})[:, 0]
    np.testing.assert_allclose(got, want)
    np.testing.assert_allclose(got, [0.5 * v + (2 if tensor == "y:0" else 3) for v in values])


def test_tf1_classify_with_context_and_classes(env, tf1_session):
    """example_list_with_context: each example is the context's bytes followed by its own,
    so an example's feature overrides the context's and a missing one comes from it."""
    inp = with_context(example(x=[9.0]), example(x=[1.0]), example(x2=[5.0]))
    response = env["predict"].Classify(
        classify_request("half", "classify_x_to_classes", inp), timeout=30)
    assert response.model_spec.signature_name == "classify_x_to_classes"
    assert response.model_spec.version.value == 1
    context = inp.example_list_with_context.context.SerializeToString()
    serialized = [context + e.SerializeToString()
                  for e in inp.example_list_with_context.examples]
    want = tf1_session.run("scores:0", {"tf_example:0": serialized})
    np.testing.assert_allclose(want, [[2.5, 3.5], [6.5, 7.5]])
    rows = response.result.classifications
    assert [[c.label for c in row.classes] for row in rows] == [["lo", "hi"], ["lo", "hi"]]
    np.testing.assert_allclose([[c.score for c in row.classes] for row in rows], want)
    # scores only: labels stay empty
    only = env["predict"].Classify(classify_request("half", "classify_x_to_y", inp), timeout=30)
    assert [[(c.label, c.score) for c in row.classes]
            for row in only.result.classifications] == [[("", 2.5)], [("", 6.5)]]


def test_tf2_classify_and_regress_match_tf(env):
    loaded = tf.saved_model.load(env["tf2"])
    xs = np.array([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]], np.float32)
    inp = example_list(*(example(x=list(map(float, row))) for row in xs))
    serialized = tf.constant([e.SerializeToString() for e in inp.example_list.examples])
    response = env["predict"].Classify(classify_request("tf2", "classify", inp), timeout=30)
    want = loaded.signatures["classify"](inputs=serialized)
    rows = response.result.classifications
    assert [[c.label for c in row.classes] for row in rows] == [["neg", "pos"]] * 3
    np.testing.assert_allclose([[c.score for c in row.classes] for row in rows],
                               want["scores"].numpy(), rtol=1e-6)
    response = env["predict"].Regress(regress_request("tf2", "regress", inp), timeout=30)
    got = [r.value for r in response.result.regressions]
    want = loaded.signatures["regress"](inputs=serialized)["outputs"].numpy()[:, 0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got, (xs @ TF2_W + TF2_B)[:, 0], rtol=1e-6)


def test_signature_method_name_check(env):
    """TF2 signatures all say "predict": Classify serves them by their inputs and outputs,
    unless --enable_signature_method_name_check asks for the method name."""
    inp = example_list(example(x=[1.0, 1.0]))
    options = env["server"].options
    options.enable_signature_method_name_check = True
    try:
        err = _error(env["predict"].Classify, classify_request("tf2", "classify", inp))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details() == (
            "Expected classification signature method_name to be "
            "tensorflow/serving/classify. Was: tensorflow/serving/predict")
        ok = env["predict"].Classify(
            classify_request("half", "classify_x_to_y", example_list(example(x=[2.0]))),
            timeout=30)
        assert ok.result.classifications[0].classes[0].score == 3.0
    finally:
        options.enable_signature_method_name_check = False


def test_keras_export_predict_matches_keras(env):
    features = np.random.default_rng(4).standard_normal((5, 3)).astype(np.float32)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "keras"
    request.inputs["features"].CopyFrom(tf.make_tensor_proto(features))
    response = env["predict"].Predict(request, timeout=30)
    (out,) = response.outputs.values()
    np.testing.assert_allclose(tf.make_ndarray(out), env["keras"].predict(features, verbose=0),
                               rtol=1e-5, atol=1e-6)


def _task(request, signature: str, method: str, model: str = "half") -> None:
    task = request.tasks.add(method_name=method)
    task.model_spec.name = model
    task.model_spec.signature_name = signature


def test_multi_inference_runs_every_task_over_one_input(env, tf1_session):
    inp = example_list(example(x=[2.0]), example(x=[-2.0]))
    request = inference_pb2.MultiInferenceRequest(input=inp)
    _task(request, "regress_x_to_y", REGRESS)
    _task(request, "regress_x_to_y2", REGRESS)
    _task(request, "classify_x_to_y", CLASSIFY)
    response = env["predict"].MultiInference(request, timeout=30)
    assert len(response.results) == 3
    for result, task in zip(response.results, request.tasks, strict=True):
        assert result.model_spec.name == "half" and result.model_spec.version.value == 1
        assert result.model_spec.signature_name == task.model_spec.signature_name
    serialized = [e.SerializeToString() for e in inp.example_list.examples]
    y, y2 = tf1_session.run(["y:0", "y2:0"], {"tf_example:0": serialized})
    np.testing.assert_allclose([r.value for r in response.results[0].regression_result
                                .regressions], y[:, 0])
    np.testing.assert_allclose([r.value for r in response.results[1].regression_result
                                .regressions], y2[:, 0])
    np.testing.assert_allclose(
        [row.classes[0].score for row in response.results[2].classification_result
         .classifications], y[:, 0])


def _multi(tasks, inp=None):
    request = inference_pb2.MultiInferenceRequest(
        input=inp if inp is not None else example_list(example(x=[1.0])))
    for task in tasks:
        _task(request, *task)
    return request


@pytest.mark.parametrize("request_, code, message", [
    (_multi([("regress_x_to_y", REGRESS), ("regress_x_to_y", REGRESS)]), "INVALID_ARGUMENT",
     "Duplicate evaluation of signature: regress_x_to_y"),
    (_multi([("regress_x_to_y", REGRESS), ("regress_x2_to_y3", REGRESS)]), "INVALID_ARGUMENT",
     "Input tensor must be the same for all Signatures."),
    (_multi([("ThisSignatureDoesNotExist", REGRESS)]), "INVALID_ARGUMENT",
     "Requested signature not found in model graph: ThisSignatureDoesNotExist"),
    (_multi([("regress_x_to_y", REGRESS), ("regress_x_to_y2", REGRESS, "tf2")]),
     "INVALID_ARGUMENT",
     "All ModelSpecs in a MultiInferenceRequest must access the same model name."),
    (_multi([("serving_default", "tensorflow/serving/predict")]), "UNIMPLEMENTED",
     "Unsupported signature method_name: tensorflow/serving/predict"),
    (_multi([("regress_x_to_y", REGRESS)], input_pb2.Input()), "INVALID_ARGUMENT",
     "Input is empty."),
    (_multi([("classify_x_to_y", REGRESS)]), "INVALID_ARGUMENT",
     "No regression outputs found in SignatureDef:"),
], ids=["duplicate", "other-input", "no-signature", "two-models", "predict", "empty",
        "not-regression"])
def test_multi_inference_errors(env, request_, code, message):
    err = _error(env["predict"].MultiInference, request_)
    assert err.code() == getattr(grpc.StatusCode, code), err.details()
    assert err.details().startswith(message)


@pytest.mark.parametrize("make, code, message", [
    (lambda: classify_request("half", "", example_list(example(x=[1.0]))), "INVALID_ARGUMENT",
     "No classification inputs found in SignatureDef:"),
    (lambda: classify_request("half", "nope", example_list(example(x=[1.0]))),
     "INVALID_ARGUMENT", "No signature was found with the name: nope"),
    (lambda: classify_request("half", "classify_x_to_y", input_pb2.Input()),
     "INVALID_ARGUMENT", "Input is empty."),
    (lambda: classify_request("half", "regress_x_to_y", example_list(example(x=[1.0]))),
     "INVALID_ARGUMENT", "Expected classification signature outputs to contain at least one"),
    (lambda: classification_pb2.ClassificationRequest(), "INVALID_ARGUMENT",
     "Missing ModelSpec"),
    (lambda: classify_request("nope", "classify_x_to_y", example_list(example(x=[1.0]))),
     "NOT_FOUND", "Servable not found for request: Latest(nope)"),
    (lambda: classify_request("half", "classify_x_to_y", example_list(example(x2=[1.0]))),
     "INVALID_ARGUMENT", "Feature: x (data type: float) is required but could not be found."),
], ids=["default-is-predict", "no-signature", "empty", "regress-signature", "no-spec",
        "no-model", "missing-feature"])
def test_classify_errors(env, make, code, message):
    err = _error(env["predict"].Classify, make())
    assert err.code() == getattr(grpc.StatusCode, code), err.details()
    assert message in err.details()


@pytest.mark.parametrize("make, message", [
    (lambda: regress_request("half", "regress_x2_to_y3", example_list(example(x=[1.0]))),
     "x2"),  # its input is a float tensor: the serialized examples do not fit it
    (lambda: regress_request("half", "classify_x_to_classes", example_list(example(x=[1.0]))),
     "Expected one output Tensor."),
    (lambda: regress_request("tf2", "serving_default", example_list(example(x=[1.0, 2.0]))),
     "No regression inputs found in SignatureDef:"),
], ids=["float-input", "two-outputs", "predict-signature"])
def test_regress_errors(env, make, message):
    err = _error(env["predict"].Regress, make())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert message in err.details()


# ------------------------------------------------------------------------------ over REST
def _rest(env, path: str, body: dict) -> dict:
    r = requests.post(f"{env['rest']}/{path}", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_rest_predict_matches_tf(env, tf1_session):
    """TF Serving's README request for half_plus_two, row and columnar, and the Keras export."""
    got = _rest(env, "half:predict", {"instances": [1.0, 2.0, 5.0]})
    assert got == {"predictions": [2.5, 3.0, 4.5]}
    column = np.array([[1.0], [2.0], [5.0]], np.float32)
    got = _rest(env, "half:predict", {"inputs": {"x": column.tolist()}})
    np.testing.assert_allclose(got["outputs"], tf1_session.run("y:0", {"x:0": column}))
    features = np.random.default_rng(5).standard_normal((4, 3)).astype(np.float32)
    got = _rest(env, "keras:predict", {"instances": features.tolist()})
    np.testing.assert_allclose(got["predictions"], env["keras"].predict(features, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_rest_classify_and_regress_match_tf1(env, tf1_session):
    """`:classify` with a context (TF Serving's JSON: "context", "examples", results as
    [label, score] pairs) and `:regress`, against the graph's own answers."""
    body = {"signature_name": "classify_x_to_classes", "context": {"x": 9.0},
            "examples": [{"x": 1.0}, {"x2": 5.0}]}
    got = _rest(env, "half:classify", body)
    context = example(x=[9.0]).SerializeToString()
    serialized = [context + example(x=[1.0]).SerializeToString(),
                  context + example(x2=[5.0]).SerializeToString()]
    want = tf1_session.run("scores:0", {"tf_example:0": serialized})
    assert [[pair[0] for pair in row] for row in got["results"]] == [["lo", "hi"]] * 2
    np.testing.assert_allclose([[pair[1] for pair in row] for row in got["results"]], want)
    values = [1.0, -3.5, 7.25]
    got = _rest(env, "half/versions/1:regress", {"signature_name": "regress_x_to_y",
                                                 "examples": [{"x": v} for v in values]})
    want = tf1_session.run("y:0", {"tf_example:0": [example(x=[v]).SerializeToString()
                                                     for v in values]})[:, 0]
    np.testing.assert_allclose(got["results"], want)


def test_rest_classify_and_regress_match_tf2(env):
    loaded = tf.saved_model.load(env["tf2"])
    xs = np.array([[1.0, 2.0], [0.5, -1.0]], np.float32)
    examples = [{"x": row.tolist()} for row in xs]
    serialized = tf.constant([example(x=list(map(float, row))).SerializeToString()
                              for row in xs])
    got = _rest(env, "tf2:classify", {"signature_name": "classify", "examples": examples})
    want = loaded.signatures["classify"](inputs=serialized)["scores"].numpy()
    assert [[pair[0] for pair in row] for row in got["results"]] == [["neg", "pos"]] * 2
    np.testing.assert_allclose([[pair[1] for pair in row] for row in got["results"]], want,
                               rtol=1e-6)
    got = _rest(env, "tf2:regress", {"signature_name": "regress", "examples": examples})
    want = loaded.signatures["regress"](inputs=serialized)["outputs"].numpy()[:, 0]
    np.testing.assert_allclose(got["results"], want, rtol=1e-6)


@pytest.mark.parametrize("path, body, message", [
    ("half:classify", {"examples": []}, "'examples' value is an empty array"),
    ("half:regress", {"signature_name": "regress_x_to_y"},
     "key 'examples' is expected and was not found"),
    ("keras:classify", {"examples": [{"x": 1.0}]},
     "No classification inputs found in SignatureDef"),
])
def test_rest_classify_errors_are_tf_servings(env, path, body, message):
    r = requests.post(f"{env['rest']}/{path}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
