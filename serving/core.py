"""The serving core: models, versions, their tables, and answering requests.

`ServingCore` is what TF Serving calls the server core: the model manager (versions,
polling, switchover), the parameter servers the loaded versions read their tables from,
server-side batching, request accounting (in-flight count for draining, metrics) and the
protocol-independent answers (Predict's run, Classify, Regress, MultiInference). It knows
no frontend: the gRPC service (`grpc_service`) and the REST API (`rest`) take a core and
call it, and `server.ModelServer` puts them together.
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

from . import api, inference
from .batching import Batcher, BatchingOptions
from .manager import Handle, ModelManager
from .metrics import Metrics
from .model_config import ModelEntry
from .spin_wait import SpinWait
from .status import ServingError, from_exception
from .tables import ParameterServers, free_memory

log = logging.getLogger("keras_hps.serving")

_CPUS = os.cpu_count() or 1


@dataclass
class ServerOptions:
    """The server's settings, named and defaulted after tensorflow_model_server's flags
    (`Server::Options` of TF Serving's server.h), plus keras-hps's own."""

    # gRPC
    port: int = 8500  # 0: pick a free port (none when grpc_socket_path is given)
    grpc_socket_path: str = ""  # also listen on this Unix domain socket
    grpc_channel_arguments: str = ""  # "key=value,key=value" for the gRPC server
    grpc_max_threads: int = 4 * _CPUS
    enable_grpc_healthcheck_service: bool = False
    ssl_config_file: str = ""  # SSLConfig text proto: TLS for gRPC
    host: str = "0.0.0.0"  # keras-hps: the address the listeners bind
    # REST (read by the REST frontend)
    rest_api_port: int = 0  # 0: no REST
    rest_api_num_threads: int = 4 * _CPUS
    rest_api_timeout_in_ms: int = 30_000
    rest_api_enable_cors_support: bool = False
    rest_api_max_body_bytes: int = 256 * 2**20  # keras-hps: larger request bodies are refused
    rest_api_max_connections: int = 0  # keras-hps: 0 = min(1024, half the open-file limit)
    monitoring_config_file: str | None = None  # MonitoringConfig text proto (metrics path)
    # models
    model_config_file: str = ""  # what model_config_file_poll_wait_seconds re-reads
    model_config_file_poll_wait_seconds: int = 0  # 0: read once
    file_system_poll_wait_seconds: float = 1.0  # 0: look for versions once
    allow_version_labels_for_unavailable_models: bool = False
    num_load_threads: int = 0  # versions loading at once; 0: one at a time
    num_unload_threads: int = 0  # versions unloading at once; 0: one at a time
    max_num_load_retries: int = 5
    load_retry_interval_micros: int = 60_000_000
    enable_model_warmup: bool = True
    num_request_iterations_for_warmup: int = 0  # used only if > 0 (else once)
    saved_model_tags: str = "serve"
    enable_signature_method_name_check: bool = False
    # batching
    enable_batching: bool = False
    batching: BatchingOptions | None = None
    # TensorFlow
    tensorflow_session_parallelism: int = 0  # 0: TensorFlow's choice
    tensorflow_intra_op_parallelism: int = 0
    tensorflow_inter_op_parallelism: int = 0
    tensorflow_session_config_file: str = ""  # ConfigProto text proto for every session
    per_process_gpu_memory_fraction: float = 0.0
    enable_serialization_as_tensor_content: bool = False
    # keras-hps
    hps_config: str | None = None  # one parameter-server config for every external version
    shutdown_grace_seconds: float = 30.0  # how long a drain waits for requests received
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


def thread_counts(options: ServerOptions) -> tuple[int, int]:
    """(intra-op, inter-op) threads from the three TensorFlow parallelism flags, by TF
    Serving's rule (0: TensorFlow's choice)."""
    intra, inter = options.tensorflow_intra_op_parallelism, options.tensorflow_inter_op_parallelism
    session = options.tensorflow_session_parallelism
    if min(intra, inter, session) < 0:
        raise ConfigError("TensorFlow thread counts must be >= 0 (0: TensorFlow's choice)")
    if intra > 0 and inter > 0 and session > 0:
        raise ConfigError(
            "Either configure server_options.tensorflow_session_parallelism or "
            "(server_options.tensorflow_intra_op_parallelism, "
            "server_options.tensorflow_inter_op_parallelism) separately. You cannot "
            "configure all."
        )
    if intra > 0 or inter > 0:
        return intra, inter
    return session, session


def configure_tensorflow_threads(intra_op: int, inter_op: int) -> None:
    """TensorFlow's process-wide thread pools (0 keeps TensorFlow's choice). Must run before
    TensorFlow starts them."""
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


def session_config(options: ServerOptions) -> Any:
    """The `ConfigProto` every version's session runs with: `--tensorflow_session_config_file`
    with the thread and GPU-memory flags applied over it."""
    from google.protobuf import text_format
    from tensorflow.core.protobuf import config_pb2

    config = config_pb2.ConfigProto()
    if options.tensorflow_session_config_file:
        path = options.tensorflow_session_config_file
        try:
            with open(path, encoding="utf-8") as f:
                text_format.Parse(f.read(), config)
        except (OSError, text_format.ParseError) as exc:
            raise ConfigError(f"Invalid protobuf file: '{path}' ({exc})") from None
    intra, inter = thread_counts(options)
    if intra or inter or not options.tensorflow_session_config_file:
        config.intra_op_parallelism_threads = intra
        config.inter_op_parallelism_threads = inter
    if options.per_process_gpu_memory_fraction:
        config.gpu_options.per_process_gpu_memory_fraction = options.per_process_gpu_memory_fraction
    config.allow_soft_placement = True  # a graph pinned to /gpu:0 still runs on a CPU host
    return config


class ServingCore:
    """Models, their versions and tables, and the answers to requests, for any frontend."""

    def __init__(
        self,
        entries: list[ModelEntry],
        options: ServerOptions | None = None,
        parameter_server: Any = None,
        loader: Callable[[str], Any] | None = None,
    ) -> None:
        self.options = options or ServerOptions()
        self.parameter_server = parameter_server  # one for every external version, if given
        self.parameter_servers = ParameterServers()
        self._fixed_tables = None
        if self.options.hps_config:
            from keras_hps.servable import config_tables

            self._fixed_tables = config_tables(self.options.hps_config)
        self._session_config: Any = None
        self._tags = tuple(t for t in self.options.saved_model_tags.split(",") if t) or ("serve",)
        self.manager = ModelManager(
            entries,
            self._warmed(loader or self._load_version),
            self.options.file_system_poll_wait_seconds,
            load_threads=self.options.num_load_threads,
            unload_threads=self.options.num_unload_threads,
            load_retries=self.options.max_num_load_retries,
            retry_interval_s=self.options.load_retry_interval_micros / 1e6,
            labels_for_unavailable=self.options.allow_version_labels_for_unavailable_models,
        )
        self.metrics = Metrics(self._table_stats)
        self.batcher: Batcher | None = None
        if self.options.enable_batching:
            self.batcher = Batcher(self.options.batching or BatchingOptions())
        self._compute_cpus: set[int] | None = None  # all CPUs, when frontend_cpus is set
        self.frontend_cpus: tuple[int, ...] | None = None  # resolved by open()
        self._spin: SpinWait | None = None
        self._inflight = 0  # requests being handled (what run() counts as concurrency)
        self._writing = 0  # REST answers being written (draining waits for them too)
        self._draining = False
        self._cond = threading.Condition()
        self._warned_shared: set[str] = set()

    # ------------------------------------------------------------------ versions
    def _load_version(self, path: str) -> Any:
        """Loads a version directory: a plain SavedModel as is; an external version with the
        parameter server of its own tables (shared with versions whose tables are equal)."""
        from keras_hps.servable import load_servable, version_tables

        if self._session_config is None:
            self._session_config = session_config(self.options)
        kwargs = {"tags": self._tags, "session_config": self._session_config}
        tables = version_tables(path)
        if tables is None:
            return load_servable(path, on_close=free_memory, **kwargs)
        if self.parameter_server is not None:
            return load_servable(path, self.parameter_server, on_close=free_memory, **kwargs)
        if self._fixed_tables is not None:
            tables = self._fixed_tables
        elif tables.shared and tables.path not in self._warned_shared:
            self._warned_shared.add(tables.path)
            log.warning(
                "%s was exported before versions pinned their tables: it reads the tables "
                "that %s names now; export it again to pin them", path, tables.path
            )
        lease = self.parameter_servers.acquire(tables)

        def release() -> None:  # the version's session, then (if last) its tables
            lease.release()
            free_memory()

        try:
            return load_servable(path, lease.parameter_server, on_close=release, **kwargs)
        except BaseException:
            release()
            raise

    def _warmed(self, loader: Callable[[str], Any]) -> Callable[[str], Any]:
        """`loader` followed by the version's warmup replay: a version is AVAILABLE only
        after its warmup records ran, and a failing record fails its load."""

        def load(path: str) -> Any:
            servable = loader(path)
            if self.options.enable_model_warmup:
                from .warmup import replay_warmup

                try:
                    replay_warmup(
                        servable,
                        path,
                        self.options.num_request_iterations_for_warmup,
                        self.options.enable_signature_method_name_check,
                    )
                except BaseException:
                    close = getattr(servable, "close", None)
                    if close is not None:
                        close()
                    raise
            return servable

        return load

    def _table_stats(self) -> Iterator[tuple[str, int, dict[str, Any]]]:
        ps = self.parameter_server
        if ps is None:
            return self.parameter_servers.table_stats()
        return (
            (m.model, t, ps.stats(m.model, t))
            for m in ps.config.models
            for t in range(len(m.sparse_files))
        )

    # ------------------------------------------------------------------ lifecycle
    def open(self, wait_for_models: bool = True) -> None:
        """Loads the models (in the background unless `wait_for_models`) and keeps polling
        for versions."""
        self.frontend_cpus = resolve_frontend_cpus(self.options.frontend_cpus)
        # the spinner keeps the request threads' CPUs awake; with no frontend set nothing
        # spins (spinning on every CPU slowed the model call in measurements). It starts
        # blocked, before the listeners, so that it sees every request.
        self._spin = SpinWait(self.frontend_cpus or (), self.options.spin_wait_ms / 1e3).start()
        configure_tensorflow_threads(*thread_counts(self.options))
        if self.frontend_cpus:
            self._compute_cpus = os.sched_getaffinity(0)
        self.manager.start(wait_for_initial_load=wait_for_models)

    def begin_draining(self) -> bool:
        """Refuses new requests from now on; False if draining had begun already."""
        with self._cond:
            if self._draining:
                return False
            self._draining = True
            return True

    def wait_idle(self, deadline: float) -> None:
        """Waits (until `deadline`, time.monotonic()) for requests in flight to finish."""
        with self._cond:
            while self._inflight + self._writing > 0 and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Stops batching and polling and unloads every version (and their tables)."""
        if self.batcher is not None:
            self.batcher.close()
        if self._spin is not None:
            self._spin.close()
        self.manager.close()

    @property
    def draining(self) -> bool:
        """True once draining has begun."""
        return self._draining

    # ------------------------------------------------------------------ requests
    @contextmanager
    def in_flight(self) -> Iterator[None]:
        """Holds off draining until the block ends (a REST handler wraps its response write).

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
    def request(
        self, model: str, api_name: str, entrypoint: str, admitted: bool = False
    ) -> Iterator[dict]:
        """Accounts one request: in-flight count (for draining) and metrics.

        Once draining has begun a request is refused (UNAVAILABLE), unless `admitted`: the
        frontend took it before it stopped taking requests, and it must be answered (the
        gRPC server stops taking calls itself, and a call it took may wait for a free
        handler thread until after draining began).

        The body sets `info["code"]` if it ends with an error status that it answers itself.
        """
        with self._cond:
            if self._draining and not admitted:
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
                model or "", api_name, entrypoint, info["code"], time.perf_counter() - start
            )
            with self._cond:
                self._inflight -= 1
                if self._inflight + self._writing == 0:
                    self._cond.notify_all()

    @contextmanager
    def _compute_affinity(self) -> Iterator[None]:
        """With `frontend_cpus`, a request thread that calls the model while other requests
        are in flight gets every CPU of the process for the call (and is restricted again
        afterwards), so concurrent calls spread over the cores. A lone request keeps its
        thread where it is: the model's pools use every CPU either way, and moving the thread
        off and back cost more than it gained (benchmarks/serving.md)."""
        if self._compute_cpus is None or self._inflight <= 1:
            yield
            return
        mine = os.sched_getaffinity(0)
        if mine == self._compute_cpus:
            yield
            return
        os.sched_setaffinity(0, self._compute_cpus)
        try:
            yield
        finally:
            os.sched_setaffinity(0, mine)

    def run(
        self,
        handle: Handle,
        signature_name: str,
        inputs: dict[str, np.ndarray],
        output_keys: list[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Runs a signature of a held version, through the batcher when batching is on."""
        with self._compute_affinity():
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

    def _infer(self, spec: Any, answer: Callable[..., Any], request: Any) -> Any:
        name, version, label = api.model_target(spec)
        with self.manager.acquire(name, version, label) as handle, self._compute_affinity():
            return answer(handle.servable, request, handle.version,
                          self.options.enable_signature_method_name_check)

    def classify(self, request: Any) -> Any:
        """ClassificationResponse of a ClassificationRequest (TF Serving's Classify)."""
        return self._infer(api.request_spec(request), inference.classify, request)

    def regress(self, request: Any) -> Any:
        """RegressionResponse of a RegressionRequest (TF Serving's Regress)."""
        return self._infer(api.request_spec(request), inference.regress, request)

    def multi_inference(self, request: Any) -> Any:
        """MultiInferenceResponse of a MultiInferenceRequest (TF Serving's MultiInference):
        the model is the one the first task names."""
        from tensorflow_serving.apis import model_pb2

        spec = request.tasks[0].model_spec if request.tasks else model_pb2.ModelSpec()
        return self._infer(spec, inference.multi_inference, request)
