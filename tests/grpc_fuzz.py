"""Seeded mutations of well-formed gRPC requests, for the hostile-input tests: each is a proto
that parses, built from a valid PredictRequest by one to three mutations of the kind a
careless or hostile client makes (dtypes, shapes, values, names, model specs)."""

from __future__ import annotations

import numpy as np
from serving_models import VOCAB

DTYPES = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 14, 17, 19, 20, 21, 22, 23, 101, 999, 2**31 - 1]
SIZES = [-(2**63), -2, -1, 0, 1, 2, 3, 7, 2**31, 2**32 + 1, 2**62, 2**63 - 1]
NAMES = ["", "ids", "x", "text", "IDS", "ids ", "\u00e9\u00e8", "a" * 300, "x:0", "../x"]


def valid_request(rng: np.random.Generator, model: str = "m") -> object:
    """A PredictRequest the test model answers: ids int64 [n, 2] and x float32 [n, 3]."""
    from tensorflow_serving.apis import predict_pb2

    from keras_hps.serving.tensors import to_proto

    n = int(rng.integers(1, 5))
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    ids = rng.integers(0, VOCAB, size=(n, 2), dtype=np.int64)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    content = bool(rng.integers(2))
    request.inputs["ids"].CopyFrom(to_proto(ids, tensor_content=content))
    request.inputs["x"].CopyFrom(to_proto(x, tensor_content=content))
    return request


def _mutate_tensor(rng: np.random.Generator, tensor) -> None:
    kind = int(rng.integers(9))
    if kind == 0:
        tensor.dtype = int(rng.choice(DTYPES))
    elif kind == 1:  # many dimensions
        del tensor.tensor_shape.dim[:]
        for _ in range(int(rng.choice([33, 64, 65, 255, 300]))):
            tensor.tensor_shape.dim.add(size=1)
    elif kind == 2:  # odd sizes, products that overflow int64
        for _ in range(int(rng.integers(1, 4))):
            tensor.tensor_shape.dim.add(size=int(rng.choice(SIZES)))
    elif kind == 3 and tensor.tensor_shape.dim:
        tensor.tensor_shape.dim[int(rng.integers(len(tensor.tensor_shape.dim)))].size = int(
            rng.choice(SIZES))
    elif kind == 4:  # tensor_content of another length, or random bytes
        tensor.tensor_content = rng.bytes(int(rng.integers(0, 64)))
    elif kind == 5:  # fewer or more typed values than the shape holds
        tensor.ClearField("tensor_content")
        tensor.float_val.extend(rng.normal(size=int(rng.integers(0, 20))).tolist())
        tensor.int64_val.extend(rng.integers(-(2**63), 2**63 - 1, size=int(rng.integers(0, 20)),
                                             dtype=np.int64).tolist())
    elif kind == 6:  # strings in numeric tensors, numbers in string tensors
        tensor.string_val.extend([rng.bytes(int(rng.integers(0, 9))) for _ in range(3)])
        if rng.integers(2):
            tensor.dtype = 7
    elif kind == 7:
        tensor.tensor_shape.unknown_rank = True
    else:  # other typed fields
        tensor.ClearField("tensor_content")
        tensor.half_val.extend(rng.integers(-(2**31), 2**31 - 1, size=3).tolist())
        tensor.bool_val.extend([True, False])
        tensor.uint64_val.extend([2**64 - 1])
        tensor.int_val.extend([2**31 - 1, -(2**31)])


def mutated_predict(rng: np.random.Generator, model: str = "m") -> object:
    """A well-formed PredictRequest with one to three mutations."""
    request = valid_request(rng, model)
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(10))
        names = list(request.inputs)
        if kind <= 3 and names:
            _mutate_tensor(rng, request.inputs[names[int(rng.integers(len(names)))]])
        elif kind == 4 and names:  # rename, drop or add inputs
            name = names[int(rng.integers(len(names)))]
            value = request.inputs[name]
            new = str(rng.choice(NAMES))
            if rng.integers(2):
                request.inputs[new].CopyFrom(value)
            if new != name and rng.integers(2):
                del request.inputs[name]
        elif kind == 5:
            request.model_spec.name = str(rng.choice(["", "m", "nope", "m/1", "\x00"]))
        elif kind == 6:
            if rng.integers(2):
                request.model_spec.version.value = int(rng.choice(SIZES))
            else:
                request.model_spec.version_label = str(rng.choice(["", "stable", "x" * 99]))
        elif kind == 7:
            request.model_spec.signature_name = str(rng.choice(
                ["", "embed", "echo", "nope", "serving_default", "keras_hps_keys"]))
        elif kind == 8:
            request.output_filter.extend([str(rng.choice(["emb", "score", "nope", ""]))
                                          for _ in range(int(rng.integers(1, 3)))])
        else:  # keys out of the table's range
            from keras_hps.serving.tensors import to_proto

            shape = (int(rng.integers(0, 3)), 2)
            ids = rng.integers(-(2**63), 2**63 - 1, size=shape, dtype=np.int64)
            request.inputs["ids"].CopyFrom(to_proto(ids))
    return request


def _mutated_spec(rng: np.random.Generator, spec, model: str) -> None:
    spec.name = str(rng.choice([model, model, "", "nope"]))
    choice = int(rng.integers(4))
    if choice == 1:
        spec.version.value = int(rng.choice(SIZES))
    elif choice == 2:
        spec.version_label = str(rng.choice(["", "stable", "nope"]))
    spec.signature_name = str(rng.choice(
        ["", "serving_default", "regress_x_to_y", "regress_x2_to_y3", "classify_x_to_y",
         "classify_x_to_classes", "nope"]))


def _examples(rng: np.random.Generator, input_proto) -> None:
    """Zero to three tf.Examples with a feature x of a random kind and length."""
    target = (input_proto.example_list_with_context if rng.integers(3) == 0
              else input_proto.example_list)
    if target is input_proto.example_list_with_context:
        target.context.features.feature["x2"].float_list.value.append(1.0)
    for _ in range(int(rng.integers(0, 4))):
        feature = target.examples.add().features.feature[str(rng.choice(["x", "x2", "y"]))]
        kind = int(rng.integers(3))
        count = int(rng.integers(0, 3))
        if kind == 0:
            feature.float_list.value.extend(rng.normal(size=count).tolist())
        elif kind == 1:
            feature.int64_list.value.extend(range(count))
        else:
            feature.bytes_list.value.extend([b"x"] * count)


def mutated_call(rng: np.random.Generator) -> tuple[str, object]:
    """(PredictionService or ModelService method, request): mostly mutated Predicts of the
    model "m", the rest Classify / Regress / MultiInference / metadata / status requests of
    the model "hp" (TF Serving's half_plus_two) with random examples and specs."""
    from tensorflow_serving.apis import (
        classification_pb2,
        get_model_metadata_pb2,
        get_model_status_pb2,
        inference_pb2,
        regression_pb2,
    )

    kind = int(rng.integers(20))
    if kind < 14:
        return "Predict", mutated_predict(rng)
    if kind < 16:
        request = (classification_pb2.ClassificationRequest() if kind == 14
                   else regression_pb2.RegressionRequest())
        _mutated_spec(rng, request.model_spec, "hp")
        _examples(rng, request.input)
        return ("Classify" if kind == 14 else "Regress"), request
    if kind == 16:
        request = inference_pb2.MultiInferenceRequest()
        for _ in range(int(rng.integers(0, 3))):
            task = request.tasks.add()
            _mutated_spec(rng, task.model_spec, "hp")
            task.method_name = str(rng.choice(["tensorflow/serving/classify",
                                               "tensorflow/serving/regress", "nope", ""]))
        _examples(rng, request.input)
        return "MultiInference", request
    if kind < 19:
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        _mutated_spec(rng, request.model_spec, str(rng.choice(["m", "hp"])))
        request.metadata_field.extend([str(rng.choice(["signature_def", "nope", ""]))
                                       for _ in range(int(rng.integers(0, 3)))])
        return "GetModelMetadata", request
    request = get_model_status_pb2.GetModelStatusRequest()
    if rng.integers(4):
        _mutated_spec(rng, request.model_spec, str(rng.choice(["m", "hp"])))
    return "GetModelStatus", request
