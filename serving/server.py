"""The model server: one process, one model manager, served over gRPC and REST.

`ModelServer(entries, ServerOptions(...)).start()` loads the models, then answers TF
Serving's gRPC API on `port` and its REST API (plus Prometheus metrics) on `rest_api_port`.
`stop()` stops taking requests, lets in-flight ones finish, then unloads every model.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from keras_hps.errors import ConfigError

from .batching import Batcher, BatchingOptions
from .manager import Handle, ModelManager
from .metrics import Metrics
from .model_config import ModelEntry
from .spin_wait import SpinWait
from .status import ServingError, from_exception

log = logging.getLogger("keras_hps.serving")


@dataclass
class ServerOptions:
    """Ports and switches, named after tensorflow_model_server's flags."""

    port: int = 8500
    rest_api_port: int = 8501
    host: str = "0.0.0.0"
    file_system_poll_wait_seconds: float = 1.0
    enable_batching: bool = False
    batching: BatchingOptions | None = None
    enable_serialization_as_tensor_content: bool = False
    grpc_max_threads: int = 4 * (os.cpu_count() or 1)
    shutdown_grace_seconds: float = 30.0
    enable_model_warmup: bool = True
    num_request_iterations_for_warmup: int = 1
    tensorflow_intra_op_parallelism: int = 0  # 0: TensorFlow's choice
    tensorflow_inter_op_parallelism: int = 0
    # "auto": one CPU when the process may use two or more; None: request threads run anywhere
    frontend_cpus: tuple[int, ...] | str | None = "auto"
    spin_wait_ms: float = 0.0  # spin on the frontend CPUs this long after a request; 0: off


def resolve_frontend_cpus(value: tuple[int, ...] | str | None) -> tuple[int, ...] | None:
    """The CPUs for the request threads: `value`, or for "auto" the lowest CPU this process
    may use when it may use two or more (None: no restriction)."""
    if isinstance(value, str) and value != "auto":
        raise ConfigError(f"--frontend_cpus={value}: give auto, all, or CPU numbers like 0,1")
    if not value:
        return None
    if not hasattr(os, "sched_getaffinity"):
        if value == "auto":
            return None
        raise ConfigError("--frontend_cpus needs Linux (os.sched_setaffinity)")
    allowed = os.sched_getaffinity(0)
    if value == "auto":
        return (min(allowed),) if len(allowed) >= 2 else None
    wanted = tuple(sorted(set(value)))
    if not set(wanted) <= allowed:
        raise ConfigError(
            f"--frontend_cpus={','.join(map(str, wanted))}: this process may run only "
            f"on CPUs {','.join(map(str, sorted(allowed)))}"
        )
    return wanted


def configure_tensorflow_threads(intra_op: int, inter_op: int) -> None:
    """TF Serving's --tensorflow_intra_op_parallelism / --tensorflow_inter_op_parallelism
    (0 keeps TensorFlow's choice). Must run before TensorFlow starts its thread pools."""
    if intra_op < 0 or inter_op < 0:
        raise ConfigError("TensorFlow thread counts must be >= 0 (0: TensorFlow's choice)")
    if not intra_op and not inter_op:
        return
    import tensorflow as tf

    threading_config = tf.config.threading
    for flag, want, get, put in (
        ("--tensorflow_intra_op_parallelism", intra_op,
         threading_config.get_intra_op_parallelism_threads,
         threading_config.set_intra_op_parallelism_threads),
        ("--tensorflow_inter_op_parallelism", inter_op,
         threading_config.get_inter_op_parallelism_threads,
         threading_config.set_inter_op_parallelism_threads),
    ):
        if not want or get() == want:
            continue
        try:
            put(want)
        except RuntimeError as exc:
            raise ConfigError(
                f"{flag}={want}: TensorFlow's thread pools already started in this process "
                f"({exc})"
            ) from None


@contextmanager
def frontend_affinity(cpus: tuple[int, ...] | None) -> Iterator[None]:
    """Threads started inside the block run only on `cpus` (None: no change).

    TensorFlow's thread pools are started first, outside the restriction, so the model's
    compute keeps every CPU while the request path's thread hand-offs stay on `cpus`
    (`ModelServer.run` lifts the restriction for a model call made while other requests are
    in flight). On small
    VMs, waking a thread on another, idle vCPU costs tens to hundreds of microseconds; keeping
    gRPC's I/O, poll and handler threads together avoids most of those wake-ups.
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


def ps_table_stats(ps: Any) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(model, table id, ps.stats(model, table)) for every table of a parameter server."""
    config = getattr(ps, "config", None)
    for model in getattr(config, "models", ()):
        for table in range(len(model.sparse_files)):
            yield model.model, table, ps.stats(model.model, table)


class ModelServer:
    """Serves the models of `entries` over gRPC and REST from one process."""

    def __init__(
        self,
        entries: list[ModelEntry],
        options: ServerOptions | None = None,
        parameter_server: Any = None,
        loader: Callable[[str], Any] | None = None,
    ) -> None:
        self.options = options or ServerOptions()
        self.parameter_server = parameter_server
        if loader is None:
            from keras_hps.servable import load_servable, read_manifest

            external_lock = threading.Lock()

            def loader(path: str) -> Any:
                if self.parameter_server is None and read_manifest(path) is not None:
                    # external exports load one at a time: the first one initialises the
                    # process-wide parameter server, and two at once would replace each other
                    with external_lock:
                        return load_servable(path)
                return load_servable(path, parameter_server=self.parameter_server)

        self.manager = ModelManager(
            entries, self._warmed(loader), self.options.file_system_poll_wait_seconds
        )
        self.metrics = Metrics(self._table_stats)
        self.batcher: Batcher | None = None
        if self.options.enable_batching:
            self.batcher = Batcher(self.options.batching or BatchingOptions())
        self._grpc: Any = None
        self._rest: Any = None
        self.grpc_port: int | None = None
        self.rest_port: int | None = None
        self._compute_cpus: set[int] | None = None  # all CPUs, when frontend_cpus is set
        self.frontend_cpus: tuple[int, ...] | None = None  # resolved by start()
        self._spin: SpinWait | None = None
        self._inflight = 0  # requests being handled (what run() counts as concurrency)
        self._writing = 0  # REST answers being written (stop() waits for them too)
        self._draining = False
        self._cond = threading.Condition()
        self._stopped = threading.Event()

    def _warmed(self, loader: Callable[[str], Any]) -> Callable[[str], Any]:
        """`loader` followed by the version's warmup replay: a version is AVAILABLE only
        after its warmup records ran, and a failing record fails its load."""

        def load(path: str) -> Any:
            servable = loader(path)
            if self.options.enable_model_warmup:
                from .warmup import replay_warmup

                try:
                    replay_warmup(servable, path, self.options.num_request_iterations_for_warmup)
                except BaseException:
                    close = getattr(servable, "close", None)
                    if close is not None:
                        close()
                    raise
            return servable

        return load

    # ------------------------------------------------------------------ lifecycle
    def start(self, wait_for_models: bool = True) -> ModelServer:
        """Loads the models (unless `wait_for_models` is False: then in the background) and
        starts the gRPC and REST listeners. Returns self."""
        self.frontend_cpus = resolve_frontend_cpus(self.options.frontend_cpus)
        # the spinner keeps the request threads' CPUs awake; with no frontend set nothing
        # spins (spinning on every CPU slowed the model call in measurements). It starts
        # blocked, before the listeners, so that it sees every request.
        self._spin = SpinWait(self.frontend_cpus or (), self.options.spin_wait_ms / 1e3).start()
        configure_tensorflow_threads(
            self.options.tensorflow_intra_op_parallelism,
            self.options.tensorflow_inter_op_parallelism,
        )
        self.manager.start(wait_for_initial_load=wait_for_models)
        from .grpc_service import start_grpc_server

        # The listeners' threads (gRPC's I/O, poll and handler threads; the REST threads) are
        # created inside this block and keep its CPU affinity; TensorFlow's pools do not.
        if self.frontend_cpus:
            self._compute_cpus = os.sched_getaffinity(0)
        with frontend_affinity(self.frontend_cpus):
            self._grpc, self.grpc_port = start_grpc_server(
                self, self.options.host, self.options.port
            )
            log.info("Running gRPC ModelServer at %s:%d ...", self.options.host, self.grpc_port)
            if self.options.rest_api_port:
                from .rest import start_rest_server

                self._rest, self.rest_port = start_rest_server(
                    self, self.options.host, self.options.rest_api_port
                )
                log.info(
                    "Exporting HTTP/REST API at:%s:%d ...", self.options.host, self.rest_port
                )
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stops accepting requests, waits (up to `grace` s) for in-flight ones, unloads."""
        grace = self.options.shutdown_grace_seconds if grace is None else grace
        with self._cond:
            if self._draining:
                return
            self._draining = True
        grpc_done = self._grpc.stop(grace) if self._grpc is not None else None
        if self._rest is not None:
            self._rest.stop_accepting()
        deadline = time.monotonic() + grace
        with self._cond:
            while self._inflight + self._writing > 0 and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
        if grpc_done is not None:
            grpc_done.wait(max(0.0, deadline - time.monotonic()))
        if self._rest is not None:
            self._rest.close()
        if self.batcher is not None:
            self.batcher.close()
        if self._spin is not None:
            self._spin.close()
        self.manager.close()
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the server has stopped; False on timeout."""
        return self._stopped.wait(timeout)

    @property
    def draining(self) -> bool:
        """True once stop() has begun."""
        return self._draining

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        """Holds off stop() until the block ends (a REST handler wraps its response write).

        Counted apart from requests, so that a REST request is not taken for two concurrent
        ones by `run`."""
        with self._cond:
            self._writing += 1
        try:
            yield
        finally:
            with self._cond:
                self._writing -= 1
                if self._inflight + self._writing == 0:
                    self._cond.notify_all()

    @contextmanager
    def request(self, model: str, api: str, entrypoint: str) -> Iterator[dict]:
        """Accounts one request: in-flight count (for draining) and metrics.

        The body sets `info["code"]` if it ends with an error status that it answers itself.
        """
        with self._cond:
            if self._draining:
                raise ServingError("UNAVAILABLE", "The server is shutting down")
            self._inflight += 1
        spin = self._spin
        if spin is not None:
            spin.begin()
        info = {"code": "OK"}
        start = time.perf_counter()
        try:
            yield info
        except BaseException as exc:
            info["code"] = from_exception(exc).code
            raise
        finally:
            if spin is not None:
                spin.end()
            self.metrics.observe(
                model or "", api, entrypoint, info["code"], time.perf_counter() - start
            )
            with self._cond:
                self._inflight -= 1
                if self._inflight + self._writing == 0:
                    self._cond.notify_all()

    # ------------------------------------------------------------------ predict core
    def run(
        self,
        handle: Handle,
        signature_name: str,
        inputs: dict[str, np.ndarray],
        output_keys: list[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Runs a signature of a held version, through the batcher when batching is on.

        With `frontend_cpus`, a request thread that calls the model while other requests are
        in flight gets every CPU of the process for the call (and is restricted again
        afterwards), so concurrent calls spread over the cores. A lone request keeps its
        thread where it is: the model's pools use every CPU either way, and moving the thread
        off and back cost more than it gained (benchmarks/serving.md)."""
        if self._compute_cpus is None or self._inflight <= 1:
            return self._run(handle, signature_name, inputs, output_keys)
        mine = os.sched_getaffinity(0)
        if mine == self._compute_cpus:
            return self._run(handle, signature_name, inputs, output_keys)
        os.sched_setaffinity(0, self._compute_cpus)
        try:
            return self._run(handle, signature_name, inputs, output_keys)
        finally:
            os.sched_setaffinity(0, mine)

    def _run(
        self,
        handle: Handle,
        signature_name: str,
        inputs: dict[str, np.ndarray],
        output_keys: list[str] | None,
    ) -> dict[str, np.ndarray]:
        servable = handle.servable
        if self.batcher is None:
            return servable.run(inputs, signature_name, output_keys)
        arrays = servable.validate(inputs, signature_name)
        key = (
            handle.model,
            handle.version,
            id(servable),
            signature_name,
            tuple(output_keys) if output_keys is not None else None,
        )
        return self.batcher.run(
            key, lambda batch: servable.run(batch, signature_name, output_keys), arrays
        )

    def _table_stats(self) -> Iterator[tuple[str, int, dict[str, Any]]]:
        ps = self.parameter_server
        if ps is None:
            try:
                from keras_hps.parameter_server import get_parameter_server

                ps = get_parameter_server()
            except Exception:
                return iter(())
        return ps_table_stats(ps)
