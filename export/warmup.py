"""`assets.extra/tf_serving_warmup_requests`: PredictionLog records TF Serving replays at load."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from keras_hps.servable import TensorSpec

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")


def warmup_inputs(
    specs: Mapping[str, TensorSpec],
    key_samples: Mapping[str, np.ndarray],
    batch: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """One valid request: keys drawn from `key_samples[input]`, other inputs random, zero or
    empty strings."""
    out = {}
    for name, spec in specs.items():
        if spec.shape is None:
            shape: tuple[int, ...] = (batch,)
        else:
            shape = tuple(batch if i == 0 and d is None else (1 if d is None else d)
                          for i, d in enumerate(spec.shape))
        if name in key_samples:
            out[name] = rng.choice(key_samples[name], size=shape).astype(spec.dtype)
        elif spec.dtype.kind == "f":
            out[name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind == "O":  # DT_STRING
            out[name] = np.full(shape, b"", dtype=object)
        else:
            out[name] = np.zeros(shape, spec.dtype)
    return out


def write_warmup(
    version_dir: str,
    model_name: str,
    specs: Mapping[str, TensorSpec],
    key_samples: Mapping[str, np.ndarray],
    num_records: int = 3,
    signature_name: str = "serving_default",
    seed: int = 0,
) -> str:
    """Write `num_records` Predict requests (batch sizes 1, 2, 4, ...); returns the file path."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    path = os.path.join(version_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    with tf.io.TFRecordWriter(path) as writer:
        for i in range(num_records):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = signature_name
            for name, array in warmup_inputs(specs, key_samples, 2**i, rng).items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return path


def read_warmup(version_dir: str) -> list[dict[str, np.ndarray]]:
    """The inputs of each warmup request of a version (for checks and replay)."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(version_dir, WARMUP_FILE)
    requests = []
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        inputs = log.predict_log.request.inputs
        requests.append({k: tf.make_ndarray(v) for k, v in inputs.items()})
    return requests
