"""The HTTP/1.1 transport of the REST API: aiohttp's server on its own event-loop thread.

What TF Serving's `util/net_http` (libevent) does for `http_server.cc`, with limits it lacks:

- keep-alive connections, TCP_NODELAY, each response in one write;
- chunked and gzip-encoded request bodies (aiohttp decodes them as they arrive);
- a body limit: a Content-Length above it is refused before the body is read, and a chunked
  or decompressed body is counted as it arrives;
- one timeout (`--rest_api_timeout_in_ms`) for a connection that sends nothing, for reading a
  request's body, and for answering it;
- a cap on open connections;
- malformed requests (bad framing, `Content-Length: abc`) answered 400 with a JSON error and
  nothing logged;
- the handler runs in a pool of `--rest_api_num_threads` threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from .rest_json import error_body

_log = logging.getLogger("keras_hps.serving")
_quiet = logging.getLogger("keras_hps.serving.http")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False  # aiohttp logs client mistakes with tracebacks; answers say enough

JSON = "application/json"
_REFUSED_LINGER_S = 0.5  # how long a connection above the cap lingers after its 503


@dataclass(frozen=True)
class HttpLimits:
    """Transport limits, with the defaults of the REST flags that set them."""

    timeout_s: float = 30.0  # --rest_api_timeout_in_ms / 1000 (TF Serving's default)
    max_body_bytes: int = 256 << 20  # --rest_api_max_body_bytes (keras-hps's; TF Serving: none)
    max_connections: int = 1024  # rest_api_max_connections (keras-hps's)
    num_threads: int = 4  # --rest_api_num_threads (TF Serving's default: 4 x CPUs)


@dataclass
class Reply:
    """An HTTP response: status, body, headers (Content-Type among them), and whether to close
    the connection after it."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": JSON})
    close: bool = False


def json_reply(status: int, message: str, close: bool = False) -> Reply:
    """A `{"error": message}` reply."""
    return Reply(status, error_body(message), close=close)


@dataclass(frozen=True)
class Request:
    """One request as the handler sees it: method, raw path (with its query), headers, body."""

    method: str
    raw_path: str
    headers: Any
    body: bytes | bytearray


Handler = Callable[[Request], Reply]
# Runs on the event loop before the body is read; a reply it returns is sent at once.
Precheck = Callable[[str, str, Any], Reply | None]


class _BodyError(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


class _Protocol(RequestHandler):
    """aiohttp's connection handler, answering malformed requests with a JSON 400 (and no
    traceback in the log) and refusing connections above the cap."""

    _refused = False

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        manager = self._manager
        if isinstance(manager, _Server) and manager.open_connections > manager.max_connections:
            reply = json_reply(503, f"Too many open connections (at most "
                                    f"{manager.max_connections})", close=True)
            head = (
                f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {JSON}\r\n"
                f"Content-Length: {len(reply.body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            transport.write(head + reply.body)
            # what the client sends meanwhile is read and dropped: closing a socket with
            # unread data resets it, and the client could lose the answer
            self._refused = True
            self._loop.call_later(_REFUSED_LINGER_S, self.force_close)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        what = exc.message if isinstance(exc, HttpProcessingError) else (message or "")
        what = str(what).strip().split("\n", 1)[0].rstrip(":")  # one line
        text = f"Malformed HTTP request: {what}".strip() if status == 400 else (
            f"{status} {what}".strip())
        response = web.Response(status=status, body=error_body(text), content_type=JSON)
        response.force_close()
        return response


class _Server(web.Server):
    """aiohttp's low-level server with a connection count."""

    def __init__(self, handler: Any, max_connections: int, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections
        self.open_connections = 0

    def connection_made(self, handler: RequestHandler, transport: Any) -> None:
        self.open_connections += 1
        super().connection_made(handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self.open_connections -= 1
        super().connection_lost(handler, exc)

    def __call__(self) -> RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)


class HttpServer:
    """A running listener: `stop_accepting()` then `close()`."""

    def __init__(
        self,
        handler: Handler,
        limits: HttpLimits,
        precheck: Precheck | None = None,
        in_flight: Callable[[], AbstractContextManager] | None = None,
    ) -> None:
        self._handler = handler
        self._precheck = precheck
        self._in_flight = in_flight or contextlib.nullcontext
        self.limits = limits
        self._pool = ThreadPoolExecutor(limits.num_threads, thread_name_prefix="keras-hps-rest")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="keras-hps-rest-loop", daemon=True
        )
        self._listener: asyncio.AbstractServer | None = None
        self._server: _Server | None = None
        self._stopping = False
        self._closed = False

    def start(self, host: str, port: int) -> int:
        """Binds host:port (port 0 picks one) and serves; returns the bound port."""
        self._thread.start()
        try:
            return asyncio.run_coroutine_threadsafe(self._bind(host, port), self._loop).result()
        except BaseException:
            self.close()
            raise

    async def _bind(self, host: str, port: int) -> int:
        timeout = self.limits.timeout_s
        self._server = _Server(
            self._serve,
            max_connections=self.limits.max_connections,
            keepalive_timeout=timeout,  # also closes a new connection that sends nothing
            lingering_time=0,  # never read a body nobody asked for (oversize ones)
            logger=_quiet,
            access_log=None,
        )
        self._listener = await self._loop.create_server(
            self._server, host, port, reuse_address=True, backlog=1024
        )
        return self._listener.sockets[0].getsockname()[1]

    def stop_accepting(self) -> None:
        """Stops taking new connections; a request on an open one answers 503 and closes it."""
        if self._stopping or self._closed:
            return
        self._stopping = True

        async def stop() -> None:
            if self._listener is not None:
                self._listener.close()
            if self._server is not None:
                self._server.pre_shutdown()  # idle keep-alive connections close now

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)

    def close(self) -> None:
        """Closes every connection, stops the event loop and the handler threads."""
        if self._closed:
            return
        self._stopping = self._closed = True

        async def shutdown() -> None:
            if self._listener is not None:
                self._listener.close()
                await self._listener.wait_closed()
            if self._server is not None:
                await self._server.shutdown(timeout=1.0)

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=15)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=15)
        if not self._loop.is_running():
            self._loop.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ one request
    async def _serve(self, request: web.BaseRequest) -> web.StreamResponse:
        if self._stopping:
            return _response(json_reply(503, "The server is shutting down", close=True))
        with self._in_flight():  # stop() waits until requests already received are answered
            try:
                reply = await self._answer(request)
            except (ConnectionError, asyncio.CancelledError):
                raise  # the client went away
            except Exception as exc:  # a bug here must still answer, and keep serving
                _log.warning("REST request failed: %s: %s", type(exc).__name__, exc)
                reply = json_reply(500, f"{type(exc).__name__}: {exc}", close=True)
            response = _response(reply)
            await response.prepare(request)
            await response.write_eof()  # headers and body in one write
            return response

    async def _answer(self, request: web.BaseRequest) -> Reply:
        deadline = time.monotonic() + self.limits.timeout_s
        method, raw_path = request.method, request.raw_path
        if self._precheck is not None:
            early = self._precheck(method, raw_path, request.headers)
            if early is not None:
                return early
        try:
            body = await self._read_body(request, deadline)
        except _BodyError as exc:
            return exc.reply
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Reply] = loop.create_future()

        def finish(reply: Reply) -> None:  # on the event loop: the first answer wins
            if not done.done():
                done.set_result(reply)

        def work() -> None:  # in a REST thread
            try:
                reply = self._handler(Request(method, raw_path, request.headers, body))
            except BaseException as exc:  # the handler answers its own errors; a bug here
                reply = json_reply(500, f"{type(exc).__name__}: {exc}")
            loop.call_soon_threadsafe(finish, reply)

        try:
            self._pool.submit(work)
        except RuntimeError:  # closing: the pool takes no more work
            return json_reply(503, "The server is shutting down", close=True)
        late = json_reply(
            504,
            "Timed out waiting for notification: the request took longer than "
            f"--rest_api_timeout_in_ms={self.limits.timeout_s * 1000:.0f}",
        )
        timer = loop.call_later(max(0.0, deadline - time.monotonic()), finish, late)
        try:
            return await done
        finally:
            timer.cancel()

    async def _read_body(self, request: web.BaseRequest, deadline: float) -> bytes | bytearray:
        """The request body (decoded when gzip-encoded), refused when above the limit."""
        limit = self.limits.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise _BodyError(_too_large(length, limit))
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        encoded = bool(request.headers.get("Content-Encoding", "").strip(" ,").lower()
                       not in ("", "identity"))
        read = _read_exactly(request, length) if length is not None and not encoded else (
            _read_counted(request, limit))
        try:
            return await asyncio.wait_for(read, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise _BodyError(json_reply(
                408,
                "Timed out reading the request body: --rest_api_timeout_in_ms="
                f"{self.limits.timeout_s * 1000:.0f}",
                close=True,
            )) from None
        except (HttpProcessingError, RequestPayloadError) as exc:
            what = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
            what = str(what).strip().split("\n", 1)[0]
            raise _BodyError(json_reply(400, f"Malformed request body: {what}", close=True)) \
                from None


async def _read_exactly(request: web.BaseRequest, length: int) -> bytearray:
    body = bytearray(length)  # one buffer of the announced size, filled as data arrives
    view, got = memoryview(body), 0
    while got < length:
        chunk = await request.content.readany()
        if not chunk:
            raise _BodyError(json_reply(
                400, f"Malformed request body: {got} of {length} bytes", close=True))
        view[got:got + len(chunk)] = chunk
        got += len(chunk)
    return body


async def _read_counted(request: web.BaseRequest, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise _BodyError(_too_large(None, limit))
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(length: int | None, limit: int) -> Reply:
    what = f"of {length} bytes " if length is not None else ""
    return json_reply(
        400,
        f"Request body {what}exceeds the limit of {limit} bytes (--rest_api_max_body_bytes)",
        close=True,
    )


def _response(reply: Reply) -> web.Response:
    response = web.Response(status=reply.status, body=reply.body, headers=reply.headers)
    if reply.close:
        response.force_close()
    return response
