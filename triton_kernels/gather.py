"""Plain Triton gather of rows by known index: ``out[i] = table[index[i]]``.

The yardstick of the cache benchmarks: the same rows moved with no hashing or probing.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .cache_layout import block_d


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


def _launch_config(dim: int) -> tuple[int, int]:
    """(rows per program, warps) measured best on an H200 (docs/benchmarks/gpu_cache.md)."""
    return (128, 4) if dim <= 32 else (16, 8)


def gather_rows(table: torch.Tensor, index: torch.Tensor, *, block_k: int | None = None,
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
        bk, nw = _launch_config(dim)
        bk, nw = block_k or bk, num_warps or nw
        _gather_kernel[(triton.cdiv(n, bk),)](index, n, table, out, DIM=dim,
                                              BLOCK_D=block_d(dim), BLOCK_K=bk,
                                              ROW_EVICT=row_evict, num_warps=nw)
    return out


def np_gather_rows(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """NumPy reference of :func:`gather_rows`."""
    return np.asarray(table, dtype=np.float32)[np.asarray(index, dtype=np.int64)]
