"""Fused multi-table query: every table of a model looked up in one launch.

The tables' caches live in one pooled allocation (tags, keys and scores concatenated set after
set; vectors concatenated as one flat float32 buffer, each table with its own dim). The keys of
all tables come concatenated, with ``key_offsets[t]:key_offsets[t+1]`` the keys of table ``t``.
The output is one flat float32 buffer; table ``t``'s rows start at element ``out_base[t]``.
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
    block_d,
    probe,
    set_and_tag,
    small_int64_to_device,
    speculative_query,
    touch_scores,
)
from .cache_query import _launch_config, np_cache_query


@dataclass
class PooledTables:
    """Pooled arrays of several caches plus the per-table parameter vectors (int64, device)."""

    tags: torch.Tensor
    slots: torch.Tensor  # int64 [slots, 2]: key, score
    vectors: torch.Tensor  # flat float32
    set_base: torch.Tensor  # first set of each table
    num_sets: torch.Tensor  # sets of each table
    vec_base: torch.Tensor  # first element of each table's vectors
    dims: torch.Tensor  # row width of each table
    dims_host: tuple[int, ...]

    @property
    def num_tables(self) -> int:
        return len(self.dims_host)


@triton.jit(do_not_specialize=["stamp"])
def _fused_query_kernel(
    keys_ptr, n, key_off_ptr,
    set_base_ptr, num_sets_ptr, vec_base_ptr, dims_ptr, out_base_ptr,
    tags_ptr, slots_ptr, vec_ptr, out_ptr, hit_ptr, stamp,
    NUM_TABLES: tl.constexpr, MAX_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr, SLOTS: tl.constexpr, TOUCH: tl.constexpr, LFU: tl.constexpr,
    UNIFORM_DIM: tl.constexpr,
    PROBE_1D: tl.constexpr, TAG_EVICT: tl.constexpr, ROW_EVICT: tl.constexpr,
    LRU_ATOMIC: tl.constexpr, SPECULATE: tl.constexpr, TOUCH_EARLY: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = offs < n
    tid = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(1, NUM_TABLES):
        tid += (offs >= tl.load(key_off_ptr + j)).to(tl.int32)
    k = tl.load(keys_ptr + offs, mask=m, other=0)
    s, t = set_and_tag(k, tl.load(num_sets_ptr + tid))
    set_base = tl.load(set_base_ptr + tid)
    s += set_base
    if UNIFORM_DIM and SPECULATE:
        # All tables share MAX_DIM: the pool is one [slots, MAX_DIM] array and the output one
        # [keys, MAX_DIM] array, so rows are addressed as in the single-table kernel (constant
        # row width: the compiler can use 16-byte accesses), with its speculative probe.
        slot, hit, score = speculative_query(
            k, s, t, m, offs, tags_ptr, slots_ptr, vec_ptr, out_ptr, stamp, SLOTS, MAX_DIM, BLOCK_D,
            TAG_EVICT, ROW_EVICT, TOUCH_EARLY, LFU, LRU_ATOMIC)
    else:
        jj, score, _tg = probe(k, s, t, m, tags_ptr, slots_ptr, SLOTS, PROBE_1D, TAG_EVICT)
        hit = jj >= 0
        slot = s * SLOTS + tl.maximum(jj, 0).to(tl.int64)
        if UNIFORM_DIM:
            for d0 in tl.static_range(0, MAX_DIM, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                dm = (d < MAX_DIM)[None, :]
                row = tl.load(vec_ptr + slot[:, None] * MAX_DIM + d[None, :],
                              mask=hit[:, None] & dm, other=0.0, eviction_policy=ROW_EVICT)
                tl.store(out_ptr + offs[:, None] * MAX_DIM + d[None, :], row,
                         mask=m[:, None] & dm, eviction_policy=ROW_EVICT)
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
    if TOUCH and not TOUCH_EARLY:
        touch_scores(slots_ptr, slot, hit, score, stamp, LFU, LRU_ATOMIC)


def fused_cache_query(
    pooled: PooledTables,
    keys: torch.Tensor,
    key_offsets: list[int],
    *,
    policy: str = "lru",
    stamp: int = 0,
    touch: bool = True,
    **tuning,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Query all tables at once.

    ``keys``: 1-D, already validated, in the pool's key dtype, on its device; ``key_offsets``:
    ``num_tables + 1`` ascending host ints. Returns (per-table values ``[n_t, dim_t]`` views of
    one output buffer, hit mask over the concatenated keys). ``tuning`` overrides the launch
    settings as in :func:`cache_query`.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    nt = pooled.num_tables
    if len(key_offsets) != nt + 1 or key_offsets[0] != 0 or key_offsets[-1] != keys.numel():
        raise ValueError(f"key_offsets must have {nt + 1} entries from 0 to {keys.numel()}, "
                         f"got {list(key_offsets)}")
    if any(b < a for a, b in zip(key_offsets[:-1], key_offsets[1:], strict=True)):
        raise ValueError(f"key_offsets must be ascending, got {list(key_offsets)}")
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
        cfg = _launch_config(max_dim)
        cfg.update({k: v for k, v in tuning.items() if v is not None})
        uniform = len(set(pooled.dims_host)) == 1
        _fused_query_kernel[(triton.cdiv(n, cfg["block_k"]),)](
            keys, n, offs_dev,
            pooled.set_base, pooled.num_sets, pooled.vec_base, pooled.dims, out_base_dev,
            pooled.tags, pooled.slots, pooled.vectors, out, hit, stamp,
            NUM_TABLES=nt, MAX_DIM=max_dim, BLOCK_D=block_d(max_dim),
            BLOCK_K=cfg["block_k"], SLOTS=SLOTS_PER_SET, TOUCH=touch, LFU=policy == "lfu",
            UNIFORM_DIM=uniform,
            PROBE_1D=cfg["probe_1d"], TAG_EVICT=cfg["tag_evict"], ROW_EVICT=cfg["row_evict"],
            LRU_ATOMIC=cfg["lru_atomic"], SPECULATE=cfg["speculate"],
            TOUCH_EARLY=touch and uniform and cfg["speculate"] and cfg["early_touch"],
            num_warps=cfg["num_warps"],
        )
    values = [out[int(out_bases[i]):int(out_bases[i + 1])].view(counts[i], pooled.dims_host[i])
              for i in range(nt)]
    return values, hit


def np_fused_cache_query(
    states: list[NpCacheState], keys_per_table: list[np.ndarray], *, policy: str = "lru",
    stamp: int = 0, touch: bool = True,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """NumPy reference of :func:`fused_cache_query`: one per-table query each."""
    vals, hits = [], []
    for state, keys in zip(states, keys_per_table, strict=True):
        v, h = np_cache_query(state, keys, policy=policy, stamp=stamp, touch=touch)
        vals.append(v)
        hits.append(h)
    return vals, hits
