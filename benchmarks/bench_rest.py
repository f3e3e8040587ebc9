"""REST benchmark: REST against gRPC on the same server, same run; and large REST bodies.

1. Latency at batch 32: the 26-table DLRM of bench_serving.py (external tables) served by one
   `keras-hps serve` subprocess; gRPC (official stubs, request built once) and REST (columnar
   JSON body built once, one kept-alive connection) take turns request by request.
   Criterion: REST p50 <= gRPC p50 + 0.5 ms.
2. Memory of large REST bodies: peak RSS growth of an in-process server answering one predict
   with an 18 MB and a 72 MB body (row and columnar), parsed the way the frontend did before
   (json.loads of the whole body) and with the chunked parser (serving.lazy_json).

Writes its own section of docs/benchmarks/serving.md (between the bench_rest markers, added
at the end when missing):

    flock /tmp/keras-hps-cpu.lock .venv/bin/python benchmarks/bench_rest.py \\
        --out docs/benchmarks/serving.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_serving import build_repository, free_port, start_server  # noqa: E402
from scratch import scratch_dir  # noqa: E402

BEGIN, END = "<!-- bench_rest: begin -->", "<!-- bench_rest: end -->"
WIDE = 64


def interleaved(calls: dict, seconds: float) -> dict[str, np.ndarray]:
    """Latencies in ms of each protocol's call, the protocols taking turns request by request
    for `seconds` (so both see the same background load on a shared machine)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: np.asarray(t) * 1e3 for name, t in times.items()}


def latency(args: argparse.Namespace, workdir: str) -> list[dict[str, np.ndarray]]:
    """Per round, {'grpc': latencies ms, 'rest': latencies ms} at batch 32, same server."""
    from keras_hps.serving.bench import grpc_calls, rest_calls

    repo = os.path.join(workdir, "repo")
    shutil.rmtree(repo, ignore_errors=True)
    t = time.perf_counter()
    build_repository(repo, args.rows)
    print(f"built repository in {time.perf_counter() - t:.1f} s", flush=True)
    port, rest_port = free_port(), free_port()
    proc = start_server(repo, port, rest_port)
    rounds = []
    try:
        calls = {
            "grpc": grpc_calls(f"127.0.0.1:{port}", "dlrm", "serving_default", 32, args.rows)(0),
            "rest": rest_calls(f"127.0.0.1:{rest_port}", "dlrm", "serving_default", 32,
                               args.rows)(0),
        }
        interleaved(calls, 2.0)  # warm-up
        for _ in range(args.rounds):
            got = interleaved(calls, args.duration)
            print("  ".join(f"{k} p50 {np.percentile(v, 50):.3f} ms" for k, v in got.items()),
                  flush=True)
            rounds.append(got)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return rounds


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def memory_one(workdir: str, rows: int, fmt: str, parser: str) -> tuple[int, float, float]:
    """(body bytes, peak RSS growth / body, seconds) of one large predict, in this process."""
    import http.client

    import tensorflow as tf

    from keras_hps.serving import lazy_json
    from keras_hps.serving.model_config import single_model
    from keras_hps.serving.server import ModelServer, ServerOptions

    class Wide(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, WIDE], tf.float32, name="x")])
        def serve(self, x):
            return {"total": tf.reduce_sum(x, axis=1)}

    root = os.path.join(workdir, "wide")
    if not os.path.exists(os.path.join(root, "1")):
        module = Wide()
        tf.saved_model.save(module, os.path.join(root, "1"),
                            signatures={"serving_default": module.serve})
    options = ServerOptions(port=0, rest_api_port=free_port(), host="127.0.0.1",
                            file_system_poll_wait_seconds=0)
    server = ModelServer(single_model("wide", root), options).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=600)
        conn.request("POST", "/v1/models/wide:predict", json.dumps({"inputs": [[0.0] * WIDE]}))
        conn.getresponse().read()  # TensorFlow's first call
        x = np.random.default_rng(1).integers(0, 100, (rows, WIDE)) / 100  # values like 0.37
        body = json.dumps({fmt: x.tolist()}).encode()
        del x
        if parser == "json.loads":  # the whole body parsed at once, as before
            lazy_json.LAZY_ABOVE = 1 << 40
            lazy_json.orjson = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _vm("VmRSS")
        start = time.perf_counter()
        conn.request("POST", "/v1/models/wide:predict", body)
        response = conn.getresponse()
        response.read()
        seconds = time.perf_counter() - start
        assert response.status == 200
        return len(body), (_vm("VmHWM") - base) / len(body), seconds
    finally:
        server.stop(grace=5)


def memory(workdir: str) -> list[tuple[str, int, str, float, float]]:
    """(format, body bytes, parser, peak RSS growth / body, seconds) per large request, each
    in a fresh process (a heap that served a request before would lend it memory)."""
    import subprocess

    out = []
    for rows in (50_000, 200_000):
        for fmt in ("instances", "inputs"):
            for parser in ("json.loads", "chunked"):
                done = subprocess.run(
                    [sys.executable, __file__, "--memory-one", f"{rows},{fmt},{parser}",
                     "--workdir", workdir], capture_output=True, text=True, check=True)
                size, grew, seconds = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{fmt:9s} {size / 1e6:5.1f} MB {parser:10s} peak RSS growth "
                      f"{grew:.2f}x body, {seconds:.2f} s", flush=True)
                out.append((fmt, size, parser, grew, seconds))
    return out


def markdown(args: argparse.Namespace, rounds: list, mem: list, load: tuple) -> str:
    gaps = [float(np.percentile(r["rest"], 50) - np.percentile(r["grpc"], 50)) for r in rounds]
    gap = sorted(gaps)[len(gaps) // 2]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    lines = [
        BEGIN,
        "## REST against gRPC, and large REST bodies (benchmarks/bench_rest.py)",
        "",
        f"- Machine: {os.cpu_count()} CPU cores ({cpu}), no GPU, shared with other work "
        f"(load average {load[0][0]:.2f} before the run, {load[1][0]:.2f} after).",
        f"- Date: {now}.",
        "- Command: `flock /tmp/keras-hps-cpu.lock .venv/bin/python benchmarks/bench_rest.py "
        f"--rows {args.rows} --duration {args.duration} --rounds {args.rounds} "
        "--out docs/benchmarks/serving.md`",
        "- Server: one `keras-hps serve --enable_serialization_as_tensor_content` subprocess "
        "(default flags) serving the DLRM of section 1 (26 tables x "
        f"{args.rows:,} rows x dim 128, external placement), batch 32.",
        "- Clients, one process: gRPC with the official stubs (PredictRequest built once, "
        "tensor_content) and REST with `keras_hps.serving.client.RestClient` (columnar JSON "
        "body built once, one kept-alive `http.client` connection). The two take turns "
        f"request by request for {args.duration:g} s per round ({args.rounds} rounds, after "
        "2 s of warm-up), so both see the same background load.",
        "",
        "| protocol | p50 ms | p90 ms | p99 ms | requests |",
        "|---|---|---|---|---|",
    ]
    for name, key in (("gRPC", "grpc"), ("REST, kept-alive connection", "rest")):
        ms = np.concatenate([r[key] for r in rounds])
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        lines.append(f"| {name} | {p50:.3f} | {p90:.3f} | {p99:.3f} | {len(ms)} |")
    verdict = "met" if gap <= 0.5 else "NOT met"
    lines += [
        "",
        "REST p50 - gRPC p50 per round: "
        + ", ".join(f"{g:+.3f} ms" for g in gaps)
        + f"; median **{gap:+.3f} ms** (criterion: at most +0.5 ms) -> {verdict}.",
        "",
        "Large bodies: peak RSS growth of an in-process server (`ModelServer`, REST on "
        "loopback) over one predict of a model taking `x: float32 [?, 64]` and answering its "
        "row sums (values like `0.37`, so the answer is small), as a multiple of the body. "
        "`json.loads` is the whole body parsed at once with `json.loads`, as the frontend did "
        "before (`lazy_json.LAZY_ABOVE` set above the body size, orjson off); chunked is the "
        "default. Each request is the first large one of a fresh server process.",
        "",
        "| format | body MB | parser | peak RSS growth | seconds |",
        "|---|---|---|---|---|",
    ]
    for fmt, size, parser, grew, seconds in mem:
        lines.append(f"| `{fmt}` | {size / 1e6:.1f} | {parser} | {grew:.2f}x | {seconds:.2f} |")
    lines += [
        "",
        "The chunked parser keeps a body's arrays as text, finds their elements with a "
        "vectorised scan (6 bytes per comma or bracket: one byte per byte of body for numbers "
        "written like `0.37, `, two or three for one-digit numbers) and converts about 1 MiB "
        "at a time; the growth above includes the server's copy of the body (1x).",
        END,
    ]
    return "\n".join(lines) + "\n"


def write_section(path: str, text: str) -> None:
    """Replaces this script's section of `path` (or appends it)."""
    old = open(path).read() if os.path.exists(path) else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + text.rstrip("\n") + rest.split(END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    with open(path, "w") as f:
        f.write(new)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000, help="rows per table")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--out", help="markdown file to write this benchmark's section into")
    parser.add_argument("--workdir", help="keep the repositories here (default: a temp dir)")
    parser.add_argument("--memory-one", help=argparse.SUPPRESS)  # rows,format,parser
    args = parser.parse_args()
    workdir = str(scratch_dir("bench_rest_", keep=args.workdir))
    if args.memory_one:
        rows, fmt, which = args.memory_one.split(",")
        print(json.dumps(memory_one(workdir, int(rows), fmt, which)))
        return 0
    before = os.getloadavg()
    rounds = latency(args, workdir)
    mem = memory(workdir)
    load = (before, os.getloadavg())
    text = markdown(args, rounds, mem, load)
    print(text)
    if args.out:
        write_section(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
