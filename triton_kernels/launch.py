"""Launch settings of every kernel: one table of what was measured best, one function to read it,
and `on_device`, the device a launch runs on.

Measured on an H200 (docs/benchmarks/gpu_cache.md, docs/benchmarks/gpu_hierarchy.md); the
wrappers take overrides (``block_k``, ``num_warps``, ...) for benchmarks that sweep them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace

import torch
import triton


@dataclass(frozen=True)
class Launch:
    """One launch: ``block_k`` keys (or rows) per program, ``num_warps``, ``block_d`` the row
    tile width, and the query kernels' ``row_evict`` (cache eviction hint of the row reads)
    and ``mark_check`` (read an LRU hit's mark before its atomic)."""

    block_k: int
    num_warps: int
    block_d: int
    row_evict: str = ""
    mark_check: bool = True


def _tile(dim: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(1, dim)))


def _by_dim(dim: int, steps: tuple[tuple[int, int, int], ...]) -> tuple[int, int]:
    """(block_k, num_warps) of the first ``(max_dim, block_k, num_warps)`` step that fits."""
    for max_dim, block_k, num_warps in steps:
        if dim <= max_dim:
            return block_k, num_warps
    return steps[-1][1], steps[-1][2]


_ANY = 1 << 62
# kernel -> (max dim, keys per program, warps), the first step whose max dim fits.
_STEPS = {
    "cache_query": ((32, 128, 4), (_ANY, 16, 4)),
    # the 26 Criteo tables, dims up to 128 (docs/benchmarks/gpu_cache.md, "hot keys")
    "fused_cache_query": ((32, 128, 4), (_ANY, 32, 4)),
    "cache_insert": ((32, 64, 4), (128, 32, 4), (_ANY, 16, 8)),
    "gather": ((32, 128, 4), (_ANY, 16, 8)),
}
# kernels whose block does not depend on the row width: (keys per program, warps)
_FIXED = {
    "cache_invalidate": (64, 4),
    "set_index": (1024, 4),
    "sketch_add": (1024, 4),
    "static_home_slot": (1024, 4),
    "static_find": (128, 4),
    "shard_owner": (1024, 4),
}
# kernels that tile rows of at most 128 floats and size the key block to the tile
_TILED_128 = ("static_query", "static_rows", "combine_bags")


def on_device(device: torch.device) -> AbstractContextManager:
    """The context in which a kernel launches on ``device``: Triton launches on the current
    CUDA device whatever its tensors' device, so a launch for another GPU must make that GPU
    current first (nothing to do on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def launch_config(kernel: str, dim: int = 1, **overrides: object) -> Launch:
    """The launch of ``kernel`` for rows of ``dim`` floats; ``overrides`` that are not None
    replace fields (a benchmark's sweep)."""
    if kernel in _STEPS:
        block_k, num_warps = _by_dim(dim, _STEPS[kernel])
        cfg = Launch(block_k, num_warps, _tile(dim, 256))
    elif kernel in _FIXED:
        cfg = Launch(*_FIXED[kernel], block_d=_tile(dim, 256))
    elif kernel in _TILED_128:
        block_d = _tile(dim, 128)
        if kernel == "combine_bags":  # rows summed per step of one bag's loop
            cfg = Launch(max(1, min(32, 4096 // block_d)), 4, block_d)
        else:
            cfg = Launch(max(16, min(128, 4096 // block_d)), 4, block_d)
    else:
        raise ValueError(f"no launch settings for kernel {kernel!r}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(cfg, **given) if given else cfg
