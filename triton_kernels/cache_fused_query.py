"""Fused multi-table query: every table of a model looked up in one launch.

The tables' caches live in one pooled allocation (keys, scores and marks concatenated set after
set, each table starting on a whole marks word; vectors concatenated as one flat float32
buffer, each table with its own dim). The keys of all tables come concatenated, with
``key_offsets[t]:key_offsets[t+1]`` the keys of table ``t``. The output is one flat float32
buffer; table ``t``'s rows start at element ``out_base[t]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from .cache_layout import (
    POLICIES,
    SLOTS_PER_SET,
    NpCacheState,
    copy_rows,
    probe,
    set_index,
    small_int64_to_device,
    touch,
)
from .cache_query import np_cache_query
from .launch import launch_config


@dataclass
class PooledCacheArrays:
    """Pooled arrays of several caches plus the per-table parameter vectors (int64, device)."""

    keys: torch.Tensor  # int64 [slots]
    scores: torch.Tensor  # int64 [slots]
    marks: torch.Tensor  # int32 [slots / 32]
    vectors: torch.Tensor  # flat float32
    set_base: torch.Tensor  # first set of each table
    num_sets: torch.Tensor  # sets of each table
    vec_base: torch.Tensor  # first element of each table's vectors
    dims: torch.Tensor  # row width of each table
    dims_host: tuple[int, ...]
    empty: int  # the empty-slot key of the pool's key dtype

    @property
    def num_tables(self) -> int:
        return len(self.dims_host)


@triton.jit(do_not_specialize=["empty"])
def _fused_query_kernel(
    keys_ptr, n, key_off_ptr,
    set_base_ptr, num_sets_ptr, vec_base_ptr, dims_ptr, out_base_ptr,
    cache_keys_ptr, scores_ptr, marks_ptr, vec_ptr, out_ptr, hit_ptr, empty,
    NUM_TABLES: tl.constexpr, MAX_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr, SLOTS: tl.constexpr, TOUCH: tl.constexpr, LFU: tl.constexpr,
    UNIFORM_DIM: tl.constexpr, ROW_EVICT: tl.constexpr, MARK_CHECK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = offs < n
    tid = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(1, NUM_TABLES):
        tid += (offs >= tl.load(key_off_ptr + j)).to(tl.int32)
    k = tl.load(keys_ptr + offs, mask=m, other=0)
    set_base = tl.load(set_base_ptr + tid)
    s = set_index(k, tl.load(num_sets_ptr + tid)) + set_base
    jj, _kb = probe(k, s, m, cache_keys_ptr, empty, SLOTS)
    hit = jj >= 0
    slot = s * SLOTS + tl.maximum(jj, 0).to(tl.int64)
    if TOUCH:
        touch(marks_ptr, scores_ptr, slot, hit, LFU, MARK_CHECK)
    if UNIFORM_DIM:
        # All tables share MAX_DIM: the pool is one [slots, MAX_DIM] array and the output one
        # [keys, MAX_DIM] array, so rows are addressed as in the single-table kernel (constant
        # row width: the compiler can use 16-byte accesses).
        copy_rows(vec_ptr, slot, hit, out_ptr, offs, m, MAX_DIM, BLOCK_D, ROW_EVICT)
    else:
        dim = tl.load(dims_ptr + tid)
        src = tl.load(vec_base_ptr + tid) + (slot - set_base * SLOTS) * dim
        dst = tl.load(out_base_ptr + tid) + (offs - tl.load(key_off_ptr + tid)) * dim
        for d0 in tl.static_range(0, MAX_DIM, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d[None, :] < dim[:, None]
            row = tl.load(vec_ptr + src[:, None] + d[None, :], mask=hit[:, None] & dm,
                          other=0.0, eviction_policy=ROW_EVICT)
            tl.store(out_ptr + dst[:, None] + d[None, :], row, mask=m[:, None] & dm,
                     eviction_policy=ROW_EVICT)
    tl.store(hit_ptr + offs, hit, mask=m)


def fused_cache_query(
    pooled: PooledCacheArrays,
    keys: torch.Tensor,
    key_offsets: list[int],
    *,
    policy: str = "lru",
    touch: bool = True,
    **tuning,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Query all tables at once.

    ``keys``: 1-D (any strides), already validated, in the pool's key dtype, on its device;
    ``key_offsets``: ``num_tables + 1`` ascending host ints. Returns (per-table values
    ``[n_t, dim_t]`` views of one output buffer, hit mask over the concatenated keys).
    ``tuning`` overrides the launch settings as in :func:`cache_query`.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    nt = pooled.num_tables
    if len(key_offsets) != nt + 1 or key_offsets[0] != 0 or key_offsets[-1] != keys.numel():
        raise ValueError(f"key_offsets must have {nt + 1} entries from 0 to {keys.numel()}, "
                         f"got {list(key_offsets)}")
    if any(b < a for a, b in zip(key_offsets[:-1], key_offsets[1:], strict=True)):
        raise ValueError(f"key_offsets must be ascending, got {list(key_offsets)}")
    keys = keys.reshape(-1).contiguous()  # the kernel reads keys[i] at keys_ptr + i
    dev = keys.device
    counts = [key_offsets[i + 1] - key_offsets[i] for i in range(nt)]
    sizes = [c * d for c, d in zip(counts, pooled.dims_host, strict=True)]
    out_bases = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    out = torch.empty(int(out_bases[-1]), dtype=torch.float32, device=dev)
    hit = torch.empty(keys.numel(), dtype=torch.bool, device=dev)
    n = keys.numel()
    if n:
        offs_dev = small_int64_to_device(key_offsets, dev)
        out_base_dev = small_int64_to_device(out_bases[:-1], dev)
        max_dim = max(pooled.dims_host)
        cfg = launch_config("fused_cache_query", max_dim, **tuning)
        uniform = len(set(pooled.dims_host)) == 1
        _fused_query_kernel[(triton.cdiv(n, cfg.block_k),)](
            keys, n, offs_dev,
            pooled.set_base, pooled.num_sets, pooled.vec_base, pooled.dims, out_base_dev,
            pooled.keys, pooled.scores, pooled.marks, pooled.vectors, out, hit, pooled.empty,
            NUM_TABLES=nt, MAX_DIM=max_dim, BLOCK_D=cfg.block_d,
            BLOCK_K=cfg.block_k, SLOTS=SLOTS_PER_SET, TOUCH=touch, LFU=policy == "lfu",
            UNIFORM_DIM=uniform, ROW_EVICT=cfg.row_evict, MARK_CHECK=cfg.mark_check,
            num_warps=cfg.num_warps,
        )
    values = [out[int(out_bases[i]):int(out_bases[i + 1])].view(counts[i], pooled.dims_host[i])
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
