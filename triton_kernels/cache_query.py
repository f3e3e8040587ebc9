"""Query kernel of the set-associative GPU embedding cache (layout: cache_layout.py).

Per key: hash to a set, read the set's 32 15-bit tags (one 64-byte line piece), then read the
record (key, score) and the row of the first slot whose tag matches at once (``speculate``; a
wrong first candidate with more candidates behind it, about one key in 2,000, is resolved by a
full probe), and on a hit copy the row into the output and touch the slot's score (LRU: the
call's clock stamp; LFU: +1 per occurrence). Misses get a zero row, ``hit=False``,
and optionally a compact list of their positions.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .cache_layout import (
    POLICIES,
    SLOTS_PER_SET,
    CacheArrays,
    NpCacheState,
    block_d,
    check_keys,
    np_set_and_tag,
    probe,
    set_and_tag,
    speculative_query,
    touch_scores,
)


@triton.jit(do_not_specialize=["num_sets", "stamp"])
def _cache_query_kernel(
    keys_ptr, n, tags_ptr, slots_ptr, vec_ptr, num_sets,
    out_ptr, hit_ptr, counters_ptr, miss_pos_ptr, miss_count_ptr, stamp,
    DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, SLOTS: tl.constexpr,
    TOUCH: tl.constexpr, LFU: tl.constexpr, COUNT: tl.constexpr, MISS_POS: tl.constexpr,
    PROBE_1D: tl.constexpr, TAG_EVICT: tl.constexpr, ROW_EVICT: tl.constexpr,
    LRU_ATOMIC: tl.constexpr, SPECULATE: tl.constexpr, TOUCH_EARLY: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=0)
    s, t = set_and_tag(k, num_sets)
    if SPECULATE:
        slot, hit, score = speculative_query(
            k, s, t, m, offs, tags_ptr, slots_ptr, vec_ptr, out_ptr, stamp, SLOTS, DIM, BLOCK_D,
            TAG_EVICT, ROW_EVICT, TOUCH_EARLY, LFU, LRU_ATOMIC)
    else:
        j, score, _tg = probe(k, s, t, m, tags_ptr, slots_ptr, SLOTS, PROBE_1D, TAG_EVICT)
        hit = j >= 0
        slot = s * SLOTS + tl.maximum(j, 0).to(tl.int64)
        for d0 in tl.static_range(0, DIM, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < DIM
            row = tl.load(vec_ptr + slot[:, None] * DIM + d[None, :],
                          mask=hit[:, None] & dm[None, :], other=0.0, eviction_policy=ROW_EVICT)
            tl.store(out_ptr + offs[:, None] * DIM + d[None, :], row,
                     mask=m[:, None] & dm[None, :], eviction_policy=ROW_EVICT)
    tl.store(hit_ptr + offs, hit, mask=m)
    if TOUCH and not TOUCH_EARLY:
        touch_scores(slots_ptr, slot, hit, score, stamp, LFU, LRU_ATOMIC)
    miss = m & (~hit)
    if COUNT:
        tl.atomic_add(counters_ptr, tl.sum(hit.to(tl.int64), axis=0), sem="relaxed")
        tl.atomic_add(counters_ptr + 1, tl.sum(miss.to(tl.int64), axis=0), sem="relaxed")
    if MISS_POS:
        mi = miss.to(tl.int32)
        nmiss = tl.sum(mi, axis=0)
        base = tl.atomic_add(miss_count_ptr, nmiss.to(tl.int64), sem="relaxed")
        rank = tl.cumsum(mi, axis=0) - mi
        tl.store(miss_pos_ptr + base + rank, offs, mask=miss)


# Launch settings per row width, measured best on an H200 (docs/benchmarks/gpu_cache.md):
# keys per program and warps. The one-candidate probe and the eviction hints measured no
# faster there, so they are off by default (kept selectable for benchmarks).
def _launch_config(dim: int) -> dict:
    block_k, num_warps = (64, 8) if dim <= 32 else (16, 4)
    return {"block_k": block_k, "num_warps": num_warps, "probe_1d": False, "tag_evict": "",
            "row_evict": "", "lru_atomic": False, "speculate": True, "early_touch": True}


def cache_query(
    arrays: CacheArrays,
    keys: torch.Tensor,
    *,
    policy: str = "lru",
    stamp: int = 0,
    touch: bool = True,
    counters: torch.Tensor | None = None,
    return_miss_positions: bool = False,
    validate: bool = True,
    **tuning,
) -> tuple[torch.Tensor, ...]:
    """Look ``keys`` up in the cache.

    Returns ``(values [n, dim] float32, hit [n] bool)``; with ``return_miss_positions`` also
    ``(miss_positions int64 [n], miss_count int64 [1])``: the first ``miss_count`` entries are
    the input positions that missed, in no particular order. Hits stamp ``stamp`` into the slot
    score (``policy="lru"``) or add one per occurrence (``"lfu"``) unless ``touch=False``.
    ``counters`` (int64 [>=2]) receives +hits at [0] and +misses at [1]. ``tuning`` overrides
    the launch settings (block_k, num_warps, speculate, early_touch, probe_1d, tag_evict,
    row_evict) for benchmarks.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    dev = arrays.device
    keys = check_keys(keys, arrays.key_dtype, dev, validate=validate)
    n = keys.numel()
    dim = arrays.dim
    out = torch.empty(n, dim, dtype=torch.float32, device=dev)
    hit = torch.empty(n, dtype=torch.bool, device=dev)
    miss_pos = torch.empty(n if return_miss_positions else 1, dtype=torch.int64, device=dev)
    miss_count = torch.zeros(1, dtype=torch.int64, device=dev)
    if n:
        cfg = _launch_config(dim)
        cfg.update({k: v for k, v in tuning.items() if v is not None})
        grid = (triton.cdiv(n, cfg["block_k"]),)
        _cache_query_kernel[grid](
            keys, n, arrays.tags, arrays.slots, arrays.vectors, arrays.num_sets,
            out, hit, counters if counters is not None else miss_count, miss_pos, miss_count,
            stamp,
            DIM=dim, BLOCK_D=block_d(dim), BLOCK_K=cfg["block_k"], SLOTS=SLOTS_PER_SET,
            TOUCH=touch, LFU=policy == "lfu", COUNT=counters is not None,
            MISS_POS=return_miss_positions, PROBE_1D=cfg["probe_1d"],
            TAG_EVICT=cfg["tag_evict"], ROW_EVICT=cfg["row_evict"], LRU_ATOMIC=cfg["lru_atomic"],
            SPECULATE=cfg["speculate"],
            TOUCH_EARLY=touch and cfg["speculate"] and cfg["early_touch"],
            num_warps=cfg["num_warps"],
        )
    if return_miss_positions:
        return out, hit, miss_pos, miss_count
    return out, hit


def np_cache_query(
    state: NpCacheState, keys: np.ndarray, *, policy: str = "lru", stamp: int = 0,
    touch: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """NumPy reference of :func:`cache_query`; touches ``state.scores`` in place."""
    keys = np.asarray(keys).reshape(-1).astype(np.int64)
    out = np.zeros((keys.size, state.vectors.shape[1]), dtype=np.float32)
    hit = np.zeros(keys.size, dtype=bool)
    sets, tags = np_set_and_tag(keys, state.num_sets)
    for i, key in enumerate(keys):
        base = int(sets[i]) * SLOTS_PER_SET
        for j in range(SLOTS_PER_SET):
            if state.tags[base + j] == tags[i] and state.keys[base + j] == key:
                out[i] = state.vectors[base + j]
                hit[i] = True
                if touch:
                    if policy == "lfu":
                        state.scores[base + j] += 1
                    else:
                        state.scores[base + j] = stamp
                break
    return out, hit
