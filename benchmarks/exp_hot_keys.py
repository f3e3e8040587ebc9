"""Experiment: the cache query on hot (Zipf) keys and the fused 26-table query (GPU only).

After the move to 8-slot key blocks and an LRU marks bitmap, the all-hit uniform query got
faster but the Zipf(1.05) query and the fused 26-table query got slower (benchmarks/
bench_gpu_cache.py, docs/benchmarks/gpu_cache.md). This script separates the suspects: the
atomic on the marks word of hot slots (``mark_check``, now the default, reads the word first
and skips the atomic where the bit is set; for LFU it skips counts at ``LFU_CAP``), touch at
all (``touch=False``), and the launch settings.

Usage (GPU machine, repository root): ``python3 benchmarks/exp_hot_keys.py``.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

sys.path.insert(0, "benchmarks")
from bench_gpu_cache import (  # noqa: E402
    CRITEO_FL15,
    bench,
    criteo_group,
    fill,
    log,
    resident_batches,
)

from keras_hps.gpu_cache import GpuEmbeddingCache  # noqa: E402
from keras_hps.triton_kernels.cache_fused_query import fused_cache_query  # noqa: E402
from keras_hps.triton_kernels.cache_query import cache_query  # noqa: E402
from keras_hps.triton_kernels.gather import gather_rows  # noqa: E402


def single(dim: int, cap: int, n: int, dev: torch.device, gen: torch.Generator) -> None:
    log(f"\n== single table, dim {dim}, {cap:,} slots, {n:,} keys ==")
    cache = GpuEmbeddingCache(cap, dim, device=dev)
    fill(cache, int(cap * 1.25), gen)
    R = 4
    batches = resident_batches(cache, n, R, gen)
    a = cache.arrays
    occ = torch.nonzero(a.occupied).squeeze(1)
    perm = occ[torch.randperm(occ.numel(), device=dev, generator=gen)]
    rs = np.random.default_rng(7)
    zipf, zslots = [], []
    for _ in range(R):
        r = rs.zipf(1.05, size=3 * n)
        r = r[r <= perm.numel()][:n] - 1
        sl = perm[torch.from_numpy(r).to(dev)]
        zslots.append(sl)
        zipf.append(a.keys[sl].contiguous())
    g = bench(lambda i: gather_rows(a.vectors, batches[i][1]), R)
    gz = bench(lambda i: gather_rows(a.vectors, zslots[i]), R)
    log(f"  gather uniform {g:.4f} ms, gather Zipf {gz:.4f} ms")
    for bk, nw in ((64, 4), (128, 4), (32, 8), (16, 4)):
        for name, kw in (("no touch", {"touch": False}),
                         ("LRU atomic per hit", {"mark_check": False}), ("LRU", {}),
                         ("LFU atomic per hit", {"policy": "lfu", "mark_check": False}),
                         ("LFU", {"policy": "lfu"})):
            u = bench(lambda i, kw=kw, bk=bk, nw=nw: cache_query(
                a, batches[i][0], validate=False, block_k=bk, num_warps=nw, **kw), R)
            z = bench(lambda i, kw=kw, bk=bk, nw=nw: cache_query(
                a, zipf[i], validate=False, block_k=bk, num_warps=nw, **kw), R)
            log(f"  ({bk},{nw}) {name:<18} uniform {u:.4f} ms ({100 * g / u:5.1f}% of gather)"
                f"  Zipf {z:.4f} ms ({100 * gz / z:5.1f}% of Zipf gather)")


def fused(dim: int, batch: int, dev: torch.device, gen: torch.Generator) -> None:
    nt = len(CRITEO_FL15)
    log(f"\n== fused 26 tables, dim {dim}, batch {batch:,} ==")
    group = criteo_group(dim, gen, dev)
    R = 4
    rot = [[torch.randint(0, c, (batch,), device=dev, generator=gen) for c in CRITEO_FL15]
           for _ in range(R)]
    dense = torch.empty(sum(CRITEO_FL15), dim, device=dev)
    bases = torch.tensor([0] + CRITEO_FL15[:-1], device=dev).cumsum(0)
    dense_idx = [torch.cat([r[t] + bases[t] for t in range(nt)]) for r in rot]
    flat = [torch.cat(r) for r in rot]
    offs = [batch * i for i in range(nt + 1)]
    dg = bench(lambda i: gather_rows(dense, dense_idx[i]), R)
    log(f"  dense gather {dg:.4f} ms")
    for bk, nw in ((16, 4), (32, 8), (32, 4), (64, 4), (128, 4)):
        for name, kw in (("no touch", {"touch": False}), ("LRU", {}),
                         ("LRU mark_check", {"mark_check": True})):
            f = bench(lambda i, kw=kw, bk=bk, nw=nw: fused_cache_query(
                group._pooled, flat[i], offs, block_k=bk, num_warps=nw, **kw), R)
            log(f"  ({bk},{nw}) {name:<15} {f:.4f} ms ({100 * dg / f:5.1f}% of dense gather)")
    for t in (12, 5, 21):
        tq = bench(lambda i, t=t: cache_query(group[t].arrays, rot[i][t], touch=False,
                                              validate=False), R)
        tg = bench(lambda i, t=t: gather_rows(dense, rot[i][t] + int(bases[t])), R)
        log(f"  table {t} ({CRITEO_FL15[t]:,} rows): query {tq:.4f} ms, gather {tg:.4f} ms")


def main() -> int:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    log(torch.cuda.get_device_name())
    for dim in (128, 16):
        single(dim, 1 << 26, 1 << 20, dev, gen)
        torch.cuda.empty_cache()
    fused(128, 32768, dev, gen)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
