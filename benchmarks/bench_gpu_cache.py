"""Benchmark of the dynamic GPU embedding cache kernels against a plain gather (needs CUDA).

    source benchmarks/device_env.sh; python3 benchmarks/bench_gpu_cache.py [--quick] [--sweep]

Measures, in one run and beside its baselines (plain Triton gather of the same rows by known
index, torch.index_select):
- device-to-device copy bandwidth (the floor's denominator);
- query, all hits, unique random keys, 1M per call, cache of 64M slots, dims 128 and 16;
- insert/replace of 1M new unique keys per call into a full 64M-slot dim-64 cache (LRU, LFU);
- fused multi-table query over the 26 Criteo-FL15 tables (dim 128) vs 26 per-table launches.
Correctness is checked at full size (query rows equal the gathered rows bit for bit, inserted
keys all hit afterwards, fused equals per-table). Prints a table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
import triton
from triton.testing import do_bench

from keras_hps.gpu_cache import GpuCacheGroup, GpuEmbeddingCache
from keras_hps.triton_kernels.cache_insert import cache_insert, sort_by_set
from keras_hps.triton_kernels.cache_query import cache_query
from keras_hps.triton_kernels.gather import gather

CRITEO_FL15 = [7912889, 33823, 17139, 7339, 20046, 4, 7105, 1382, 63, 5554114, 582469, 245828,
               11, 2209, 10667, 104, 4, 968, 15, 8165896, 2675940, 7156453, 302516, 12022, 97, 35]
ROWS: list[dict] = []


def log(*a: object) -> None:
    print(*a, flush=True)


def bench(fn, rotate: int = 1) -> float:
    """Median ms per call; ``fn(i)`` gets the rotation index."""
    state = {"i": 0}

    def call() -> None:
        fn(state["i"] % rotate)
        state["i"] += 1

    return do_bench(call, warmup=50, rep=300, return_mode="median")


def row(op: str, dim: int, n: int, ms: float, bytes_per_key: float, bw: float,
        base_ms: float | None = None, note: str = "") -> None:
    kps = n / ms / 1e6  # G keys/s
    floor = n * bytes_per_key / bw  # ms at the copy bandwidth (bw in bytes/ms)
    r = {"op": op, "dim": dim, "keys": n, "ms": round(ms, 4), "Gkeys_s": round(kps, 3),
         "bytes_per_key": bytes_per_key, "floor_ms": round(floor, 4),
         "pct_of_floor": round(100 * floor / ms, 1),
         "pct_of_gather": round(100 * base_ms / ms, 1) if base_ms else None, "note": note}
    ROWS.append(r)
    log(f"  {op:<34} d={dim:<4} {ms:8.4f} ms {kps:7.3f} Gk/s  floor {floor:.4f} ms "
        f"({r['pct_of_floor']}% of floor)" + (f"  {r['pct_of_gather']}% of gather" if base_ms
                                              else "") + (f"  [{note}]" if note else ""))


def copy_bandwidth(dev: torch.device) -> float:
    """Bytes/ms of a large device-to-device copy, read + write counted."""
    n = 1 << 29  # 2 GiB of float32
    a = torch.randn(n, device=dev)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * n * 4 / ms


def fill(cache: GpuEmbeddingCache, n_keys: int, gen: torch.Generator, batch: int = 1 << 22) -> None:
    """Insert ``n_keys`` random (practically unique) keys with random rows."""
    dev = cache.device
    for lo in range(0, n_keys, batch):
        b = min(batch, n_keys - lo)
        k = torch.randint(0, 2**62, (b,), device=dev, generator=gen)
        v = torch.randn(b, cache.dim, device=dev, generator=gen)
        cache_insert(cache.arrays, k, v, policy=cache.policy, stamp=1, validate=False)
    torch.cuda.synchronize()


def resident_batches(cache: GpuEmbeddingCache, n: int, count: int, gen: torch.Generator
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of ``n`` unique resident (keys, slot) pairs in random order."""
    a = cache.arrays
    occ = torch.nonzero(a.occupied).squeeze(1)
    out = []
    for _ in range(count):
        slots = occ[torch.randperm(occ.numel(), device=occ.device, generator=gen)[:n]]
        out.append((a.keys[slots].contiguous(), slots.contiguous()))
    return out


def query_section(dim: int, cap: int, n: int, bw: float, sweep: bool, gen: torch.Generator,
                  dev: torch.device) -> dict:
    log(f"\n== query, all hits, dim {dim}, capacity {cap:,} slots, {n:,} unique keys/call ==")
    cache = GpuEmbeddingCache(cap, dim, device=dev)
    t0 = time.time()
    fill(cache, int(cap * 1.25), gen)
    occ = int(cache.arrays.occupied.sum())
    log(f"  filled to {occ / cache.capacity:.4f} in {time.time() - t0:.1f} s")
    R = 6
    batches = resident_batches(cache, n, R, gen)
    table = cache.arrays.vectors
    # Correctness at full size: all hit, rows equal the gathered rows exactly.
    for keys, slots in batches[:2]:
        out, hit = cache_query(cache.arrays, keys, validate=True)
        ref = gather(table, slots)
        assert bool(hit.all()), "resident keys missed"
        assert torch.equal(out, ref), "query rows differ from the gathered rows"
        assert torch.equal(ref, table.index_select(0, slots))
    miss_keys = torch.randint(0, 2**62, (n,), device=dev, generator=gen) | 1
    out, hit = cache_query(cache.arrays, miss_keys)
    log(f"  check ok: hits exact; random absent keys hit rate {hit.float().mean().item():.2e}")

    def best(make, configs):
        res = []
        for cfg in configs:
            try:
                ms = bench(make(cfg), R)
            except Exception as e:  # noqa: BLE001 - report and go on with other configs
                log(f"    config {cfg} failed: {type(e).__name__}: {str(e)[:300]}")
                continue
            res.append((ms, cfg))
        res.sort(key=lambda r: r[0])
        return res

    def show(name, res):
        log(f"  sweep {name}: " + ", ".join(f"{c} {ms:.4f}" for ms, c in res[:8]))

    base = [{"block_k": bk, "num_warps": nw} for bk in ((32, 64, 128) if dim <= 32
                                                        else (16, 32, 64)) for nw in (4, 8)]
    if not sweep:
        base = [{}]
    g = best(lambda c: lambda i: gather(table, batches[i][1], **c), base)
    g += best(lambda c: lambda i: gather(table, batches[i][1], **c),
              [dict(g[0][1], row_evict="evict_first")])
    g.sort(key=lambda r: r[0])
    q = best(lambda c: lambda i: cache_query(cache.arrays, batches[i][0],
                                             validate=False, **c), base)
    if sweep:
        top = q[0][1]
        variants = [dict(top, row_evict="evict_first")]
        q += best(lambda c: lambda i: cache_query(cache.arrays, batches[i][0],
                                                  validate=False, **c), variants)
        q.sort(key=lambda r: r[0])
        show("gather", g)
        show("query", q)
    qcfg = q[0][1]
    qn = bench(lambda i: cache_query(cache.arrays, batches[i][0], touch=False, validate=False,
                                     **qcfg), R)
    # 60% hits, 40% absent keys (HKV's protocol), shuffled.
    mixed = []
    for keys, _slots in batches[:R]:
        k = keys.clone()
        nm = int(0.4 * n)
        k[:nm] = torch.randint(0, 2**62, (nm,), device=dev, generator=gen)
        mixed.append(k[torch.randperm(n, device=dev, generator=gen)])
    qm = bench(lambda i: cache_query(cache.arrays, mixed[i], validate=False,
                                     **qcfg), R)
    # Zipf(1.05) over the resident keys: repeats within a call, hot rows reused from L2.
    occ_slots = torch.nonzero(cache.arrays.occupied).squeeze(1)
    perm = occ_slots[torch.randperm(occ_slots.numel(), device=dev, generator=gen)]
    zipf = []
    rs = np.random.default_rng(7)
    for _ in range(R):
        r = rs.zipf(1.05, size=3 * n)
        r = r[r <= perm.numel()][:n] - 1
        zipf.append(cache.arrays.keys[perm[torch.from_numpy(r).to(dev)]].contiguous())
    qz = bench(lambda i: cache_query(cache.arrays, zipf[i], validate=False,
                                     **qcfg), R)
    qlfu = bench(lambda i: cache_query(cache.arrays, batches[i][0], policy="lfu",
                                       validate=False, **qcfg), R)
    qzlfu = bench(lambda i: cache_query(cache.arrays, zipf[i], policy="lfu", validate=False,
                                        **qcfg), R)
    gms = g[0][0]
    isel = bench(lambda i: table.index_select(0, batches[i][1]), R)
    cq = bench(lambda i: cache.query(batches[i][0]), R)
    cqn = bench(lambda i: cache.query(batches[i][0], validate=False), R)
    gather_b = 8 + 8 * dim
    # key, the set's 64-byte key block, row read and written, hit flag (the LRU mark is an
    # atomic on an 8 MiB bitmap that stays in L2: not counted)
    query_b = 8 + 64 + 8 * dim + 1
    row("triton gather (yardstick)", dim, n, gms, gather_b, bw, gms, f"cfg {g[0][1]}")
    row("torch.index_select", dim, n, isel, gather_b, bw, gms)
    row("cache query kernel (LRU touch)", dim, n, q[0][0], query_b, bw, gms, f"cfg {qcfg}")
    row("cache query kernel (no touch)", dim, n, qn, query_b, bw, gms)
    row("cache query kernel, 60% hits", dim, n, qm, query_b - 0.4 * 8 * dim, bw, gms)
    row("cache query kernel, Zipf 1.05 keys", dim, n, qz, query_b, bw, gms, "L2 reuse")
    row("cache query kernel (LFU count)", dim, n, qlfu, query_b + 64, bw, gms,
        "atomic add per hit on the score array")
    row("cache query kernel, Zipf 1.05, LFU", dim, n, qzlfu, query_b, bw, gms,
        "atomics on hot slots")
    row("GpuEmbeddingCache.query", dim, n, cq, query_b, bw, gms,
        "checks keys (a device sync), own stream, counters")
    row("GpuEmbeddingCache.query(validate=False)", dim, n, cqn, query_b, bw, gms)
    return qcfg


def insert_section(dim: int, cap: int, n: int, bw: float, gen: torch.Generator,
                   dev: torch.device, policy: str, sweep: bool) -> None:
    log(f"\n== insert/replace into a full cache, dim {dim}, {policy}, capacity {cap:,}, "
        f"{n:,} new unique keys/call ==")
    cache = GpuEmbeddingCache(cap, dim, device=dev, policy=policy)
    fill(cache, int(cap * 1.25), gen)
    occ = int(cache.arrays.occupied.sum())
    log(f"  filled to {occ / cache.capacity:.4f}")
    n_batches = 160
    keys = [torch.randint(0, 2**62, (n,), device=dev, generator=gen) for _ in range(n_batches)]
    vals = [torch.randn(n, dim, device=dev, generator=gen) for _ in range(4)]
    # Correctness at full size: every inserted key is then resident with its row.
    counters = torch.zeros(4, dtype=torch.int64, device=dev)
    cache_insert(cache.arrays, keys[0], vals[0], policy=policy, stamp=5, counters=counters)
    out, hit = cache_query(cache.arrays, keys[0], touch=False)
    assert bool(hit.all()) and torch.equal(out, vals[0]), "inserted keys not all resident"
    ins, ev = counters[2].item(), counters[3].item()
    log(f"  check ok: {n:,} inserted, all resident; insertions {ins:,}, evictions {ev:,}")

    def timed(fn, count):
        ev0 = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        ev1 = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        for i in range(count):
            ev0[i].record()
            fn(i)
            ev1[i].record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in zip(ev0, ev1, strict=True))

    cfgs = [(32, 4), (32, 8), (64, 4)] if sweep else [(None, None)]
    res = []
    it = iter(range(1, n_batches))
    for bk, nw in cfgs:
        cache_insert(cache.arrays, keys[next(it)], vals[0], policy=policy, stamp=6,
                     validate=False, block_k=bk, num_warps=nw)  # compile outside the timing
        idx = [next(it) for _ in range(12)]
        ms = timed(lambda i, idx=idx, bk=bk, nw=nw: cache_insert(
            cache.arrays, keys[idx[i]], vals[i % 4], policy=policy, stamp=6 + i,
            validate=False, block_k=bk, num_warps=nw), len(idx))
        res.append((ms, bk, nw))
    res.sort()
    if sweep:
        log("  sweep insert: " + ", ".join(f"({bk},{nw}) {ms:.4f}" for ms, bk, nw in res[:6]))
    bk, nw = res[0][1:]
    left = list(it)
    ms = timed(lambda i: cache_insert(cache.arrays, keys[left[i]], vals[i % 4], policy=policy,
                                      stamp=100 + i, validate=False, block_k=bk, num_warps=nw),
               len(left))
    sort_ms = timed(lambda i: sort_by_set(keys[i], cache.num_sets), 20)
    slots = torch.randint(0, cache.capacity, (n,), device=dev, generator=gen)
    table = cache.arrays.vectors
    scatter_ms = bench(lambda i: table.index_copy_(0, slots, vals[i]), 4)
    # bytes: key 8 + value row in 4d + the set's key block 64 and scores 64 + key and score
    # sectors written 64 + row out 4d (the set sort and the L2-resident marks not counted)
    insert_b = 8 + 4 * dim + 64 + 64 + 64 + 4 * dim
    row(f"insert/replace ({policy}), full cache", dim, n, ms, insert_b, bw, None,
        f"cfg ({bk},{nw}); {len(left)} fresh batches; incl. set sort {sort_ms:.4f} ms")
    row("torch.index_copy_ (scatter rows)", dim, n, scatter_ms, 8 + 8 * dim, bw, None,
        "known slots, no hashing")


def criteo_group(dim: int, gen: torch.Generator, dev: torch.device) -> GpuCacheGroup:
    """The 26 Criteo FL15 tables' caches, each as large as its table and filled with rows
    0..rows-1 (keys = row ids)."""
    group = GpuCacheGroup([(c, dim) for c in CRITEO_FL15], device=dev)
    for i, c in enumerate(CRITEO_FL15):
        for lo in range(0, c, 1 << 22):
            k = torch.arange(lo, min(c, lo + (1 << 22)), device=dev)
            cache_insert(group[i].arrays, k, torch.randn(k.numel(), dim, device=dev,
                                                         generator=gen), stamp=1, validate=False)
    torch.cuda.synchronize()
    return group


def fused_section(dim: int, batch: int, bw: float, gen: torch.Generator, dev: torch.device,
                  qcfg: dict) -> None:
    nt = len(CRITEO_FL15)
    log(f"\n== fused 26-table query (Criteo FL15 cardinalities, whole tables cached), dim {dim}, "
        f"batch {batch:,} samples ==")
    group = criteo_group(dim, gen, dev)
    R = 4
    rot = [[torch.randint(0, c, (batch,), device=dev, generator=gen) for c in CRITEO_FL15]
           for _ in range(R)]
    vals, hits = group.query(rot[0])
    for i in range(nt):
        v, h = cache_query(group[i].arrays, rot[0][i], touch=False)
        assert torch.equal(v, vals[i]) and torch.equal(h, hits[i])
    rate = float(torch.cat(hits).float().mean())
    log(f"  check ok: fused equals per-table; hit rate {rate:.4f} (a cache as large as its "
        f"table still overflows some sets)")
    # Baseline: the same rows gathered by known index from dense tables (native embeddings).
    dense = torch.empty(sum(CRITEO_FL15), dim, device=dev)
    bases = torch.tensor([0] + CRITEO_FL15[:-1], device=dev).cumsum(0)
    dense_idx = [torch.cat([r[t] + bases[t] for t in range(nt)]) for r in rot]
    from keras_hps.triton_kernels.cache_fused_query import fused_cache_query
    flat = [torch.cat(r) for r in rot]
    counts, dims = [batch] * nt, [dim] * nt
    fused = bench(lambda i: fused_cache_query(group._params, flat[i], counts, dims, **qcfg), R)
    per = bench(lambda i: [cache_query(group[t].arrays, rot[i][t],
                                       validate=False, **qcfg) for t in range(nt)], R)
    gq = bench(lambda i: group.query(rot[i]), R)
    dg = bench(lambda i: gather(dense, dense_idx[i]), R)
    fnt = bench(lambda i: fused_cache_query(group._params, flat[i], counts, dims, touch=False,
                                            **qcfg), R)
    flfu = bench(lambda i: fused_cache_query(group._params, flat[i], counts, dims, policy="lfu",
                                             **qcfg), R)
    # Per-table breakdown: which tables cost the time.
    dbase = [int(x) for x in bases.tolist()]
    per_t = []
    for t in range(nt):
        tq = bench(lambda i, t=t: cache_query(group[t].arrays, rot[i][t], touch=False,
                                              validate=False, **qcfg), R)
        tg = bench(lambda i, t=t: gather(dense, rot[i][t] + dbase[t]), R)
        per_t.append((tq, tg, t))
    per_t.sort(reverse=True)
    log("  slowest tables (query ms, dense gather ms, rows): " + ", ".join(
        f"t{t}: {tq:.4f}/{tg:.4f}/{CRITEO_FL15[t]}" for tq, tg, t in per_t[:8]))
    n = batch * nt
    query_b = 8 + 64 + 8 * dim + 1
    row("dense gather of the same rows (1 launch)", dim, n, dg, 8 + 8 * dim, bw, dg,
        "hot rows of tiny tables")
    row("fused 26-table query kernel", dim, n, fused, query_b, bw, dg)
    row("fused 26-table query kernel, no touch", dim, n, fnt, query_b, bw, dg)
    row("fused 26-table query kernel, LFU", dim, n, flfu, query_b, bw, dg)
    row("26 per-table query launches", dim, n, per, query_b, bw, dg)
    row("GpuCacheGroup.query (checked)", dim, n, gq, query_b, bw, dg)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--sweep", action="store_true", help="sweep block sizes and warps")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    ap.add_argument("--only", default="query,insert,fused")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        log("needs a CUDA device")
        return 2
    dev = torch.device("cuda", 0)
    p = torch.cuda.get_device_properties(dev)
    log(f"device {p.name}, {p.multi_processor_count} SMs, L2 {p.L2_cache_size / 2**20:.0f} MiB, "
        f"torch {torch.__version__}, triton {triton.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    gen = torch.Generator(device=dev)
    gen.manual_seed(1234)
    bw = copy_bandwidth(dev)
    log(f"device-to-device copy: {bw / 1e9:.3f} TB/s (read + write)")
    cap = (1 << 20) if args.quick else (1 << 26)
    n = (1 << 16) if args.quick else (1 << 20)
    only = set(args.only.split(","))
    qcfg = {}
    if "query" in only:
        for dim in (128, 16):
            cfg = query_section(dim, cap, n, bw, args.sweep, gen, dev)
            qcfg = cfg if dim == 128 else qcfg
            torch.cuda.empty_cache()
    if "insert" in only:
        for policy in ("lru", "lfu"):
            insert_section(64, cap, n, bw, gen, dev, policy, args.sweep and policy == "lru")
            torch.cuda.empty_cache()
    if "fused" in only:
        fused_section(128, 4096 if args.quick else 32768, bw, gen, dev, qcfg)
    log("\n| op | dim | keys/call | ms | G keys/s | B/key | floor ms | % of floor | % of gather |")
    log("|---|---|---|---|---|---|---|---|---|")
    for r in ROWS:
        log(f"| {r['op']} | {r['dim']} | {r['keys']:,} | {r['ms']} | {r['Gkeys_s']} | "
            f"{r['bytes_per_key']} | {r['floor_ms']} | {r['pct_of_floor']} | "
            f"{r['pct_of_gather'] if r['pct_of_gather'] else ''} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_TBps": bw / 1e9, "rows": ROWS}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
