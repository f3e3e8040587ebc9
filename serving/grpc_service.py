"""TF Serving's gRPC API over a serving core: PredictionService (Predict, GetModelMetadata,
Classify, Regress, MultiInference) and ModelService (GetModelStatus,
HandleReloadConfigRequest), from the tensorflow-serving-api protos; optionally the standard
gRPC health service.

`start_grpc_server(core, host, port)` listens on TCP `port` (0: a free one, or none when
`grpc_socket_path` is set) and on the Unix socket `core.options.grpc_socket_path`, with
`grpc_channel_arguments`, `grpc_max_threads` and `ssl_config_file` as tensorflow_model_server
takes them.
"""

from __future__ import annotations

from collections.abc import Callable
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

from keras_hps.errors import ConfigError

from . import api
from .model_config import entries_from_proto
from .status import MAX_GRPC_MESSAGE, from_exception, invalid_argument
from .tensors import from_proto, to_proto

if TYPE_CHECKING:
    from .core import ServingCore

# No message size limit beyond TF Serving's (SetMaxMessageSize(kint32max)).
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
]
HEALTH_SERVICE = "grpc.health.v1.Health"


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    err = from_exception(exc)
    message = err.message
    if len(message) > MAX_GRPC_MESSAGE:
        message = message[:MAX_GRPC_MESSAGE] + "...TRUNCATED"
    context.abort(getattr(grpc.StatusCode, err.code), message)


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """tensorflow.serving.PredictionService."""

    def __init__(self, core: ServingCore) -> None:
        self.core = core

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            return self._predict(request)
        except Exception as exc:
            _abort(context, exc)

    def _predict(self, request: Any) -> Any:
        with self.core.request(request.model_spec.name, "predict", "GRPC", admitted=True):
            name, version, label = api.model_target(api.request_spec(request))
            signature = request.model_spec.signature_name or api.DEFAULT_SIGNATURE
            with self.core.manager.acquire(name, version, label) as handle:
                api.check_signature(handle, signature, rest=False)
                inputs = {k: from_proto(v, k) for k, v in request.inputs.items()}
                output_keys = list(request.output_filter) or None
                outputs = self.core.run(handle, signature, inputs, output_keys)
                served = handle.version
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(api.model_spec(name, served, signature))
        content = self.core.options.enable_serialization_as_tensor_content
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(to_proto(value, tensor_content=content))
        return response

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            with self.core.request(request.model_spec.name, "metadata", "GRPC", admitted=True):
                spec = api.request_spec(request)  # then the fields, then the model (TF Serving)
                fields = list(request.metadata_field)
                if not fields:
                    raise invalid_argument(
                        "GetModelMetadataRequest must specify at least one metadata_field"
                    )
                for field in fields:
                    if field != "signature_def":
                        raise invalid_argument(f"Metadata field {field} is not supported")
                name, version, label = api.model_target(spec)
                with self.core.manager.acquire(name, version, label) as handle:
                    response = get_model_metadata_pb2.GetModelMetadataResponse()
                    response.model_spec.CopyFrom(api.model_spec(name, handle.version))
                    response.metadata["signature_def"].Pack(api.signature_def_map(handle.servable))
                return response
        except Exception as exc:
            _abort(context, exc)

    def _answer(self, api_name: str, model: str, answer: Callable[[Any], Any], request: Any,
                context: grpc.ServicerContext) -> Any:
        try:
            with self.core.request(model, api_name, "GRPC", admitted=True):
                return answer(request)
        except Exception as exc:
            _abort(context, exc)

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        model = request.model_spec.name
        return self._answer("classify", model, self.core.classify, request, context)

    def Regress(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        model = request.model_spec.name
        return self._answer("regress", model, self.core.regress, request, context)

    def MultiInference(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        model = request.tasks[0].model_spec.name if request.tasks else ""
        return self._answer("multi_inference", model, self.core.multi_inference, request,
                            context)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """tensorflow.serving.ModelService."""

    def __init__(self, core: ServingCore) -> None:
        self.core = core

    def GetModelStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            name, version, label = api.model_target(api.request_spec(request))
            return api.model_status(self.core.manager, name, version, label)
        except Exception as exc:
            _abort(context, exc)

    def HandleReloadConfigRequest(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        from tensorflow.core.protobuf import error_codes_pb2

        response = model_management_pb2.ReloadConfigResponse()
        try:
            entries = entries_from_proto(request.config, "ReloadConfigRequest")
            failures = self.core.manager.reload_config(entries)
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


def _health_handler(core: ServingCore) -> grpc.GenericRpcHandler:
    """grpc.health.v1.Health: SERVING for the server ("") and its two services while the
    core takes requests, NOT_SERVING once it drains; NOT_FOUND for other service names."""
    from .protos import health_check_classes

    request_class, response_class = health_check_classes()
    known = {"", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"}

    def check(request: Any, context: grpc.ServicerContext) -> Any:
        if request.service not in known:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return response_class(status=2 if core.draining else 1)

    return grpc.method_handlers_generic_handler(HEALTH_SERVICE, {
        "Check": grpc.unary_unary_rpc_method_handler(
            check,
            request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString,
        ),
    })


def channel_arguments(text: str) -> list[tuple[str, int | str]]:
    """`--grpc_channel_arguments`: "key=value,..." as gRPC options; a value that parses as a
    32-bit integer is passed as one, anything else as a string (TF Serving's rule)."""
    out: list[tuple[str, int | str]] = []
    for item in text.split(",") if text else []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--grpc_channel_arguments: {item!r} is not key=value")
        try:
            number = int(value)
        except ValueError:
            out.append((key, value))
            continue
        out.append((key, number) if -(2**31) <= number < 2**31 else (key, value))
    return out


def _credentials(ssl_config_file: str) -> grpc.ServerCredentials | None:
    """TLS credentials from an SSLConfig text file (None: insecure)."""
    if not ssl_config_file:
        return None
    from google.protobuf import text_format

    from .protos import ssl_config_class

    config = ssl_config_class()()
    try:
        with open(ssl_config_file, encoding="utf-8") as f:
            text_format.Parse(f.read(), config)
    except (OSError, text_format.ParseError) as exc:
        raise ConfigError(f"Invalid protobuf file: '{ssl_config_file}' ({exc})") from None
    return grpc.ssl_server_credentials(
        [(config.server_key.encode(), config.server_cert.encode())],
        root_certificates=config.custom_ca.encode() or None,
        require_client_auth=config.client_verify,
    )


def start_grpc_server(core: ServingCore, host: str, port: int) -> tuple[grpc.Server, int]:
    """Starts the gRPC listeners; returns the server and its TCP port (0: none)."""
    options = core.options
    args = dict(CHANNEL_OPTIONS)
    args.update(channel_arguments(options.grpc_channel_arguments))
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=options.grpc_max_threads, thread_name_prefix="keras-hps-grpc"
        ),
        options=list(args.items()),
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(core), grpc_server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(core), grpc_server)
    if options.enable_grpc_healthcheck_service:
        grpc_server.add_generic_rpc_handlers((_health_handler(core),))
    credentials = _credentials(options.ssl_config_file)

    def listen(address: str) -> int:
        if credentials is None:
            return grpc_server.add_insecure_port(address)
        return grpc_server.add_secure_port(address, credentials)

    bound = 0
    if port or not options.grpc_socket_path:
        address = f"[::]:{port}" if host in ("0.0.0.0", "::", "") else f"{host}:{port}"
        bound = listen(address)
        if bound == 0:
            raise OSError(f"cannot bind the gRPC port {address}")
    if options.grpc_socket_path:
        path = options.grpc_socket_path
        if listen(f"unix:{path}") == 0:
            raise OSError(f"cannot listen on the gRPC Unix socket {path}")
    grpc_server.start()
    return grpc_server, bound
