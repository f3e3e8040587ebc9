"""The seed benchmark: a DLRM served with native embeddings, with keras-hps lookups, and as an
ensemble (lookup service + dense service), batch 32 to 131,072.

`gpu` (Keras 3, torch backend, one CUDA device): the JoC DLRM (bottom MLP 512-256-128, dot
interaction, top MLP 1024-1024-512-256-1) over 26 tables of dim 128 at the Criteo-1TB
frequency-threshold-15 cardinalities, fp32. Deployments:

- ``native``: 26 ``keras.layers.Embedding`` tables in GPU memory (the baseline);
- ``hps_static``: 26 ``keras_hps.LookupLayer``s over static GPU tables (whole table on the
  device; keys 0..n-1, so served by a plain gather where the library supports it);
- ``hps_fused``: one ``keras_hps.FusedLookupLayer`` over the same static tables;
- ``hps_dynamic``: ``LookupLayer``s over dynamic GPU caches warmed to all hits;
- ``ensemble``: the lookups and the dense part as two calls, the vectors handed over through
  host memory between them (two services), as the seed's third column did.

Each deployment runs ``eager`` (a plain model call) and ``graph`` (the call captured once in a
CUDA graph and replayed) where it can. Streams: ``repeat`` (the same batch again and again,
the seed's all-hits case) and ``zipf`` (fresh Zipf(alpha) batches against a dynamic cache of
``--zipf-cache`` of each table's rows over a host RAM tier holding the whole table; the hit
rate is reported beside the latency). Before timing, the keras-hps models' outputs are
compared with the native model's bit for bit on the repeated batch.

    source benchmarks/device_env.sh          # on the GPU machine, carry=[".whl"] for Keras
    python3 benchmarks/bench_dlrm.py gpu --json $OUT/dlrm.json
    python3 benchmarks/bench_dlrm.py plot docs/benchmarks/raw/<run>/dlrm.json --out docs/benchmarks/

``--scale 0.001 --batches 32,256`` runs the whole script at toy size (also on the CPU).
Prints Markdown tables; ``--json PATH`` writes every number (rows appended as they come).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

CRITEO = [7912889, 33823, 17139, 7339, 20046, 4, 7105, 1382, 63, 5554114, 582469, 245828, 11,
          2209, 10667, 104, 4, 968, 15, 8165896, 2675940, 7156453, 302516, 12022, 97, 35]
BATCHES = [32, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
NUM_DENSE = 13
MODEL = "dlrm"
DYNAMIC = "dlrm_dynamic"


# ---------------------------------------------------------------------------------- the model
def dense_part(num_tables: int, dim: int) -> Any:
    """The DLRM after the lookups: inputs ``dense`` [B, 13] and ``vec_i`` [B, dim]; output the
    click probability [B, 1]."""
    import keras

    class DotInteraction(keras.layers.Layer):
        """Pairwise dot products of the bottom-MLP output and the embedding vectors (the
        strictly lower triangle), concatenated after the bottom-MLP output."""

        def build(self, shapes: Any) -> None:
            n = len(shapes)
            pairs = np.array([i * n + j for i in range(n) for j in range(i)], np.int32)
            # a device-resident index: no host-to-device copy per call (CUDA-graph safe)
            self.pairs = self.add_weight(shape=pairs.shape, dtype="int32", trainable=False,
                                         initializer=keras.initializers.Constant(pairs),
                                         name="pairs")
            self.n = n

        def call(self, inputs: list[Any]) -> Any:
            ops = keras.ops
            z = ops.stack(inputs, axis=1)
            zz = ops.matmul(z, ops.transpose(z, (0, 2, 1)))
            flat = ops.reshape(zz, (-1, self.n * self.n))
            return ops.concatenate([inputs[0], ops.take(flat, self.pairs, axis=1)], axis=1)

    layers = keras.layers
    dense_in = keras.Input((NUM_DENSE,), name="numerical")
    vec_in = [keras.Input((dim,), name=f"vec_{i}") for i in range(num_tables)]
    x = dense_in
    for width in (512, 256, dim):
        x = layers.Dense(width, activation="relu")(x)
    x = DotInteraction()([x, *vec_in])
    for width in (1024, 1024, 512, 256):
        x = layers.Dense(width, activation="relu")(x)
    out = layers.Dense(1, activation="sigmoid")(x)
    return keras.Model([dense_in, *vec_in], out, name="dlrm_dense")


def lookup_model(lookups: Callable[[list[Any]], list[Any]], num_tables: int) -> Any:
    """``cat`` [B, 26] int64 -> the 26 vectors, each table's ids sliced from the one input."""
    import keras

    cat = keras.Input((num_tables,), dtype="int64", name="cat")
    return keras.Model(cat, lookups([cat[:, i] for i in range(num_tables)]), name="lookups")


def full_model(lookups: Callable[[list[Any]], list[Any]], dense: Any, num_tables: int) -> Any:
    """The whole DLRM: ``dense`` [B, 13] and ``cat`` [B, 26] -> [B, 1]."""
    import keras

    dense_in = keras.Input((NUM_DENSE,), name="numerical")
    cat = keras.Input((num_tables,), dtype="int64", name="cat")
    vectors = lookups([cat[:, i] for i in range(num_tables)])
    return keras.Model([dense_in, cat], dense([dense_in, *vectors]))


def per_table(layers: list[Any]) -> Callable[[list[Any]], list[Any]]:
    return lambda ids: [layer(x) for layer, x in zip(layers, ids, strict=True)]


# ---------------------------------------------------------------------------------- tables
def cardinalities(scale: float) -> list[int]:
    return [max(1, math.ceil(c * scale)) if c > 1000 else c for c in CRITEO]


def make_tables(rows: list[int], dim: int, dev: Any, seed: int = 0) -> list[Any]:
    """Random N(0, 1) float32 tables on ``dev`` (generated there: 17 GB in seconds)."""
    import torch

    gen = torch.Generator(device=dev).manual_seed(seed)
    return [torch.randn(n, dim, generator=gen, device=dev) for n in rows]


def write_tables(folder: Path, tables: list[Any]) -> list[str]:
    """Each table as an HPS directory (``key`` = 0..n-1, ``emb_vector``); returns the paths."""
    from tqdm import tqdm

    from keras_hps import formats

    paths = []
    for i, t in enumerate(tqdm(tables, desc="writing tables", unit="table")):
        path = folder / f"table_{i}"
        formats.write_hps_table(path, np.arange(t.shape[0], dtype=np.int64), t.cpu().numpy())
        paths.append(str(path))
    return paths


def ps_config(paths: list[str], dim: int, max_batch: int, *,
              extra_models: tuple[dict[str, Any], ...] = (), volatile_db: Any = None,
              **model: Any) -> dict[str, Any]:
    """An hps.json serving the 26 tables as model ``dlrm`` (settings ``model``), and as one more
    model per ``extra_models`` entry (its settings over ``model``'s)."""
    n = len(paths)
    base = {
        "model": MODEL,
        "sparse_files": paths,
        "embedding_table_names": [f"t{i}" for i in range(n)],
        "embedding_vecsize_per_table": [dim] * n,
        "maxnum_catfeature_query_per_table_per_sample": [1] * n,
        "default_value_for_each_table": [0.0] * n,
        "deployed_device_list": [0],
        "max_batch_size": max_batch,
        **model,
    }
    config: dict[str, Any] = {"supportlonglong": True,
                              "models": [base, *({**base, **m} for m in extra_models)]}
    if volatile_db is not None:
        config["volatile_db"] = volatile_db
    return config


# ---------------------------------------------------------------------------------- keys
class ZipfKeys:
    """Fresh Zipf(alpha) ids per table, hot ranks scattered over the rows (a fixed random
    permutation per table), drawn on the device by inverse CDF."""

    def __init__(self, rows: list[int], alpha: float, dev: Any, seed: int = 1) -> None:
        import torch

        self.gen = torch.Generator(device=dev).manual_seed(seed)
        self.dev = dev
        self.cdfs, self.perms = [], []
        for n in rows:
            p = torch.arange(1, n + 1, device=dev, dtype=torch.float64).pow(-alpha)
            self.cdfs.append(torch.cumsum(p / p.sum(), 0))
            self.perms.append(torch.randperm(n, device=dev, generator=self.gen))

    def batch(self, size: int) -> Any:
        import torch

        cols = []
        for cdf, perm in zip(self.cdfs, self.perms, strict=True):
            u = torch.rand(size, device=self.dev, generator=self.gen, dtype=torch.float64)
            rank = torch.searchsorted(cdf, u).clamp_(max=cdf.numel() - 1)
            cols.append(perm[rank])
        return torch.stack(cols, 1)


def uniform_keys(rows: list[int], size: int, dev: Any, gen: Any) -> Any:
    import torch

    return torch.stack(
        [torch.randint(0, n, (size,), device=dev, generator=gen) for n in rows], 1)


# ---------------------------------------------------------------------------------- timing
class Runner:
    """One deployment in one execution mode: ``step()`` runs a batch already placed in the
    runner's inputs and returns the output tensor."""

    def __init__(self, name: str, mode: str, call: Callable[[Any, Any], Any], dev: Any) -> None:
        self.name, self.mode, self.call, self.dev = name, mode, call, dev
        self.graph = None
        self.inputs: tuple[Any, Any] | None = None
        self.output = None

    def prepare(self, dense: Any, cat: Any) -> None:
        import torch

        if self.mode == "eager":
            self.inputs = (dense, cat)
            return
        self.inputs = (dense.clone(), cat.clone())
        side = torch.cuda.Stream(self.dev)
        side.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.call(*self.inputs)
        torch.cuda.current_stream(self.dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = self.call(*self.inputs)
        torch.cuda.synchronize(self.dev)

    def step(self) -> Any:
        if self.graph is not None:
            self.graph.replay()
            return self.output
        return self.call(*self.inputs)

    def release(self) -> None:
        self.graph = self.output = self.inputs = None


def sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_interleaved(runners: list[Runner], reps: int, feed: Callable[[], None] | None = None
                     ) -> dict[str, list[float]]:
    """Seconds per step of each runner, rounds interleaved (A B C, A B C, ...) so drift hits
    all alike; ``feed`` (fresh keys) runs before each round, outside the timed region."""
    times: dict[str, list[float]] = {r.name + "/" + r.mode: [] for r in runners}
    for _ in range(reps):
        if feed is not None:
            feed()
        for r in runners:
            sync(r.dev)
            start = time.perf_counter()
            r.step()
            sync(r.dev)
            times[r.name + "/" + r.mode].append(time.perf_counter() - start)
    return times


def reps_for(batch: int, base: int) -> int:
    return max(5, min(base, (base * 4096) // batch))


# ---------------------------------------------------------------------------------- gpu
def bench_gpu(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["KERAS_BACKEND"] = "torch"
    import keras
    import torch

    import keras_hps
    torch.set_grad_enabled(False)  # inference: no autograd records (as predict does)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = cardinalities(args.scale)
    batches = [int(b) for b in args.batches.split(",")]
    max_batch = max(batches)
    dim, n = args.dim, len(rows)
    out: dict[str, Any] = {
        "machine": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv), "torch": torch.__version__, "keras": keras.__version__,
        "rows": rows, "dim": dim, "results": [],
    }
    log_path = args.json

    def log(**row: Any) -> None:
        out["results"].append(row)
        print(json.dumps(row), flush=True)
        if log_path:
            Path(log_path).write_text(json.dumps(out, indent=1))

    print(f"DLRM on {out['machine']}: {sum(rows):,} rows x {dim} "
          f"({sum(rows) * dim * 4 / 2**30:.1f} GiB per copy of the tables)", flush=True)
    tables = make_tables(rows, dim, dev)
    workdir = Path(tempfile.mkdtemp(prefix="dlrm_", dir=args.workdir))
    paths = write_tables(workdir, tables)

    dense = dense_part(n, dim)
    embeddings = []
    for i, t in enumerate(tables):
        emb = keras.layers.Embedding(t.shape[0], dim, name=f"emb_{i}")
        emb.build((None,))
        emb.embeddings.assign(t)
        embeddings.append(emb)
    del tables
    native = full_model(per_table(embeddings), dense, n)

    models: dict[str, Any] = {"native": native}
    # One parameter server for the repeated stream: the same table files as two models,
    # "dlrm" on static GPU tables and "dlrm_dynamic" behind dynamic caches (a quarter of each
    # table's rows, so the repeated batch stays resident); no host RAM tier.
    ps = keras_hps.init(ps_config(
        paths, dim, max_batch, gpucache=True, embedding_cache_type="static",
        extra_models=[{"model": DYNAMIC, "embedding_cache_type": "dynamic",
                       "gpucacheper": 0.25, "hit_rate_threshold": 1.0}],
        volatile_db={"type": "disabled"}))
    static_layers = [keras_hps.LookupLayer(MODEL, i, dim) for i in range(n)]
    models["hps_static"] = full_model(per_table(static_layers), dense, n)
    if "hps_fused" in args.deployments:
        fused = keras_hps.FusedLookupLayer(MODEL, list(range(n)), dim)
        models["hps_fused"] = full_model(fused, dense, n)
    if "hps_dynamic" in args.deployments:
        dynamic_layers = [keras_hps.LookupLayer(DYNAMIC, i, dim) for i in range(n)]
        models["hps_dynamic"] = full_model(per_table(dynamic_layers), dense, n)
    if "ensemble" in args.deployments:
        lookups = lookup_model(per_table(static_layers), n)

        def ensemble(d: Any, c: Any) -> Any:
            vectors = [v.cpu() for v in lookups(c)]  # service 1 answers over the host
            return dense([d, *[v.to(dev) for v in vectors]])  # service 2 takes them in

        models["ensemble"] = ensemble

    gen = torch.Generator(device=dev).manual_seed(2)
    # ------------------------------------------------------------------ the repeated batch
    for batch in batches:
        cat = uniform_keys(rows, batch, dev, gen)
        dense_x = torch.randn(batch, NUM_DENSE, device=dev, generator=gen)
        want = native([dense_x, cat], training=False)
        for name, model in models.items():
            if name in ("native", "ensemble"):
                continue
            got = model([dense_x, cat], training=False)
            same = bool(torch.equal(got, want))
            log(stream="repeat", batch=batch, check=name, bit_identical=same,
                max_abs_diff=float((got - want).abs().max()))
        runners = []
        for name in ["native", *[d for d in args.deployments if d != "native"]]:
            if name not in models:
                continue
            model = models[name]
            for mode in args.modes.split(","):
                if mode == "graph" and dev.type != "cuda":
                    continue
                call = (model if name == "ensemble"
                        else (lambda d, c, m=model: m([d, c], training=False)))
                r = Runner(name, mode, call, dev)
                try:
                    r.prepare(dense_x, cat)
                except Exception as exc:  # a deployment that cannot be captured: say why
                    log(stream="repeat", batch=batch, deployment=name, mode=mode,
                        error=f"{type(exc).__name__}: {exc}"[:300])
                    r.release()
                    torch.cuda.synchronize() if dev.type == "cuda" else None
                    continue
                runners.append(r)
        times = time_interleaved(runners, reps_for(batch, args.reps))
        for key, ts in times.items():
            name, mode = key.split("/")
            ms = 1e3 * statistics.median(ts)
            log(stream="repeat", batch=batch, deployment=name, mode=mode, ms=ms,
                samples_per_s=batch / (ms / 1e3), reps=len(ts))
        for r in runners:
            r.release()
    ps.close()

    # ------------------------------------------------------------------ the Zipf stream
    if "zipf" in args.streams:
        ps = keras_hps.init(ps_config(
            paths, dim, max_batch, gpucache=True, embedding_cache_type="dynamic",
            gpucacheper=args.zipf_cache, hit_rate_threshold=1.0,
            volatile_db={"type": "parallel_hash_map", "initial_cache_rate": 1.0}))
        layers = [keras_hps.LookupLayer(MODEL, i, dim) for i in range(n)]
        hps_model = full_model(per_table(layers), dense, n)
        zipf = ZipfKeys(rows, args.alpha, dev)
        holder: dict[str, Any] = {}  # the current Zipf batch, replaced by feed()
        for batch in batches:
            dense_x = torch.randn(batch, NUM_DENSE, device=dev, generator=gen)

            def feed(batch: int = batch) -> None:
                holder["cat"] = zipf.batch(batch)

            feed()
            for _ in range(args.zipf_warm):  # let the caches fill before timing
                feed()
                hps_model([dense_x, holder["cat"]], training=False)
            before = [ps.stats(MODEL, t).get("gpu", {}) for t in range(n)]
            runners = [
                Runner("native", "eager", lambda d, _c: native([d, holder["cat"]],
                                                                training=False), dev),
                Runner("hps_dynamic", "eager", lambda d, _c: hps_model([d, holder["cat"]],
                                                                       training=False), dev),
            ]
            for r in runners:
                r.prepare(dense_x, None)
            times = time_interleaved(runners, reps_for(batch, args.reps), feed)
            after = [ps.stats(MODEL, t).get("gpu", {}) for t in range(n)]
            hits = sum(a.get("hits", 0) - b.get("hits", 0)
                       for a, b in zip(after, before, strict=True))
            misses = sum(a.get("misses", 0) - b.get("misses", 0)
                         for a, b in zip(after, before, strict=True))
            for key, ts in times.items():
                name, mode = key.split("/")
                ms = 1e3 * statistics.median(ts)
                row = dict(stream="zipf", batch=batch, deployment=name, mode=mode, ms=ms,
                           samples_per_s=batch / (ms / 1e3), reps=len(ts))
                if name != "native":
                    row["hit_rate"] = hits / max(1, hits + misses)
                log(**row)
        ps.close()
    summarize(out)
    return out


# ---------------------------------------------------------------------------------- output
def summarize(out: dict[str, Any]) -> None:
    """Markdown tables: ms per batch and ratio to native, per stream and mode."""
    rows = [r for r in out["results"] if "ms" in r]
    for stream in sorted({r["stream"] for r in rows}):
        for mode in ("eager", "graph"):
            sel = [r for r in rows if r["stream"] == stream and r["mode"] == mode]
            if not sel:
                continue
            deps = list(dict.fromkeys(r["deployment"] for r in sel))
            print(f"\n{out['machine']}, stream {stream}, {mode}: ms per batch (x native)")
            print("| batch | " + " | ".join(deps) + " |")
            print("| ---: |" + " ---: |" * len(deps))
            for batch in sorted({r["batch"] for r in sel}):
                cell = {r["deployment"]: r for r in sel if r["batch"] == batch}
                base = cell.get("native", {}).get("ms")
                parts = []
                for d in deps:
                    r = cell.get(d)
                    if r is None:
                        parts.append("n/a")
                    elif base and d != "native":
                        extra = f" ({r['ms'] / base:.2f}x)"
                        if "hit_rate" in r:
                            extra += f", hit {100 * r['hit_rate']:.1f}%"
                        parts.append(f"{r['ms']:.3f}{extra}")
                    else:
                        parts.append(f"{r['ms']:.3f}")
                print(f"| {batch:,} | " + " | ".join(parts) + " |")


def plot(args: argparse.Namespace) -> None:
    """Fig. 1 (latency) and Fig. 2 (throughput) as PNGs with a log y axis, as the seed's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(args.json).read_text())
    rows = [r for r in data["results"] if "ms" in r and r["stream"] == args.stream]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for metric, label, fname in (("ms", "latency per batch (ms)", "dlrm_latency.png"),
                                 ("samples_per_s", "throughput (K samples/s)",
                                  "dlrm_throughput.png")):
        fig, ax = plt.subplots(figsize=(9, 5))
        for dep, mode in dict.fromkeys((r["deployment"], r["mode"]) for r in rows):
            sel = sorted((r for r in rows if r["deployment"] == dep and r["mode"] == mode),
                         key=lambda r: r["batch"])
            ys = [r[metric] / (1e3 if metric == "samples_per_s" else 1) for r in sel]
            ax.plot([r["batch"] for r in sel], ys, marker="o", label=f"{dep} ({mode})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.set_title(f"DLRM, 26 tables x 128, fp32, stream '{args.stream}': {data['machine']}, "
                     f"{data['date']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(Path(args.out) / fname, dpi=110)
        print(Path(args.out) / fname)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gpu", help="torch backend on one CUDA device",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--scale", type=float, default=1.0,
                   help="scale the cardinalities above 1,000 rows (toy runs: 0.001)")
    g.add_argument("--dim", type=int, default=128)
    g.add_argument("--batches", default=",".join(map(str, BATCHES)))
    g.add_argument("--deployments", default="hps_static,hps_fused,hps_dynamic,ensemble")
    g.add_argument("--modes", default="eager,graph")
    g.add_argument("--streams", default="repeat,zipf")
    g.add_argument("--alpha", type=float, default=1.05)
    g.add_argument("--zipf-cache", type=float, default=0.1,
                   help="dynamic cache size as a share of each table's rows (Zipf stream)")
    g.add_argument("--zipf-warm", type=int, default=20, help="Zipf batches before timing")
    g.add_argument("--reps", type=int, default=30, help="timed steps at batch 4,096 "
                   "(more at smaller, fewer at larger batches; at least 5)")
    g.add_argument("--workdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                   help="where the table files are written")
    g.add_argument("--json", help="write every number here")
    p = sub.add_parser("plot", help="PNG plots of a --json result",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("json")
    p.add_argument("--stream", default="repeat")
    p.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args(argv)
    args.deployments = [d for d in args.deployments.split(",") if d] if args.what == "gpu" \
        else None
    if args.what == "gpu":
        bench_gpu(args)
    else:
        plot(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
