"""TF Serving's gRPC API: PredictionService (Predict, GetModelMetadata; Classify, Regress
and MultiInference answer UNIMPLEMENTED) and ModelService (GetModelStatus,
HandleReloadConfigRequest), from the tensorflow-serving-api protos."""

from __future__ import annotations

from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from . import api
from .model_config import entries_from_proto
from .status import MAX_GRPC_MESSAGE, ServingError, from_exception, invalid_argument
from .tensors import from_proto, to_proto

if TYPE_CHECKING:
    from .server import ModelServer

# No message size limit, as tensorflow_model_server (large batches of embeddings).
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    err = from_exception(exc)
    message = err.message
    if len(message) > MAX_GRPC_MESSAGE:
        message = message[:MAX_GRPC_MESSAGE] + "...TRUNCATED"
    context.abort(getattr(grpc.StatusCode, err.code), message)


def _spec_target(spec: Any) -> tuple[str, int | None, str | None]:
    if not spec.name:
        raise invalid_argument("ModelSpec has no name specified.")
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.name, spec.version.value, None
    if choice == "version_label":
        return spec.name, None, spec.version_label
    return spec.name, None, None


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """tensorflow.serving.PredictionService."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            return self._predict(request)
        except Exception as exc:
            _abort(context, exc)

    def _predict(self, request: Any) -> Any:
        name, version, label = _spec_target(request.model_spec)
        with self.server.request(name, "predict", "GRPC"):
            signature = request.model_spec.signature_name or api.DEFAULT_SIGNATURE
            with self.server.manager.acquire(name, version, label) as handle:
                api.check_signature(handle, signature, rest=False)
                inputs = {k: from_proto(v, k) for k, v in request.inputs.items()}
                output_keys = list(request.output_filter) or None
                outputs = self.server.run(handle, signature, inputs, output_keys)
                served = handle.version
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(api.model_spec(name, served, signature))
        content = self.server.options.enable_serialization_as_tensor_content
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(to_proto(value, tensor_content=content))
        return response

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            name, version, label = _spec_target(request.model_spec)
            with self.server.request(name, "metadata", "GRPC"):
                fields = list(request.metadata_field)
                if not fields:
                    raise invalid_argument(
                        "GetModelMetadataRequest must specify at least one metadata_field"
                    )
                for field in fields:
                    if field != "signature_def":
                        raise invalid_argument(f"Metadata field {field} is not supported")
                with self.server.manager.acquire(name, version, label) as handle:
                    response = get_model_metadata_pb2.GetModelMetadataResponse()
                    response.model_spec.CopyFrom(api.model_spec(name, handle.version))
                    response.metadata["signature_def"].Pack(api.signature_def_map(handle.servable))
                return response
        except Exception as exc:
            _abort(context, exc)

    def _unsupported(self, what: str, context: grpc.ServicerContext) -> None:
        _abort(
            context,
            ServingError(
                "UNIMPLEMENTED",
                f"{what} is not supported by keras-hps serve: exported models have predict "
                "signatures; use Predict.",
            ),
        )

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._unsupported("Classify", context)

    def Regress(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._unsupported("Regress", context)

    def MultiInference(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._unsupported("MultiInference", context)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """tensorflow.serving.ModelService."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server

    def GetModelStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            if not request.HasField("model_spec"):
                raise invalid_argument("Missing ModelSpec")
            name, version, label = _spec_target(request.model_spec)
            return api.model_status(self.server.manager, name, version, label)
        except Exception as exc:
            _abort(context, exc)

    def HandleReloadConfigRequest(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        from tensorflow.core.protobuf import error_codes_pb2

        response = model_management_pb2.ReloadConfigResponse()
        try:
            entries = entries_from_proto(request.config, "ReloadConfigRequest")
            failures = self.server.manager.reload_config(entries)
        except Exception as exc:
            err = from_exception(exc)
            response.status.error_code = error_codes_pb2.Code.Value(err.code)
            response.status.error_message = err.message
            return response
        if failures:
            model, version, err = failures[0]
            response.status.error_code = error_codes_pb2.Code.Value(err.code)
            response.status.error_message = (
                f"Loading servable version {{name: {model} version: {version}}} failed: "
                f"{err.message}"
            )
        return response


def start_grpc_server(server: ModelServer, host: str, port: int) -> tuple[grpc.Server, int]:
    """Starts the gRPC listener; returns it and its port (port 0 picks one)."""
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=server.options.grpc_max_threads, thread_name_prefix="keras-hps-grpc"
        ),
        options=CHANNEL_OPTIONS,
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(server), grpc_server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(server), grpc_server)
    address = f"[::]:{port}" if host in ("0.0.0.0", "::", "") else f"{host}:{port}"
    bound = grpc_server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind the gRPC port {address}")
    grpc_server.start()
    return grpc_server, bound
