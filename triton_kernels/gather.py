"""Triton gather of rows by known index: ``out[i] = table[index[i]]``.

The lookup path's way back to input order on the GPU (after the unique keys were resolved),
and the yardstick of the cache benchmarks: the same rows moved with no hashing or probing.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .launch import launch_config, on_device


@triton.jit
def _gather_kernel(idx_ptr, n, table_ptr, out_ptr, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_K: tl.constexpr, ROW_EVICT: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = offs < n
    row = tl.load(idx_ptr + offs, mask=m, other=0).to(tl.int64)
    for d0 in tl.static_range(0, DIM, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mm = m[:, None] & (d < DIM)[None, :]
        v = tl.load(table_ptr + row[:, None] * DIM + d[None, :], mask=mm,
                    eviction_policy=ROW_EVICT)
        tl.store(out_ptr + offs[:, None] * DIM + d[None, :], v, mask=mm,
                 eviction_policy=ROW_EVICT)


def gather(table: torch.Tensor, index: torch.Tensor, *, block_k: int | None = None,
           num_warps: int | None = None, row_evict: str = "") -> torch.Tensor:
    """Rows ``table[index]`` of a contiguous float32 ``[rows, dim]`` table; index int32/int64.

    Indices must lie in ``[0, rows)``; they are not checked (this is the unchecked yardstick).
    """
    if table.dim() != 2 or table.dtype != torch.float32 or not table.is_contiguous():
        raise ValueError("table must be a contiguous float32 [rows, dim] tensor")
    if index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
        raise ValueError(f"index must be a 1-D int32/int64 tensor, got {index.dtype} "
                         f"{tuple(index.shape)}")
    if index.device != table.device:
        raise ValueError(f"index is on {index.device}, table on {table.device}")
    index = index.contiguous()
    n, dim = index.numel(), table.shape[1]
    out = torch.empty(n, dim, dtype=torch.float32, device=table.device)
    if n:
        cfg = launch_config("gather", dim, block_k=block_k, num_warps=num_warps)
        with on_device(table.device):
            _gather_kernel[(triton.cdiv(n, cfg.block_k),)](
                index, n, table, out, DIM=dim, BLOCK_D=cfg.block_d, BLOCK_K=cfg.block_k,
                ROW_EVICT=row_evict, num_warps=cfg.num_warps)
    return out


def np_gather(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """NumPy reference of :func:`gather`."""
    return np.asarray(table, dtype=np.float32)[np.asarray(index, dtype=np.int64)]
