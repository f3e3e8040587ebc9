"""The seed benchmark: a DLRM served with native embeddings, with keras-hps lookups, and as an
ensemble (lookup service + dense service), batch 32 to 131,072.

`gpu` (Keras 3, torch backend, one CUDA device): the JoC DLRM (bottom MLP 512-256-128, dot
interaction, top MLP 1024-1024-512-256-1) over 26 tables of dim 128 at the Criteo-1TB
frequency-threshold-15 cardinalities, fp32. Deployments:

- ``native``: 26 ``keras.layers.Embedding`` tables in GPU memory (the baseline);
- ``hps_static``: 26 ``keras_hps.LookupLayer``s over static GPU tables (keys 0..n-1: identity
  tables, served by a plain gather);
- ``hps_fused``: one ``keras_hps.FusedLookupLayer`` over the same tables (one launch);
- ``hps_dynamic``: ``LookupLayer``s over dynamic GPU caches warmed to all hits (each table's
  cache sized to hold every distinct key of the largest batch: the tables are grouped into
  models by that size);
- ``hps_dynamic_fused``: one ``FusedLookupLayer`` per such model (one launch per model when
  captured; table by table when eager);
- ``ensemble``: the lookups (``hps_static``'s) and the dense part as two calls, the vectors
  [batch, 26, 128] handed over through host memory (two services), as the seed's third column.

Each deployment runs ``eager`` (a plain model call) and ``graph`` (``keras_hps.CapturedCall``:
the call captured once in a CUDA graph and replayed; the ensemble captures each service).
Streams: ``repeat`` (the same batch again and again, the seed's all-hits case; before timing,
every keras-hps deployment's output is compared with the native model's bit for bit, in both
modes) and ``zipf`` (fresh Zipf(alpha) batches against a dynamic cache of ``--zipf-cache`` of
each table's rows over a host RAM tier holding the whole table; hit rate beside the latency;
``--profile`` adds where the time goes). ``--budget-s`` skips what would not fit.

    source benchmarks/device_env.sh          # on the GPU machine (carry .whl for Keras)
    python3 benchmarks/bench_dlrm.py gpu --json $OUT/dlrm.json --budget-s 520 --profile
    python3 benchmarks/bench_dlrm.py plot docs/benchmarks/raw/<run>/dlrm.json --out docs/benchmarks/

`cpu` (TensorFlow backend, the keras-hps model server over gRPC): the same DLRM with capped
tables, exported embedded (native TF lookups), external (the keras-hps hierarchy) and as an
ensemble (a lookup-only export and a dense-only model, the vectors through the client); see
``cpu --help``.

``--scale 0.0005 --batches 32,256`` runs the GPU script at toy size (also on the CPU, under
``KERAS_HPS_GPU_TIER=interpret TRITON_INTERPRET=1``). Prints Markdown tables; ``--json PATH``
writes every number (rows appended as they come).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scratch import scratch_dir  # noqa: E402

CRITEO = [7912889, 33823, 17139, 7339, 20046, 4, 7105, 1382, 63, 5554114, 582469, 245828, 11,
          2209, 10667, 104, 4, 968, 15, 8165896, 2675940, 7156453, 302516, 12022, 97, 35]
BATCHES = [32, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
NUM_DENSE = 13
MODEL = "dlrm"
HPS = ("hps_static", "hps_fused", "hps_dynamic", "hps_dynamic_fused")


# ---------------------------------------------------------------------------------- the model
def dense_part(num_tables: int, dim: int) -> Any:
    """The DLRM after the lookups: inputs ``numerical`` [B, 13] and ``vec_i`` [B, dim]; output
    the click probability [B, 1]."""
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


Lookups = Callable[[list[Any]], list[Any]]


def lookup_model(lookups: Lookups, num_tables: int) -> Any:
    """``cat`` [B, 26] int64 -> the 26 vectors, each table's ids sliced from the one input."""
    import keras

    cat = keras.Input((num_tables,), dtype="int64", name="cat")
    return keras.Model(cat, lookups([cat[:, i] for i in range(num_tables)]), name="lookups")


def full_model(lookups: Lookups, dense: Any, num_tables: int) -> Any:
    """The whole DLRM: ``numerical`` [B, 13] and ``cat`` [B, 26] -> [B, 1]."""
    import keras

    dense_in = keras.Input((NUM_DENSE,), name="numerical")
    cat = keras.Input((num_tables,), dtype="int64", name="cat")
    vectors = lookups([cat[:, i] for i in range(num_tables)])
    return keras.Model([dense_in, cat], dense([dense_in, *vectors]))


def per_table(layers: list[Any]) -> Lookups:
    return lambda ids: [layer(x) for layer, x in zip(layers, ids, strict=True)]


def grouped(groups: list[tuple[Any, list[int]]]) -> Lookups:
    """Several multi-table layers (layer, the tables it serves, in its order) as one lookup of
    every table, in table order."""
    def run(ids: list[Any]) -> list[Any]:
        out: dict[int, Any] = {}
        for layer, tables in groups:
            for t, v in zip(tables, layer([ids[t] for t in tables]), strict=True):
                out[t] = v
        return [out[t] for t in range(len(ids))]
    return run


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
    for i, t in enumerate(tqdm(tables, desc="writing tables", unit="table", mininterval=2)):
        path = folder / f"table_{i}"
        formats.write_hps_table(path, np.arange(t.shape[0], dtype=np.int64), t.cpu().numpy())
        paths.append(str(path))
    return paths


def cache_groups(rows: list[int], batch: int) -> list[tuple[float, list[int]]]:
    """The tables grouped by the dynamic-cache size (``gpucacheper``, a power of two) that holds
    every distinct key of a uniform batch of ``batch`` ids: 8 slots per expected distinct key
    (an 8-way set then overflows with probability about 1e-6)."""
    groups: dict[float, list[int]] = {}
    for t, n in enumerate(rows):
        distinct = n * -math.expm1(-batch / n)
        per = 2.0 ** math.ceil(math.log2(max(8 * distinct / n, 2**-10)))
        groups.setdefault(min(per, 64.0), []).append(t)
    return sorted(groups.items())


def model_entry(name: str, paths: list[str], dim: int, max_batch: int,
                **settings: Any) -> dict[str, Any]:
    n = len(paths)
    return {"model": name, "sparse_files": paths,
            "embedding_table_names": [f"t{i}" for i in range(n)],
            "embedding_vecsize_per_table": [dim] * n,
            "maxnum_catfeature_query_per_table_per_sample": [1] * n,
            "default_value_for_each_table": [0.0] * n, "deployed_device_list": [0],
            "max_batch_size": max_batch, "gpucache": True, **settings}


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


# ---------------------------------------------------------------------------------- running
class Budget:
    """Wall-clock budget of the run: progress lines, and whether a part still fits."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def fits(self, estimate: float, share: float = 1.0) -> bool:
        """Whether ``estimate`` seconds more end before ``share`` of the budget."""
        return self.elapsed() + estimate <= share * self.seconds

    def say(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {msg}", flush=True)


def sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Runner:
    """One deployment in one execution mode: ``step(dense, cat)`` answers a batch.

    ``eager`` calls ``fn``; ``graph`` replays ``fn`` captured by ``keras_hps.CapturedCall``
    (on CPU devices: its protocol without a graph). ``split`` (the ensemble): ``fn`` is
    (lookup service, dense service), the vectors [B, 26, dim] crossing host memory between
    them, each service captured on its own in graph mode."""

    def __init__(self, name: str, mode: str, fn: Any, dev: Any, *, split: bool = False) -> None:
        self.name, self.mode, self.fn, self.dev, self.split = name, mode, fn, dev, split
        self.calls: list[Any] = []

    @property
    def key(self) -> str:
        return f"{self.name}/{self.mode}"

    def prepare(self, dense: Any, cat: Any, pool: Any = None) -> None:
        from keras_hps import CapturedCall

        if self.mode != "graph":
            return
        if not self.split:
            self.calls = [CapturedCall(self.fn, dense, cat, pool=pool)]
            return
        lookups, rest = self.fn
        self.calls = [CapturedCall(lookups, cat, pool=pool)]
        vectors = lookups(cat).cpu()
        self.calls.append(CapturedCall(rest, dense, vectors.to(self.dev), pool=pool))

    def step(self, dense: Any, cat: Any) -> Any:
        if not self.split:
            return self.calls[0](dense, cat) if self.calls else self.fn(dense, cat)
        lookups, rest = self.calls if self.calls else self.fn
        vectors = lookups(cat).cpu()  # service 1 answers over the host ...
        return rest(dense, vectors.to(self.dev))  # ... service 2 takes the vectors in

    @property
    def reruns(self) -> int:
        return sum(c.reruns for c in self.calls)

    def release(self) -> None:
        self.calls = []


def time_interleaved(runners: list[Runner], reps: int, inputs: Callable[[], tuple[Any, Any]]
                     ) -> dict[str, list[float]]:
    """Seconds per step of each runner, rounds interleaved (A B C, A B C, ...) so drift hits
    all alike; ``inputs()`` (the batch, fresh keys for the Zipf stream) runs before each
    round, outside the timed region."""
    times: dict[str, list[float]] = {r.key: [] for r in runners}
    for _ in range(reps):
        dense, cat = inputs()
        for r in runners:
            sync(r.dev)
            start = time.perf_counter()
            r.step(dense, cat)
            sync(r.dev)
            times[r.key].append(time.perf_counter() - start)
    return times


def reps_for(batch: int, base: int) -> int:
    return max(5, min(base, (base * 4096) // batch))


def gpu_counts(ps: Any, tables: list[tuple[str, int]]) -> tuple[int, int]:
    """(hits, misses) summed over the GPU tiers of ``tables`` ((model, table id))."""
    hits = misses = 0
    for model, t in tables:
        s = ps.stats(model, t).get("gpu", {})
        hits += s.get("hits", 0)
        misses += s.get("misses", 0)
    return hits, misses


# ---------------------------------------------------------------------------------- gpu
def bench_gpu(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["KERAS_BACKEND"] = "torch"
    budget = Budget(args.budget_s)
    import keras
    import torch

    import keras_hps
    torch.set_grad_enabled(False)  # inference: no autograd records (as predict does)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = cardinalities(args.scale)
    batches = [int(b) for b in args.batches.split(",")]
    max_batch = max(batches)
    dim, n = args.dim, len(rows)
    modes = [m for m in args.modes.split(",") if m]
    streams = [s for s in args.streams.split(",") if s]
    out: dict[str, Any] = {
        "machine": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv), "torch": torch.__version__, "keras": keras.__version__,
        "rows": rows, "dim": dim, "results": [],
    }

    def log(**row: Any) -> None:
        out["results"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))

    budget.say(f"DLRM on {out['machine']}: {sum(rows):,} rows x {dim} "
               f"({sum(rows) * dim * 4 / 2**30:.1f} GiB per copy of the tables)")
    tables = make_tables(rows, dim, dev)
    workdir = scratch_dir("dlrm_", args.workdir)
    paths = write_tables(workdir, tables)
    budget.say(f"tables written to {workdir}")
    dense = dense_part(n, dim)
    embeddings = []
    for i, t in enumerate(tables):
        emb = keras.layers.Embedding(t.shape[0], dim, name=f"emb_{i}")
        emb.build((None,))
        emb.embeddings.assign(t)
        embeddings.append(emb)
    del tables, t
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    native = full_model(per_table(embeddings), dense, n)

    def keras_call(model: Any) -> Callable[[Any, Any], Any]:
        return lambda d, c: model([d, c], training=False)

    deployments: dict[str, Any] = {"native": keras_call(native)}
    if "repeat" in streams:
        # One parameter server: the 26 files as model "dlrm" on static (identity) tables, and
        # as one dynamic model per cache size, each cache holding every key of the batch.
        groups = cache_groups(rows, max_batch)
        dyn_of = {t: (f"dlrm_dyn{g}", j) for g, (_p, ts) in enumerate(groups)
                  for j, t in enumerate(ts)}
        config = {"supportlonglong": True, "volatile_db": {"type": "disabled"}, "models": [
            model_entry(MODEL, paths, dim, max_batch, embedding_cache_type="static"),
            *(model_entry(f"dlrm_dyn{g}", [paths[t] for t in ts], dim, max_batch,
                          embedding_cache_type="dynamic", gpucacheper=p, hit_rate_threshold=1.0)
              for g, (p, ts) in enumerate(groups))]}
        budget.say("loading the parameter server (static tables; dynamic caches "
                   + ", ".join(f"{p:g}x rows for {len(ts)} tables" for p, ts in groups) + ")")
        ps = keras_hps.init(config)
        budget.say("parameter server ready")
        static_layers = [keras_hps.LookupLayer(MODEL, i, dim) for i in range(n)]
        wanted = set(args.deployments)
        if "hps_static" in wanted:
            deployments["hps_static"] = keras_call(full_model(per_table(static_layers), dense, n))
        if "hps_fused" in wanted:
            fused = keras_hps.FusedLookupLayer(MODEL, list(range(n)), dim)
            deployments["hps_fused"] = keras_call(full_model(fused, dense, n))
        if "hps_dynamic" in wanted:
            dyn = [keras_hps.LookupLayer(*dyn_of[t], dim) for t in range(n)]
            deployments["hps_dynamic"] = keras_call(full_model(per_table(dyn), dense, n))
        if "hps_dynamic_fused" in wanted:
            fl = [(keras_hps.FusedLookupLayer(f"dlrm_dyn{g}", list(range(len(ts))), dim), ts)
                  for g, (_p, ts) in enumerate(groups)]
            deployments["hps_dynamic_fused"] = keras_call(full_model(grouped(fl), dense, n))
        if "ensemble" in wanted:
            lookups = lookup_model(per_table(static_layers), n)

            def lookup_service(c: Any) -> Any:
                return torch.stack(lookups(c), 1)

            def dense_service(d: Any, v: Any) -> Any:
                return dense([d, *torch.unbind(v, 1)], training=False)

            deployments["ensemble"] = (lookup_service, dense_service)
        dyn_tables = [(f"dlrm_dyn{g}", j) for g, (_p, ts) in enumerate(groups)
                      for j in range(len(ts))]
        run_repeat(args, budget, log, deployments, modes, batches, rows, dev, ps, dyn_tables)
        ps.close()
        for name in [k for k in deployments if k != "native"]:
            del deployments[name]
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if "zipf" in streams:
        run_zipf(args, budget, log, deployments["native"], dense, modes, batches, rows, paths,
                 dim, dev)
    summarize(out)
    return out


def run_repeat(args: argparse.Namespace, budget: Budget, log: Callable[..., None],
               deployments: dict[str, Any], modes: list[str], batches: list[int],
               rows: list[int], dev: Any, ps: Any, dyn_tables: list[tuple[str, int]]) -> None:
    """The seed's stream: one batch repeated; bit-identity checks, then interleaved timing."""
    import torch

    gen = torch.Generator(device=dev).manual_seed(2)
    last = 0.0
    for batch in batches:
        if not budget.fits(2.2 * last, args.repeat_share):
            log(stream="repeat", batch=batch, skipped="time budget",
                budget_s=args.budget_s, elapsed_s=round(budget.elapsed(), 1))
            continue
        t0 = time.monotonic()
        cat = uniform_keys(rows, batch, dev, gen)
        dense_x = torch.randn(batch, NUM_DENSE, device=dev, generator=gen)
        pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None
        runners: list[Runner] = []
        for name, fn in deployments.items():
            for mode in modes:
                r = Runner(name, mode, fn, dev, split=name == "ensemble")
                try:
                    if name.startswith("hps_dynamic") and mode == modes[0]:
                        for _ in range(2):  # fill the caches with the batch's keys
                            r.step(dense_x, cat)
                    r.prepare(dense_x, cat, pool)
                except Exception as exc:  # a deployment that cannot run so: say why
                    log(stream="repeat", batch=batch, deployment=name, mode=mode,
                        error=f"{type(exc).__name__}: {exc}"[:300])
                    continue
                runners.append(r)
        # Bit for bit against the native model in the same mode, before timing.
        want = {r.mode: r.step(dense_x, cat).clone() for r in runners if r.name == "native"}
        for r in runners:
            if r.name != "native" and r.mode in want:
                got = r.step(dense_x, cat)
                log(stream="repeat", batch=batch, check=r.name, mode=r.mode,
                    bit_identical=bool(torch.equal(got, want[r.mode])),
                    max_abs_diff=float((got - want[r.mode]).abs().max()))
        before = gpu_counts(ps, dyn_tables)
        reruns0 = {r.key: r.reruns for r in runners}
        times = time_interleaved(runners, reps_for(batch, args.reps),
                                 lambda d=dense_x, c=cat: (d, c))
        hits, misses = (a - b for a, b in zip(gpu_counts(ps, dyn_tables), before, strict=True))
        for r in runners:
            ts = times[r.key]
            ms = 1e3 * statistics.median(ts)
            row = dict(stream="repeat", batch=batch, deployment=r.name, mode=r.mode, ms=ms,
                       samples_per_s=batch / (ms / 1e3), reps=len(ts))
            if r.mode == "graph":
                row["reruns"] = r.reruns - reruns0[r.key]
            if r.name.startswith("hps_dynamic"):
                row["dynamic_hit_rate"] = hits / max(1, hits + misses)
            log(**row)
        for r in runners:
            r.release()
        del runners
        last = time.monotonic() - t0
        budget.say(f"repeat stream, batch {batch:,}: {last:.1f} s")


def run_zipf(args: argparse.Namespace, budget: Budget, log: Callable[..., None],
             native: Any, dense: Any, modes: list[str], batches: list[int], rows: list[int],
             paths: list[str], dim: int, dev: Any) -> None:
    """Fresh Zipf batches against a dynamic cache of --zipf-cache of the rows over host RAM."""
    import torch

    import keras_hps

    n = len(rows)
    budget.say("loading the Zipf parameter server (host RAM tier holds every table)")
    ps = keras_hps.init({
        "supportlonglong": True,
        "volatile_db": {"type": "parallel_hash_map", "initial_cache_rate": 1.0},
        "models": [model_entry(MODEL, paths, dim, max(batches), embedding_cache_type="dynamic",
                               gpucacheper=args.zipf_cache,
                               hit_rate_threshold=args.zipf_threshold)]})
    budget.say("parameter server ready")
    layers = [keras_hps.LookupLayer(MODEL, i, dim) for i in range(n)]
    model = full_model(per_table(layers), dense, n)
    fused = full_model(keras_hps.FusedLookupLayer(MODEL, list(range(n)), dim), dense, n)

    def call(m: Any) -> Callable[[Any, Any], Any]:
        return lambda d, c: m([d, c], training=False)

    deployments = {"native": native, "hps_dynamic": call(model),
                   "hps_dynamic_fused": call(fused)}
    zipf = ZipfKeys(rows, args.alpha, dev)
    gen = torch.Generator(device=dev).manual_seed(3)
    tables = [(MODEL, t) for t in range(n)]
    last = 0.0
    for batch in batches:
        if not budget.fits(2.2 * last, args.zipf_share):
            log(stream="zipf", batch=batch, skipped="time budget", budget_s=args.budget_s,
                elapsed_s=round(budget.elapsed(), 1))
            continue
        t0 = time.monotonic()
        dense_x = torch.randn(batch, NUM_DENSE, device=dev, generator=gen)
        warm = max(2, min(args.zipf_warm, -(-args.zipf_warm_samples // batch)))
        for _ in range(warm):  # the cache carries over from the smaller batches: a few more
            deployments["hps_dynamic"](dense_x, zipf.batch(batch))
        pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None
        runners = []
        for name, fn in deployments.items():
            for mode in modes:
                r = Runner(name, mode, fn, dev)
                r.prepare(dense_x, zipf.batch(batch), pool)
                runners.append(r)
        for mode in modes:  # hit rate and timing per mode: eager first, then graph
            sel = [r for r in runners if r.mode == mode]
            before = gpu_counts(ps, tables)
            reruns0 = {r.key: r.reruns for r in sel}
            times = time_interleaved(sel, reps_for(batch, args.reps),
                                     lambda d=dense_x, b=batch: (d, zipf.batch(b)))
            hits, misses = (a - b for a, b in zip(gpu_counts(ps, tables), before, strict=True))
            for r in sel:
                ms = 1e3 * statistics.median(times[r.key])
                row = dict(stream="zipf", batch=batch, deployment=r.name, mode=mode, ms=ms,
                           samples_per_s=batch / (ms / 1e3), reps=len(times[r.key]))
                if r.name != "native":
                    row["hit_rate"] = hits / max(1, hits + misses)
                if mode == "graph":
                    row["reruns"] = r.reruns - reruns0[r.key]
                log(**row)
        for r in runners:
            r.release()
        if args.profile:
            log(stream="zipf", batch=batch, profile=profile_step(
                deployments["hps_dynamic"], dense, dense_x, zipf.batch(batch), dev, ps))
        last = time.monotonic() - t0
        budget.say(f"zipf stream, batch {batch:,}: {last:.1f} s")
    ps.close()


def profile_step(fn: Callable[[Any, Any], Any], dense: Any, dense_x: Any, cat: Any, dev: Any,
                 ps: Any) -> dict[str, float]:
    """Where one eager step of the keras-hps model goes, in ms: each lookup phase timed with
    the device synchronised around it (so GPU work lands in its phase), the dense part alone on
    the same batch, and the rest (Keras and Python between them). The syncs make the step a
    little slower than the timed ones."""
    from keras_hps import gpu_tier, parameter_server

    phases = {"lookup: GPU probe (unique, cache query, miss count)": (gpu_tier.GpuTier, "query"),
              "lookup: host RAM + table file (CPU)": (parameter_server.TieredTable,
                                                      "_below_gpu"),
              "lookup: fill (rows to GPU, cache insert, input order)": (gpu_tier.GpuTier,
                                                                        "complete"),
              "lookups, all (ParameterServer.lookup)": (parameter_server.ParameterServer,
                                                        "lookup")}
    spent = dict.fromkeys(phases, 0.0)
    originals = {}

    def timed(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            sync(dev)
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                sync(dev)
                spent[name] += time.perf_counter() - t
        return wrapper

    for name, (cls, attr) in phases.items():
        originals[(cls, attr)] = getattr(cls, attr)
        setattr(cls, attr, timed(name, originals[(cls, attr)]))
    try:
        sync(dev)
        t = time.perf_counter()
        fn(dense_x, cat)
        sync(dev)
        total = time.perf_counter() - t
    finally:
        for (cls, attr), f in originals.items():
            setattr(cls, attr, f)
    vectors = [ps.lookup(MODEL, i, cat[:, i]) for i in range(cat.shape[1])]
    dense_s = math.inf
    for _ in range(3):  # the best of three: the dense part alone
        sync(dev)
        t = time.perf_counter()
        dense([dense_x, *vectors], training=False)
        sync(dev)
        dense_s = min(dense_s, time.perf_counter() - t)
    out = {k: 1e3 * v for k, v in spent.items()}
    lookups = spent["lookups, all (ParameterServer.lookup)"]
    out["lookup: the rest (key checks, Python)"] = 1e3 * (lookups - sum(
        v for k, v in spent.items() if k.startswith("lookup:")))
    out["dense part (eager, alone)"] = 1e3 * dense_s
    out["Keras and Python around them"] = 1e3 * (total - lookups - dense_s)
    out["step (with the syncs)"] = 1e3 * total
    return out


# ---------------------------------------------------------------------------------- cpu
CPU_MODELS = ("embedded", "external", "ensemble")


def cpu_models(rows: list[int], dim: int) -> tuple[Any, Any, Any]:
    """(the full DLRM, its lookups alone with the vectors as one ``vectors`` [B, 26, dim]
    output, its dense part alone), sharing one set of layers (TensorFlow backend)."""
    import keras

    keras.utils.set_random_seed(0)
    n = len(rows)
    dense = dense_part(n, dim)
    embeddings = [keras.layers.Embedding(r, dim, name=f"emb_{i}") for i, r in enumerate(rows)]
    full = full_model(per_table(embeddings), dense, n)
    cat = keras.Input((n,), dtype="int64", name="cat")
    rows_of = [keras.layers.Reshape((1, dim))(e(cat[:, i])) for i, e in enumerate(embeddings)]
    lookup = keras.Model(cat, keras.layers.Concatenate(axis=1, name="vectors")(rows_of))
    return full, lookup, dense


def cpu_repository(repo: Path, rows: list[int], dim: int, max_batch: int) -> None:
    """The four served models: the DLRM exported embedded and external, and the ensemble's
    lookup model (external) and dense model (a plain SavedModel: ``numerical`` and
    ``vectors`` in, ``click`` out); and models.config."""
    import keras
    import tensorflow as tf

    from keras_hps.export import export_for_serving
    from keras_hps.serving.model_config import ModelEntry, to_text

    full, lookup, dense = cpu_models(rows, dim)
    export_for_serving(full, repo, "dlrm_embedded", tables="embedded")
    export_for_serving(full, repo, "dlrm_external", tables="external", max_batch_size=max_batch)
    export_for_serving(lookup, repo, "dlrm_lookup", tables="external", max_batch_size=max_batch)
    archive = keras.export.ExportArchive()  # Keras 3 variables in a session-loadable model
    archive.track(dense)
    archive.add_endpoint(
        name="serving_default",
        fn=lambda numerical, vectors: {"click": dense([numerical, *tf.unstack(vectors, axis=1)])},
        input_signature=[tf.TensorSpec([None, NUM_DENSE], tf.float32, name="numerical"),
                         tf.TensorSpec([None, len(rows), dim], tf.float32, name="vectors")])
    archive.write_out(str(repo / "dlrm_dense" / "1"), verbose=False)
    names = ("dlrm_embedded", "dlrm_external", "dlrm_lookup", "dlrm_dense")
    (repo / "models.config").write_text(to_text([ModelEntry(m, str(repo / m)) for m in names]))


def cpu_inputs(rows: list[int], batch: int, seed: int) -> dict[str, np.ndarray]:
    """One request's inputs: ``numerical`` [B, 13] and ``cat`` [B, 26], each table's ids
    uniform over its rows."""
    rng = np.random.default_rng(seed)
    cat = np.stack([rng.integers(0, r, batch) for r in rows], 1).astype(np.int64)
    return {"numerical": rng.standard_normal((batch, NUM_DENSE)).astype(np.float32),
            "cat": cat}


def cpu_calls(target: str, deployment: str, rows: list[int], batch: int,
              variants: int = 3) -> Callable[[int], Callable[[], Any]]:
    """Client factory for `keras_hps.serving.bench.measure`: pre-built Predict requests (a
    few variants) over the official stubs; the ensemble's second request is built from the
    first one's answer, as a client between two services does."""
    from keras_hps.serving.client import GrpcClient
    from keras_hps.serving.tensors import to_proto

    def make(i: int) -> Callable[[], Any]:
        client = GrpcClient(target)
        inputs = [cpu_inputs(rows, batch, 1000 * i + v) for v in range(variants)]
        state = [0]
        if deployment != "ensemble":
            reqs = [client.predict_request(f"dlrm_{deployment}", x) for x in inputs]

            def call() -> Any:
                state[0] += 1
                return client.prediction.Predict(reqs[state[0] % variants], timeout=600)
            return call
        firsts = [client.predict_request("dlrm_lookup", {"cat": x["cat"]}) for x in inputs]
        numerical = [to_proto(x["numerical"], tensor_content=True) for x in inputs]

        def ensemble() -> Any:
            state[0] += 1
            k = state[0] % variants
            first = client.prediction.Predict(firsts[k], timeout=600)
            second = client.predict_request("dlrm_dense", {})
            second.inputs["vectors"].CopyFrom(first.outputs["vectors"])
            second.inputs["numerical"].CopyFrom(numerical[k])
            return client.prediction.Predict(second, timeout=600)
        return ensemble

    return make


def bench_cpu(args: argparse.Namespace) -> dict[str, Any]:
    """The DLRM served by `keras-hps serve` over gRPC: embedded, external, ensemble."""
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import platform
    import signal

    import keras
    from bench_serving import free_port, start_server

    from keras_hps.serving.bench import measure
    from keras_hps.serving.client import GrpcClient

    budget = Budget(args.budget_s)
    rows = [min(r, args.cap) for r in cardinalities(args.scale)]
    batches = [int(b) for b in args.batches.split(",")]
    out: dict[str, Any] = {
        "edition": "cpu", "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs ({platform.node()})", "date": time.strftime(
            "%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
        "keras": keras.__version__, "rows": rows, "dim": args.dim, "results": []}

    def log(**row: Any) -> None:
        out["results"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))

    workdir = scratch_dir("dlrm_cpu_", args.workdir)
    repo = workdir / "repo"
    budget.say(f"exporting the DLRM ({sum(rows):,} rows x {args.dim}) to {repo}")
    cpu_repository(repo, rows, args.dim, max(batches))
    port = free_port()
    target = f"127.0.0.1:{port}"
    budget.say("starting keras-hps serve")
    server = start_server(str(repo), port, 0, extra=tuple(args.server_flag))
    try:
        client = GrpcClient(target)
        x = cpu_inputs(rows, 64, 5)
        answers = {d: next(iter(client.predict(f"dlrm_{d}", x).values()))
                   for d in ("embedded", "external")}
        vec = client.predict("dlrm_lookup", {"cat": x["cat"]})["vectors"]
        answers["ensemble"] = client.predict(
            "dlrm_dense", {"vectors": vec, "numerical": x["numerical"]})["click"]
        for d in ("external", "ensemble"):
            log(check=d, against="embedded",
                max_abs_diff=float(np.abs(answers[d] - answers["embedded"]).max()))
        budget.say("answers checked; measuring")
        for batch in batches:
            runs: dict[str, list[Any]] = {d: [] for d in CPU_MODELS}
            warm = 3 if batch <= 2048 else 1
            calls = {d: cpu_calls(target, d, rows, batch) for d in CPU_MODELS}
            for _ in range(args.rounds):  # alternating: the three see the same load
                for d in CPU_MODELS:
                    runs[d].append(measure(calls[d], d, f"dlrm_{d}", batch, 1, args.duration,
                                           warm))
            for d in CPU_MODELS:
                r = sorted(runs[d], key=lambda r: r.p50_ms)[len(runs[d]) // 2]
                log(stream="uniform", batch=batch, deployment=d, mode="served", ms=r.p50_ms,
                    p90_ms=r.p90_ms, samples_per_s=r.rows_per_s, requests=r.requests,
                    rounds=[round(x.p50_ms, 4) for x in runs[d]])
            budget.say(f"batch {batch:,} done")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    for batch in [int(b) for b in args.breakdown.split(",") if b]:
        log(breakdown="external, in process", batch=batch,
            ms=external_breakdown(repo, rows, batch))
    summarize_cpu(out)
    return out


def external_breakdown(repo: Path, rows: list[int], batch: int, n: int = 60) -> dict[str, float]:
    """Where one request of the external export goes, in process (`Servable.run` of the two
    versions, no server), ms per request over ``n`` requests alternating with the embedded
    version's: the embedded version, the external one, and the external one's 26 lookups (the
    rest of it is its two session calls: the keys step and the dense part)."""
    from keras_hps import external, servable

    spent = {"embedded": 0.0, "external": 0.0, "external: 26 lookups": 0.0}
    pooled = external.pooled

    def timed_pooled(*a: Any) -> Any:
        t = time.perf_counter()
        try:
            return pooled(*a)
        finally:
            spent["external: 26 lookups"] += time.perf_counter() - t

    versions = {d: servable.load_servable(str(repo / f"dlrm_{d}" / "1"))
                for d in ("embedded", "external")}
    xs = [cpu_inputs(rows, batch, s) for s in range(4)]
    for v in versions.values():
        for x in xs * 2:
            v.run(x, "serving_default")
    external.pooled = timed_pooled
    try:
        for i in range(n):
            for d, v in versions.items():
                t = time.perf_counter()
                v.run(xs[i % 4], "serving_default")
                spent[d] += time.perf_counter() - t
    finally:
        external.pooled = pooled
        for v in versions.values():
            v.close()
    out = {k: 1e3 * v / n for k, v in spent.items()}
    out["external: session calls and the rest"] = \
        out["external"] - out["external: 26 lookups"]
    return out


def summarize_cpu(out: dict[str, Any]) -> None:
    """Markdown: p50 latency and throughput per batch, and the ratios to the embedded export."""
    rows = [r for r in out["results"] if "deployment" in r]
    print(f"\n{out['machine']}: p50 ms per request (x embedded), K samples/s")
    print("| batch | embedded | external | ensemble | embedded K/s | external K/s | "
          "ensemble K/s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch in sorted({r["batch"] for r in rows}):
        cell = {r["deployment"]: r for r in rows if r["batch"] == batch}
        if len(cell) < len(CPU_MODELS):
            continue
        base = cell["embedded"]["ms"]
        lat = [f"{cell[d]['ms']:.3f}" + ("" if d == "embedded" else
                                           f" ({cell[d]['ms'] / base:.2f}x)") for d in CPU_MODELS]
        thr = [f"{cell[d]['samples_per_s'] / 1e3:.1f}" for d in CPU_MODELS]
        print(f"| {batch:,} | " + " | ".join(lat + thr) + " |")
    for r in out["results"]:
        if "breakdown" in r:
            print(f"\n{r['breakdown']}, batch {r['batch']:,}, ms per request: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["ms"].items()))


# ---------------------------------------------------------------------------------- output
def summarize(out: dict[str, Any]) -> None:
    """Markdown tables: ms per batch and ratio to native, per stream and mode; fused against
    per-table; the ensemble against the in-process model."""
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
                        continue
                    text = f"{r['ms']:.3f}"
                    if base and d != "native":
                        text += f" ({r['ms'] / base:.2f}x)"
                    if "hit_rate" in r:
                        text += f", hit {100 * r['hit_rate']:.1f}%"
                    if r.get("reruns"):
                        text += f", {r['reruns']}/{r['reps']} reruns"
                    parts.append(text)
                print(f"| {batch:,} | " + " | ".join(parts) + " |")
    pairs = (("hps_fused", "hps_static"), ("hps_dynamic_fused", "hps_dynamic"),
             ("ensemble", "hps_static"))
    for a, b in pairs:
        ratio = {(r["stream"], r["mode"], r["batch"]): r["ms"] for r in rows
                 if r["deployment"] == b}
        sel = [r for r in rows if r["deployment"] == a
               and (r["stream"], r["mode"], r["batch"]) in ratio]
        if sel:
            print(f"\n{a} / {b} (latency ratio, same stream and mode)")
            for r in sel:
                print(f"  {r['stream']} {r['mode']} batch {r['batch']:,}: "
                      f"{r['ms'] / ratio[(r['stream'], r['mode'], r['batch'])]:.3f}")
    checks = [r for r in out["results"] if "check" in r]
    if checks:
        bad = [r for r in checks if not r["bit_identical"]]
        print(f"\nbit-identity against native: {len(checks) - len(bad)} of {len(checks)} equal"
              + "".join(f"\n  DIFFERS: {r['check']} {r['mode']} batch {r['batch']}: max abs "
                        f"{r['max_abs_diff']:.3g}" for r in bad))
    for r in out["results"]:
        if "profile" in r:
            print(f"\nzipf batch {r['batch']:,}, one eager step of hps_dynamic, ms:")
            for k, v in r["profile"].items():
                print(f"  {k}: {v:.2f}")
    skipped = [r for r in out["results"] if "skipped" in r]
    for r in skipped:
        print(f"skipped: {r['stream']} batch {r['batch']:,} ({r['skipped']})")


def plot(args: argparse.Namespace) -> None:
    """Fig. 1 (latency) and Fig. 2 (throughput) as PNGs with a log y axis, as the seed's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(args.json).read_text())
    rows = [r for r in data["results"] if "deployment" in r and r["stream"] == args.stream]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    prefix = args.prefix or f"dlrm_{data.get('edition', 'gpu')}"
    for metric, label, fname in (("ms", "latency per batch (ms)", "latency"),
                                 ("samples_per_s", "throughput (K samples/s)", "throughput")):
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
        ax.set_title(f"DLRM, 26 tables x {data.get('dim', 128)}, fp32, stream "
                     f"'{args.stream}': {data['machine']}, {data['date']}\n{data['command']}",
                     fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(args.out) / f"{prefix}_{fname}.png"
        fig.savefig(path, dpi=110)
        print(path)


# ---------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gpu", help="torch backend on one CUDA device",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--scale", type=float, default=1.0,
                   help="scale the cardinalities above 1,000 rows (toy runs: 0.0005)")
    g.add_argument("--dim", type=int, default=128)
    g.add_argument("--batches", default=",".join(map(str, BATCHES)))
    g.add_argument("--deployments", default=",".join([*HPS, "ensemble"]))
    g.add_argument("--modes", default="eager,graph")
    g.add_argument("--streams", default="repeat,zipf")
    g.add_argument("--alpha", type=float, default=1.05)
    g.add_argument("--zipf-cache", type=float, default=0.1,
                   help="dynamic cache size as a share of each table's rows (Zipf stream)")
    g.add_argument("--zipf-threshold", type=float, default=1.0,
                   help="hit_rate_threshold of the Zipf stream's model (1.0: every miss enters "
                   "the cache before the lookup returns)")
    g.add_argument("--zipf-warm", type=int, default=5,
                   help="most Zipf batches before timing each batch size")
    g.add_argument("--zipf-warm-samples", type=int, default=1 << 20,
                   help="warm with about this many samples (at least 2 batches)")
    g.add_argument("--reps", type=int, default=30, help="timed steps at batch 4,096 "
                   "(more at smaller, fewer at larger batches; at least 5)")
    g.add_argument("--profile", action="store_true",
                   help="Zipf stream: one instrumented step per batch (where the time goes)")
    g.add_argument("--budget-s", type=float, default=520.0,
                   help="wall-clock budget: batch sizes that would not fit are skipped")
    g.add_argument("--repeat-share", type=float, default=0.6,
                   help="share of the budget the repeated stream may take")
    g.add_argument("--zipf-share", type=float, default=0.97,
                   help="share of the budget by which the Zipf stream must end")
    g.add_argument("--workdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                   help="where the table files are written")
    g.add_argument("--json", help="write every number here")
    c = sub.add_parser("cpu", help="TensorFlow backend: the model served by keras-hps serve",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--scale", type=float, default=1.0, help="scale the cardinalities")
    c.add_argument("--cap", type=int, default=200_000, help="rows of each table at most")
    c.add_argument("--dim", type=int, default=128)
    c.add_argument("--batches", default="32,64,256,1024,2048,4096,8192,16384")
    c.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    c.add_argument("--rounds", type=int, default=3, help="alternating rounds per batch size")
    c.add_argument("--breakdown", default="32,256,4096",
                   help="batch sizes at which the external export's steps are timed in "
                   "process afterwards (empty: none)")
    c.add_argument("--server-flag", action="append", default=[],
                   help="an extra flag for keras-hps serve (repeatable)")
    c.add_argument("--budget-s", type=float, default=3600.0)
    c.add_argument("--workdir", default=None, help="where the repository is written")
    c.add_argument("--json", help="write every number here")
    p = sub.add_parser("plot", help="PNG plots of a --json result",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("json")
    p.add_argument("--stream", default="repeat")
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--prefix", default=None, help="file name prefix (dlrm_gpu / dlrm_cpu)")
    args = parser.parse_args(argv)
    if args.what == "gpu":
        args.deployments = [d for d in args.deployments.split(",") if d]
        bench_gpu(args)
    elif args.what == "cpu":
        bench_cpu(args)
    else:
        plot(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
