"""The model server: a serving core with its gRPC and REST frontends, in one process.

`ModelServer(entries, ServerOptions(...)).start()` loads the models, then answers TF
Serving's gRPC API on `port` (and `grpc_socket_path`) and its REST API (plus Prometheus
metrics) on `rest_api_port`. `stop()` stops taking requests, lets in-flight ones finish,
then unloads every model. This module is the only one that knows both the core
(`core.ServingCore`) and the frontends (`grpc_service`, `rest`); they know only the core.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .core import ServerOptions, ServingCore, resolve_frontend_cpus

__all__ = ["ModelServer", "ServerOptions", "frontend_affinity", "resolve_frontend_cpus"]

log = logging.getLogger("keras_hps.serving")


@contextmanager
def frontend_affinity(cpus: tuple[int, ...] | None) -> Iterator[None]:
    """Threads started inside the block run only on `cpus` (None: no change).

    TensorFlow's thread pools are started first, outside the restriction, so the model's
    compute keeps every CPU while the request path's thread hand-offs stay on `cpus`
    (`ServingCore.run` lifts the restriction for a model call made while other requests are
    in flight). On small VMs, waking a thread on another, idle vCPU costs tens to hundreds of
    microseconds; keeping gRPC's I/O, poll and handler threads together avoids most of those
    wake-ups.
    """
    if not cpus:
        yield
        return
    allowed = os.sched_getaffinity(0)
    wanted = set(resolve_frontend_cpus(cpus) or ())
    import tensorflow as tf

    tf.config.list_logical_devices()  # starts TensorFlow's pools with the full CPU set
    os.sched_setaffinity(0, wanted)  # this thread only; threads started now inherit it
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


class ModelServer(ServingCore):
    """A serving core answered over gRPC and REST from one process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Takes `ServingCore`'s arguments (entries, options, parameter_server, loader)."""
        super().__init__(*args, **kwargs)
        self._grpc: Any = None
        self._rest: Any = None
        self.grpc_port: int | None = None
        self.rest_port: int | None = None
        self._stopped = threading.Event()  # set once everything is unloaded
        self._quit = threading.Event()  # set when stop() begins
        self._config_watch: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, wait_for_models: bool = True) -> ModelServer:
        """Loads the models (unless `wait_for_models` is False: then in the background) and
        starts the gRPC and REST listeners. Returns self."""
        self.open(wait_for_models)
        from .grpc_service import start_grpc_server

        # The listeners' threads (gRPC's I/O, poll and handler threads; the REST threads) are
        # created inside this block and keep its CPU affinity; TensorFlow's pools do not.
        with frontend_affinity(self.frontend_cpus):
            self._grpc, self.grpc_port = start_grpc_server(
                self, self.options.host, self.options.port
            )
            if self.grpc_port:
                log.info("Running gRPC ModelServer at %s:%d ...", self.options.host,
                         self.grpc_port)
            if self.options.grpc_socket_path:
                log.info("Running gRPC ModelServer at UNIX socket %s ...",
                         self.options.grpc_socket_path)
            if self.options.rest_api_port:
                from .rest import start_rest_server

                self._rest, self.rest_port = start_rest_server(
                    self, self.options.host, self.options.rest_api_port
                )
                log.info(
                    "Exporting HTTP/REST API at:%s:%d ...", self.options.host, self.rest_port
                )
        if self.options.model_config_file and self.options.model_config_file_poll_wait_seconds > 0:
            self._config_watch = threading.Thread(
                target=self._watch_config_file, name="keras-hps-config-poll", daemon=True
            )
            self._config_watch.start()
        return self

    def _watch_config_file(self) -> None:
        """Re-reads `model_config_file` every `model_config_file_poll_wait_seconds` and
        applies it (TF Serving's PollFilesystemAndReloadConfig); a bad file is logged and
        the config in use is kept."""
        from .model_config import load_model_config_file

        path = self.options.model_config_file
        while not self._quit.wait(self.options.model_config_file_poll_wait_seconds):
            try:
                entries = load_model_config_file(path)
            except Exception as exc:
                log.error("Failed to read ModelServerConfig file: %s", exc)
                continue
            try:
                self.manager.reload_config(entries)
            except Exception as exc:
                log.error("PollFilesystemAndReloadConfig failed to ReloadConfig: %s", exc)

    def stop(self, grace: float | None = None) -> None:
        """Stops accepting requests, waits (up to `grace` s) for in-flight ones, unloads."""
        grace = self.options.shutdown_grace_seconds if grace is None else grace
        if not self.begin_draining():
            return
        self._quit.set()
        grpc_done = self._grpc.stop(grace) if self._grpc is not None else None
        if self._rest is not None:
            self._rest.stop_accepting()
        deadline = time.monotonic() + grace
        self.wait_idle(deadline)
        if grpc_done is not None:
            grpc_done.wait(max(0.0, deadline - time.monotonic()))
        if self._rest is not None:
            self._rest.close()
        if self._config_watch is not None:
            self._config_watch.join(grace)
        self.close()
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the server has stopped; False on timeout."""
        return self._stopped.wait(timeout)
