"""`keras-hps serve`: a model server that takes tensorflow_model_server's command line.

    keras-hps serve --port=8500 --rest_api_port=8501 --model_config_file=repo/models.config
    keras-hps serve --model_name=dlrm --model_base_path=/models/dlrm

Every flag of TF Serving's `main.cc` is accepted with its name, type and default (`FLAGS`);
those that mean nothing here (TFLite, TPU, XLA, profiler, ALTS, ...) log a one-line warning
when given. Booleans take TF Serving's forms: `--flag`, `--flag=true`, `--flag=false`
(also 1/0). keras-hps's own flags follow them. SIGTERM or SIGINT stops the server
gracefully: no new requests, in-flight ones finish, then exit 0. A server that cannot start
prints `Failed to start server. Error: <CODE>: <message>` and exits 255, as TF Serving does.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, fields
from typing import Any

from .status import ServingError

READY_LINE = "keras-hps serve: ready"
log = logging.getLogger("keras_hps.serving")


def _schedulable_cpus() -> int:
    """TF Serving's port::NumSchedulableCPUs."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Flag:
    """One flag: TF Serving's name, type and default, and what it does in keras-hps
    ("ignored" flags are accepted and warned about)."""

    name: str
    type: str  # int32 | int64 | float | bool | string
    default: Any
    help: str
    ignored: bool = False


_CPUS = _schedulable_cpus()

# tensorflow_serving/model_servers/main.cc's flag list (defaults from server.h), in its order.
FLAGS: tuple[Flag, ...] = (
    Flag("port", "int32", 8500, "TCP port for the gRPC API (0: a free port, or none with "
         "--grpc_socket_path)"),
    Flag("grpc_socket_path", "string", "", "also serve gRPC on this Unix domain socket"),
    Flag("rest_api_port", "int32", 0, "port for the REST API and metrics (0: no REST); must "
         "differ from --port"),
    Flag("rest_api_num_threads", "int32", 4 * _CPUS, "REST requests handled at once"),
    Flag("rest_api_timeout_in_ms", "int32", 30000, "time limit of one REST request"),
    Flag("rest_api_enable_cors_support", "bool", False, "answer REST requests with CORS "
         "headers"),
    Flag("enable_batching", "bool", False, "merge concurrent Predict requests into batches"),
    Flag("allow_version_labels_for_unavailable_models", "bool", False,
         "a config change may point a new label at a version that is not AVAILABLE yet"),
    Flag("batching_parameters_file", "string", "", "BatchingParameters text proto (needs "
         "--enable_batching)"),
    Flag("enable_per_model_batching_parameters", "bool", False,
         "batching_params.pbtxt per SavedModel (not supported: the global parameters apply)",
         ignored=True),
    Flag("model_config_file", "string", "", "ModelServerConfig text proto listing the models "
         "(then --model_name and --model_base_path are ignored)"),
    Flag("model_config_file_poll_wait_seconds", "int32", 0, "re-read --model_config_file this "
         "often and apply changes (0: read once)"),
    Flag("model_name", "string", "default", "name of the one model of --model_base_path"),
    Flag("model_base_path", "string", "", "folder of the model's <version>/ folders"),
    Flag("num_load_threads", "int32", 0, "versions loading at once (0: one at a time)"),
    Flag("num_unload_threads", "int32", 0, "versions unloading at once (0: one at a time)"),
    Flag("max_num_load_retries", "int32", 5, "retries of a failed load (0: try once)"),
    Flag("load_retry_interval_micros", "int64", 60_000_000, "wait between load retries"),
    Flag("file_system_poll_wait_seconds", "float", 1, "seconds between looks for new versions "
         "(0: look once)"),
    Flag("flush_filesystem_caches", "bool", True, "TF Serving's file-system cache flush after "
         "loads (nothing to flush here)", ignored=True),
    Flag("tensorflow_session_parallelism", "int64", 0, "intra- and inter-op threads of the "
         "model's session (0: TensorFlow's choice)"),
    Flag("tensorflow_session_config_file", "string", "", "ConfigProto text proto for every "
         "version's session"),
    Flag("tensorflow_intra_op_parallelism", "int64", 0, "threads one TensorFlow op may use "
         "(0: TensorFlow's choice)"),
    Flag("tensorflow_inter_op_parallelism", "int64", 0, "TensorFlow ops run at once "
         "(0: TensorFlow's choice)"),
    Flag("use_alts_credentials", "bool", False, "Google ALTS credentials (not available)",
         ignored=True),
    Flag("ssl_config_file", "string", "", "SSLConfig text proto: serve gRPC over TLS"),
    Flag("platform_config_file", "string", "", "PlatformConfigMap (only the TensorFlow "
         "platform is served)", ignored=True),
    Flag("per_process_gpu_memory_fraction", "float", 0.0, "GPU memory fraction of the "
         "model's TensorFlow session"),
    Flag("saved_model_tags", "string", "serve", "comma-separated tags of the MetaGraph to load"),
    Flag("grpc_channel_arguments", "string", "", "gRPC server arguments, e.g. "
         "grpc.max_connection_age_ms=2000,grpc.keepalive_time_ms=10000"),
    Flag("grpc_max_threads", "int32", 4 * _CPUS, "threads handling gRPC requests"),
    Flag("enable_model_warmup", "bool", True, "replay assets.extra/tf_serving_warmup_requests "
         "before a version serves"),
    Flag("num_request_iterations_for_warmup", "int32", 0, "times each warmup record runs "
         "(used if > 0; else once)"),
    Flag("version", "bool", False, "print the version and exit"),
    Flag("monitoring_config_file", "string", "", "MonitoringConfig text proto: turns the "
         "Prometheus endpoint on (prometheus_config { enable: true }) and sets its path on "
         "the REST port"),
    Flag("remove_unused_fields_from_bundle_metagraph", "bool", True, "TF Serving's MetaGraph "
         "trimming", ignored=True),
    Flag("prefer_tflite_model", "bool", False, "TFLite models (not served)", ignored=True),
    Flag("num_tflite_pools", "int32", _CPUS, "TFLite interpreter pools", ignored=True),
    Flag("num_tflite_interpreters_per_pool", "int32", 1, "TFLite interpreters", ignored=True),
    Flag("enable_signature_method_name_check", "bool", False, "Classify/Regress require the "
         "signature's method_name (off: its inputs and outputs decide, for TF2 models)"),
    Flag("xla_cpu_compilation_enabled", "bool", False, "XLA:CPU JIT", ignored=True),
    Flag("xla_gpu_compilation_enabled", "bool", False, "XLA:GPU JIT", ignored=True),
    Flag("enable_profiler", "bool", True, "TensorFlow profiler service", ignored=True),
    Flag("thread_pool_factory_config_file", "string", "", "ThreadPoolConfig", ignored=True),
    Flag("mixed_precision", "string", "", "mixed-precision mode", ignored=True),
    Flag("skip_initialize_tpu", "bool", False, "TPU initialisation", ignored=True),
    Flag("enable_grpc_healthcheck_service", "bool", False, "serve grpc.health.v1.Health"),
    Flag("enable_serialization_as_tensor_content", "bool", False, "answer Predict tensors as "
         "tensor_content bytes"),
)

# keras-hps's own flags.
OWN_FLAGS: tuple[Flag, ...] = (
    Flag("host", "string", "0.0.0.0", "address the listeners bind (TF Serving: all)"),
    Flag("rest_api_max_body_bytes", "int64", 256 * 2**20, "largest REST request body; larger "
         "ones are refused with 400 before they are read"),
    Flag("rest_api_max_connections", "int32", 0, "open REST connections at most (503 above "
         "it); 0: min(1024, half the open-file limit)"),
    Flag("hps_config", "string", "", "one parameter-server config (hps.json) for every "
         "external-placement version, instead of the one each version pins"),
    Flag("shutdown_grace_seconds", "float", 30.0, "on SIGTERM, how long requests already "
         "received may take to finish before the server stops anyway"),
)


# keras-hps's flags of other forms than FLAGS' (help texts; defaults in add_arguments)
_HELP = {
    "frontend_cpus": "CPUs for the gRPC/REST request threads: auto (one CPU when the process "
    "has two or more), all (no restriction), or a list like 0,1; the model's compute keeps "
    "every CPU",
    "spin_wait_ms": "keep the request threads' CPUs busy (SCHED_IDLE spin) while requests run "
    "and this long after the last one ends, so that the next request finds them awake",
    "verbose": "log loads and unloads",
}
_OTHER_DEFAULTS = {"frontend_cpus": "auto", "spin_wait_ms": "0 (off)", "verbose": "off"}


def _shown_default(flag: Flag) -> str:
    """A flag's default as docs show it (CPU-dependent ones by their rule)."""
    if flag.name in ("rest_api_num_threads", "grpc_max_threads"):
        return "4 x CPUs"
    if flag.name == "num_tflite_pools":
        return "CPUs"
    if flag.default == "":
        return ""
    if isinstance(flag.default, bool):
        return str(flag.default).lower()
    if isinstance(flag.default, int) and flag.default >= 100_000:
        return f"{flag.default:,}"
    return str(flag.default)


def flags_markdown() -> str:
    """The flag table of docs/deployment.md: every flag, its default, what it does here."""
    lines = ["| flag | default | here |", "|---|---|---|"]
    for flag in FLAGS + OWN_FLAGS:
        what = ("accepted, warns, no effect: " + flag.help) if flag.ignored else flag.help
        mark = " (keras-hps)" if flag in OWN_FLAGS else ""
        lines.append(f"| `--{flag.name}`{mark} | {_shown_default(flag)} | {what} |")
    for name, text in _HELP.items():
        lines.append(f"| `--{name}` (keras-hps) | {_OTHER_DEFAULTS[name]} | {text} |")
    return "\n".join(lines)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _cpus(text: str) -> tuple[int, ...] | str | None:
    if text.strip().lower() in ("auto", "all"):
        return "auto" if text.strip().lower() == "auto" else None
    try:
        cpus = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        cpus = ()
    if not cpus or min(cpus) < 0:
        raise argparse.ArgumentTypeError(
            f"expected auto, all, or CPU numbers like 0 or 0,1, got {text!r}"
        )
    return cpus


_TYPES = {"int32": int, "int64": int, "float": float, "string": str}


def _add(parser: argparse.ArgumentParser, flag: Flag) -> None:
    names = [f"--{flag.name}"]  # the other spelling (hyphens) is keras_hps.cli's to map
    shown = "" if flag.default == "" else f" (default {flag.default})"
    help_text = flag.help + ("; accepted and ignored here" if flag.ignored else "") + shown
    # ignored flags default to None, so that giving one (any value) is noticed
    default = None if flag.ignored else flag.default
    if flag.type == "bool":
        parser.add_argument(*names, dest=flag.name, type=_bool, nargs="?", const=True,
                            default=default, metavar="true|false", help=help_text)
    else:
        parser.add_argument(*names, dest=flag.name, type=_TYPES[flag.type], default=default,
                            help=help_text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """tensorflow_model_server's flags, then keras-hps's (`--flag=value` and `--flag value`)."""
    for flag in FLAGS + OWN_FLAGS:
        _add(parser, flag)
    parser.add_argument("--frontend_cpus", dest="frontend_cpus", type=_cpus,
                        default="auto", help=_HELP["frontend_cpus"] + " (default auto)")
    parser.add_argument("--spin_wait_ms", dest="spin_wait_ms", type=float,
                        default=0.0, help=_HELP["spin_wait_ms"] + " (default 0: off)")
    parser.add_argument("--verbose", action="store_true", help=_HELP["verbose"])


def version_text() -> str:
    """What `--version` prints (TF Serving's two lines)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("keras-hps")
    except PackageNotFoundError:
        ours = "unknown"
    try:
        tf_version = version("tensorflow")
    except PackageNotFoundError:
        tf_version = "not installed"
    return f"TensorFlow ModelServer: keras-hps-{ours}\nTensorFlow Library: {tf_version}"


def build_options(args: argparse.Namespace) -> Any:
    """`ServerOptions` from parsed flags (every flag named like a field sets it)."""
    from .batching import load_batching_parameters
    from .core import ServerOptions

    if args.batching_parameters_file and not args.enable_batching:
        raise ServingError(
            "INVALID_ARGUMENT",
            "server_options.batching_parameters_file is set without setting "
            "server_options.enable_batching to true.",
        )
    values = {f.name: getattr(args, f.name) for f in fields(ServerOptions) if hasattr(args, f.name)}
    values["hps_config"] = args.hps_config or None
    values["monitoring_config_file"] = args.monitoring_config_file or None
    values["model_config_file"] = args.model_config_file or ""
    if args.enable_batching:
        values["batching"] = load_batching_parameters(args.batching_parameters_file or None)
    return ServerOptions(**values)


def model_entries(args: argparse.Namespace) -> list[Any]:
    """The models to serve: --model_config_file, else --model_name / --model_base_path."""
    from .model_config import load_model_config_file, single_model

    if args.model_config_file:
        return load_model_config_file(args.model_config_file)
    if args.model_base_path:
        return single_model(args.model_name, args.model_base_path)
    raise ServingError(
        "INVALID_ARGUMENT",
        "Both server_options.model_base_path and server_options.model_config_file are empty!",
    )


def _warn_ignored(args: argparse.Namespace) -> None:
    for flag in FLAGS:
        if flag.ignored and getattr(args, flag.name) is not None:
            log.warning("--%s has no effect in keras-hps serve (%s); ignored", flag.name,
                        flag.help)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code."""
    if args.version:
        print(version_text(), flush=True)
        return 0
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _warn_ignored(args)
    if args.rest_api_port and args.rest_api_port == args.port:
        log.error(
            "server_options.http_port cannot be same as grpc_port. Please use a different "
            "port for HTTP/REST API. Skipped exporting HTTP/REST API."
        )
        args.rest_api_port = 0
    try:
        from .server import ModelServer

        entries = model_entries(args)
        server = ModelServer(entries, build_options(args))
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        server.start()
    except Exception as exc:
        print(f"Failed to start server. Error: {_status_text(exc)}", file=sys.stderr,
              flush=True)
        return 255
    for entry in entries:
        for s in server.manager.status(entry.name) if _has_versions(server, entry.name) else []:
            err = f" ({s.error.code}: {s.error.message})" if s.error else ""
            print(f"model {entry.name} version {s.version}: {s.state.name}{err}", flush=True)
    if server.grpc_port:
        print(f"Running gRPC ModelServer at {args.host}:{server.grpc_port} ...", flush=True)
    if args.grpc_socket_path:
        print(f"Running gRPC ModelServer at UNIX socket {args.grpc_socket_path} ...", flush=True)
    if server.rest_port:
        print(f"Exporting HTTP/REST API at:{args.host}:{server.rest_port} ...", flush=True)
    print(READY_LINE, flush=True)
    while not stop.wait(0.5):
        pass
    print("keras-hps serve: stopping (finishing in-flight requests)", flush=True)
    server.stop()
    print("keras-hps serve: stopped", flush=True)
    return 0


def _status_text(exc: BaseException) -> str:
    """`CODE: message` of a start failure, as TF Serving prints a Status (the details of a
    bad models.config go to the log first, as protobuf's parser logs them there)."""
    from .model_config import ModelConfigError
    from .status import from_exception

    if isinstance(exc, ModelConfigError):
        log.error("%s", exc)
        return exc.status
    err = from_exception(exc)
    return f"{err.code}: {err.message}"


def _has_versions(server: object, name: str) -> bool:
    try:
        server.manager.status(name)  # type: ignore[attr-defined]
        return True
    except Exception:
        return False
