"""Insert/replace kernel of the set-associative GPU embedding cache (layout: cache_layout.py).

The batch is ordered by set (a stable sort of the keys' set indices), and each run of keys that
share a set is handled by one lane, in input order. So no two lanes of a launch ever write the
same set (the marks bitmap, whose words span 4 sets, is changed with atomics), a key that
appears twice in one batch is inserted once (its last value wins), and a key already present
is updated in place.

With LRU, the lane first stamps the set's slots marked by query hits since the last insert
into the set with ``stamp`` and clears their marks. Victim choice for a new key: the
lowest-index empty slot of its set; else the slot with the lowest score among those not written
earlier in this launch (ties: lowest index); if more than 8 keys of one batch land in one set,
the later ones replace the earlier, lowest index first. New keys get score ``stamp`` (LRU) or
1 (LFU); a present key gets ``stamp`` (LRU) or +1 (LFU).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .cache_admission import np_sketch_estimate, sketch_estimate
from .cache_layout import (
    POLICIES,
    SLOTS_PER_SET,
    CacheArrays,
    NpCacheState,
    check_keys,
    check_values,
    empty_key,
    np_set_index,
    probe,
    set_index,
)
from .launch import launch_config

_INT64_MAX = 2**63 - 1


@triton.jit(do_not_specialize=["num_sets"])
def _set_index_kernel(keys_ptr, n, num_sets, out_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=0)
    tl.store(out_ptr + offs, set_index(k, num_sets).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["num_sets", "stamp", "empty"])
def _cache_insert_kernel(
    keys_ptr, vals_ptr, order_ptr, ssets_ptr, n,
    cache_keys_ptr, scores_ptr, marks_ptr, vec_ptr, num_sets, empty, counters_ptr, stamp,
    sketch_ptr,
    DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, SLOTS: tl.constexpr,
    LFU: tl.constexpr, ONLY_PRESENT: tl.constexpr, COUNT: tl.constexpr,
    ADMIT: tl.constexpr, WIDTH_LOG2: tl.constexpr,
):
    pid = tl.program_id(0)
    pos = pid.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = pos < n
    myset = tl.load(ssets_ptr + pos, mask=m, other=-1).to(tl.int64)
    prev = tl.load(ssets_ptr + pos - 1, mask=m & (pos > 0), other=-1).to(tl.int64)
    active = m & (myset != prev)  # each lane owns the run of its set that starts here
    sl = tl.arange(0, SLOTS)
    sbase = myset * SLOTS
    sidx = sbase[:, None] + sl[None, :]
    if not ONLY_PRESENT and not LFU:
        # Query hits since the last insert into this set become this insert's stamp.
        word = marks_ptr + (sbase >> 5)
        shift = (sbase & 31).to(tl.int32)
        bits = tl.load(word, mask=active, other=0)
        marked = ((bits[:, None] >> (shift[:, None] + sl[None, :])) & 1) != 0
        tl.store(scores_ptr + sidx, tl.zeros([BLOCK_K, SLOTS], tl.int64) + stamp,
                 mask=active[:, None] & marked)
        tl.atomic_and(word, ~(((bits >> shift) & 0xFF) << shift), mask=active, sem="relaxed")
        tl.debug_barrier()
    written = tl.zeros([BLOCK_K, SLOTS], dtype=tl.int1)
    n_ins = tl.zeros([BLOCK_K], dtype=tl.int64)
    n_evict = tl.zeros([BLOCK_K], dtype=tl.int64)
    n_reject = tl.zeros([BLOCK_K], dtype=tl.int64)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        src = tl.load(order_ptr + pos, mask=active, other=0)
        k = tl.load(keys_ptr + src, mask=active, other=0)
        j_hit, kb = probe(k, myset, active, cache_keys_ptr, empty, SLOTS)
        present = j_hit >= 0
        if ONLY_PRESENT:
            victim = tl.maximum(j_hit, 0)
            do = present
        else:
            empty_slot = kb == empty
            need_scores = active & (~present) & (tl.sum(empty_slot.to(tl.int32), axis=1) == 0)
            sc = tl.load(scores_ptr + sidx, mask=need_scores[:, None], other=0)
            adj = tl.where(empty_slot, -1, tl.where(written, 9223372036854775807, sc))
            minv = tl.min(adj, axis=1)
            victim = tl.min(tl.where(adj == minv[:, None], sl[None, :], SLOTS), axis=1)
            victim = tl.where(present, j_hit, victim)
            do = active
            vempty = tl.sum(tl.where(sl[None, :] == victim[:, None], empty_slot, 0), axis=1)
            if ADMIT:
                # TinyLFU: a new key evicts a resident only if it was looked up more often.
                vkey = tl.sum(tl.where(sl[None, :] == victim[:, None], kb, 0), axis=1)
                contest = active & (~present) & (vempty == 0)
                wins = (sketch_estimate(sketch_ptr, k, contest, WIDTH_LOG2)
                        > sketch_estimate(sketch_ptr, vkey, contest, WIDTH_LOG2))
                n_reject += (contest & (~wins)).to(tl.int64)
                do = do & ((~contest) | wins)
            new = do & (~present)
            n_ins += new.to(tl.int64)
            n_evict += (new & (vempty == 0)).to(tl.int64)
        vslot = sbase + victim.to(tl.int64)
        if not ONLY_PRESENT:
            if LFU:
                old = tl.load(scores_ptr + vslot, mask=do & present, other=0)
                score = tl.where(present, old + 1, 1)
            else:
                score = tl.zeros([BLOCK_K], dtype=tl.int64) + stamp
            tl.store(scores_ptr + vslot, score, mask=do)
            tl.store(cache_keys_ptr + vslot, k.to(tl.int64), mask=do)
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
        if ADMIT:
            tl.atomic_add(counters_ptr + 4, tl.sum(n_reject, axis=0), sem="relaxed")


def sort_by_set(keys: torch.Tensor, num_sets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(set index of each key in ascending order, the stable order that sorts them)."""
    keys = keys.reshape(-1).contiguous()
    n = keys.numel()
    sdtype = torch.int32 if num_sets < 2**31 else torch.int64
    sets = torch.empty(n, dtype=sdtype, device=keys.device)
    block = launch_config("set_index").block_k
    _set_index_kernel[(triton.cdiv(n, block),)](keys, n, num_sets, sets, BLOCK=block)
    sorted_sets, order = torch.sort(sets, stable=True)
    return sorted_sets, order


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
    sketch: tuple[torch.Tensor, int] | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Insert ``keys`` with rows ``values`` ([n, dim]); present keys are updated in place.

    With ``only_present=True`` absent keys are skipped and scores are left alone (an update).
    With ``sketch`` (a TinyLFU sketch and its width_log2, cache_admission.py) a new key that
    would evict a resident one is admitted only if the sketch counts it more lookups.
    ``counters`` (int64 [>=4]) receives +insertions (new keys) at [2] and +evictions at [3]
    (and, with ``sketch``, [>=5], +keys not admitted at [4]).
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
    cfg = launch_config("cache_insert", arrays.dim, block_k=block_k, num_warps=num_warps)
    _cache_insert_kernel[(triton.cdiv(n, cfg.block_k),)](
        keys, values, order, sorted_sets, n,
        arrays.keys, arrays.scores, arrays.marks, arrays.vectors, arrays.num_sets,
        empty_key(arrays.key_dtype), counters if counters is not None else order, stamp,
        sketch[0] if sketch is not None else order,
        DIM=arrays.dim, BLOCK_D=cfg.block_d, BLOCK_K=cfg.block_k, SLOTS=SLOTS_PER_SET,
        LFU=policy == "lfu", ONLY_PRESENT=only_present, COUNT=counters is not None,
        ADMIT=sketch is not None and not only_present,
        WIDTH_LOG2=sketch[1] if sketch is not None else 0, num_warps=cfg.num_warps,
    )


def np_cache_insert(
    state: NpCacheState, keys: np.ndarray, values: np.ndarray, *, policy: str = "lru",
    stamp: int = 0, only_present: bool = False, sketch: tuple[np.ndarray, int] | None = None,
) -> tuple[int, int] | tuple[int, int, int]:
    """NumPy reference of :func:`cache_insert`, mutating ``state``: (insertions, evictions),
    and keys not admitted when ``sketch`` is given."""
    keys = np.asarray(keys).reshape(-1).astype(np.int64)
    values = np.asarray(values, dtype=np.float32).reshape(keys.size, -1)
    sets = np_set_index(keys, state.num_sets)
    written: dict[int, set[int]] = {}
    if not only_present and policy == "lru":
        for base in np.unique(sets) * SLOTS_PER_SET:
            state.refresh(int(base), stamp)
    inserted = evicted = rejected = 0
    for i, key in enumerate(keys):
        base = int(sets[i]) * SLOTS_PER_SET
        slots = range(base, base + SLOTS_PER_SET)
        found = [s for s in slots if state.keys[s] == key]
        if found:
            slot = found[0]
            if not only_present:
                state.scores[slot] = state.scores[slot] + 1 if policy == "lfu" else stamp
        elif only_present:
            continue
        else:
            done = written.setdefault(base, set())
            adj = [-1 if state.keys[s] == state.empty
                   else (_INT64_MAX if s in done else state.scores[s]) for s in slots]
            slot = base + int(np.argmin(adj))  # argmin returns the lowest index among ties
            if sketch is not None and state.keys[slot] != state.empty:
                est = np_sketch_estimate(sketch[0], np.array([key, state.keys[slot]]),
                                         sketch[1])
                if est[0] <= est[1]:
                    rejected += 1
                    continue
            evicted += int(state.keys[slot] != state.empty)
            inserted += 1
            state.keys[slot] = key
            state.scores[slot] = 1 if policy == "lfu" else stamp
        state.vectors[slot] = values[i]
        written.setdefault(base, set()).add(slot)
    if sketch is not None and not only_present:
        return inserted, evicted, rejected
    return inserted, evicted
