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

``--study single`` (dim 16) measures designs that find a hit in one random access, the
only way left to the dim-16 target (a key compared before its row is read costs two; see
the doc): the key stored in the same 128-byte line as its row, at a position computed from
the key. All use the shipped bitmap touch (with the read before the atomic) or none.

- ``inline128 direct``: a direct-mapped cache of 128-byte records (key, then the row), one
  possible slot per key: one access per hit. The bound of any design; a direct-mapped
  cache loses hit rate to conflicts (``sim_cache_policy.py --ways 1``).
- ``inline72 direct``: the same with 72-byte records (no padding; half of them straddle two
  lines).
- ``inline2way`` / ``inline4way``: 2-slot sets of 144 bytes (the 2 keys, then the 2 rows),
  or 4-slot sets of 288, each read whole in one go: associativity for adjacent lines.
- ``keys8 home``: the 8-slot key block read together with the row of the key's home slot
  (a second hash picks one of the set's 8); a second row read when the key sits elsewhere.
- ``inline128 home``: 8-slot sets of 128-byte records; the home record is read first (key
  and row in one line); elsewhere -> the key block, then the row.

The ``home`` layouts are filled greedily (each key at its home slot when free, else at a free
slot of the set): the most keys at home any insert policy can keep (about 63% of a full set).

``--study pipe`` measures the shipped layout (``keys8`` + bitmap) with a software-pipelined
query: persistent programs walk the batch in chunks and read the next chunk's key blocks
while this chunk's rows are read, so a program waits for one random access per chunk
instead of two in a row.

Usage (GPU machine, repository root): ``python3 benchmarks/proto_cache_layouts.py``
(``--study single`` / ``--study pipe`` for the sections above).
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
from keras_hps.triton_kernels.cache_layout import block_d, copy_rows, hash_key, set_index
from keras_hps.triton_kernels.cache_layout import touch as cache_touch
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


@triton.jit(do_not_specialize=["num_sets"])
def _home_kernel(keys_ptr, n, out_ptr, num_sets, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=0)
    tl.store(out_ptr + offs, set_index(k, num_sets) * 8 + _home(k), mask=m)


@triton.jit
def _home(k):
    """The key's home way in its 8-slot set (hash bits the set index does not use)."""
    return ((hash_key(k) >> 40) & 7).to(tl.int64)


@triton.jit(do_not_specialize=["num_slots"])
def _inline_direct_query(keys_ptr, n, rec_ptr, marks_ptr, out_ptr, hit_ptr, num_slots,
                         STRIDE: tl.constexpr, DIM: tl.constexpr, BLOCK_K: tl.constexpr,
                         TOUCH: tl.constexpr):
    """Direct-mapped records of STRIDE int32 words: key (2 words), then the row."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=0)
    slot = set_index(k, num_slots)
    base = slot * STRIDE
    kp = rec_ptr.to(tl.pointer_type(tl.int64))
    stored = tl.load(kp + (base >> 1), mask=m, other=0)
    d = tl.arange(0, DIM)
    row = tl.load(rec_ptr.to(tl.pointer_type(tl.float32)) + base[:, None] + 2 + d[None, :],
                  mask=m[:, None], other=0.0)
    hit = m & (stored == k)
    if TOUCH:
        cache_touch(marks_ptr, marks_ptr, slot, hit, False, True)
    row = tl.where(hit[:, None], row, 0.0)
    tl.store(out_ptr + offs[:, None] * DIM + d[None, :], row, mask=m[:, None])
    tl.store(hit_ptr + offs, hit, mask=m)


@triton.jit(do_not_specialize=["num_sets"])
def _home_query(keys_ptr, n, kb_ptr, vec_ptr, marks_ptr, out_ptr, hit_ptr, num_sets,
                INLINE: tl.constexpr, STRIDE: tl.constexpr, DIM: tl.constexpr,
                BLOCK_K: tl.constexpr, TOUCH: tl.constexpr):
    """8-slot sets; the home slot's row read at once. INLINE: rows live in records of STRIDE
    int32 words (key, then row) and the home record's key decides; else the key block is
    read together with the home row."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=0)
    s = set_index(k, num_sets)
    hm = _home(k)
    d = tl.arange(0, DIM)
    w = tl.arange(0, 8)
    fp = vec_ptr.to(tl.pointer_type(tl.float32))
    if INLINE:
        hbase = (s * 8 + hm) * STRIDE
        hkey = tl.load(vec_ptr.to(tl.pointer_type(tl.int64)) + (hbase >> 1), mask=m, other=0)
        row = tl.load(fp + hbase[:, None] + 2 + d[None, :], mask=m[:, None], other=0.0)
        at_home = m & (hkey == k)
        away = m & (~at_home)
        kb = tl.load(kb_ptr + s[:, None] * 8 + w[None, :], mask=away[:, None], other=EMPTY_KEY)
        j = tl.max(tl.where(kb == k[:, None], w[None, :], -1), axis=1)
        found = away & (j >= 0)
        jb = (s * 8 + tl.maximum(j, 0)) * STRIDE
        row2 = tl.load(fp + jb[:, None] + 2 + d[None, :], mask=found[:, None], other=0.0)
    else:
        kb = tl.load(kb_ptr + s[:, None] * 8 + w[None, :], mask=m[:, None], other=EMPTY_KEY)
        row = tl.load(fp + (s * 8 + hm)[:, None] * DIM + d[None, :], mask=m[:, None], other=0.0)
        j = tl.max(tl.where(kb == k[:, None], w[None, :], -1), axis=1)
        at_home = m & (j == hm)
        found = m & (j >= 0) & (j != hm)
        row2 = tl.load(fp + (s * 8 + tl.maximum(j, 0))[:, None] * DIM + d[None, :],
                       mask=found[:, None], other=0.0)
    hit = at_home | found
    if TOUCH:
        slot = s * 8 + tl.where(at_home, hm, tl.maximum(j, 0))
        cache_touch(marks_ptr, marks_ptr, slot, hit, False, True)
    row = tl.where(at_home[:, None], row, row2)
    tl.store(out_ptr + offs[:, None] * DIM + d[None, :], row, mask=m[:, None])
    tl.store(hit_ptr + offs, hit, mask=m)


EMPTY_KEY = tl.constexpr(EMPTY)


@triton.jit(do_not_specialize=["num_sets"])
def _inline_set_query(keys_ptr, n, set_ptr, marks_ptr, out_ptr, hit_ptr, num_sets,
                      WAYS: tl.constexpr, DIM: tl.constexpr, BLOCK_K: tl.constexpr,
                      TOUCH: tl.constexpr):
    """WAYS-slot sets of 2*WAYS + WAYS*DIM int32 words: the keys, then the rows; all read at
    once."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=0)
    s = set_index(k, num_sets)
    base = s * (2 * WAYS + WAYS * DIM)
    w = tl.arange(0, WAYS)
    kk = tl.load(set_ptr.to(tl.pointer_type(tl.int64)) + (base >> 1)[:, None] + w[None, :],
                 mask=m[:, None], other=EMPTY_KEY)
    e = tl.arange(0, WAYS * DIM)
    rows = tl.load(set_ptr.to(tl.pointer_type(tl.float32)) + base[:, None] + 2 * WAYS
                   + e[None, :], mask=m[:, None], other=0.0)
    j = tl.max(tl.where(kk == k[:, None], w[None, :], -1), axis=1)
    hit = m & (j >= 0)
    if TOUCH:
        cache_touch(marks_ptr, marks_ptr, s * WAYS + tl.maximum(j, 0), hit, False, True)
    rows3 = tl.reshape(rows, (BLOCK_K, WAYS, DIM))
    pick = (w[None, :] == j[:, None])[:, :, None]
    row = tl.sum(tl.where(pick, rows3, 0.0), axis=1)
    d = tl.arange(0, DIM)
    tl.store(out_ptr + offs[:, None] * DIM + d[None, :], row, mask=m[:, None])
    tl.store(hit_ptr + offs, hit, mask=m)


@triton.jit(do_not_specialize=["n", "num_sets", "iters", "programs"])
def _pipelined_query(keys_ptr, n, ckeys_ptr, marks_ptr, vec_ptr, num_sets, out_ptr, hit_ptr,
                     iters, programs, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_K: tl.constexpr, TOUCH: tl.constexpr):
    """Persistent programs (``programs`` of them, ``iters`` chunks each); chunk c+G's key
    blocks are read while chunk c's rows are."""
    pid = tl.program_id(0)
    step = programs.to(tl.int64) * BLOCK_K
    w = tl.arange(0, 8)
    offs0 = pid.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m0 = offs0 < n
    k0 = tl.load(keys_ptr + offs0, mask=m0, other=0)
    s0 = set_index(k0, num_sets)
    kb0 = tl.load(ckeys_ptr + s0[:, None] * 8 + w[None, :], mask=m0[:, None], other=EMPTY_KEY)
    offs1 = offs0 + step
    m1 = offs1 < n
    k1 = tl.load(keys_ptr + offs1, mask=m1, other=0)
    c = 0
    while c < iters:  # (a while loop: the interpreter cannot range() over an argument)
        s1 = set_index(k1, num_sets)
        kb1 = tl.load(ckeys_ptr + s1[:, None] * 8 + w[None, :], mask=m1[:, None],
                      other=EMPTY_KEY)
        offs2 = offs1 + step
        m2 = offs2 < n
        k2 = tl.load(keys_ptr + offs2, mask=m2, other=0)
        eq = (kb0 == k0[:, None]) & (k0 != EMPTY_KEY)[:, None]
        j = tl.max(tl.where(eq, w[None, :], -1), axis=1)
        hit = m0 & (j >= 0)
        slot = s0 * 8 + tl.maximum(j, 0).to(tl.int64)
        if TOUCH:
            cache_touch(marks_ptr, marks_ptr, slot, hit, False, True)
        copy_rows(vec_ptr, slot, hit, out_ptr, offs0, m0, DIM, BLOCK_D, "")
        tl.store(hit_ptr + offs0, hit, mask=m0)
        offs0, m0, k0, s0, kb0 = offs1, m1, k1, s1, kb1
        offs1, m1, k1 = offs2, m2, k2
        c += 1


def pipelined(dim: int, slots: int, n: int, dev: torch.device, gen: torch.Generator) -> None:
    """The shipped cache's arrays queried by ``_pipelined_query``, beside the gather and
    ``cache_query``."""
    log(f"\n== pipelined query: dim {dim}, {slots:,} slots, {n:,} keys per call ==")
    R = 4
    cand = torch.randint(0, 2**62, (int(slots * 1.25),), device=dev, generator=gen)
    cache, picks, qa = filled_cache(slots, dim, cand, n, R, dev, gen)
    cand = None
    a = cache.arrays
    g = bench(lambda i: gather_rows(a.vectors, picks[i]), R)
    record("gather (baseline)", dim, n, g, g)
    record("cache_query (LRU marks)", dim, n,
           bench(lambda i: cache_query(a, qa[i], validate=False), R), g)
    record("cache_query, no touch", dim, n,
           bench(lambda i: cache_query(a, qa[i], touch=False, validate=False), R), g)
    out = torch.empty(n, dim, device=dev)
    hit = torch.empty(n, dtype=torch.bool, device=dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" \
        else 1
    bks = (32, 64, 128) if dim <= 32 else (16, 32)
    configs = [(bk, nw, per) for bk in bks for nw in (4, 8) for per in (4, 8, 16)]
    for touch_, tname in ((0, "no touch"), (1, "LRU marks")):
        best = None
        for bk, nw, per in configs:
            def run(i, bk=bk, nw=nw, per=per, t=touch_):
                programs = min(sms * per, triton.cdiv(n, bk))
                iters = triton.cdiv(triton.cdiv(n, bk), programs)
                _pipelined_query[(programs,)](
                    qa[i], n, a.keys, a.marks, a.vectors, a.num_sets, out, hit, iters,
                    programs, DIM=dim, BLOCK_D=block_d(dim), BLOCK_K=bk, TOUCH=t, num_warps=nw)
            ms = bench(run, R)
            if best is None or ms < best[0]:
                best = (ms, bk, nw, per, run)
        best[4](0)
        assert bool(hit.all()), "pipelined query missed resident keys"
        assert torch.equal(out, a.vectors[picks[0]]), "pipelined query rows differ"
        record(f"pipelined query, {tname}", dim, n, best[0], g,
               f"block_k={best[1]} warps={best[2]} programs/SM={best[3]}")


def place_home(keys: torch.Tensor, num_sets: int) -> torch.Tensor:
    """Key blocks [num_sets, 8] filled greedily: each key at its home way when no earlier key
    took it, the rest of a set's free ways given to the set's other keys in order."""
    n = keys.numel()
    home = torch.empty(n, dtype=torch.int64, device=keys.device)
    _home_kernel[(triton.cdiv(n, 1024),)](keys, n, home, num_sets, BLOCK=1024)
    kb = torch.full((num_sets * 8,), EMPTY, dtype=torch.int64, device=keys.device)
    sorted_home, order = torch.sort(home, stable=True)
    first = torch.ones_like(sorted_home, dtype=torch.bool)
    first[1:] = sorted_home[1:] != sorted_home[:-1]
    kb[sorted_home[first]] = keys[order[first]]
    rest = keys[order[~first]]
    rest_set = sorted_home[~first] // 8
    free = (kb == EMPTY).view(num_sets, 8)
    free_ways = torch.argsort((~free).to(torch.int8), dim=1, stable=True)  # free ways first
    nfree = free.sum(1)
    starts = torch.cumsum(torch.bincount(rest_set, minlength=num_sets), 0)
    counts = torch.bincount(rest_set, minlength=num_sets)
    rank = torch.arange(rest.numel(), device=keys.device) - (starts - counts)[rest_set]
    keep = rank < nfree[rest_set]
    rs, rr = rest_set[keep], rank[keep]
    kb[rs * 8 + free_ways[rs, rr]] = rest[keep]
    return kb.view(num_sets, 8)


def single_access(dim: int, slots: int, n: int, dev: torch.device,
                  gen: torch.Generator) -> None:
    """The one-access designs of the module docstring, beside the gather and cache_query."""
    log(f"\n== single-access designs: dim {dim}, {slots:,} slots, {n:,} keys per call ==")
    R = 4
    table, g = gather_baseline(dim, slots, n, R, dev, gen)
    marks = torch.zeros(slots // 32, dtype=torch.int32, device=dev)
    out = torch.empty(n, dim, device=dev)
    hit = torch.empty(n, dtype=torch.bool, device=dev)
    cand = torch.randint(0, 2**62, (int(slots * 1.25),), device=dev, generator=gen)
    configs = [(bk, nw) for bk in (32, 64, 128) for nw in (4, 8)]

    def best_of(name: str, launch, picks, note: str = "") -> None:
        for touch_, tname in ((0, "no touch"), (1, "bitmap touch")):
            best = None
            for bk, nw in configs:
                ms = bench(lambda i, bk=bk, nw=nw, t=touch_: launch(i, bk, nw, t), R)
                if best is None or ms < best[0]:
                    best = (ms, bk, nw)
            marks.zero_()
            launch(0, 128, 4, touch_)
            assert bool(hit.all()), f"{name} missed resident keys"
            assert torch.equal(out, table[picks[0]]), f"{name} rows differ"
            record(f"{name}, {tname}", dim, n, best[0], g,
                   f"block_k={best[1]} warps={best[2]} {note}")

    # Shipped cache, same fill as the study above.
    cache, _picks, qa = filled_cache(slots, dim, cand, n, R, dev, gen)
    a = cache.arrays
    record("cache_query (LRU marks)", dim, n,
           bench(lambda i: cache_query(a, qa[i], validate=False), R), g)
    cache = a = qa = None
    torch.cuda.empty_cache()

    # Direct-mapped inline records.
    kb1 = place(cand, slots, 1).reshape(-1)
    occ = torch.nonzero(kb1 != EMPTY).squeeze(1)
    picks = [occ[torch.randperm(occ.numel(), device=dev, generator=gen)[:n]] for _ in range(R)]
    qk = [kb1[p].contiguous() for p in picks]
    for stride in (32, 18):
        rec = torch.zeros(slots, stride, dtype=torch.int32, device=dev)
        rec[:, :2] = kb1.view(torch.int32).view(slots, 2)
        rec[:, 2:2 + dim] = table.view(torch.int32)

        def launch(i, bk, nw, touch_, rec=rec, stride=stride):
            _inline_direct_query[(triton.cdiv(n, bk),)](
                qk[i], n, rec, marks, out, hit, slots, STRIDE=stride, DIM=dim, BLOCK_K=bk,
                TOUCH=touch_, num_warps=nw)

        best_of(f"inline{4 * stride} direct", launch, picks,
                f"occupancy {occ.numel() / slots:.3f}")
        rec = None
        torch.cuda.empty_cache()
    kb1 = occ = picks = qk = None

    # 2- and 4-slot sets read whole.
    for ways in (2, 4):
        ns = slots // ways
        kbw = place(cand, ns, ways)
        flatw = kbw.reshape(-1)
        occ = torch.nonzero(flatw != EMPTY).squeeze(1)
        picks = [occ[torch.randperm(occ.numel(), device=dev, generator=gen)[:n]]
                 for _ in range(R)]
        qk = [flatw[p].contiguous() for p in picks]
        sets = torch.empty(ns, 2 * ways + ways * dim, dtype=torch.int32, device=dev)
        sets[:, :2 * ways] = kbw.view(torch.int32).view(ns, 2 * ways)
        sets[:, 2 * ways:] = table.view(torch.int32).view(ns, ways * dim)

        def launch_set(i, bk, nw, touch_, ways=ways, ns=ns, sets=sets, qk=qk):
            _inline_set_query[(triton.cdiv(n, bk),)](
                qk[i], n, sets, marks, out, hit, ns, WAYS=ways, DIM=dim, BLOCK_K=bk,
                TOUCH=touch_, num_warps=nw)

        best_of(f"inline{ways}way", launch_set, picks, f"occupancy {occ.numel() / slots:.3f}")
        kbw = flatw = occ = picks = qk = sets = None
        torch.cuda.empty_cache()

    # 8-slot sets with a home way.
    num_sets = slots // 8
    kb = place_home(cand, num_sets)
    flat = kb.reshape(-1)
    occ = torch.nonzero(flat != EMPTY).squeeze(1)
    home = torch.empty(occ.numel(), dtype=torch.int64, device=dev)
    okeys = flat[occ].contiguous()
    _home_kernel[(triton.cdiv(occ.numel(), 1024),)](okeys, occ.numel(), home, num_sets,
                                                      BLOCK=1024)
    at_home = (home == occ).float().mean().item()
    note = f"occupancy {occ.numel() / slots:.3f}, keys at home {at_home:.3f}"
    picks = [occ[torch.randperm(occ.numel(), device=dev, generator=gen)[:n]] for _ in range(R)]
    qk = [flat[p].contiguous() for p in picks]

    def launch_keys(i, bk, nw, touch_):
        _home_query[(triton.cdiv(n, bk),)](
            qk[i], n, flat, table, marks, out, hit, num_sets, INLINE=False, STRIDE=0, DIM=dim,
            BLOCK_K=bk, TOUCH=touch_, num_warps=nw)

    best_of("keys8 home", launch_keys, picks, note)
    rec = torch.zeros(slots, 32, dtype=torch.int32, device=dev)
    rec[:, :2] = flat.view(torch.int32).view(slots, 2)
    rec[:, 2:2 + dim] = table.view(torch.int32)

    def launch_inline(i, bk, nw, touch_):
        _home_query[(triton.cdiv(n, bk),)](
            qk[i], n, flat, rec, marks, out, hit, num_sets, INLINE=True, STRIDE=32, DIM=dim,
            BLOCK_K=bk, TOUCH=touch_, num_warps=nw)

    best_of("inline128 home", launch_inline, picks, note)


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


def gather_baseline(dim: int, slots: int, n: int, batches: int, dev: torch.device,
                    gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """A random ``[slots, dim]`` table and the plain gather's time for ``n`` random rows of it
    (recorded as the baseline): ``(table, ms)``."""
    table = torch.randn(slots, dim, device=dev, generator=gen)
    idx = [torch.randperm(slots, device=dev, generator=gen)[:n] for _ in range(batches)]
    g = bench(lambda i: gather_rows(table, idx[i]), batches)
    record("gather (baseline)", dim, n, g, g)
    return table, g


def filled_cache(slots: int, dim: int, cand: torch.Tensor, n: int, batches: int,
                 dev: torch.device, gen: torch.Generator):
    """The shipped cache filled with the candidate keys (random rows), and ``batches`` picks of
    ``n`` occupied slots with their keys: ``(cache, slot picks, key batches)``."""
    cache = GpuEmbeddingCache(slots, dim, device=dev)
    for lo in range(0, cand.numel(), 1 << 22):
        k = cand[lo:lo + (1 << 22)]
        cache_insert(cache.arrays, k, torch.randn(k.numel(), dim, device=dev, generator=gen),
                     stamp=1, validate=False)
    occ = torch.nonzero(cache.arrays.occupied).squeeze(1)
    picks = [occ[torch.randperm(occ.numel(), device=dev, generator=gen)[:n]]
             for _ in range(batches)]
    return cache, picks, [cache.arrays.keys[p].contiguous() for p in picks]


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
    table, g = gather_baseline(dim, slots, n, R, dev, gen)
    bits = torch.zeros(slots // 32, dtype=torch.int32, device=dev)
    scores = torch.zeros(slots, dtype=torch.int32, device=dev)
    out = torch.empty(n, dim, device=dev)
    hit = torch.empty(n, dtype=torch.bool, device=dev)
    bd = block_d(dim)
    cand = torch.randint(0, 2**62, (int(slots * 1.25),), device=dev, generator=gen)

    # The shipped cache (keys8 + bitmap), through cache_query.
    cache, _picks, qa = filled_cache(slots, dim, cand, n, R, dev, gen)
    a = cache.arrays
    ms = bench(lambda i: cache_query(a, qa[i], validate=False), R)
    record("cache_query (LRU marks)", dim, n, ms, g)
    ms = bench(lambda i: cache_query(a, qa[i], touch=False, validate=False), R)
    record("cache_query, no touch", dim, n, ms, g)
    cache = a = qa = None
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
    p.add_argument("--study", default="layouts", choices=("layouts", "single", "pipe"))
    args = p.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    log(torch.cuda.get_device_name(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    for dim in (int(d) for d in args.dims.split(",")):
        if args.study == "pipe":
            pipelined(dim, args.slots, args.keys, dev, gen)
        elif args.study == "single":
            single_access(dim, args.slots, args.keys, dev, gen)
        else:
            study(dim, args.slots, args.keys, dev, gen)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RESULTS, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
