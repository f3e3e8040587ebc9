"""TF Serving's REST API (`http_rest_api_handler.cc`, `http_server.cc`) over the aiohttp
transport of `serving.http_server`.

Routes:

    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]            model status
    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata   signature defs
    POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict    row or columnar predict
    POST ...:classify | ...:regress                              tf.Example in, results out
    <prometheus path>                                            Prometheus text

Errors answer `{"error": "..."}` with the HTTP status of the error's code. As in TF Serving,
any other method on a `/v1/` path is `400 Malformed request`, methods outside GET, POST, HEAD,
PUT, DELETE, OPTIONS and PATCH are 501, and `--rest_api_enable_cors_support` adds CORS headers
and answers a browser's preflight `OPTIONS`. The frontend uses the server core only through
`core.manager`, `core.request`, `core.run`, `core.classify` / `core.regress`,
`core.in_flight`, `core.metrics` and `core.options`.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import unquote

from . import api
from .http_server import JSON, HttpLimits, HttpServer, Reply, Request, json_reply
from .metrics import CONTENT_TYPE, PrometheusExport, load_monitoring_config
from .rest_json import (
    classification_json,
    parse_classify_regress_request,
    parse_predict_request,
    predict_response,
    regression_json,
)
from .status import from_exception, invalid_argument

log = logging.getLogger("keras_hps.serving")

_V1 = re.compile(r"(?i)/v1/.*")
_POST = re.compile(
    r"(?i)/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)"
)
_GET = re.compile(
    r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?"
)
_INT64_MAX = 2**63 - 1
# The methods TF Serving's libevent server passes to the REST handler; others are 501.
METHODS = frozenset({"GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"})
# http_rest_api_util.cc's AddCORSHeaders
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, GET",
    "Access-Control-Allow-Headers": "Content-Type",
}
_ORIGIN = re.compile(r"https?://")


def _version(text: str | None) -> int | None:
    if text is None:
        return None
    value = int(text)
    if value > _INT64_MAX:
        raise invalid_argument(f"Failed to convert version: {text} to numeric.")
    return value


def _unquote(text: str | None) -> str | None:
    return unquote(text) if text is not None else None


def _json(message: Any) -> str:
    from google.protobuf import json_format

    return json_format.MessageToJson(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


class RestApi:
    """Turns a request into TF Serving's REST answer, using the server core."""

    def __init__(self, core: Any, prometheus: PrometheusExport, cors: bool = False) -> None:
        self.core = core
        self.prometheus = prometheus
        self.cors = cors

    # ------------------------------------------------------------------ transport hooks
    def precheck(self, method: str, raw_path: str, headers: Any) -> Reply | None:
        """What is answered before the body is read: unknown methods, paths outside the API,
        and CORS preflights."""
        if method not in METHODS:
            return json_reply(501, f"Method not implemented: {method}")
        path = raw_path.split("?", 1)[0]
        if self.prometheus.enabled and path == self.prometheus.path:
            return None
        if not _V1.fullmatch(path):
            return json_reply(404, f"Not found: {method} {path}")
        if self.cors and method == "OPTIONS" and _ORIGIN.match(headers.get("Origin", "")):
            return Reply(200, b"", dict(CORS_HEADERS))
        return None

    def handle(self, request: Request) -> Reply:
        """The answer to one request whose body has been read (runs in a REST thread)."""
        path = request.raw_path.split("?", 1)[0]
        if self.prometheus.enabled and path == self.prometheus.path:
            return self._metrics(request.raw_path)
        try:
            reply = Reply(200, self._route(request.method, path, request.body))
        except Exception as exc:
            err = from_exception(exc)
            if err.code == "INTERNAL":
                log.warning("REST %s %s: %s", request.method, path, err.message)
            reply = json_reply(err.http_status, err.message)
        if self.cors:
            reply.headers.update(CORS_HEADERS)
        return reply

    def _metrics(self, raw_path: str) -> Reply:
        headers = {"Content-Type": CONTENT_TYPE}
        if raw_path != self.prometheus.path:  # a query string: TF Serving compares it too
            text = f"Unexpected path: {raw_path}. Should be {self.prometheus.path}"
            return Reply(400, text.encode(), headers)
        return Reply(200, self.core.metrics.render().encode(), headers)

    # ------------------------------------------------------------------ the API
    def _route(self, method: str, path: str, body: bytes) -> bytes:
        if method == "POST":
            m = _POST.fullmatch(path)
            if m:
                name, version, label, verb = m.groups()
                return self._post(
                    unquote(name), _version(version), _unquote(label), verb.lower(), body
                )
        elif method == "GET":
            m = _GET.fullmatch(path)
            if m:
                name, version, label, metadata = m.groups()
                name = unquote(name) if name else ""
                if not name:
                    raise invalid_argument("Missing model name in request.")
                with self.core.request(name, "metadata" if metadata else "status", "REST"):
                    if metadata:
                        return self._metadata(name, _version(version), _unquote(label))
                    return self._status(name, _version(version), _unquote(label))
        raise invalid_argument(f"Malformed request: {method} {path}")

    def _status(self, name: str, version: int | None, label: str | None) -> bytes:
        response = api.model_status(self.core.manager, name, version, label)
        return _json(response).encode()

    def _metadata(self, name: str, version: int | None, label: str | None) -> bytes:
        with self.core.manager.acquire(name, version, label) as handle:
            spec = _json(api.model_spec(name, handle.version, ""))
            sigs = _json(api.signature_def_map(handle.servable))
        return (
            '{\n"model_spec":' + spec + ',\n"metadata": {"signature_def": ' + sigs + "}\n}"
        ).encode()

    def _post(
        self, name: str, version: int | None, label: str | None, verb: str, body: bytes
    ) -> bytes:
        with self.core.request(name, verb, "REST"):
            if verb != "predict":
                return self._classify_regress(name, version, label, verb, body)
            with self.core.manager.acquire(name, version, label) as handle:

                def input_specs(signature: str) -> dict:
                    return api.check_signature(handle, signature, rest=True).inputs

                signature, inputs, fmt = parse_predict_request(body, input_specs)
                outputs = self.core.run(handle, signature, inputs, None)
            return predict_response(outputs, fmt)

    def _classify_regress(
        self, name: str, version: int | None, label: str | None, verb: str, body: bytes
    ) -> bytes:
        method = self.core.classify if verb == "classify" else self.core.regress
        from tensorflow_serving.apis import classification_pb2, regression_pb2

        proto = classification_pb2.ClassificationRequest if verb == "classify" else (
            regression_pb2.RegressionRequest)
        request = proto()
        request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = version
        if label is not None:
            request.model_spec.version_label = label
        parse_classify_regress_request(body, request)
        response = method(request)
        if verb == "classify":
            return classification_json(response.result)
        return regression_json(response.result)


def _max_connections() -> int:
    """1024, or half the process's open-file limit when that is lower."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 1024
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(16, min(1024, soft // 2))


def rest_limits(options: Any) -> HttpLimits:
    """The REST transport's limits from the server options (TF Serving's defaults)."""
    defaults = HttpLimits()
    timeout_ms = getattr(options, "rest_api_timeout_in_ms", defaults.timeout_s * 1000)
    threads = getattr(options, "rest_api_num_threads", 0) or 4 * (os.cpu_count() or 1)
    return HttpLimits(
        # TF Serving: <= 0 means no timeout; a day stands in for "none" here
        timeout_s=timeout_ms / 1000 if timeout_ms and timeout_ms > 0 else 86_400.0,
        max_body_bytes=getattr(options, "rest_api_max_body_bytes", defaults.max_body_bytes),
        max_connections=getattr(options, "rest_api_max_connections", 0) or _max_connections(),
        num_threads=max(1, threads),
    )


def start_rest_server(core: Any, host: str, port: int) -> tuple[HttpServer, int]:
    """Starts the REST listener; returns it and the port it bound (port 0 picks one).

    Reads `--monitoring_config_file` (ConfigError when it is not a MonitoringConfig) and the
    REST flags from `core.options`."""
    options = core.options
    prometheus = load_monitoring_config(getattr(options, "monitoring_config_file", None))
    rest = RestApi(core, prometheus, bool(getattr(options, "rest_api_enable_cors_support", False)))
    server = HttpServer(rest.handle, rest_limits(options), rest.precheck, core.in_flight)
    return server, server.start(host, port)


__all__ = ["JSON", "RestApi", "rest_limits", "start_rest_server"]
