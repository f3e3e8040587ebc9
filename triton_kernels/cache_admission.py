"""TinyLFU admission for the GPU cache: a count-min sketch of how often keys are looked up.

The sketch is ``SKETCH_DEPTH`` rows of ``2**width_log2`` int32 counters. Every looked-up key
adds one to one counter per row (the row's index is a multiplicative hash of the key's 64-bit
hash); a key's estimated count is the minimum over its counters. An insert that would evict a
resident key admits the new key only if its estimate exceeds the resident's, so one-off keys
do not push out keys that are looked up again and again. The owner halves every counter now
and then (aging), so that the estimates follow a changing workload.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .cache_layout import hash_key, np_hash
from .launch import launch_config

SKETCH_DEPTH = 4
# Odd 64-bit multipliers, one per row (below 2**63 so that they are int64 literals).
_MULT = (0x1E3779B97F4A7C15, 0x42B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5)


@triton.jit
def sketch_index(h, row: tl.constexpr, WIDTH_LOG2: tl.constexpr):
    """Counter index (int64, in its row) of hashed keys ``h`` (uint64) in sketch row ``row``."""
    if row == 0:
        x = h * 0x1E3779B97F4A7C15
    elif row == 1:
        x = h * 0x42B2AE3D27D4EB4F
    elif row == 2:
        x = h * 0x165667B19E3779F9
    else:
        x = h * 0x27D4EB2F165667C5
    return (x >> (64 - WIDTH_LOG2)).to(tl.int64)


@triton.jit
def sketch_estimate(sketch_ptr, k, m, WIDTH_LOG2: tl.constexpr):
    """Estimated lookup count (int32) of keys ``k`` (lanes ``m``; 0 elsewhere)."""
    h = hash_key(k)
    est = tl.load(sketch_ptr + sketch_index(h, 0, WIDTH_LOG2), mask=m, other=0)
    for r in tl.static_range(1, 4):
        c = tl.load(sketch_ptr + (r << WIDTH_LOG2) + sketch_index(h, r, WIDTH_LOG2), mask=m,
                    other=0)
        est = tl.minimum(est, c)
    return est


@triton.jit
def _sketch_add_kernel(keys_ptr, n, sketch_ptr, WIDTH_LOG2: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    h = hash_key(tl.load(keys_ptr + offs, mask=m, other=0))
    for r in tl.static_range(0, 4):
        tl.atomic_add(sketch_ptr + (r << WIDTH_LOG2) + sketch_index(h, r, WIDTH_LOG2), 1,
                      mask=m, sem="relaxed")


def sketch_width_log2(capacity: int) -> int:
    """Row width (log2) for a cache of ``capacity`` slots: about one counter per slot."""
    return max(10, int(capacity - 1).bit_length())


def new_sketch(width_log2: int, device: torch.device | str) -> torch.Tensor:
    """A zeroed sketch: int32 ``[SKETCH_DEPTH * 2**width_log2]``."""
    return torch.zeros(SKETCH_DEPTH << width_log2, dtype=torch.int32, device=device)


def sketch_add(sketch: torch.Tensor, keys: torch.Tensor, width_log2: int) -> None:
    """Count one lookup of each of ``keys`` (int32/int64 on the sketch's device, any shape)."""
    keys = keys.reshape(-1).contiguous()
    if sketch.numel() != SKETCH_DEPTH << width_log2 or sketch.dtype != torch.int32:
        raise ValueError(f"sketch must be int32 [{SKETCH_DEPTH << width_log2}]")
    n = keys.numel()
    if n:
        cfg = launch_config("sketch_add")
        _sketch_add_kernel[(triton.cdiv(n, cfg.block_k),)](keys, n, sketch,
                                                           WIDTH_LOG2=width_log2,
                                                           BLOCK=cfg.block_k,
                                                           num_warps=cfg.num_warps)


def np_sketch_index(keys: np.ndarray, width_log2: int) -> np.ndarray:
    """NumPy twin of the counter indices: int64 ``[SKETCH_DEPTH, n]`` (flat, row offset
    included)."""
    h = np_hash(np.asarray(keys).reshape(-1))
    out = np.empty((SKETCH_DEPTH, h.size), dtype=np.int64)
    with np.errstate(over="ignore"):
        for r, mult in enumerate(_MULT):
            out[r] = ((h * np.uint64(mult)) >> np.uint64(64 - width_log2)).astype(np.int64)
            out[r] += r << width_log2
    return out


def np_sketch_add(sketch: np.ndarray, keys: np.ndarray, width_log2: int) -> None:
    """NumPy reference of :func:`sketch_add` (in place)."""
    np.add.at(sketch, np_sketch_index(keys, width_log2).reshape(-1), 1)


def np_sketch_estimate(sketch: np.ndarray, keys: np.ndarray, width_log2: int) -> np.ndarray:
    """Estimated lookup counts of ``keys``."""
    return sketch[np_sketch_index(keys, width_log2)].min(axis=0)
