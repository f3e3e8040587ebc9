"""Several GPUs: the GPU tier replicated on every GPU or sharded over them, beside one GPU in
the same run (issue 18; results in docs/benchmarks/multigpu.md).

``lookup``: all-hit lookup throughput (keys/s through ``ParameterServer.lookup`` with CUDA
keys, the torch backend's path) of 1, 2 and 4 GPUs, for a static table and for a dynamic cache
warmed to all hits. ``replicate``: every GPU holds the same table of ``--rows-per-gpu`` rows;
``shard``: the table has N x ``--rows-per-gpu`` rows split over the N GPUs, so each GPU holds
as many rows as the one-GPU baseline. Worker threads (``--threads-per-gpu`` per GPU), each
with its keys on its GPU, look up ``--keys`` keys at a time, each lookup waited for (as a
server answers it), for ``--seconds``. Targets: replicated rate >= 0.9 x N x one GPU's,
sharded rate >= 0.5 x N x one GPU's.

``dlrm``: the seed benchmark's DLRM (benchmarks/bench_dlrm.py: the 26 Criteo tables of dim
128, the JoC dense part) on N GPUs, one worker per GPU running whole batches (its keys and
dense input on its GPU; lookups through ``ParameterServer.lookup``, the dense part replayed as
a CUDA graph, eager on the CPU): ``replicate`` (every table on every GPU) and ``shard`` (the
``--shard-tables`` largest tables sharded, the others replicated), static GPU tables.

Without several GPUs: ``--virtual`` puts every "GPU" on GPU 0 (``KERAS_HPS_GPU_TIER=virtual``:
each replica or shard with its own memory), so the script runs end to end on one GPU; without
CUDA it runs on the CPU through Triton's interpreter (toy sizes only). NVLink multicast stays
off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are set
here; keras-hps itself starts no NCCL communicator).

    source benchmarks/device_env.sh            # on the GPU machine (carry .whl for dlrm)
    python3 benchmarks/bench_multigpu.py lookup --json $OUT/multigpu_lookup.json
    python3 benchmarks/bench_multigpu.py dlrm --json $OUT/multigpu_dlrm.json
    python3 benchmarks/bench_multigpu.py lookup --virtual --gpus 1,2,4   # one GPU
    python3 benchmarks/bench_multigpu.py lookup --rows-per-gpu 4096 --keys 512 --seconds 0.3
                                               # CPU toy run (interpreter)

Prints Markdown tables; ``--json PATH`` writes every number (rows appended as they come).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                  NVSHMEM_DISABLE_NVLS="1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from scratch import scratch_dir  # noqa: E402

MODEL = "m"


# ---------------------------------------------------------------------------------- setup
class PatternRows:
    """A ``[rows, dim]`` float32 array-like whose row ``i`` is a function of ``i`` (exact in
    float32), generated block by block when a table file is written: no table in memory, and
    any row can be checked later."""

    def __init__(self, rows: int, dim: int) -> None:
        self.shape = (rows, dim)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, item: slice) -> np.ndarray:
        start, stop, _ = item.indices(self.shape[0])
        return row_pattern(np.arange(start, stop, dtype=np.int64), self.shape[1])


def row_pattern(idx: np.ndarray, dim: int) -> np.ndarray:
    """Row ``idx[i]`` of a `PatternRows` table."""
    with np.errstate(over="ignore"):
        h = idx[:, None] * np.int64(0x9E3779B1) + np.arange(dim, dtype=np.int64) * 0x85EBCA77
    return ((h & 0xFFFFF).astype(np.float32) / np.float32(1 << 20)) - np.float32(0.5)


def write_table(folder: Path, rows: int, dim: int) -> str:
    """An HPS table of keys 0..rows-1 with `PatternRows` vectors (written once per size)."""
    from keras_hps import formats

    path = folder / f"table_{rows}x{dim}"
    if not path.exists():
        formats.write_hps_table(path, np.arange(rows, dtype=np.int64), PatternRows(rows, dim),
                                progress=rows >= 1 << 20)
    return str(path)


def devices_for(n: int, args: argparse.Namespace) -> list[Any]:
    """The torch device of each of ``n`` "GPUs": real ones, GPU 0 n times (--virtual), or
    the CPU n times (no CUDA: the interpreter)."""
    import torch

    if not torch.cuda.is_available():
        return [torch.device("cpu")] * n
    if args.virtual:
        return [torch.device("cuda", 0)] * n
    return [torch.device("cuda", i) for i in range(n)]


def set_tier_mode(args: argparse.Namespace) -> str:
    """KERAS_HPS_GPU_TIER for this run (before the first parameter server)."""
    import torch

    mode = ("interpret" if not torch.cuda.is_available()
            else "virtual" if args.virtual else "auto")
    os.environ["KERAS_HPS_GPU_TIER"] = mode
    if mode == "interpret":  # before the first Triton kernel is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return mode


def gpu_counts(args: argparse.Namespace) -> list[int]:
    """The GPU counts to run, 1 first (the baseline), those this machine has."""
    import torch

    wanted = sorted({1, *(int(g) for g in args.gpus.split(","))})
    real = torch.cuda.is_available() and not args.virtual
    have = torch.cuda.device_count() if real else max(wanted)
    skipped = [g for g in wanted if g > have]
    if skipped:
        print(f"this machine has {have} GPU(s): skipping {skipped} (--virtual runs them on one)",
              flush=True)
    return [g for g in wanted if g <= have]


def machine(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv), "torch": torch.__version__,
        "virtual": bool(args.virtual),
        "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE",
                                               "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                               "NVSHMEM_DISABLE_NVLS", "KERAS_HPS_GPU_TIER")},
    }
    if torch.cuda.is_available():
        from keras_hps.gpu_shards import peer_access

        n = torch.cuda.device_count()
        info["machine"] = f"{n} x {torch.cuda.get_device_name(0)}"
        info["peer_access"] = peer_access([torch.device("cuda", i) for i in range(n)])
    else:
        info["machine"] = "CPU (Triton interpreter)"
    return info


class Log:
    """Rows printed as JSON lines and kept in ``out['results']`` (written to --json)."""

    def __init__(self, out: dict[str, Any], path: str | None) -> None:
        self.out, self.path = out, path
        out.setdefault("results", [])

    def __call__(self, **row: Any) -> None:
        self.out["results"].append(row)
        print(json.dumps(row), flush=True)
        if self.path:
            Path(self.path).write_text(json.dumps(self.out, indent=1))


def sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.current_stream(dev).synchronize()


def run_workers(devs: list[Any], threads_per_gpu: int, seconds: float,
                step: Callable[[int, Any], int]) -> dict[str, float]:
    """Run ``step(worker, device)`` (returns items done, waited for) in threads_per_gpu
    threads per device until ``seconds`` have passed; items/s and CPU seconds per step."""
    import torch

    workers = [(w, devs[w % len(devs)]) for w in range(len(devs) * threads_per_gpu)]
    barrier = threading.Barrier(len(workers) + 1)
    stop = threading.Event()
    done = [0] * len(workers)
    steps = [0] * len(workers)
    cpu = [0.0] * len(workers)
    errors: list[BaseException] = []

    def work(w: int, dev: Any) -> None:
        try:
            with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
                step(w, dev)  # first step outside the clock (lazy setup, this thread's turn)
                barrier.wait()
                c0 = time.thread_time()
                while not stop.is_set():
                    done[w] += step(w, dev)
                    steps[w] += 1
                cpu[w] = time.thread_time() - c0
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=wd, daemon=True) for wd in workers]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return {"per_s": sum(done) / elapsed, "steps": sum(steps), "seconds": elapsed,
            "cpu_ms_per_step": 1e3 * sum(cpu) / max(1, sum(steps))}


# ---------------------------------------------------------------------------------- lookup
def lookup_config(path: str, dim: int, n: int, placement: str, cache_type: str,
                  keys: int) -> dict[str, Any]:
    return {"supportlonglong": True, "volatile_db": {"type": "disabled"}, "models": [{
        "model": MODEL, "sparse_files": [path], "embedding_vecsize_per_table": [dim],
        "maxnum_catfeature_query_per_table_per_sample": [1], "max_batch_size": keys,
        "deployed_device_list": list(range(n)), "gpu_placement": placement,
        "embedding_cache_type": cache_type, "gpucacheper": 1.0, "hit_rate_threshold": 1.0}]}


def resident_keys(ps: Any, devs: list[Any], candidates: Any) -> Any:
    """Warm the dynamic caches with ``candidates`` (from every replica's device), then the
    keys every replica's cache holds: batches of them are all hits."""
    import torch

    tier = ps.table(MODEL, 0).gpu
    step = ps.table_spec(MODEL, 0).max_keys_per_lookup
    warm = threading.Barrier(len(tier._replicas))

    def fill(dev: Any) -> None:  # one thread per replica: each takes its own turn
        warm.wait()
        for _ in range(2):
            for s in range(0, candidates.numel(), step):
                ps.lookup(MODEL, 0, candidates[s:s + step].to(dev))
        sync(dev)

    threads = [threading.Thread(target=fill, args=(devs[i % len(devs)],))
               for i in range(len(tier._replicas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tier.wait()
    keep = torch.ones(candidates.numel(), dtype=torch.bool)
    for rep in tier._stores():
        for s in range(0, candidates.numel(), step):
            part = candidates[s:s + step].to(rep.device)
            _vals, hit = rep.cache.query(part, touch=False, validate=False)
            keep[s:s + step] &= hit.cpu()
    return candidates[keep]


def bench_lookup(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from keras_hps.parameter_server import ParameterServer

    out = machine(args)
    out.update(part="lookup", dim=args.dim, rows_per_gpu=args.rows_per_gpu, keys=args.keys,
               threads_per_gpu=args.threads_per_gpu, seconds=args.seconds, tier=args.tier)
    log = Log(out, args.json)
    print(f"lookup on {out['machine']}{' (virtual GPUs on GPU 0)' if args.virtual else ''}",
          flush=True)
    folder = scratch_dir("multigpu_", args.workdir)
    counts = gpu_counts(args)
    base: dict[str, float] = {}
    for cache_type in args.cache_types.split(","):
        for n in counts:
            for placement in (("replicate",) if n == 1 else ("replicate", "shard")):
                rows = args.rows_per_gpu * (n if placement == "shard" else 1)
                path = write_table(folder, rows, args.dim)
                devs = devices_for(n, args)
                cfg = lookup_config(path, args.dim, n, placement, cache_type, args.keys)
                with ParameterServer(cfg) as ps:
                    tier = ps.table(MODEL, 0).gpu
                    gen = torch.Generator().manual_seed(n)
                    pool = torch.arange(rows, dtype=torch.int64)
                    if cache_type == "dynamic":  # half the cache's slots: a working set
                        pool = torch.randperm(rows, generator=gen)[: rows // 2]
                        pool = resident_keys(ps, devs, pool)
                    batches = [[pool[torch.randint(0, pool.numel(), (args.keys,),
                                                   generator=gen)].to(d) for _ in range(4)]
                               for d in devs * args.threads_per_gpu]
                    check = batches[0][0][:4096]
                    got = ps.lookup(MODEL, 0, check).cpu().numpy()
                    want = row_pattern(check.cpu().numpy(), args.dim)
                    np.testing.assert_array_equal(got, want)  # exact before timing
                    before = tier.stats()

                    def step(w: int, dev: Any, ps: Any = ps, batches: Any = batches) -> int:
                        b = batches[w][step.turn[w] % 4]
                        step.turn[w] += 1
                        ps.lookup(MODEL, 0, b)
                        sync(dev)
                        return b.numel()

                    step.turn = [0] * len(batches)
                    res = run_workers(devs, args.threads_per_gpu, args.seconds, step)
                    after = tier.stats()
                hits = after["hits"] - before["hits"]
                misses = after["misses"] - before["misses"]
                key = cache_type
                if n == 1:
                    base[key] = res["per_s"]
                scale = res["per_s"] / base[key]
                target = (0.9 if placement == "replicate" else 0.5) * n
                log(part="lookup", cache_type=cache_type, placement=placement, gpus=n,
                    rows=rows, rows_per_gpu=args.rows_per_gpu, keys_per_s=res["per_s"],
                    x_one_gpu=scale, target_x=target if n > 1 else None,
                    meets_target=(scale >= target) if n > 1 else None,
                    hit_rate=hits / max(1, hits + misses), lookups=res["steps"],
                    seconds=res["seconds"], cpu_ms_per_lookup=res["cpu_ms_per_step"])
    summarize(out)
    return out


# ---------------------------------------------------------------------------------- dlrm
def bench_dlrm_multi(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["KERAS_BACKEND"] = "torch"
    import bench_dlrm as seed
    import keras
    import torch

    from keras_hps.parameter_server import ParameterServer

    torch.set_grad_enabled(False)
    out = machine(args)
    rows = seed.cardinalities(args.scale)
    n_tab, dim, batch = len(rows), args.dim, args.batch
    big = sorted(sorted(range(n_tab), key=lambda t: -rows[t])[: args.shard_tables])
    small = [t for t in range(n_tab) if t not in big]
    out.update(part="dlrm", rows=rows, dim=dim, batch=batch, sharded_tables=big,
               tier=args.tier, keras=keras.__version__)
    log = Log(out, args.json)
    print(f"DLRM on {out['machine']}: {sum(rows):,} rows x {dim}; sharded tables {big} "
          f"({sum(rows[t] for t in big):,} rows)", flush=True)
    folder = scratch_dir("multigpu_dlrm_", args.workdir)
    paths = [write_table(folder, r, dim) for r in rows]
    dense0 = seed.dense_part(n_tab, dim)
    weights = dense0.get_weights()
    gen = torch.Generator().manual_seed(5)
    cat_cpu = torch.stack([torch.randint(0, r, (batch,), generator=gen) for r in rows], 1)
    dense_cpu = torch.randn(batch, seed.NUM_DENSE, generator=gen)
    reference = None
    base = None
    for n in gpu_counts(args):
        devs = devices_for(n, args)
        for placement in (("replicate",) if n == 1 else ("replicate", "shard")):
            models = []
            for name, tables, pl in (("big", big, placement), ("small", small, "replicate")):
                models.append({
                    "model": name, "sparse_files": [paths[t] for t in tables],
                    "embedding_vecsize_per_table": [dim] * len(tables),
                    "maxnum_catfeature_query_per_table_per_sample": [1] * len(tables),
                    "max_batch_size": batch, "deployed_device_list": list(range(n)),
                    "gpu_placement": pl, "embedding_cache_type": "static"})
            where = {t: ("big", i) for i, t in enumerate(big)}
            where.update({t: ("small", i) for i, t in enumerate(small)})
            cfg = {"supportlonglong": True, "volatile_db": {"type": "disabled"},
                   "models": models}
            with ParameterServer(cfg) as ps:
                workers = []
                for dev in devs:
                    with keras.device(str(dev)):
                        dense = seed.dense_part(n_tab, dim)
                    dense.set_weights(weights)
                    workers.append(DlrmWorker(ps, where, dense, dev, cat_cpu, dense_cpu))
                outs = [w.run_once() for w in workers]
                if reference is None:
                    reference = outs[0]
                for o in outs:  # every GPU, either placement: the one-GPU answer
                    np.testing.assert_allclose(o, reference, rtol=1e-4, atol=1e-5)
                mem = [torch.cuda.memory_allocated(d) / 2**30 for d in sorted(
                    {d.index for d in devs if d.type == "cuda"})]
                res = run_workers(devs, 1, args.seconds,
                                  lambda w, dev, ws=workers: ws[w].step())
            if n == 1:
                base = res["per_s"]
            log(part="dlrm", placement=placement, gpus=n, batch=batch,
                samples_per_s=res["per_s"], x_one_gpu=res["per_s"] / base,
                steps=res["steps"], seconds=res["seconds"],
                cpu_ms_per_step=res["cpu_ms_per_step"], gib_allocated_per_gpu=mem)
    summarize(out)
    return out


class DlrmWorker:
    """One GPU's DLRM: its keys and dense input on its device, lookups through the parameter
    server, the dense part as a CUDA graph (eager on the CPU)."""

    def __init__(self, ps: Any, where: dict[int, tuple[str, int]], dense: Any, dev: Any,
                 cat: Any, dense_x: Any) -> None:
        import torch

        self.ps, self.where, self.dense, self.dev = ps, where, dense, dev
        self.cat = cat.to(dev)
        self.inputs = [dense_x.to(dev)] + [
            torch.empty(cat.shape[0], dense.inputs[1].shape[1], device=dev)
            for _ in range(cat.shape[1])]
        self.graph = self.output = None

    def lookups(self) -> None:
        for t in range(self.cat.shape[1]):
            model, i = self.where[t]
            self.inputs[1 + t].copy_(self.ps.lookup(model, i, self.cat[:, t]))

    def run_once(self) -> np.ndarray:
        import torch

        self.lookups()
        if self.dev.type == "cuda":
            with torch.cuda.device(self.dev):
                side = torch.cuda.Stream(self.dev)
                side.wait_stream(torch.cuda.current_stream(self.dev))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self.dense(self.inputs, training=False)
                torch.cuda.current_stream(self.dev).wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.output = self.dense(self.inputs, training=False)
                self.graph.replay()
                sync(self.dev)
                return self.output.cpu().numpy()
        return np.asarray(self.dense(self.inputs, training=False).cpu())

    def step(self) -> int:
        self.lookups()
        if self.graph is not None:
            self.graph.replay()
        else:
            self.dense(self.inputs, training=False)
        sync(self.dev)
        return self.cat.shape[0]


# ---------------------------------------------------------------------------------- output
def summarize(out: dict[str, Any]) -> None:
    """Markdown tables of the rows: rate, x one GPU, target."""
    rows = [r for r in out["results"] if "x_one_gpu" in r]
    if not rows:
        return
    print(f"\n{out['machine']}{', virtual GPUs on GPU 0' if out.get('virtual') else ''}, "
          f"{out['date']}")
    if out["part"] == "lookup":
        print("| cache | placement | GPUs | rows | M keys/s | x 1 GPU | target | hit rate "
              "| CPU ms/lookup |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            tgt = "" if r["target_x"] is None else (
                f">= {r['target_x']:.1f} {'yes' if r['meets_target'] else 'NO'}")
            print(f"| {r['cache_type']} | {r['placement']} | {r['gpus']} | {r['rows']:,} | "
                  f"{r['keys_per_s'] / 1e6:,.4g} | {r['x_one_gpu']:.2f} | {tgt} | "
                  f"{100 * r['hit_rate']:.1f}% | {r['cpu_ms_per_lookup']:.2f} |")
    else:
        print("| placement | GPUs | batch | samples/s | x 1 GPU | GiB per GPU | CPU ms/step |")
        print("|---|---:|---:|---:|---:|---|---:|")
        for r in rows:
            mem = ", ".join(f"{m:.1f}" for m in r["gib_allocated_per_gpu"]) or "-"
            print(f"| {r['placement']} | {r['gpus']} | {r['batch']:,} | "
                  f"{r['samples_per_s']:,.0f} | {r['x_one_gpu']:.2f} | {mem} | "
                  f"{r['cpu_ms_per_step']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--gpus", default="1,2,4", help="GPU counts (1 always runs first)")
    common.add_argument("--virtual", action="store_true",
                        help="every GPU is GPU 0 (KERAS_HPS_GPU_TIER=virtual)")
    common.add_argument("--dim", type=int, default=128)
    common.add_argument("--seconds", type=float, default=3.0, help="timed seconds per case")
    common.add_argument("--workdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where the table files are written")
    common.add_argument("--json", help="write every number here")
    lk = sub.add_parser("lookup", parents=[common], help="all-hit lookup throughput",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    lk.add_argument("--rows-per-gpu", type=int, default=1 << 21)
    lk.add_argument("--keys", type=int, default=1 << 20, help="keys per lookup")
    lk.add_argument("--threads-per-gpu", type=int, default=2)
    lk.add_argument("--cache-types", default="static,dynamic")
    dl = sub.add_parser("dlrm", parents=[common], help="the seed DLRM, largest tables sharded",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    dl.add_argument("--scale", type=float, default=1.0,
                    help="scale the cardinalities above 1,000 rows (toy runs: 0.0001)")
    dl.add_argument("--batch", type=int, default=65536)
    dl.add_argument("--shard-tables", type=int, default=5, help="the largest tables sharded")
    args = parser.parse_args(argv)
    args.tier = set_tier_mode(args)  # before Keras or a kernel is imported
    if args.what == "lookup":
        bench_lookup(args)
    else:
        bench_dlrm_multi(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
