"""Insert/replace kernel of the set-associative GPU embedding cache (layout: cache_layout.py).

The batch is ordered by set (a stable sort of the keys' set indices), and each run of keys that
share a set is handled by one lane, in input order. So no two lanes of a launch ever write the
same set (no atomics, no locks), a key that appears twice in one batch is inserted once (its
last value wins), and a key already present is updated in place.

Victim choice for a new key: the lowest-index empty slot of its set; else the slot with the
lowest score among those not written earlier in this launch (ties: lowest index); if more than
32 keys of one batch land in one set, the later ones replace the earlier, lowest index first.
New keys get score ``stamp`` (LRU) or 1 (LFU); a present key gets ``stamp`` (LRU) or +1 (LFU).
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
    check_values,
    np_set_and_tag,
    probe,
    set_and_tag,
)

_INT64_MAX = 2**63 - 1


@triton.jit(do_not_specialize=["num_sets"])
def _set_index_kernel(keys_ptr, n, num_sets, out_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=0)
    s, _t = set_and_tag(k, num_sets)
    tl.store(out_ptr + offs, s.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["num_sets", "stamp"])
def _cache_insert_kernel(
    keys_ptr, vals_ptr, order_ptr, ssets_ptr, n,
    tags_ptr, slots_ptr, vec_ptr, num_sets, counters_ptr, stamp,
    DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, SLOTS: tl.constexpr,
    LFU: tl.constexpr, ONLY_PRESENT: tl.constexpr, COUNT: tl.constexpr,
):
    pid = tl.program_id(0)
    pos = pid.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = pos < n
    myset = tl.load(ssets_ptr + pos, mask=m, other=-1).to(tl.int64)
    prev = tl.load(ssets_ptr + pos - 1, mask=m & (pos > 0), other=-1).to(tl.int64)
    active = m & (myset != prev)  # each lane owns the run of its set that starts here
    sl = tl.arange(0, SLOTS)
    written = tl.zeros([BLOCK_K, SLOTS], dtype=tl.int1)
    n_ins = tl.zeros([BLOCK_K], dtype=tl.int64)
    n_evict = tl.zeros([BLOCK_K], dtype=tl.int64)
    sbase = myset * SLOTS
    while tl.max(active.to(tl.int32), axis=0) > 0:
        src = tl.load(order_ptr + pos, mask=active, other=0)
        k = tl.load(keys_ptr + src, mask=active, other=0)
        _s, t = set_and_tag(k, num_sets)
        j_hit, old, tg = probe(k, myset, t, active, tags_ptr, slots_ptr, SLOTS, False, "")
        present = j_hit >= 0
        if ONLY_PRESENT:
            victim = tl.maximum(j_hit, 0)
            do = present
        else:
            empty = tg == 0
            need_scores = active & (~present) & (tl.sum(empty.to(tl.int32), axis=1) == 0)
            sidx = sbase[:, None] + sl[None, :]
            sc = tl.load(slots_ptr + 2 * sidx + 1, mask=need_scores[:, None], other=0)
            adj = tl.where(empty, -1, tl.where(written, 9223372036854775807, sc))
            minv = tl.min(adj, axis=1)
            victim = tl.min(tl.where(adj == minv[:, None], sl[None, :], SLOTS), axis=1)
            victim = tl.where(present, j_hit, victim)
            do = active
            vtag = tl.sum(tl.where(sl[None, :] == victim[:, None], tg, 0), axis=1)
            new = do & (~present)
            n_ins += new.to(tl.int64)
            n_evict += (new & (vtag != 0)).to(tl.int64)
        vslot = sbase + victim.to(tl.int64)
        if not ONLY_PRESENT:
            if LFU:
                score = tl.where(present, old + 1, 1)
            else:
                score = tl.zeros([BLOCK_K], dtype=tl.int64) + stamp
            tl.store(slots_ptr + 2 * vslot + 1, score, mask=do)
            tl.store(slots_ptr + 2 * vslot, k.to(tl.int64), mask=do)
            tl.store(tags_ptr + vslot, t.to(tl.int16), mask=do)
        for d0 in tl.static_range(0, DIM, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = (d < DIM)[None, :]
            row = tl.load(vals_ptr + src[:, None] * DIM + d[None, :], mask=do[:, None] & dm)
            tl.store(vec_ptr + vslot[:, None] * DIM + d[None, :], row, mask=do[:, None] & dm)
        written = written | ((sl[None, :] == victim[:, None]) & do[:, None])
        # The next key of a run reads what this one wrote, possibly from another thread.
        tl.debug_barrier()
        pos += 1
        nxt = tl.load(ssets_ptr + pos, mask=active & (pos < n), other=-1).to(tl.int64)
        active = active & (pos < n) & (nxt == myset)
    if COUNT:
        tl.atomic_add(counters_ptr + 2, tl.sum(n_ins, axis=0), sem="relaxed")
        tl.atomic_add(counters_ptr + 3, tl.sum(n_evict, axis=0), sem="relaxed")


def sort_by_set(keys: torch.Tensor, num_sets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(set index of each key in ascending order, the stable order that sorts them)."""
    n = keys.numel()
    sdtype = torch.int32 if num_sets < 2**31 else torch.int64
    sets = torch.empty(n, dtype=sdtype, device=keys.device)
    block = 1024
    _set_index_kernel[(triton.cdiv(n, block),)](keys, n, num_sets, sets, BLOCK=block)
    sorted_sets, order = torch.sort(sets, stable=True)
    return sorted_sets, order


def _launch_config(dim: int) -> tuple[int, int]:
    """(keys per program, warps) measured best on an H200 (docs/benchmarks/gpu_cache.md)."""
    if dim <= 32:
        return 64, 4
    if dim <= 128:
        return 32, 4
    return 16, 8


def cache_insert(
    arrays: CacheArrays,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    policy: str = "lru",
    stamp: int = 0,
    counters: torch.Tensor | None = None,
    only_present: bool = False,
    validate: bool = True,
    block_k: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Insert ``keys`` with rows ``values`` ([n, dim]); present keys are updated in place.

    With ``only_present=True`` absent keys are skipped and scores are left alone (an update).
    ``counters`` (int64 [>=4]) receives +insertions (new keys) at [2] and +evictions at [3].
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    dev = arrays.device
    keys = check_keys(keys, arrays.key_dtype, dev, validate=validate)
    n = keys.numel()
    values = check_values(values, n, arrays.dim, dev)
    if n == 0:
        return
    sorted_sets, order = sort_by_set(keys, arrays.num_sets)
    bk, nw = _launch_config(arrays.dim)
    bk, nw = block_k or bk, num_warps or nw
    _cache_insert_kernel[(triton.cdiv(n, bk),)](
        keys, values, order, sorted_sets, n,
        arrays.tags, arrays.slots, arrays.vectors, arrays.num_sets,
        counters if counters is not None else order, stamp,
        DIM=arrays.dim, BLOCK_D=block_d(arrays.dim), BLOCK_K=bk, SLOTS=SLOTS_PER_SET,
        LFU=policy == "lfu", ONLY_PRESENT=only_present, COUNT=counters is not None,
        num_warps=nw,
    )


def np_cache_insert(
    state: NpCacheState, keys: np.ndarray, values: np.ndarray, *, policy: str = "lru",
    stamp: int = 0, only_present: bool = False,
) -> tuple[int, int]:
    """NumPy reference of :func:`cache_insert`, mutating ``state``: (insertions, evictions)."""
    keys = np.asarray(keys).reshape(-1).astype(np.int64)
    values = np.asarray(values, dtype=np.float32).reshape(keys.size, -1)
    sets, tags = np_set_and_tag(keys, state.num_sets)
    written: dict[int, set[int]] = {}
    inserted = evicted = 0
    for i, key in enumerate(keys):
        base = int(sets[i]) * SLOTS_PER_SET
        slots = range(base, base + SLOTS_PER_SET)
        found = [s for s in slots if state.tags[s] == tags[i] and state.keys[s] == key]
        if found:
            slot = found[0]
            if not only_present:
                state.scores[slot] = state.scores[slot] + 1 if policy == "lfu" else stamp
        elif only_present:
            continue
        else:
            done = written.setdefault(base, set())
            adj = [-1 if state.tags[s] == 0 else (_INT64_MAX if s in done else state.scores[s])
                   for s in slots]
            slot = base + int(np.argmin(adj))  # argmin returns the lowest index among ties
            evicted += int(state.tags[slot] != 0)
            inserted += 1
            state.tags[slot] = tags[i]
            state.keys[slot] = key
            state.scores[slot] = 1 if policy == "lfu" else stamp
        state.vectors[slot] = values[i]
        written.setdefault(base, set()).add(slot)
    return inserted, evicted
