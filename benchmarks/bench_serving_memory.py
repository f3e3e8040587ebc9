"""Resident memory of `keras-hps serve` across a hot swap and an unload.

A model with two external tables (host RAM tier fully resident) is served by a
`keras-hps serve` subprocess; its resident set (VmRSS, and the peak VmHWM since the last
reset) is read from /proc while:

1. a dense-only retrain (version 2: same tables, new dense weights) replaces version 1:
   after the swap, memory should stay within 1.1x of before it (the tables are shared);
2. for contrast, a retrain with new tables (version 3) replaces version 2: both versions'
   tables are resident while the new one loads, and the old ones are freed after;
3. a second model is added with a config reload, then removed: after the unload, memory
   should be back within 10% of what it was before that model loaded.

Every number is printed beside its baseline from the same run, as markdown.

    python benchmarks/bench_serving_memory.py --rows 1000000 --dim 64
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scratch import scratch_dir  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def reset_peak(pid: int) -> None:
    """Resets VmHWM to the current resident set (Linux: write 5 to clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def build_model(rows: int, dim: int, tables: list[np.ndarray], dense_seed: int):
    import keras

    inputs, vectors = [], []
    for i in range(len(tables)):
        ids = keras.Input(shape=(1,), dtype="int64", name=f"c{i}")
        emb = keras.layers.Embedding(rows, dim, name=f"emb{i}")
        inputs.append(ids)
        vectors.append(keras.layers.Flatten()(emb(ids)))
    out = keras.layers.Dense(1, name="out")(keras.layers.Concatenate()(vectors))
    model = keras.Model(inputs, out)
    for i, table in enumerate(tables):
        model.get_layer(f"emb{i}").set_weights([table])
    rng = np.random.default_rng(dense_seed)
    model.get_layer("out").set_weights([rng.standard_normal((len(tables) * dim, 1)).astype(
        np.float32), rng.standard_normal(1).astype(np.float32)])
    return model


def export(repo: str, name: str, rows: int, dim: int, tables, dense_seed: int) -> float:
    """Exports a version; returns the seconds it took."""
    from keras_hps.export import export_for_serving

    start = time.perf_counter()
    model = build_model(rows, dim, tables, dense_seed)
    export_for_serving(model, repo, name, tables="external", warmup_records=1)
    return time.perf_counter() - start


def random_tables(rows: int, dim: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((rows, dim), dtype=np.float32) for _ in range(2)]


class Server:
    """`keras-hps serve` in a subprocess, with gRPC stubs."""

    def __init__(self, config: str) -> None:
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        from keras_hps.serving.cli import READY_LINE

        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keras_hps.cli", "serve", f"--port={self.port}",
             f"--model_config_file={config}", "--host=127.0.0.1",
             "--file_system_poll_wait_seconds=0.2", "--max_num_load_retries=0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if READY_LINE in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(600):
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(channel)

    def memory(self, settle: float = 1.0) -> tuple[float, float]:
        time.sleep(settle)
        return memory_mib(self.proc.pid)

    def status(self, name: str) -> dict[int, str]:
        import grpc
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        try:
            response = self.models.GetModelStatus(request, timeout=30)
        except grpc.RpcError:
            return {}
        return {s.version: get_model_status_pb2.ModelVersionStatus.State.Name(s.state)
                for s in response.model_version_status}

    def wait_status(self, name: str, want: dict[int, str], timeout: float = 900) -> float:
        start = time.monotonic()
        while {v: s for v, s in self.status(name).items() if v in want} != want:
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{name}: {self.status(name)} != {want}")
            time.sleep(0.05)
        return time.monotonic() - start

    def query(self, name: str, n: int, rows: int) -> tuple[int, np.ndarray]:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        rng = np.random.default_rng(n)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = name
        for i in range(2):
            request.inputs[f"c{i}"].CopyFrom(tf.make_tensor_proto(
                rng.integers(0, rows, (n, 1)).astype(np.int64)))
        response = self.predict.Predict(request, timeout=60)
        return response.model_spec.version.value, tf.make_ndarray(
            next(iter(response.outputs.values())))

    def reload(self, config_text: str) -> None:
        from google.protobuf import text_format
        from tensorflow_serving.apis import model_management_pb2

        request = model_management_pb2.ReloadConfigRequest()
        text_format.Parse(config_text, request.config)
        status = self.models.HandleReloadConfigRequest(request, timeout=900).status
        if status.error_code:
            raise RuntimeError(status.error_message)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def config_text(repo: str, names: list[str]) -> str:
    return "model_config_list {\n" + "".join(
        f"  config {{ name: '{n}' base_path: '{os.path.join(repo, n)}' "
        "model_platform: 'tensorflow' }\n" for n in names) + "}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per table")
    parser.add_argument("--dim", type=int, default=64, help="vector size")
    parser.add_argument("--workdir", help="where the repository goes (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    workdir = str(scratch_dir("keras-hps-memory-", keep=args.workdir))
    repo = os.path.join(workdir, "repo")
    table_mib = 2 * args.rows * args.dim * 4 / 2**20
    load_before = os.getloadavg()
    t1 = random_tables(args.rows, args.dim, 1)
    print(f"export dlrm v1 ({table_mib:,.0f} MiB of tables): "
          f"{export(repo, 'dlrm', args.rows, args.dim, t1, dense_seed=1):.1f} s", flush=True)
    print(f"export other v1: {export(repo, 'other', args.rows, args.dim, random_tables(args.rows, args.dim, 9), dense_seed=9):.1f} s", flush=True)  # noqa: E501
    config = os.path.join(repo, "serve.config")
    with open(config, "w") as f:
        f.write(config_text(repo, ["dlrm"]))
    server = Server(config)
    rows: list[tuple[str, str, str, str]] = []
    try:
        server.query("dlrm", 256, args.rows)
        rss_v1, _ = server.memory()
        print(f"serving v1: RSS {rss_v1:,.0f} MiB", flush=True)

        # 1. dense-only retrain: same tables, new dense weights
        reset_peak(server.proc.pid)
        secs = export(repo, "dlrm", args.rows, args.dim, t1, dense_seed=2)
        took = server.wait_status("dlrm", {1: "END", 2: "AVAILABLE"})
        version, _ = server.query("dlrm", 256, args.rows)
        assert version == 2
        rss_v2, peak_v2 = server.memory()
        print(f"dense-only swap (export {secs:.1f} s, swap {took:.1f} s): RSS {rss_v2:,.0f} "
              f"MiB, peak {peak_v2:,.0f} MiB", flush=True)
        rows.append(("hot swap to a dense-only retrain (v1 -> v2, tables shared)",
                     f"{rss_v1:,.0f}", f"{rss_v2:,.0f} (peak {peak_v2:,.0f})",
                     f"{rss_v2 / rss_v1:.3f}x (target <= 1.1x: "
                     f"{'met' if rss_v2 <= 1.1 * rss_v1 else 'NOT met'})"))

        # 2. for contrast: a retrain with new tables
        reset_peak(server.proc.pid)
        t3 = random_tables(args.rows, args.dim, 3)
        secs = export(repo, "dlrm", args.rows, args.dim, t3, dense_seed=3)
        del t3
        took = server.wait_status("dlrm", {2: "END", 3: "AVAILABLE"})
        rss_v3, peak_v3 = server.memory()
        print(f"new-tables swap (export {secs:.1f} s, swap {took:.1f} s): RSS {rss_v3:,.0f} "
              f"MiB, peak {peak_v3:,.0f} MiB", flush=True)
        rows.append(("hot swap to new tables (v2 -> v3; both loaded while v3 loads)",
                     f"{rss_v2:,.0f}", f"{rss_v3:,.0f} (peak {peak_v3:,.0f})",
                     f"{rss_v3 / rss_v2:.3f}x after, {peak_v3 / rss_v2:.2f}x at the peak"))

        # 3. load a second model, then unload it
        rss_before, _ = server.memory()
        server.reload(config_text(repo, ["dlrm", "other"]))
        server.query("other", 256, args.rows)
        rss_loaded, _ = server.memory()
        server.reload(config_text(repo, ["dlrm"]))
        rss_after, _ = server.memory(settle=2.0)
        print(f"other: before {rss_before:,.0f}, loaded {rss_loaded:,.0f}, unloaded "
              f"{rss_after:,.0f} MiB", flush=True)
        change = rss_after / rss_before - 1
        rows.append(("load a second model, then unload it", f"{rss_before:,.0f}",
                     f"{rss_after:,.0f} (loaded: {rss_loaded:,.0f})",
                     f"{change:+.1%} (target within 10%: "
                     f"{'met' if abs(change) <= 0.10 else 'NOT met'})"))
    finally:
        server.stop()
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    print()
    print(f"- Machine: {os.cpu_count()} CPU cores ({cpu}), "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
          f"{platform.system()} {platform.release()}, no GPU")
    print(f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; load average "
          f"{'/'.join(f'{x:.2f}' for x in load_before)} before, "
          f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())} after")
    print(f"- Command: `python benchmarks/bench_serving_memory.py --rows {args.rows} "
          f"--dim {args.dim}`")
    print(f"- Model: two external tables of {args.rows:,} rows x dim {args.dim} (fp32, "
          f"{table_mib:,.0f} MiB together; host RAM tier fully resident), one dense layer; "
          "`keras-hps serve` in a subprocess; resident memory (VmRSS; peak: VmHWM since the "
          "step began) of the server process")
    print()
    print("| step | before (MiB) | after (MiB) | after / before |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
