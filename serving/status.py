"""Status codes of the model server, with TF Serving's code -> HTTP mapping.

Every failure the server reports is a `ServingError(code, message)`; REST turns it into
`{"error": message}` with the HTTP status of `HTTP_STATUS[code]`, gRPC into the status code of
the same name. Codes are the canonical names shared by absl, gRPC and `tensorflow.error.Code`.
"""

from __future__ import annotations

from keras_hps.errors import (
    ConfigError,
    InvalidInputError,
    NotFoundError,
    TableFormatError,
    UnavailableError,
)

# TF Serving's ToHTTPStatusCode (model_servers/http_server.cc).
HTTP_STATUS: dict[str, int] = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}

# gRPC truncates long messages like TF Serving's ToGRPCStatus does.
MAX_GRPC_MESSAGE = 1024


class ServingError(Exception):
    """A request or load failure with a canonical status code name (e.g. "NOT_FOUND")."""

    def __init__(self, code: str, message: str) -> None:
        if code not in HTTP_STATUS:
            raise ValueError(f"unknown status code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        """The HTTP status TF Serving answers for this code."""
        return HTTP_STATUS.get(self.code, 500)

    def __repr__(self) -> str:
        return f"ServingError({self.code}, {self.message!r})"


def invalid_argument(message: str) -> ServingError:
    """An INVALID_ARGUMENT error (HTTP 400)."""
    return ServingError("INVALID_ARGUMENT", message)


def not_found(message: str) -> ServingError:
    """A NOT_FOUND error (HTTP 404)."""
    return ServingError("NOT_FOUND", message)


def from_exception(exc: BaseException) -> ServingError:
    """The status an exception raised while serving maps to.

    keras-hps's own errors keep their meaning (bad input -> INVALID_ARGUMENT, unknown name ->
    NOT_FOUND, a shared tier that cannot answer -> UNAVAILABLE); anything else is an internal
    failure (INTERNAL), named with its type.
    """
    if isinstance(exc, ServingError):
        return exc
    message = str(exc) or type(exc).__name__
    if isinstance(exc, (InvalidInputError, ConfigError, TableFormatError)):
        return ServingError("INVALID_ARGUMENT", message)
    if isinstance(exc, NotFoundError):
        return ServingError("NOT_FOUND", message)
    if isinstance(exc, UnavailableError):  # a shared tier is down: retry later
        return ServingError("UNAVAILABLE", message)
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return ServingError("NOT_FOUND", message)
    if isinstance(exc, MemoryError):
        return ServingError("RESOURCE_EXHAUSTED", f"out of memory: {message}")
    name = type(exc).__name__
    code = _graph_error_code(exc)
    if code is not None:  # tf.errors.OpError from running a graph: its own status code
        return ServingError(code, getattr(exc, "message", message))
    return ServingError("INTERNAL", f"{name}: {message}")


def _graph_error_code(exc: BaseException) -> str | None:
    """The canonical code name of TensorFlow's OpError (None for other exceptions)."""
    if not any(c.__name__ == "OpError" for c in type(exc).__mro__):
        return None
    from tensorflow.core.protobuf import error_codes_pb2

    try:
        code = error_codes_pb2.Code.Name(int(exc.error_code))
    except (AttributeError, TypeError, ValueError):
        return None
    return code if code in HTTP_STATUS else None
