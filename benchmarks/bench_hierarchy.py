"""GPU tier benchmarks: static/UVM lookups beside a plain gather, the combiner beside torch's
embedding_bag, and the whole hierarchy through ``ps.lookup`` on CUDA key tensors.

On the GPU machine, from the repository root:

    source benchmarks/device_env.sh
    python3 benchmarks/bench_hierarchy.py --out $OUT/hier.jsonl

Sections (``--sections``): ``bw`` (device copy and pinned host-to-device bandwidth: the
floors), ``static`` (static and UVM table queries vs a Triton gather by known row and
``torch.index_select``), ``combiner`` (``combine_bags`` vs ``F.embedding_bag``),
``hierarchy`` (a ``--rows`` x ``--dim`` table in an HPS directory under ``--workdir``,
served by a ParameterServer in ``--modes``; keys Zipf(``--alpha``) over the table, hot keys
scattered over the rows; ``--batch`` keys per ``ps.lookup``). Results are JSON lines; a
summary table is printed last. ``--small`` runs every section at toy sizes (also on CPU
through the Triton interpreter, to check the script).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import numpy as np

RESULTS: list[dict] = []
REPS = {"reps": 20, "warm": 3}  # --small: 1 and 0 (the interpreter is slow)


OUT_PATH: list[str] = []  # --out, appended to as results come (a killed run keeps them)


def log(**row) -> None:
    RESULTS.append(row)
    print(json.dumps(row), flush=True)
    if OUT_PATH:
        with open(OUT_PATH[0], "a") as f:
            f.write(json.dumps(row) + "\n")


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(fn, dev, reps: int | None = None, warm: int | None = None) -> float:
    """Median seconds of fn() (device-synchronised around each call)."""
    reps = min(reps or REPS["reps"], REPS["reps"])
    warm = REPS["warm"] if warm is None else min(warm, REPS["warm"])
    for _ in range(warm):
        fn()
    sync(dev)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------ floors
def section_bw(dev, small: bool) -> dict:
    import torch

    n = (1 << 20) if small else (1 << 30)  # floats: 4 GiB on the GPU
    a = torch.randn(n, device=dev)
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), dev, reps=10)
    d2d = 2 * 4 * n / t
    out = {"d2d_GBps": d2d / 1e9}
    if dev.type == "cuda":
        h = torch.randn(n // 2, pin_memory=True)
        g = torch.empty(n // 2, device=dev)
        t = bench(lambda: g.copy_(h, non_blocking=True), dev, reps=10)
        out["h2d_pinned_GBps"] = 4 * (n // 2) / t / 1e9
    log(section="bw", **out)
    return out


# ------------------------------------------------------------------------------ static / uvm
def section_static(dev, small: bool, dims=(128, 16)) -> None:
    import torch

    from keras_hps.gpu_static_table import GpuStaticTable
    from keras_hps.triton_kernels.gather import gather

    rows = 20_000 if small else 64_000_000
    nq = 4096 if small else 1 << 20
    for dim in dims:
        r = rows if dim <= 16 else rows // 4  # 16M x 128 fp32 = 8 GiB; 64M x 16 = 4 GiB
        keys = torch.randperm(r, device=dev, dtype=torch.int64) * 3 + 1
        vals = torch.randn(r, dim, device=dev)
        t0 = time.perf_counter()
        table = GpuStaticTable(keys, vals, device=dev)
        sync(dev)
        build_s = time.perf_counter() - t0
        rows_q = torch.randperm(r, device=dev)[:nq]  # unique rows, far beyond L2
        q = keys[rows_q]
        qmiss = torch.where(torch.rand(nq, device=dev) < 0.5, q, q + 1)  # keys % 3 == 2: absent
        out, hit = table.query(q)
        ok = bool(hit.all()) and torch.equal(out, vals[rows_q])
        t_static = bench(lambda t=table, k=q: t.query(k), dev)
        t_static_miss = bench(lambda t=table, k=qmiss: t.query(k), dev)
        t_gather = bench(lambda v=vals, r=rows_q: gather(v, r), dev)
        t_isel = bench(lambda v=vals, r=rows_q: torch.index_select(v, 0, r), dev)
        log(section="static", rows=r, dim=dim, keys=nq, correct=ok, build_s=build_s,
            slots=table.index.slots, probe_windows=table.index.n_windows,
            static_Gkeys=nq / t_static / 1e9, static_50miss_Gkeys=nq / t_static_miss / 1e9,
            gather_Gkeys=nq / t_gather / 1e9, index_select_Gkeys=nq / t_isel / 1e9,
            static_vs_gather=t_gather / t_static,
            static_GBps=nq * (4 * dim * 2 + 8 + 64) / t_static / 1e9)
        del table, vals


UVM_LAUNCH: dict[str, int] = {}  # the fastest launch found by section_uvm, used later
UVM_SHARE = [0.0]  # the best fetch() zero-copy share found by section_uvm


def section_uvm(dev, small: bool) -> None:
    """UVM table query (all rows in pinned host memory) over a sweep of launch configs."""
    import torch

    from keras_hps.gpu_static_table import GpuStaticTable, pinned_empty

    r, dim = (20_000, 128) if small else (16_000_000, 128)
    nq = 4096 if small else 1 << 20
    keys = torch.randperm(r, device=dev, dtype=torch.int64) * 3 + 1
    hv = pinned_empty((r, dim))
    hv.copy_(torch.randn(r, dim, device=dev))
    table = GpuStaticTable(keys, hv, device=dev, n_device=0)
    rows_q = torch.randperm(r, device=dev)[:nq]
    q = keys[rows_q]
    out, hit = table.query(q)
    ok = bool(hit.all()) and torch.equal(out.cpu(), hv[rows_q.cpu()])
    best = None
    configs = [(32, 4)] if small else [(bk, nw) for bk in (32, 64, 128, 256) for nw in (4, 8)]
    for bk, nw in configs:
        table.launch = {"block_k": bk, "num_warps": nw}
        t = bench(lambda t=table, k=q: t.query(k), dev, reps=10)
        log(section="uvm", rows=r, dim=dim, keys=nq, correct=ok, pinned=hv.is_pinned(),
            block_k=bk, num_warps=nw, uvm_Gkeys=nq / t / 1e9,
            uvm_GBps_over_bus=nq * 4 * dim / t / 1e9)
        if best is None or t < best[0]:
            best = (t, bk, nw)
    UVM_LAUNCH.update(block_k=best[1], num_warps=best[2])
    table.launch = dict(UVM_LAUNCH)
    table.zero_copy_share = 0.0
    # The same rows through the copy engine: host threads gather them into pinned staging.
    out, hit = table.query(q, host_read="copy")
    ok_copy = bool(hit.all()) and torch.equal(out.cpu(), hv[rows_q.cpu()])
    t_copy = bench(lambda t=table, k=q: t.query(k, host_read="copy"), dev, reps=10)
    t_kernel = bench(lambda t=table, k=q: t.query(k), dev, reps=10)
    idx = rows_q.cpu()
    stage = torch.empty((nq, dim), pin_memory=dev.type == "cuda")
    t_gather = bench(lambda h=hv: torch.index_select(h, 0, idx, out=stage), dev, reps=10)
    dst = torch.empty((nq, dim), device=dev)
    t_h2d = bench(lambda: dst.copy_(stage, non_blocking=True), dev, reps=10)
    # Misses of the hierarchy benchmark: ~113K rows per batch. Split and chunk size there.
    nm = min(nq, 131072)
    qm = q[:nm]
    ref_m, _ = table.query(qm)
    split = {}
    for share in (0.0, 0.2, 0.3, 0.4):
        for chunk_mb in (2, 8):
            table.zero_copy_share, table.copy_chunk_bytes = share, chunk_mb << 20
            o2, h2 = table.query(qm, host_read="copy")
            assert bool(h2.all()) and torch.equal(o2, ref_m), "fetch differs from query"
            split[(share, chunk_mb)] = bench(
                lambda t=table, k=qm: t.query(k, host_read="copy"), dev, reps=20)
    t_zc_m = bench(lambda t=table, k=qm: t.query(k), dev, reps=20)
    best_share, best_chunk = min(split, key=split.get)
    table.zero_copy_share, table.copy_chunk_bytes = 0.0, 8 << 20
    UVM_SHARE[0] = best_share
    log(section="uvm_copy_engine_split", keys=nm, best_share=best_share,
        best_chunk_MB=best_chunk, zero_copy_ms=t_zc_m * 1e3,
        **{f"fetch_share{sh}_chunk{c}MB_ms": t * 1e3 for (sh, c), t in split.items()})
    # The same table without transparent huge pages.
    hv4k = pinned_empty((r, dim), huge_pages=False)
    hv4k.copy_(hv)
    t4k = GpuStaticTable(keys, hv4k, device=dev, n_device=0)
    t4k.launch = dict(UVM_LAUNCH)
    t4k.zero_copy_share = 0.0
    log(section="uvm_huge_pages", keys=nm,
        zero_copy_ms_huge=t_zc_m * 1e3,
        zero_copy_ms_4k=bench(lambda t=t4k, k=qm: t.query(k), dev, reps=20) * 1e3,
        fetch_copy_ms_huge=split[(0.0, 8)] * 1e3,
        fetch_copy_ms_4k=bench(lambda t=t4k, k=qm: t.query(k, host_read="copy"), dev,
                               reps=20) * 1e3)
    del t4k, hv4k
    log(section="uvm_copy_engine", rows=r, dim=dim, keys=nq, correct=ok_copy,
        torch_threads=torch.get_num_threads(), fetch_copy_ms=t_copy * 1e3,
        query_zero_copy_ms=t_kernel * 1e3, fetch_copy_GBps=nq * 4 * dim / t_copy / 1e9,
        zero_copy_GBps=nq * 4 * dim / t_kernel / 1e9,
        host_index_select_GBps=nq * 4 * dim / t_gather / 1e9,
        h2d_pinned_GBps=nq * 4 * dim / t_h2d / 1e9)
    del table, hv


# ------------------------------------------------------------------------------ combiner
def section_combiner(dev, small: bool) -> None:
    import torch
    import torch.nn.functional as F

    from keras_hps.triton_kernels.combiners import combine_bags

    batch = 512 if small else 65536
    dim = 128
    lengths = torch.randint(0, 41, (batch,), device=dev)  # mean 20, some empty
    offsets = torch.zeros(batch + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(lengths, 0)
    nnz = int(offsets[-1])
    vec = torch.randn(nnz, dim, device=dev)
    w = torch.rand(nnz, device=dev)
    idx = torch.arange(nnz, device=dev)
    for combiner, weights in (("sum", None), ("mean", None), ("sum", w)):
        mode = combiner
        ours = combine_bags(vec, offsets, weights, combiner, validate=False)
        ref = F.embedding_bag(idx, vec, offsets[:-1], mode=mode, per_sample_weights=weights,
                              include_last_offset=False)
        err = float((ours - ref).norm() / ref.norm())
        t_ours = bench(
            lambda w=weights, c=combiner: combine_bags(vec, offsets, w, c, validate=False), dev
        )
        t_ref = bench(lambda w=weights, m=mode: F.embedding_bag(
            idx, vec, offsets[:-1], mode=m, per_sample_weights=w), dev)
        log(section="combiner", combiner=combiner, weighted=weights is not None, batch=batch,
            nnz=nnz, dim=dim, rel_err=err, ours_ms=t_ours * 1e3, embedding_bag_ms=t_ref * 1e3,
            ours_GBps=nnz * 4 * dim / t_ours / 1e9, speedup=t_ref / t_ours)


# ------------------------------------------------------------------------------ hierarchy
def write_table(path: str, rows: int, dim: int, dev) -> None:
    """An HPS table directory: keys 3*i + 1 (sorted), random float32 vectors."""
    import torch

    os.makedirs(path, exist_ok=True)
    (np.arange(rows, dtype=np.int64) * 3 + 1).tofile(os.path.join(path, "key"))
    chunk = max(1, (1 << 30) // (4 * dim))
    pin = dev.type == "cuda"
    buf = torch.empty((chunk, dim), pin_memory=pin)
    with open(os.path.join(path, "emb_vector"), "wb") as f:
        for s in range(0, rows, chunk):
            n = min(chunk, rows - s)
            buf[:n].copy_(torch.randn(n, dim, device=dev))
            f.write(memoryview(buf[:n].numpy()).cast("B"))


def zipf_batches(rows: int, alpha: float, batch: int, count: int, dev):
    """``count`` batches of keys: Zipf ranks over ``rows`` mapped to randomly placed keys."""
    import torch

    w = torch.arange(1, rows + 1, device=dev, dtype=torch.float64).pow_(-alpha)
    cdf = torch.cumsum(w, 0)
    cdf /= cdf[-1].clone()
    del w
    place = torch.randperm(rows, device=dev)
    out = []
    for _ in range(count):
        u = torch.rand(batch, device=dev, dtype=torch.float64)
        r = torch.searchsorted(cdf, u).clamp_(max=rows - 1)
        out.append(place[r] * 3 + 1)
    del cdf, place
    return out


def breakdown(tier, keys, dev) -> None:
    """Device time of each step of one uvm lookup (each step synchronised: an upper bound)."""
    import torch

    from keras_hps.triton_kernels.gather import gather

    rep = tier._replicas[0]
    steps = {}

    def step(name, fn):
        sync(dev)
        t0 = time.perf_counter()
        r = fn()
        sync(dev)
        steps[name + "_ms"] = (time.perf_counter() - t0) * 1e3
        return r

    ukeys, inv = step("unique", lambda: torch.unique(keys, return_inverse=True))
    vals, hit = step("cache_query", lambda: rep.cache.query(ukeys, validate=False))
    midx = step("miss_index", lambda: torch.nonzero(~hit).reshape(-1))
    mkeys = ukeys[midx]
    step("uvm_query_zero_copy", lambda: rep.table.query(mkeys))
    share = rep.table.zero_copy_share
    rep.table.zero_copy_share = 0.0
    step("uvm_fetch_copy_engine", lambda: rep.table.query(mkeys, host_read="copy"))
    rep.table.zero_copy_share = UVM_SHARE[0]
    mv, _ = step("uvm_fetch_split", lambda: rep.table.query(mkeys, host_read="copy"))
    rep.table.zero_copy_share = share
    step("scatter_misses", lambda: vals.index_copy_(0, midx, mv))
    step("cache_insert", lambda: rep.cache.insert(mkeys, mv, validate=False))
    step("gather_to_input_order", lambda: gather(vals, inv))
    log(section="hierarchy_breakdown", keys=keys.numel(), unique=ukeys.numel(),
        misses=mkeys.numel(), miss_MB_over_bus=mkeys.numel() * 4 * tier.dim / 1e6, **steps)


def profile(ps, batches, dev) -> None:
    """torch.profiler over a few `ps.lookup` calls: device time per kernel and the host's
    own time, printed (the table) and logged (the top rows)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sync(dev)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for b in batches:
            ps.lookup("bench", 0, b)
        sync(dev)
    avg = prof.key_averages()
    print(avg.table(sort_by="cuda_time_total", row_limit=25), flush=True)
    rows = sorted(avg, key=lambda e: e.device_time_total, reverse=True)[:15]
    log(section="hierarchy_profile", batches=len(batches),
        top_device_us={e.key[:60]: round(e.device_time_total / len(batches), 1) for e in rows})


def timed_lookup(ps, tier, keys, dev) -> tuple[float, int, int, int]:
    """(seconds, GPU-tier hits, misses, distinct missed keys) of one synchronised lookup;
    background inserts finish before the counts are read, outside the timing."""
    s0 = tier.stats()
    t0 = time.perf_counter()
    ps.lookup("bench", 0, keys)
    sync(dev)
    sec = time.perf_counter() - t0
    tier.wait()
    s1 = tier.stats()
    distinct = (s1["fetched"] + s1["uvm_hits"]) - (s0["fetched"] + s0["uvm_hits"])
    return sec, s1["hits"] - s0["hits"], s1["misses"] - s0["misses"], distinct


def section_hierarchy(dev, args) -> None:
    import torch

    from keras_hps.parameter_server import ParameterServer

    rows, dim, batch = args.rows, args.dim, args.batch
    if args.workdir == "auto":  # the roomier of tmpfs and disk
        cands = [d for d in ("/dev/shm", "/tmp") if os.path.isdir(d)]
        base = max(cands, key=lambda d: shutil.disk_usage(d).free)
        args.workdir = os.path.join(base, "keras_hps_bench")
        free = shutil.disk_usage(base).free
        need = rows * (4 * dim + 8)
        if need > 0.95 * free:
            rows = int(0.95 * free / (4 * dim + 8)) // 1_000_000 * 1_000_000
            log(section="hierarchy_note", note=f"only {free / 1e9:.1f} GB free in {base}: "
                f"table shrunk to {rows} rows")
    path = os.path.join(args.workdir, f"table_{rows}x{dim}")
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(path, "emb_vector")):
        write_table(path, rows, dim, dev)
    log(section="hierarchy_setup", write_s=time.perf_counter() - t0, path=path)
    count = (args.warm + 4 * (args.reps + 2) + 1 + 3 * args.profile
             + (args.warm + args.reps if args.lfu else 0))
    batches = zipf_batches(rows, args.alpha, batch, count, dev)
    uniq = statistics.mean(int(torch.unique(b).numel()) for b in batches[:5])
    emb = np.memmap(os.path.join(path, "emb_vector"), np.float32, "r", shape=(rows, dim))
    runs = [(m, a) for m in args.modes for a in args.admissions.split(",")]
    for mode, admission in runs:
        if time.time() > args.deadline:
            log(section="hierarchy", mode=mode, admission=admission, skipped="deadline")
            continue
        cfg = {
            "volatile_db": {"type": "hash_map" if mode == "dynamic" else "disabled",
                            "initial_cache_rate": 0.0},
            "models": [{
                "model": "bench", "sparse_files": [path],
                "embedding_vecsize_per_table": [dim],
                "maxnum_catfeature_query_per_table_per_sample": [1],
                "max_batch_size": batch, "gpucache": True, "gpucacheper": args.cache_frac,
                "hit_rate_threshold": args.threshold, "embedding_cache_type": mode,
                "gpu_cache_admission": admission,
                "deployed_device_list": [dev.index or 0] if dev.type == "cuda" else [0],
            }],
        }
        t0 = time.perf_counter()
        ps = ParameterServer(cfg)
        init_s = time.perf_counter() - t0
        try:
            tier = ps.table("bench", 0).gpu
            for rep in tier._replicas:
                if rep.table is not None:
                    rep.table.launch = dict(UVM_LAUNCH)
            # Exactness on a sample, against the file itself.
            q = batches[0][:20000]
            got = ps.lookup("bench", 0, q)
            want = emb[((q.cpu().numpy() - 1) // 3)]
            exact = bool(np.array_equal(got.cpu().numpy(), want)) and got.device == q.device
            n_warm = args.warm if mode != "dynamic" else min(args.warm, 3)
            n_reps = args.reps if mode != "dynamic" else min(args.reps, 3)
            for b in batches[:n_warm]:
                ps.lookup("bench", 0, b)
            tier.wait()
            sync(dev)
            pos = n_warm
            # Variants of how uvm misses read the pinned table: (host_read, zero-copy share).
            # They take turns batch by batch, so that the machine's drift hits all alike.
            # (Probing every key in place instead of unique first, the former --flat, was
            # not adopted: docs/benchmarks/gpu_hierarchy.md, code at commit bd7285d.)
            variants = ([("copy", 0.0), ("copy", 0.2), ("copy", 0.3), ("kernel", 0.0)]
                        if mode == "uvm" else [("-", 0.0)])

            def use(host_read, share, tier=tier):
                tier.host_read = host_read  # uvm misses: copy engine or zero-copy kernel reads
                for rep in tier._replicas:
                    if rep.table is not None:
                        rep.table.zero_copy_share = share

            tier.hit_rate_threshold = args.threshold
            for v in variants:  # each variant's kernels compiled, buffers sized
                use(*v)
                for b in batches[pos:pos + 2]:
                    ps.lookup("bench", 0, b)
                pos += 2
            tier.wait()
            sync(dev)
            times = {v: [] for v in variants}
            counts = {v: [0, 0, 0] for v in variants}
            for _ in range(n_reps):
                for v in variants:
                    use(*v)
                    sec, h, mi, dist = timed_lookup(ps, tier, batches[pos], dev)
                    pos += 1
                    times[v].append(sec)
                    counts[v][0] += h
                    counts[v][1] += mi
                    counts[v][2] += dist
            for v in variants:
                dh, dm, dd = counts[v]
                log(section="hierarchy", mode=mode, admission=admission, host_read=v[0],
                    zero_copy_share=v[1], path="ps.lookup",
                    rows=rows, dim=dim, batch=batch, alpha=args.alpha,
                    cache_frac=args.cache_frac, cache_slots=tier.slots,
                    threshold=args.threshold, init_s=init_s, exact_sample=exact,
                    warm_batches=n_warm, mean_unique_per_batch=uniq,
                    gpu_hit_rate_unique=dh / max(1, dh + dm),
                    distinct_misses_per_batch=dd / max(1, len(times[v])),
                    uvm_launch=dict(UVM_LAUNCH),
                    Gkeys_per_s=batch * len(times[v]) / sum(times[v]) / 1e9,
                    batch_ms_median=statistics.median(times[v]) * 1e3,
                    batch_ms_p90=float(np.percentile(times[v], 90)) * 1e3,
                    batches=len(times[v]))
            if mode == "uvm" and pos < len(batches):
                breakdown(tier, batches[pos], dev)
                pos += 1
            if args.profile and dev.type == "cuda":
                use(*variants[2 if mode == "uvm" else 0])  # the default miss reads
                profile(ps, batches[pos:pos + 3], dev)
                pos += 3
            if mode == "uvm" and args.lfu:
                # The same tier with LFU caches (frequency keeps the Zipf head resident).
                from keras_hps.gpu_cache import GpuEmbeddingCache

                for rep in tier._replicas:
                    rep.cache = GpuEmbeddingCache(tier.slots, tier.dim, device=rep.device,
                                                  policy="lfu")
                tier.host_read, tier.hit_rate_threshold = "copy", args.threshold
                for rep in tier._replicas:
                    rep.table.zero_copy_share = UVM_SHARE[0]
                for b in batches[pos:pos + n_warm]:
                    ps.lookup("bench", 0, b)
                pos += n_warm
                tier.wait()
                sync(dev)
                runs = [timed_lookup(ps, tier, b, dev)[:3] for b in batches[pos:pos + n_reps]]
                times = [r[0] for r in runs]
                dh, dm = sum(r[1] for r in runs), sum(r[2] for r in runs)
                log(section="hierarchy", mode=mode, policy="lfu", host_read="copy",
                    zero_copy_share=UVM_SHARE[0], threshold=args.threshold,
                    gpu_hit_rate_unique=dh / max(1, dh + dm),
                    Gkeys_per_s=batch * len(times) / sum(times) / 1e9,
                    batch_ms_median=statistics.median(times) * 1e3, batches=len(times))
        finally:
            ps.close()
            del ps
            torch.cuda.empty_cache() if dev.type == "cuda" else None
    if args.cleanup:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default="bw,static,uvm,combiner,hierarchy")
    ap.add_argument("--rows", type=int, default=100_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1 << 20)
    ap.add_argument("--alpha", type=float, default=1.05)
    ap.add_argument("--cache-frac", type=float, default=0.1)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--modes", default="uvm,dynamic")
    ap.add_argument("--warm", type=int, default=60)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--workdir", default="auto")
    ap.add_argument("--cleanup", action="store_true")
    ap.add_argument("--lfu", action="store_true", help="uvm: also time the tier with LFU caches")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler table of a few default lookups at the end")
    ap.add_argument("--admissions", default="none",
                    help="GPU cache admission policies to run (comma list: none,tinylfu)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip later hierarchy modes once this many seconds have passed")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.deadline = time.time() + args.budget_s
    if args.out:
        OUT_PATH.append(args.out)
    import torch

    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    if args.small:
        args.rows, args.batch, args.warm, args.reps = 20_000, 2048, 2, 2
        REPS.update(reps=1, warm=0)
    info = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "argv": sys.argv[1:],
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    log(section="info", **info)
    sections = args.sections.split(",")
    try:
        if "bw" in sections:
            section_bw(dev, args.small)
        if "static" in sections:
            section_static(dev, args.small)
        if "uvm" in sections and dev.type == "cuda":
            section_uvm(dev, args.small)
        if "combiner" in sections:
            section_combiner(dev, args.small)
        if "hierarchy" in sections:
            section_hierarchy(dev, args)
    finally:
        print("\nsummary")
        for r in RESULTS:
            print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in r.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
