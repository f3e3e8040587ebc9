"""Prototype: query cost of candidate GPU-cache layouts, beside the plain gather (GPU only).

A measurement to decide the cache layout before rebuilding the kernels around it; results in
docs/benchmarks/gpu_cache.md ("Layout study"). All-hit queries of 1M unique resident keys,
64M-slot caches (far larger than L2), timed with ``triton.testing.do_bench`` (L2 flushed
between calls). Layouts:

- ``tags32``: the cache before the study (32 slots per set, 15-bit tags, (key, score)
  records, rows apart); touch = LRU stamp into the record, none, or a bit in an 8 MiB bitmap.
  That layout is gone: its rows were measured by this script as of commit a1e3e10, and
  ``cache_query`` now runs the ``keys8`` layout with the bitmap touch.
- ``keys8`` / ``keys16``: no tags; a set's 8 (16) int64 keys are one 64 (128) byte block, the
  rows apart; touch = none, an int32 score array, or the bitmap.
- ``region8``: as ``keys8`` but each set's key block and its 8 rows lie in one contiguous
  region (the row read lands in the DRAM page the key block opened).

Usage (GPU machine, repository root): ``python3 benchmarks/proto_cache_layouts.py``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from keras_hps.gpu_cache import GpuEmbeddingCache
from keras_hps.triton_kernels.cache_insert import cache_insert
from keras_hps.triton_kernels.cache_layout import block_d, set_index
from keras_hps.triton_kernels.cache_query import cache_query
from keras_hps.triton_kernels.gather import gather_rows

EMPTY = torch.iinfo(torch.int64).max
RESULTS: list[dict] = []


def log(*a: object) -> None:
    print(*a, flush=True)


@triton.jit(do_not_specialize=["num_sets"])
def _sets_kernel(keys_ptr, n, out_ptr, num_sets, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=0)
    tl.store(out_ptr + offs, set_index(k, num_sets), mask=m)


@triton.jit
def _touch(bits_ptr, score_ptr, slot, hit, stamp, TOUCH: tl.constexpr):
    if TOUCH == 1:
        tl.store(score_ptr + slot, stamp, mask=hit)
    elif TOUCH == 2:
        one = tl.full(slot.shape, 1, tl.int32)
        tl.atomic_or(bits_ptr + (slot >> 5), one << (slot & 31).to(tl.int32), mask=hit,
                     sem="relaxed")


@triton.jit(do_not_specialize=["num_sets", "stamp"])
def _keys_query(keys_ptr, n, kb_ptr, vec_ptr, out_ptr, hit_ptr, bits_ptr, score_ptr, num_sets,
                stamp, W: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_K: tl.constexpr, TOUCH: tl.constexpr, REGION: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=0)
    s = set_index(k, num_sets)
    w = tl.arange(0, W)
    if REGION:
        base = s * (2 * W + W * DIM)
        kp = (vec_ptr + base).to(tl.pointer_type(tl.int64))
        kb = tl.load(kp[:, None] + w[None, :], mask=m[:, None], other=0)
    else:
        kb = tl.load(kb_ptr + s[:, None] * W + w[None, :], mask=m[:, None], other=0)
    j = tl.max(tl.where(kb == k[:, None], w[None, :], -1), axis=1)
    hit = m & (j >= 0)
    j = tl.maximum(j, 0).to(tl.int64)
    slot = s * W + j
    _touch(bits_ptr, score_ptr, slot, hit, stamp, TOUCH)
    if REGION:
        rbase = base + 2 * W + j * DIM
    else:
        rbase = slot * DIM
    for d0 in tl.static_range(0, DIM, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = (d < DIM)[None, :]
        r = tl.load(vec_ptr + rbase[:, None] + d[None, :], mask=hit[:, None] & dm, other=0.0)
        tl.store(out_ptr + offs[:, None] * DIM + d[None, :], r, mask=m[:, None] & dm)
    tl.store(hit_ptr + offs, hit, mask=m)


def place(keys: torch.Tensor, num_sets: int, w: int) -> torch.Tensor:
    """Key blocks [num_sets, w]: candidate keys placed in their hash set while it has room."""
    n = keys.numel()
    sets = torch.empty(n, dtype=torch.int64, device=keys.device)
    _sets_kernel[(triton.cdiv(n, 1024),)](keys, n, sets, num_sets, BLOCK=1024)
    sorted_sets, order = torch.sort(sets)
    counts = torch.bincount(sorted_sets, minlength=num_sets)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=keys.device) - starts[sorted_sets]
    keep = rank < w
    kb = torch.full((num_sets * w,), EMPTY, dtype=torch.int64, device=keys.device)
    kb[sorted_sets[keep] * w + rank[keep]] = keys[order[keep]]
    return kb.view(num_sets, w)


def bench(fn, rotate: int) -> float:
    st = {"i": 0}

    def call() -> None:
        fn(st["i"] % rotate)
        st["i"] += 1

    return do_bench(call, warmup=50, rep=300, return_mode="median")


def record(name: str, dim: int, n: int, ms: float, base: float, note: str = "") -> None:
    r = {"layout": name, "dim": dim, "ms": round(ms, 4), "Gkeys_s": round(n / ms / 1e6, 3),
         "pct_of_gather": round(100 * base / ms, 1), "note": note}
    RESULTS.append(r)
    log(f"  {name:<36} d={dim:<4} {ms:8.4f} ms {r['Gkeys_s']:7.3f} Gk/s "
        f"{r['pct_of_gather']:6.1f}% of gather {note}")


def study(dim: int, slots: int, n: int, dev: torch.device, gen: torch.Generator) -> None:
    log(f"\n== dim {dim}, {slots:,} slots, {n:,} keys per call ==")
    R = 4
    table = torch.randn(slots, dim, device=dev, generator=gen)
    idx = [torch.randperm(slots, device=dev, generator=gen)[:n] for _ in range(R)]
    g = bench(lambda i: gather_rows(table, idx[i]), R)
    record("gather (baseline)", dim, n, g, g)
    bits = torch.zeros(slots // 32, dtype=torch.int32, device=dev)
    scores = torch.zeros(slots, dtype=torch.int32, device=dev)
    out = torch.empty(n, dim, device=dev)
    hit = torch.empty(n, dtype=torch.bool, device=dev)
    bd = block_d(dim)
    cand = torch.randint(0, 2**62, (int(slots * 1.25),), device=dev, generator=gen)

    # The shipped cache (keys8 + bitmap), through cache_query.
    cache = GpuEmbeddingCache(slots, dim, device=dev)
    for lo in range(0, cand.numel(), 1 << 22):
        k = cand[lo:lo + (1 << 22)]
        cache_insert(cache.arrays, k, torch.randn(k.numel(), dim, device=dev, generator=gen),
                     stamp=1, validate=False)
    a = cache.arrays
    occ = torch.nonzero(a.occupied).squeeze(1)
    qa = [a.keys[occ[torch.randperm(occ.numel(), device=dev, generator=gen)[:n]]].contiguous()
          for _ in range(R)]
    ms = bench(lambda i: cache_query(a, qa[i], validate=False), R)
    record("cache_query (LRU marks)", dim, n, ms, g)
    ms = bench(lambda i: cache_query(a, qa[i], touch=False, validate=False), R)
    record("cache_query, no touch", dim, n, ms, g)
    cache = a = qa = occ = None
    torch.cuda.empty_cache()

    # Tag-less key blocks, rows apart (rows: `table`) or in one region per set.
    for w, region in ((8, False), (16, False), (8, True)):
        num_sets = slots // w
        kb = place(cand, num_sets, w)
        flat = kb.reshape(-1)
        occ = torch.nonzero(flat != EMPTY).squeeze(1)
        picks = [occ[torch.randperm(occ.numel(), device=dev, generator=gen)[:n]] for _ in range(R)]
        qk = [flat[p].contiguous() for p in picks]
        if region:
            stride = 2 * w + w * dim
            reg = torch.empty(num_sets, stride, device=dev)
            reg[:, :2 * w] = kb.view(torch.float32).view(num_sets, 2 * w)
            reg[:, 2 * w:] = table.view(num_sets, w * dim)
            vec = reg
        else:
            vec = table
        name = f"region{w}" if region else f"keys{w}"
        log(f"  {name}: occupancy {occ.numel() / slots:.4f}")
        configs = [(bk_, nw_) for bk_ in ((32, 64, 128) if dim <= 32 else (16, 32))
                   for nw_ in (4, 8)]
        for touch, tname in ((0, "no touch"), (1, "int32 score store"), (2, "bitmap touch")):
            best = None
            for bk_, nw_ in configs:
                def run(i: int, bk_=bk_, nw_=nw_, qk=qk, kb=kb, vec=vec, num_sets=num_sets, w=w,
                        touch=touch, region=region) -> None:
                    _keys_query[(triton.cdiv(n, bk_),)](
                        qk[i], n, kb, vec, out, hit, bits, scores, num_sets, 7, W=w, DIM=dim,
                        BLOCK_D=bd, BLOCK_K=bk_, TOUCH=touch, REGION=region, num_warps=nw_)
                ms = bench(run, R)
                if best is None or ms < best[0]:
                    best = (ms, bk_, nw_)
            run(0)
            assert bool(hit.all()), f"{name} missed resident keys"
            assert torch.equal(out, table[picks[0]]), f"{name} rows differ"
            record(f"{name}, {tname}", dim, n, best[0], g, f"block_k={best[1]} warps={best[2]}")
        kb = flat = occ = picks = qk = vec = reg = None
        torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--slots", type=int, default=1 << 26)
    p.add_argument("--keys", type=int, default=1 << 20)
    p.add_argument("--dims", default="16,128")
    p.add_argument("--json", default="")
    args = p.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    log(torch.cuda.get_device_name(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    for dim in (int(d) for d in args.dims.split(",")):
        study(dim, args.slots, args.keys, dev, gen)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RESULTS, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
