"""`keras-hps bench`: a load generator in the spirit of Triton's perf_analyzer.

    keras-hps bench --protocol grpc --target localhost:8500 --model dlrm \\
        --batch-sizes 32,4096 --concurrency 1,4 --duration 10
    keras-hps bench --protocol inprocess --model-base-path repo/dlrm/1 --hps-config repo/hps.json
    keras-hps bench --protocol grpc --ensemble dlrm_lookup,dlrm_dense ...

Inputs are synthesized from the model's signature (integer keys uniform in [0, key_range),
floats standard normal; unknown dimensions other than the batch are 1). Each client sends
requests back to back for `duration` seconds; the report gives requests/s, rows/s and the
p50/p90/p99 latency of one request (for an ensemble: both hops).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from keras_hps.errors import UsageError

Call = Callable[[], Any]


@dataclass
class BenchResult:
    """One (protocol, batch size, concurrency) measurement."""

    protocol: str
    model: str
    batch_size: int
    concurrency: int
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    @property
    def requests_per_s(self) -> float:
        """Completed requests per second."""
        return self.requests / self.seconds

    @property
    def rows_per_s(self) -> float:
        """Samples (rows) per second."""
        return self.requests * self.batch_size / self.seconds

    def line(self) -> str:
        """One human-readable report line."""
        return (
            f"{self.protocol:10s} {self.model:22s} batch {self.batch_size:6d} conc "
            f"{self.concurrency:2d}: {self.requests_per_s:9.1f} req/s {self.rows_per_s:12,.0f} "
            f"rows/s  p50 {self.p50_ms:8.3f} ms  p90 {self.p90_ms:8.3f} ms  "
            f"p99 {self.p99_ms:8.3f} ms"
        )


def measure(
    make_call: Callable[[int], Call],
    protocol: str,
    model: str,
    batch_size: int,
    concurrency: int,
    duration: float,
    warmup: int = 3,
) -> BenchResult:
    """Runs `concurrency` clients, each calling its `make_call(i)()` back to back for
    `duration` seconds after `warmup` untimed calls; returns the latency/throughput summary."""
    calls = [make_call(i) for i in range(concurrency)]
    for call in calls:
        for _ in range(warmup):
            call()
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []
    start_line = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        call, lat = calls[i], latencies[i]
        start_line.wait()
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at[0]:
                    return
                call()
                lat.append(time.perf_counter() - t0)
        except BaseException as exc:  # reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    begin = time.perf_counter()
    stop_at[0] = begin + duration
    start_line.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begin
    if errors:
        raise errors[0]
    all_ms = np.concatenate([np.asarray(x) for x in latencies]) * 1e3
    if all_ms.size == 0:
        raise RuntimeError(f"no request finished within {duration} s")
    p50, p90, p99 = np.percentile(all_ms, [50, 90, 99])
    return BenchResult(
        protocol,
        model,
        batch_size,
        concurrency,
        int(all_ms.size),
        elapsed,
        float(p50),
        float(p90),
        float(p99),
        float(all_ms.mean()),
    )


# ---------------------------------------------------------------- inputs
def _shape(shape: tuple | None, batch: int) -> tuple[int, ...]:
    if shape is None:
        return (batch,)
    return tuple(batch if i == 0 else (1 if d is None else int(d)) for i, d in enumerate(shape))


def synthesize(
    specs: dict[str, tuple[np.dtype, tuple | None]], batch: int, key_range: int, seed: int
) -> dict[str, np.ndarray]:
    """Random inputs for a signature {name: (dtype, shape)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (dtype, shape) in sorted(specs.items()):
        dtype = np.dtype(dtype)
        dims = _shape(shape, batch)
        if dtype.kind in "iu":
            out[name] = rng.integers(0, key_range, size=dims).astype(dtype)
        elif dtype.kind == "f":
            out[name] = rng.normal(size=dims).astype(dtype)
        elif dtype.kind == "b":
            out[name] = rng.random(dims) < 0.5
        else:
            out[name] = np.array([b"x"] * int(np.prod(dims)), dtype=object).reshape(dims)
    return out


def grpc_signature(client: Any, model: str, signature: str) -> dict[str, tuple[np.dtype, tuple]]:
    """{input name: (dtype, shape)} of a served model's signature, from GetModelMetadata."""
    from .tensors import enum_to_numpy

    sig = client.metadata(model).signature_def[signature]
    return {
        name: (
            enum_to_numpy(info.dtype),
            None
            if info.tensor_shape.unknown_rank
            else tuple(None if d.size < 0 else d.size for d in info.tensor_shape.dim),
        )
        for name, info in sig.inputs.items()
    }


# ---------------------------------------------------------------- protocols
def grpc_calls(
    target: str, model: str, signature: str, batch: int, key_range: int, variants: int = 4
) -> Callable[[int], Call]:
    """Client factory: each client gets its own channel and pre-built requests."""
    from .client import GrpcClient

    probe = GrpcClient(target)
    specs = grpc_signature(probe, model, signature)
    probe.close()

    def make(i: int) -> Call:
        client = GrpcClient(target)
        requests = [
            client.predict_request(
                model, synthesize(specs, batch, key_range, 1000 * i + v), signature
            )
            for v in range(variants)
        ]
        state = [0]

        def call() -> Any:
            state[0] += 1
            return client.prediction.Predict(requests[state[0] % variants], timeout=120)

        return call

    return make


def rest_calls(
    target: str, model: str, signature: str, batch: int, key_range: int, variants: int = 4
) -> Callable[[int], Call]:
    """Client factory for REST (columnar format), one keep-alive connection per client."""
    from tensorflow.core.framework import types_pb2

    from .client import RestClient
    from .tensors import enum_to_numpy

    rest = RestClient(target)
    meta = rest.metadata(model)["metadata"]["signature_def"]["signature_def"][signature]
    specs = {
        name: (
            enum_to_numpy(types_pb2.DataType.Value(info["dtype"])),
            tuple(
                None if int(d["size"]) < 0 else int(d["size"])
                for d in info["tensor_shape"].get("dim", [])
            ),
        )
        for name, info in meta["inputs"].items()
    }

    def make(i: int) -> Call:
        client = RestClient(target)
        path = RestClient.model_path(model) + ":predict"
        bodies = [
            json.dumps(
                {
                    "signature_name": signature,
                    "inputs": {
                        k: v.tolist()
                        for k, v in synthesize(specs, batch, key_range, 1000 * i + v).items()
                    },
                }
            ).encode()
            for v in range(variants)
        ]
        state = [0]

        def call() -> Any:
            state[0] += 1
            status, body = client.request("POST", path, bodies[state[0] % variants])
            if status != 200:
                raise RuntimeError(f"REST predict answered {status}: {body[:300]!r}")
            return body

        return call

    return make


def ensemble_calls(
    target: str,
    lookup_model: str,
    dense_model: str,
    signature: str,
    batch: int,
    key_range: int,
    variants: int = 4,
) -> Callable[[int], Call]:
    """Client factory for the two-service ensemble: the lookup model's outputs (plus the
    original inputs the dense model takes) feed the dense model, each hop over gRPC."""
    from .client import GrpcClient
    from .tensors import to_proto

    probe = GrpcClient(target)
    lookup_specs = grpc_signature(probe, lookup_model, signature)
    dense_specs = grpc_signature(probe, dense_model, signature)
    probe.close()
    # inputs of the dense model that no lookup output provides come from the original request
    extra = {k: v for k, v in dense_specs.items() if k not in lookup_specs}

    def make(i: int) -> Call:
        client = GrpcClient(target)
        firsts, passthrough = [], []
        for v in range(variants):
            firsts.append(
                client.predict_request(
                    lookup_model,
                    synthesize(lookup_specs, batch, key_range, 1000 * i + v),
                    signature,
                )
            )
            passthrough.append(synthesize(extra, batch, key_range, 7 + 1000 * i + v))
        state = [0]

        def call() -> Any:
            state[0] += 1
            k = state[0] % variants
            first = client.prediction.Predict(firsts[k], timeout=120)
            second = client.predict_request(dense_model, {}, signature)
            for name, tensor in first.outputs.items():
                if name in dense_specs:
                    second.inputs[name].CopyFrom(tensor)
            for name, value in passthrough[k].items():
                if name not in second.inputs:
                    second.inputs[name].CopyFrom(to_proto(value, tensor_content=True))
            return client.prediction.Predict(second, timeout=120)

        return call

    return make


def inprocess_calls(
    version_dir: str,
    parameter_server: Any,
    signature: str,
    batch: int,
    key_range: int,
    variants: int = 4,
) -> tuple[Callable[[int], Call], Any]:
    """Client factory calling `Servable.run` in this process (the baseline without a server).
    Returns the factory and the servable (close it when done)."""
    from keras_hps.servable import load_servable

    servable = load_servable(version_dir, parameter_server=parameter_server)
    sig = servable.signatures[signature]
    specs = {k: (v.dtype, v.shape) for k, v in sig.inputs.items()}

    def make(i: int) -> Call:
        inputs = [synthesize(specs, batch, key_range, 1000 * i + v) for v in range(variants)]
        state = [0]

        def call() -> Any:
            state[0] += 1
            return servable.run(inputs[state[0] % variants], signature)

        return call

    return make, servable


# ---------------------------------------------------------------- command line
def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Load-generator options."""
    parser.add_argument("--protocol", choices=("grpc", "rest", "inprocess"), default="grpc",
                        help="how requests are sent; inprocess: Servable.run in this process "
                        "(the baseline without a server)")
    parser.add_argument(
        "--target",
        default="localhost:8500",
        help="host:port of the server (gRPC port, or REST port for rest)",
    )
    parser.add_argument("--model", default="dlrm", help="served model name")
    parser.add_argument(
        "--ensemble",
        metavar="LOOKUP,DENSE",
        help="two models chained over gRPC: lookup outputs feed the dense model",
    )
    parser.add_argument("--signature", default="serving_default", help="signature to call")
    parser.add_argument("--model-base-path", help="version folder, for --protocol inprocess")
    parser.add_argument("--hps-config", help="hps.json, for --protocol inprocess")
    parser.add_argument("--batch-sizes", type=_ints, default=[32, 4096],
                        help="rows per request, comma-separated")
    parser.add_argument("--concurrency", type=_ints, default=[1],
                        help="clients sending at once, comma-separated")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument(
        "--key-range",
        type=int,
        default=1000,
        help="integer inputs are drawn uniformly from [0, key_range)",
    )
    parser.add_argument("--json", help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    """Measure every (batch size, concurrency) pair and print one line each."""
    if args.protocol == "inprocess" and not args.model_base_path:
        raise UsageError("--protocol inprocess needs --model-base-path")
    if args.ensemble and len(args.ensemble.split(",")) != 2:
        raise UsageError(f"--ensemble takes LOOKUP,DENSE (two model names), got {args.ensemble!r}")
    results = []
    servable = None
    ps = None
    if args.protocol == "inprocess" and args.hps_config:
        from keras_hps.parameter_server import ParameterServer

        ps = ParameterServer(args.hps_config)
    try:
        for batch in args.batch_sizes:
            if args.protocol == "inprocess":
                if servable is not None:
                    servable.close()
                make, servable = inprocess_calls(
                    args.model_base_path, ps, args.signature, batch, args.key_range
                )
                name = args.model_base_path
            elif args.ensemble:
                lookup, dense = args.ensemble.split(",")
                make = ensemble_calls(
                    args.target, lookup, dense, args.signature, batch, args.key_range
                )
                name = args.ensemble
            elif args.protocol == "rest":
                make = rest_calls(args.target, args.model, args.signature, batch, args.key_range)
                name = args.model
            else:
                make = grpc_calls(args.target, args.model, args.signature, batch, args.key_range)
                name = args.model
            protocol = "ensemble" if args.ensemble else args.protocol
            for conc in args.concurrency:
                result = measure(make, protocol, name, batch, conc, args.duration)
                print(result.line(), flush=True)
                results.append(result)
    finally:
        if servable is not None:
            servable.close()
        if ps is not None:
            ps.close()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([asdict(r) | {"rows_per_s": r.rows_per_s} for r in results], f, indent=2)
    return 0
