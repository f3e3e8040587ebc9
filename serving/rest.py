"""TF Serving's REST API over HTTP/1.1, plus Prometheus metrics.

Routes (as in TF Serving's http_rest_api_handler):

    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]            model status
    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata   signature defs
    POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict    row or columnar predict
    POST ...:classify | ...:regress                              501 (not supported)
    GET  /monitoring/prometheus/metrics                          Prometheus text

Errors answer `{"error": "..."}` with the HTTP status of the error's code.
"""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from . import api
from .rest_json import error_body, parse_predict_request, predict_response
from .status import ServingError, from_exception, invalid_argument

if TYPE_CHECKING:
    from .server import ModelServer

METRICS_PATH = "/monitoring/prometheus/metrics"
_V1 = re.compile(r"(?i)/v1/.*")
_POST = re.compile(
    r"(?i)/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)"
)
_GET = re.compile(
    r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?"
)
_INT64_MAX = 2**63 - 1


def _version(text: str | None) -> int | None:
    if text is None:
        return None
    value = int(text)
    if value > _INT64_MAX:
        raise invalid_argument(f"Failed to convert version: {text} to numeric.")
    return value


def _json(message: Any) -> str:
    from google.protobuf import json_format

    return json_format.MessageToJson(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


class RestApi:
    """Turns (method, path, body) into (HTTP status, body, content type)."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, bytes, str]:
        """The answer to one HTTP request."""
        path = path.split("?", 1)[0]
        if method == "GET" and path == METRICS_PATH:
            text = self.server.metrics.render().encode()
            return 200, text, "text/plain; version=0.0.4; charset=utf-8"
        if not _V1.fullmatch(path):
            return 404, error_body(f"Not found: {method} {path}"), "application/json"
        try:
            return 200, self._route(method, path, body), "application/json"
        except Exception as exc:
            err = from_exception(exc)
            return err.http_status, error_body(err.message), "application/json"

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
                with self.server.request(name, "metadata" if metadata else "status", "REST"):
                    if metadata:
                        return self._metadata(name, _version(version), _unquote(label))
                    return self._status(name, _version(version), _unquote(label))
        raise invalid_argument(f"Malformed request: {method} {path}")

    def _status(self, name: str, version: int | None, label: str | None) -> bytes:
        response = api.model_status(self.server.manager, name, version, label)
        return _json(response).encode()

    def _metadata(self, name: str, version: int | None, label: str | None) -> bytes:
        with self.server.manager.acquire(name, version, label) as handle:
            spec = _json(api.model_spec(name, handle.version, ""))
            sigs = _json(api.signature_def_map(handle.servable))
        return (
            '{\n"model_spec":' + spec + ',\n"metadata": {"signature_def": ' + sigs + "}\n}"
        ).encode()

    def _post(
        self, name: str, version: int | None, label: str | None, verb: str, body: bytes
    ) -> bytes:
        with self.server.request(name, verb, "REST"):
            if verb != "predict":
                raise ServingError(
                    "UNIMPLEMENTED",
                    f"The {verb} API is not supported by keras-hps serve: models exported by "
                    f"keras-hps have predict signatures; POST .../models/{name}:predict instead.",
                )
            with self.server.manager.acquire(name, version, label) as handle:

                def input_specs(signature: str) -> dict:
                    return api.check_signature(handle, signature, rest=True).inputs

                signature, inputs, fmt = parse_predict_request(body, input_specs)
                outputs = self.server.run(handle, signature, inputs)
            return predict_response(outputs, fmt)


def _unquote(text: str | None) -> str | None:
    return unquote(text) if text is not None else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "keras-hps"
    api: RestApi  # set on the subclass built per server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by default
        pass

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        with self.api.server.in_flight():  # stop() waits until the answer is written
            if self.api.server.draining:
                status, payload, ctype = (
                    503,
                    error_body("The server is shutting down"),
                    "application/json",
                )
                self.close_connection = True
            else:
                status, payload, ctype = self.api.handle(method, self.path, body)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._serve("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve("DELETE")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True


class RestServer:
    """A running REST listener (one thread per connection)."""

    def __init__(self, httpd: _HTTPServer) -> None:
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="keras-hps-rest",
            daemon=True,
        )
        self._thread.start()
        self._stopped = False

    def stop_accepting(self) -> None:
        """Stops taking new connections (requests on open ones answer 503)."""
        if not self._stopped:
            self._stopped = True
            self._httpd.shutdown()
            self._thread.join()

    def close(self) -> None:
        """Closes the listening socket."""
        self.stop_accepting()
        self._httpd.server_close()


def start_rest_server(server: ModelServer, host: str, port: int) -> tuple[RestServer, int]:
    """Starts the REST listener; returns it and the port it bound (port 0 picks one)."""
    handler = type("Handler", (_Handler,), {"api": RestApi(server)})
    httpd = _HTTPServer((host, port), handler)
    return RestServer(httpd), httpd.server_address[1]
