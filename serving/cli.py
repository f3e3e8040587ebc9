"""`keras-hps serve`: a model server with tensorflow_model_server's flags.

    keras-hps serve --model_config_file=repo/models.config --port=8500 --rest_api_port=8501
    keras-hps serve --model_name=dlrm --model_base_path=repo/dlrm

SIGTERM or SIGINT stops it gracefully: no new requests, in-flight ones finish, then exit 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from keras_hps.errors import HPSError

READY_LINE = "keras-hps serve: ready"


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """TF Serving's flag names (both --flag=value and --flag value work)."""
    parser.add_argument("--port", type=int, default=8500, help="gRPC port (default 8500)")
    parser.add_argument(
        "--rest_api_port", type=int, default=8501, help="REST port (default 8501; 0 turns REST off)"
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default all)")
    parser.add_argument("--model_config_file", help="a models.config (ModelServerConfig text)")
    parser.add_argument(
        "--model_name",
        default="default",
        help="model name when serving one model (with --model_base_path)",
    )
    parser.add_argument("--model_base_path", help="folder holding the model's <version>/ dirs")
    parser.add_argument(
        "--file_system_poll_wait_seconds",
        type=float,
        default=1.0,
        help="seconds between polls for new versions (0: load once)",
    )
    parser.add_argument(
        "--enable_batching",
        type=_bool,
        nargs="?",
        const=True,
        default=False,
        help="merge concurrent requests into batches",
    )
    parser.add_argument(
        "--batching_parameters_file", help="BatchingParameters text proto (max_batch_size, ...)"
    )
    parser.add_argument(
        "--enable_serialization_as_tensor_content",
        type=_bool,
        nargs="?",
        const=True,
        default=False,
        help="answer gRPC tensors as tensor_content bytes (faster when large)",
    )
    parser.add_argument(
        "--hps_config",
        help="hps.json for external-placement models (default: the one each "
        "export's manifest names)",
    )
    parser.add_argument(
        "--enable_model_warmup",
        type=_bool,
        nargs="?",
        const=True,
        default=True,
        help="replay assets.extra/tf_serving_warmup_requests before a version serves",
    )
    parser.add_argument(
        "--num_request_iterations_for_warmup",
        type=int,
        default=1,
        help="times each warmup record is replayed (default 1)",
    )
    parser.add_argument(
        "--tensorflow_intra_op_parallelism",
        type=int,
        default=0,
        help="threads one TensorFlow op may use (0: TensorFlow's choice)",
    )
    parser.add_argument(
        "--tensorflow_inter_op_parallelism",
        type=int,
        default=0,
        help="TensorFlow ops run at once (0: TensorFlow's choice)",
    )
    parser.add_argument(
        "--frontend_cpus",
        type=_cpus,
        default="auto",
        help="CPUs for the gRPC/REST request threads: auto (default: one CPU when the "
        "process has two or more), all (no restriction), or a list like 0,1; the model's "
        "compute keeps every CPU",
    )
    parser.add_argument(
        "--spin_wait_ms",
        type=float,
        default=0.0,
        help="keep the request threads' CPUs busy (SCHED_IDLE spin) while requests run and "
        "this long after the last one ends, so that the next request finds them awake "
        "(default 0: off)",
    )
    parser.add_argument("--verbose", action="store_true", help="log loads and unloads")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.rest_api_port and args.rest_api_port == args.port:
        print("keras-hps serve: --rest_api_port must differ from --port", file=sys.stderr)
        return 2
    try:
        from .batching import load_batching_parameters
        from .model_config import load_model_config_file, single_model
        from .server import ModelServer, ServerOptions

        if args.model_config_file:
            entries = load_model_config_file(args.model_config_file)
        elif args.model_base_path:
            entries = single_model(args.model_name, args.model_base_path)
        else:
            print(
                "keras-hps serve: give --model_config_file, or --model_name and --model_base_path",
                file=sys.stderr,
            )
            return 2
        ps = None
        if args.hps_config:
            import keras_hps

            ps = keras_hps.init(args.hps_config)
        options = ServerOptions(
            port=args.port,
            rest_api_port=args.rest_api_port,
            host=args.host,
            file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
            enable_batching=bool(args.enable_batching),
            batching=load_batching_parameters(args.batching_parameters_file)
            if args.enable_batching
            else None,
            enable_serialization_as_tensor_content=bool(
                args.enable_serialization_as_tensor_content
            ),
            enable_model_warmup=bool(args.enable_model_warmup),
            num_request_iterations_for_warmup=args.num_request_iterations_for_warmup,
            tensorflow_intra_op_parallelism=args.tensorflow_intra_op_parallelism,
            tensorflow_inter_op_parallelism=args.tensorflow_inter_op_parallelism,
            frontend_cpus=args.frontend_cpus,
            spin_wait_ms=args.spin_wait_ms,
        )
        server = ModelServer(entries, options, parameter_server=ps)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        server.start()
    except (HPSError, OSError) as exc:
        print(f"keras-hps serve: {exc}", file=sys.stderr)
        return 1
    for entry in entries:
        for s in server.manager.status(entry.name) if _has_versions(server, entry.name) else []:
            err = f" ({s.error.code}: {s.error.message})" if s.error else ""
            print(f"model {entry.name} version {s.version}: {s.state.name}{err}", flush=True)
    print(f"Running gRPC ModelServer at {args.host}:{server.grpc_port} ...", flush=True)
    if server.rest_port:
        print(f"Exporting HTTP/REST API at:{args.host}:{server.rest_port} ...", flush=True)
    print(READY_LINE, flush=True)
    while not stop.wait(0.5):
        pass
    print("keras-hps serve: stopping (finishing in-flight requests)", flush=True)
    server.stop()
    print("keras-hps serve: stopped", flush=True)
    return 0


def _has_versions(server: object, name: str) -> bool:
    try:
        server.manager.status(name)  # type: ignore[attr-defined]
        return True
    except Exception:
        return False
