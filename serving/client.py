"""Client helpers: predict from NumPy inputs over gRPC (official stubs) or REST (JSON).

    from keras_hps.serving.client import GrpcClient, RestClient
    out = GrpcClient("localhost:8500").predict("dlrm", {"cat": keys, "dense": x})
    out = RestClient("http://localhost:8501").predict("dlrm", {"cat": keys, "dense": x})

Both return {output name: np.ndarray} and raise `ServingError` (with the server's status
code and message) when the server answers an error. They work against keras-hps serve and
stock TensorFlow Serving alike.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from .status import HTTP_STATUS, ServingError

_HTTP_TO_CODE = {}
for _code, _http in HTTP_STATUS.items():
    _HTTP_TO_CODE.setdefault(_http, _code)


class GrpcClient:
    """PredictionService / ModelService client on one channel (thread-safe)."""

    def __init__(self, target: str, timeout: float = 30.0) -> None:
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        from .grpc_service import CHANNEL_OPTIONS

        self.target = target
        self.timeout = timeout
        self._grpc = grpc
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout)
        except self._grpc.RpcError as exc:
            raise ServingError(exc.code().name, exc.details() or "") from None

    @staticmethod
    def _spec(spec: Any, model: str, version: int | None, label: str | None) -> None:
        spec.name = model
        if version is not None:
            spec.version.value = version
        if label is not None:
            spec.version_label = label

    def predict_request(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        signature_name: str = "serving_default",
        version: int | None = None,
        label: str | None = None,
        output_filter: list[str] | None = None,
    ) -> Any:
        """The PredictRequest proto for NumPy inputs (tensor_content encoding)."""
        from tensorflow_serving.apis import predict_pb2

        from .tensors import to_proto

        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, model, version, label)
        request.model_spec.signature_name = signature_name
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(to_proto(np.asarray(value), tensor_content=True))
        request.output_filter.extend(output_filter or [])
        return request

    def predict(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        signature_name: str = "serving_default",
        version: int | None = None,
        label: str | None = None,
        output_filter: list[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Predict; returns {output name: array}."""
        request = self.predict_request(model, inputs, signature_name, version, label, output_filter)
        return self.decode(self._call(self.prediction.Predict, request))

    def send(self, request: Any) -> dict[str, np.ndarray]:
        """Sends a prepared PredictRequest; returns {output name: array}."""
        return self.decode(self._call(self.prediction.Predict, request))

    @staticmethod
    def decode(response: Any) -> dict[str, np.ndarray]:
        """{output name: array} of a PredictResponse."""
        from .tensors import from_proto

        return {k: from_proto(v, k) for k, v in response.outputs.items()}

    def metadata(self, model: str, version: int | None = None, label: str | None = None) -> Any:
        """The model's SignatureDefMap proto."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec, model, version, label)
        response = self._call(self.prediction.GetModelMetadata, request)
        out = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(out)
        return out

    def status(
        self, model: str, version: int | None = None, label: str | None = None
    ) -> list[tuple[int, str, str]]:
        """(version, state name, error message) for each version of a model."""
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec, model, version, label)
        response = self._call(self.models.GetModelStatus, request)
        states = get_model_status_pb2.ModelVersionStatus.State
        return [
            (s.version, states.Name(s.state), s.status.error_message)
            for s in response.model_version_status
        ]

    def reload_config(self, models_config_text: str) -> None:
        """Replaces the server's models with a models.config (text); raises on failure."""
        from google.protobuf import text_format
        from tensorflow.core.protobuf import error_codes_pb2
        from tensorflow_serving.apis import model_management_pb2

        request = model_management_pb2.ReloadConfigRequest()
        text_format.Parse(models_config_text, request.config)
        response = self._call(self.models.HandleReloadConfigRequest, request)
        if response.status.error_code != 0:
            code = error_codes_pb2.Code.Name(response.status.error_code)
            raise ServingError(code, response.status.error_message)

    def close(self) -> None:
        """Closes the channel."""
        self.channel.close()


def _to_json_value(array: np.ndarray) -> Any:
    array = np.asarray(array)
    if array.dtype.kind in "OSU":

        def enc(v: Any) -> Any:
            if isinstance(v, list):
                return [enc(x) for x in v]
            raw = v.encode() if isinstance(v, str) else bytes(v)
            return {"b64": base64.b64encode(raw).decode("ascii")}

        return enc(array.tolist())
    return array.tolist()


class RestClient:
    """TF Serving REST client (one keep-alive connection per thread)."""

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        parts = urlsplit(base_url if "://" in base_url else f"http://{base_url}")
        self.host, self.port = parts.hostname or "localhost", parts.port or 8501
        self.timeout = timeout
        self._local = threading.local()
        self._outputs: dict[tuple, dict[str, np.dtype]] = {}

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """(HTTP status, body) of one request; retries once on a dropped connection."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in (0, 1):
            conn = self._conn()
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, ConnectionError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, body: bytes | None = None) -> Any:
        status, payload = self.request(method, path, body)
        try:
            doc = json.loads(payload) if payload else {}
        except ValueError:
            doc = {"error": payload.decode(errors="replace")}
        if status != 200:
            err = ServingError(_HTTP_TO_CODE.get(status, "UNKNOWN"), str(doc.get("error", doc)))
            err.http_status_received = status  # type: ignore[attr-defined]
            raise err
        return doc

    @staticmethod
    def model_path(model: str, version: int | None = None, label: str | None = None) -> str:
        """`/v1/models/NAME[/versions/V|/labels/L]`."""
        path = f"/v1/models/{quote(model, safe='')}"
        if version is not None:
            path += f"/versions/{int(version)}"
        elif label is not None:
            path += f"/labels/{quote(label, safe='')}"
        return path

    def status(self, model: str, version: int | None = None, label: str | None = None) -> Any:
        """The status JSON (`{"model_version_status": [...]}`)."""
        return self._json("GET", self.model_path(model, version, label))

    def metadata(self, model: str, version: int | None = None, label: str | None = None) -> Any:
        """The metadata JSON (`{"model_spec": ..., "metadata": {"signature_def": ...}}`)."""
        return self._json("GET", self.model_path(model, version, label) + "/metadata")

    def _output_dtypes(
        self, model: str, version: int | None, label: str | None, signature: str
    ) -> dict[str, np.dtype]:
        key = (model, version, label, signature)
        if key not in self._outputs:
            from tensorflow.core.framework import types_pb2

            from .tensors import enum_to_numpy

            sig = self.metadata(model, version, label)["metadata"]["signature_def"]
            outputs = sig["signature_def"][signature]["outputs"]
            self._outputs[key] = {
                name: enum_to_numpy(types_pb2.DataType.Value(info["dtype"]))
                for name, info in outputs.items()
            }
        return self._outputs[key]

    def predict(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        signature_name: str = "serving_default",
        version: int | None = None,
        label: str | None = None,
        row_format: bool = False,
    ) -> dict[str, np.ndarray]:
        """Predict with the columnar (`inputs`) or row (`instances`) format; returns
        {output name: array} with the signature's output dtypes."""
        if row_format:
            names = list(inputs)
            n = len(next(iter(inputs.values())))
            cols = {k: _to_json_value(v) for k, v in inputs.items()}
            rows = [{k: cols[k][i] for k in names} for i in range(n)]
            doc: dict[str, Any] = {"instances": rows}
        else:
            doc = {"inputs": {k: _to_json_value(v) for k, v in inputs.items()}}
        doc["signature_name"] = signature_name
        body = json.dumps(doc, separators=(",", ":")).encode()
        result = self._json("POST", self.model_path(model, version, label) + ":predict", body)
        dtypes = self._output_dtypes(model, version, label, signature_name)
        if row_format:
            preds = result["predictions"]
            if len(dtypes) == 1:
                (name,) = dtypes
                return {name: np.asarray(preds, dtype=dtypes[name])}
            return {k: np.asarray([p[k] for p in preds], dtype=dt) for k, dt in dtypes.items()}
        outs = result["outputs"]
        if len(dtypes) == 1 and not (isinstance(outs, dict) and set(outs) == set(dtypes)):
            (name,) = dtypes
            return {name: np.asarray(outs, dtype=dtypes[name])}
        return {k: np.asarray(v, dtype=dtypes.get(k)) for k, v in outs.items()}

    def close(self) -> None:
        """Closes this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
