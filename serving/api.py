"""Protocol-independent answers: model status and metadata protos, signature checks.

Both frontends (gRPC and REST) build their responses from these, so the two protocols
always agree on what a model's status and signatures are.
"""

from __future__ import annotations

from typing import Any

from .manager import Handle, ModelManager, VersionStatus
from .status import ServingError, invalid_argument

DEFAULT_SIGNATURE = "serving_default"
PREDICTABLE_METHODS = (
    "tensorflow/serving/predict",
    "tensorflow/serving/classify",
    "tensorflow/serving/regress",
)


def version_status_proto(statuses: list[VersionStatus]) -> Any:
    """GetModelStatusResponse for a list of version states."""
    from tensorflow.core.protobuf import error_codes_pb2
    from tensorflow_serving.apis import get_model_status_pb2

    response = get_model_status_pb2.GetModelStatusResponse()
    for s in statuses:
        entry = response.model_version_status.add()
        entry.version = s.version
        entry.state = int(s.state)
        entry.status.SetInParent()  # TF Serving always reports a status (OK by default)
        if s.error is not None:
            entry.status.error_code = error_codes_pb2.Code.Value(s.error.code)
            entry.status.error_message = s.error.message
    return response


def model_status(manager: ModelManager, name: str, version: int | None, label: str | None) -> Any:
    """GetModelStatusResponse for a model (all versions) or one version or label."""
    if not name:
        raise invalid_argument("Missing model name in request.")
    return version_status_proto(manager.status(name, version, label))


def signature_def_map(servable: Any) -> Any:
    """SignatureDefMap of every signature a loaded version has (raw-key inputs)."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    out = get_model_metadata_pb2.SignatureDefMap()
    for name in sorted(servable.signatures):
        out.signature_def[name].CopyFrom(servable.signature_def(name))
    return out


def model_spec(name: str, version: int | None, signature_name: str | None = None) -> Any:
    """ModelSpec proto naming what answered a request."""
    from tensorflow_serving.apis import model_pb2

    spec = model_pb2.ModelSpec(name=name)
    if version is not None:
        spec.version.value = version
    if signature_name is not None:
        spec.signature_name = signature_name
    return spec


def request_spec(request: Any) -> Any:
    """The ModelSpec of a gRPC request; INVALID_ARGUMENT "Missing ModelSpec" when it has
    none (TF Serving's predict_impl, get_model_metadata_impl, get_model_status_impl,
    classification and regression services)."""
    if not request.HasField("model_spec"):
        raise invalid_argument("Missing ModelSpec")
    return request.model_spec


def model_target(spec: Any) -> tuple[str, int | None, str | None]:
    """(name, version, label) a ModelSpec asks for (None where it leaves them open)."""
    if not spec.name:
        raise invalid_argument("ModelSpec has no name specified.")
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.name, spec.version.value, None
    if choice == "version_label":
        return spec.name, None, spec.version_label
    return spec.name, None, None


def check_signature(handle: Handle, signature_name: str, rest: bool) -> Any:
    """The spec of a signature Predict may run; unknown names fail as TF Serving's REST or
    gRPC path does, and so do signatures of another method (predict_util.cc)."""
    spec = handle.servable.signatures.get(signature_name)
    if spec is None:
        if rest:
            raise invalid_argument(
                f'Serving signature name: "{signature_name}" not found in signature def'
            )
        raise ServingError(
            "FAILED_PRECONDITION", f'Serving signature key "{signature_name}" not found.'
        )
    if spec.method_name not in PREDICTABLE_METHODS:
        raise ServingError(
            "INTERNAL",
            "Expected prediction signature method_name to be one of {"
            + ", ".join(PREDICTABLE_METHODS) + f"}}. Was: {spec.method_name}",
        )
    return spec
