"""Fused multi-table query: the caches of several tables looked up in one launch.

Each cache keeps its own arrays (layout: cache_layout.py); the kernel finds them through a
parameter row per table (`cache_params`: the arrays' addresses, the set count, the row width
and the table's counters), so the caches need not share an allocation. Program ``(i, t)``
answers keys ``i * BLOCK_K ...`` of table ``t``.

The keys of all tables come concatenated. When every table has the same number of keys ``n``
(and the same dim), table ``t``'s keys and rows start at ``t * n``: nothing is copied to the
device per call, so the query can be captured in a CUDA graph. Otherwise a small array of
per-table offsets goes with the launch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from .cache_layout import (
    POLICIES,
    SLOTS_PER_SET,
    CacheArrays,
    NpCacheState,
    copy_rows,
    empty_key,
    probe,
    set_index,
    small_int64_to_device,
    touch,
)
from .cache_query import np_cache_query
from .launch import launch_config
from .miss_flag import raise_flag

CACHE_PARAMS = 8  # int64s per table in a parameter row


def cache_params(arrays: CacheArrays, counters: torch.Tensor) -> torch.Tensor:
    """One cache's row of `fused_cache_query` parameters (int64 ``[CACHE_PARAMS]`` on its
    device): the addresses of its keys, scores, marks and vectors and of ``counters`` (int64,
    +hits at [0], +misses at [1]), its set count and row width. The row holds raw addresses:
    the arrays must outlive every query that reads it."""
    if counters.dtype != torch.int64 or counters.device != arrays.device or counters.numel() < 2:
        raise ValueError("cache_params: counters must be int64 [>=2] on the cache's device")
    row = [arrays.keys.data_ptr(), arrays.scores.data_ptr(), arrays.marks.data_ptr(),
           arrays.vectors.data_ptr(), counters.data_ptr(), arrays.num_sets, arrays.dim,
           empty_key(arrays.key_dtype)]
    return torch.tensor(row, dtype=torch.int64).to(arrays.device)


@triton.jit
def _fused_query_kernel(
    keys_ptr, n_uniform, spans_ptr, params_ptr, out_ptr, hit_ptr, flag_ptr,
    NPARAM: tl.constexpr, MAX_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    SLOTS: tl.constexpr, TOUCH: tl.constexpr, LFU: tl.constexpr, SPANS: tl.constexpr,
    UNIFORM_DIM: tl.constexpr, MISS_FLAG: tl.constexpr, ROW_EVICT: tl.constexpr,
    MARK_CHECK: tl.constexpr,
):
    t = tl.program_id(1)
    p = params_ptr + t * NPARAM
    cache_keys = tl.load(p).to(tl.pointer_type(tl.int64))
    scores = tl.load(p + 1).to(tl.pointer_type(tl.int64))
    marks = tl.load(p + 2).to(tl.pointer_type(tl.int32))
    vectors = tl.load(p + 3).to(tl.pointer_type(tl.float32))
    counters = tl.load(p + 4).to(tl.pointer_type(tl.int64))
    num_sets = tl.load(p + 5)
    dim = tl.load(p + 6)
    empty = tl.load(p + 7)
    if SPANS:  # spans: key offsets [tables + 1], then output offsets [tables]
        kbase = tl.load(spans_ptr + t)
        n = tl.load(spans_ptr + t + 1) - kbase
        obase = tl.load(spans_ptr + tl.num_programs(1) + 1 + t)
    else:
        n = n_uniform
        kbase = t.to(tl.int64) * n
        obase = kbase * MAX_DIM
    offs = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = offs < n
    k = tl.load(keys_ptr + kbase + offs, mask=m, other=0)
    s = set_index(k, num_sets)
    jj, _kb = probe(k, s, m, cache_keys, empty, SLOTS)
    hit = jj >= 0
    slot = s * SLOTS + tl.maximum(jj, 0).to(tl.int64)
    if TOUCH:
        touch(marks, scores, slot, hit, LFU, MARK_CHECK)
    if UNIFORM_DIM:
        # Every table's rows are MAX_DIM wide: the row copy of the single-table kernel (a
        # constant row width lets the compiler use 16-byte accesses).
        copy_rows(vectors, slot, hit, out_ptr + obase, offs, m, MAX_DIM, BLOCK_D, ROW_EVICT)
    else:
        for d0 in tl.static_range(0, MAX_DIM, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = (d < dim)[None, :]
            row = tl.load(vectors + slot[:, None] * dim + d[None, :], mask=hit[:, None] & dm,
                          other=0.0, eviction_policy=ROW_EVICT)
            tl.store(out_ptr + obase + offs[:, None] * dim + d[None, :], row,
                     mask=m[:, None] & dm, eviction_policy=ROW_EVICT)
    tl.store(hit_ptr + kbase + offs, hit, mask=m)
    miss = m & ~hit
    tl.atomic_add(counters, tl.sum(hit.to(tl.int64), axis=0), sem="relaxed")
    tl.atomic_add(counters + 1, tl.sum(miss.to(tl.int64), axis=0), sem="relaxed")
    if MISS_FLAG:
        raise_flag(flag_ptr, miss)


def fused_cache_query(
    params: torch.Tensor,
    keys: torch.Tensor,
    counts: Sequence[int],
    dims: Sequence[int],
    *,
    policy: str = "lru",
    touch: bool = True,
    miss_flag: torch.Tensor | None = None,
    **tuning,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Query every table at once.

    ``params``: the tables' `cache_params` rows stacked (``[tables, CACHE_PARAMS]``);
    ``keys``: the tables' keys concatenated (1-D, any strides, int64, already validated, on
    the params' device), ``counts[t]`` of them for table ``t``, whose rows are ``dims[t]``
    wide. Returns (per-table values ``[counts[t], dims[t]]``, views of one output buffer; the
    hit mask over the concatenated keys). Each table's counters get its hits and misses;
    ``miss_flag`` (int32 ``[1]``) is set to 1 when any key misses. With equal counts and dims
    nothing is copied to the device (capturable in a CUDA graph). ``tuning`` overrides the
    launch settings as in :func:`cache_query`.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    nt = params.shape[0] if params.dim() == 2 else -1
    if params.dim() != 2 or params.shape[1] != CACHE_PARAMS or params.dtype != torch.int64:
        raise ValueError(f"fused_cache_query: params must be int64 [tables, {CACHE_PARAMS}]")
    if len(counts) != nt or len(dims) != nt or any(c < 0 for c in counts):
        raise ValueError(f"fused_cache_query: {nt} tables need {nt} counts and dims, got "
                         f"{list(counts)} and {list(dims)}")
    keys = keys.reshape(-1).contiguous()  # the kernel reads keys[i] at keys_ptr + i
    if keys.numel() != sum(counts) or keys.device != params.device:
        raise ValueError(f"fused_cache_query: {keys.numel()} keys on {keys.device} for counts "
                         f"{list(counts)} (sum {sum(counts)}) of tables on {params.device}")
    dev = keys.device
    sizes = [c * d for c, d in zip(counts, dims, strict=True)]
    out_bases = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    out = torch.empty(int(out_bases[-1]), dtype=torch.float32, device=dev)
    hit = torch.empty(keys.numel(), dtype=torch.bool, device=dev)
    max_n = max(counts, default=0)
    if max_n:
        uniform = len(set(counts)) == 1 and len(set(dims)) == 1
        spans = hit  # a valid pointer the kernel never reads
        if not uniform:
            key_bases = np.concatenate([[0], np.cumsum(counts)])
            spans = small_int64_to_device(np.concatenate([key_bases, out_bases[:-1]]), dev)
        max_dim = max(dims)
        cfg = launch_config("fused_cache_query", max_dim, **tuning)
        _fused_query_kernel[(triton.cdiv(max_n, cfg.block_k), nt)](
            keys, max_n, spans, params, out, hit,
            miss_flag if miss_flag is not None else hit,
            NPARAM=CACHE_PARAMS, MAX_DIM=max_dim, BLOCK_D=cfg.block_d, BLOCK_K=cfg.block_k,
            SLOTS=SLOTS_PER_SET, TOUCH=touch, LFU=policy == "lfu", SPANS=not uniform,
            UNIFORM_DIM=len(set(dims)) == 1, MISS_FLAG=miss_flag is not None,
            ROW_EVICT=cfg.row_evict, MARK_CHECK=cfg.mark_check, num_warps=cfg.num_warps,
        )
    values = [out[int(out_bases[i]):int(out_bases[i + 1])].view(counts[i], dims[i])
              for i in range(nt)]
    return values, hit


def np_fused_cache_query(
    states: list[NpCacheState], keys_per_table: list[np.ndarray], *, policy: str = "lru",
    touch: bool = True,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """NumPy reference of :func:`fused_cache_query`: one per-table query each."""
    vals, hits = [], []
    for state, keys in zip(states, keys_per_table, strict=True):
        v, h = np_cache_query(state, keys, policy=policy, touch=touch)
        vals.append(v)
        hits.append(h)
    return vals, hits
