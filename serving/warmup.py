"""Warmup replay at load, as TF Serving does it (`--enable_model_warmup`).

A version folder may hold `assets.extra/tf_serving_warmup_requests`: a TFRecord file of
serialized `tensorflow.serving.PredictionLog` records (`keras-hps export` writes one). Before a
version becomes AVAILABLE, every record's request runs against the loaded version
(`num_request_iterations` times each). A record that cannot be read or parsed, a request that
fails, or more than `MAX_RECORDS` records fail the load; the error becomes the version's
status and the versions already serving keep serving.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from .status import ServingError, from_exception, invalid_argument

log = logging.getLogger("keras_hps.serving")

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_RECORDS = 1000  # TF Serving's WarmupConsts::kMaxNumRecords
DEFAULT_SIGNATURE = "serving_default"
# The PredictionLog kinds TF Serving replays (session_run_log is refused there too).
WARMUP_KINDS = ("predict_log", "classify_log", "regress_log", "multi_inference_log")


def warmup_path(version_dir: str) -> str:
    """Where a version's warmup records live."""
    return os.path.join(version_dir, WARMUP_FILE)


def _records(path: str) -> Any:
    """The raw records of a TFRecord file (DATA_LOSS when it is not one)."""
    import tensorflow as tf

    try:
        for record in tf.data.TFRecordDataset(path):
            yield record.numpy()
    except tf.errors.DataLossError as exc:
        raise ServingError(
            "DATA_LOSS",
            f"{exc.message}. Please verify your warmup data is in TFRecord format ({path}).",
        ) from None
    except tf.errors.OpError as exc:
        raise ServingError("UNKNOWN", f"cannot read warmup data {path}: {exc.message}") from None


def _run_predict(servable: Any, request: Any) -> None:
    """One PredictRequest against a loaded version (its model_spec name is not checked,
    as in TF Serving's warmup)."""
    from .tensors import from_proto

    signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
    if signature not in servable.signatures:
        raise ServingError(
            "FAILED_PRECONDITION", f'Serving signature key "{signature}" not found.'
        )
    inputs = {k: from_proto(v, k) for k, v in request.inputs.items()}
    servable.run(inputs, signature, list(request.output_filter) or None)


def _replay(servable: Any, record: Any, kind: str, check_method: bool) -> None:
    """One warmup record: a PredictionLog's predict, classify, regress or multi_inference
    request, against the version being loaded (the version number is not known yet)."""
    from . import inference

    if kind == "predict_log":
        _run_predict(servable, record.predict_log.request)
        return
    answer = {
        "classify_log": inference.classify,
        "regress_log": inference.regress,
        "multi_inference_log": inference.multi_inference,
    }[kind]
    answer(servable, getattr(record, kind).request, None, check_method)


def replay_warmup(servable: Any, version_dir: str, num_request_iterations: int = 1,
                  check_method: bool = False) -> int:
    """Runs the version's warmup records against `servable`, each `num_request_iterations`
    times (at least once); returns how many records ran (0 when the version has no warmup
    file). Raises `ServingError` on the first failure."""
    from tensorflow_serving.apis import prediction_log_pb2

    path = warmup_path(version_dir)
    if not os.path.isfile(path):
        return 0
    start = time.perf_counter()
    count = 0
    for raw in _records(path):
        count += 1
        if count > MAX_RECORDS:
            raise invalid_argument(
                f"Number of warmup records exceeds the maximum ({MAX_RECORDS}) at {path}"
            )
        record = prediction_log_pb2.PredictionLog()
        try:
            record.ParseFromString(raw)
        except Exception:  # protobuf's DecodeError
            raise invalid_argument(
                f"Failed to parse warmup record {count} from {path}"
            ) from None
        kind = record.WhichOneof("log_type")
        if kind is None:
            continue  # an empty record does nothing, as in TF Serving
        if kind not in WARMUP_KINDS:
            raise ServingError(
                "UNIMPLEMENTED",
                f"Unsupported log_type for warmup: {kind} (record {count} of {path})",
            )
        for _ in range(max(1, num_request_iterations)):
            try:
                _replay(servable, record, kind, check_method)
            except Exception as exc:
                err = from_exception(exc)
                raise ServingError(
                    err.code, f"warmup record {count} of {path} failed: {err.message}"
                ) from None
    log.info(
        "Finished reading warmup data for model at %s. Number of warmup records read: %d. "
        "Elapsed time (microseconds): %d.",
        path,
        count,
        (time.perf_counter() - start) * 1e6,
    )
    return count
