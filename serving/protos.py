"""Message classes for TF Serving and gRPC protos that no installed package ships.

`tensorflow-serving-api` lacks `session_bundle_config.proto` (BatchingParameters) and
`ssl_config.proto`, and grpcio lacks the health-checking service's messages unless
`grpcio-health-checking` is installed. Each is built here from its field list, with the same
package, name, field numbers and types as the original, so text files and wire bytes
written for the original parse the same.
"""

from __future__ import annotations

import functools
from typing import Any

# (field name, number, type, repeated); type is a scalar name or a google.protobuf wrapper
Field = tuple[str, int, str, bool]

_SCALARS = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "bool": "TYPE_BOOL",
            "string": "TYPE_STRING"}


@functools.cache
def message_class(full_name: str, fields: tuple[Field, ...]) -> Any:
    """The message class `full_name` (e.g. "tensorflow.serving.SSLConfig") with `fields`."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    package, _, name = full_name.rpartition(".")
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    fdp = descriptor_pb2.FileDescriptorProto(
        name=f"keras_hps/{full_name}.proto",
        package=package,
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    msg = fdp.message_type.add(name=name)
    F = descriptor_pb2.FieldDescriptorProto
    for field_name, number, kind, repeated in fields:
        field = msg.field.add(name=field_name, number=number)
        field.label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
        if kind in _SCALARS:
            field.type = getattr(F, _SCALARS[kind])
        else:
            field.type = F.TYPE_MESSAGE
            field.type_name = f".google.protobuf.{kind}"
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


def ssl_config_class() -> Any:
    """`tensorflow.serving.SSLConfig` (tensorflow_serving/config/ssl_config.proto)."""
    return message_class("tensorflow.serving.SSLConfig", (
        ("server_key", 1, "string", False),
        ("server_cert", 2, "string", False),
        ("custom_ca", 3, "string", False),
        ("client_verify", 4, "bool", False),
    ))


def health_check_classes() -> tuple[Any, Any]:
    """(HealthCheckRequest, HealthCheckResponse) of grpc/health/v1/health.proto (the status
    enum travels as its number: SERVING = 1, NOT_SERVING = 2)."""
    return (
        message_class("grpc.health.v1.HealthCheckRequest", (("service", 1, "string", False),)),
        message_class("grpc.health.v1.HealthCheckResponse", (("status", 1, "int32", False),)),
    )
