"""Invalidate and update-if-present for the GPU embedding cache (layout: cache_layout.py).

``cache_invalidate`` empties the slots holding the given keys, so a later query misses and the
caller refetches the fresh row from a lower tier. ``cache_update`` overwrites the rows of the
given keys that are present (absent keys are ignored; scores are left alone), through the
insert kernel's set-ordered path, so a key repeated in one batch takes its last value.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .cache_insert import cache_insert, np_cache_insert
from .cache_layout import (
    SLOTS_PER_SET,
    CacheArrays,
    NpCacheState,
    check_keys,
    empty_key,
    find_slots,
    np_set_index,
)
from .launch import launch_config


@triton.jit(do_not_specialize=["num_sets", "empty"])
def _cache_invalidate_kernel(
    keys_ptr, n, cache_keys_ptr, scores_ptr, marks_ptr, num_sets, empty,
    BLOCK_K: tl.constexpr, SLOTS: tl.constexpr,
):
    _offs, _m, found, slot = find_slots(keys_ptr, n, cache_keys_ptr, num_sets, empty,
                                        BLOCK_K, SLOTS)
    # Repeated keys write the same values to the same slot: benign.
    tl.store(cache_keys_ptr + slot, tl.zeros([BLOCK_K], dtype=tl.int64) + empty, mask=found)
    tl.store(scores_ptr + slot, tl.zeros([BLOCK_K], dtype=tl.int64), mask=found)
    one = tl.full([BLOCK_K], 1, tl.int32)
    tl.atomic_and(marks_ptr + (slot >> 5), ~(one << (slot & 31).to(tl.int32)), mask=found,
                  sem="relaxed")


def cache_invalidate(arrays: CacheArrays, keys: torch.Tensor, *,
                     validate: bool = True) -> None:
    """Remove ``keys`` (absent ones are ignored) from the cache."""
    dev = arrays.device
    keys = check_keys(keys, arrays.key_dtype, dev, validate=validate)
    n = keys.numel()
    if n:
        cfg = launch_config("cache_invalidate")
        _cache_invalidate_kernel[(triton.cdiv(n, cfg.block_k),)](
            keys, n, arrays.keys, arrays.scores, arrays.marks, arrays.num_sets,
            empty_key(arrays.key_dtype), BLOCK_K=cfg.block_k, SLOTS=SLOTS_PER_SET,
            num_warps=cfg.num_warps,
        )


def cache_update(arrays: CacheArrays, keys: torch.Tensor, values: torch.Tensor, *,
                 validate: bool = True) -> None:
    """Overwrite the rows of those ``keys`` that are present; absent keys are ignored."""
    cache_insert(arrays, keys, values, only_present=True, validate=validate)


def np_cache_invalidate(state: NpCacheState, keys: np.ndarray) -> None:
    """NumPy reference of :func:`cache_invalidate`, mutating ``state``."""
    keys = np.asarray(keys).reshape(-1).astype(np.int64)
    sets = np_set_index(keys, state.num_sets)
    for i, key in enumerate(keys):
        base = int(sets[i]) * SLOTS_PER_SET
        for s in range(base, base + SLOTS_PER_SET):
            if key != state.empty and state.keys[s] == key:
                state.keys[s] = state.empty
                state.scores[s] = 0
                state.marks[s] = False


def np_cache_update(state: NpCacheState, keys: np.ndarray, values: np.ndarray) -> None:
    """NumPy reference of :func:`cache_update`, mutating ``state``."""
    np_cache_insert(state, keys, values, only_present=True)
