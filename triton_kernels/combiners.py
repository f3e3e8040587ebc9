"""Sparse combiners: reduce CSR bags of embedding vectors to one vector per bag.

`combine_bags(vectors, offsets, weights, combiner)` follows TensorFlow's
`tf.nn.safe_embedding_lookup_sparse` / `embedding_lookup_sparse` arithmetic:

- ``sum``:   sum_i w_i * v_i
- ``mean``:  sum_i w_i * v_i / sum_i w_i
- ``sqrtn``: sum_i w_i * v_i / sqrt(sum_i w_i**2)

with w_i = 1 when no weights are given. An empty bag gives zeros, and a zero divisor
gives zeros (TensorFlow's ``div_no_nan``). Pruning of invalid ids or non-positive
weights (what ``safe_`` adds) is the caller's job: this kernel combines what it is given.
Accumulation is in float32 whatever the vector dtype.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .launch import launch_config, on_device

COMBINERS = ("sum", "mean", "sqrtn")
_COMBINER_CODE = {"sum": 0, "mean": 1, "sqrtn": 2}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _combine_bags_kernel(
    vec_ptr,
    off_ptr,
    w_ptr,
    out_ptr,
    nnz,
    DIM: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    COMBINER: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bag = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < DIM
    start = tl.load(off_ptr + bag).to(tl.int64)
    end = tl.load(off_ptr + bag + 1).to(tl.int64)
    # Clamp to the vector array so a bad offsets array can never read out of bounds.
    start = tl.maximum(tl.minimum(start, nnz), 0)
    end = tl.maximum(tl.minimum(end, nnz), start)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    wsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    w2sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    # A while loop, not range(start, end): the interpreter cannot range over loaded scalars.
    i = start
    while i < end:
        rows = i + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < end
        tile = tl.load(
            vec_ptr + rows[:, None] * DIM + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_WEIGHTS:
            w = tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        else:
            w = tl.where(row_ok, 1.0, 0.0)
        acc += tl.sum(tile * w[:, None], axis=0)
        wsum += w
        w2sum += w * w
        i += BLOCK_N
    if COMBINER != 0:
        if COMBINER == 1:
            div = tl.sum(wsum, axis=0)
        else:
            div = tl.sqrt(tl.sum(w2sum, axis=0))
        # div_no_nan: a zero divisor gives zeros (an empty bag or weights summing to 0).
        acc = tl.where(div != 0.0, acc / tl.where(div != 0.0, div, 1.0), 0.0)
    tl.store(out_ptr + bag.to(tl.int64) * DIM + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def _check_offsets_values(offsets: torch.Tensor, nnz: int) -> None:
    """Raise ValueError unless offsets start at 0, never decrease and end at nnz (syncs)."""
    first = int(offsets[0])
    last = int(offsets[-1])
    if first != 0 or last != nnz:
        raise ValueError(
            f"combine_bags: offsets must start at 0 and end at nnz={nnz}, got {first} .. {last}"
        )
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError("combine_bags: offsets must be non-decreasing")


def combine_bags(
    vectors: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None = None,
    combiner: str = "sum",
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Combine bags of vectors: ``out[b] = combine(vectors[offsets[b]:offsets[b+1]])``.

    vectors: ``[nnz, dim]`` float32/float16/bfloat16; offsets: ``[batch + 1]`` int64 (int32
    accepted), CSR row starts; weights: ``[nnz]`` float or None; combiner: sum | mean | sqrtn.
    Returns ``[batch, dim]`` in the dtype of ``vectors`` on its device. ``validate=False``
    skips the value checks on ``offsets`` (they read the tensor back, a device sync).
    """
    if combiner not in _COMBINER_CODE:
        raise ValueError(f"combine_bags: combiner must be one of {COMBINERS}, got {combiner!r}")
    if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2:
        raise ValueError(
            f"combine_bags: vectors must be a 2-D torch tensor [nnz, dim], got "
            f"{getattr(vectors, 'shape', type(vectors))}"
        )
    if vectors.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"combine_bags: vectors must be float32, float16 or bfloat16, got {vectors.dtype}"
        )
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError("combine_bags: offsets must be a 1-D torch tensor [batch + 1]")
    if offsets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"combine_bags: offsets must be int64 (or int32), got {offsets.dtype}")
    if offsets.device != vectors.device:
        raise ValueError(
            f"combine_bags: offsets on {offsets.device} but vectors on {vectors.device}"
        )
    nnz, dim = vectors.shape
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or weights.shape != (nnz,):
            raise ValueError(
                f"combine_bags: weights must have shape ({nnz},), got "
                f"{getattr(weights, 'shape', type(weights))}"
            )
        if not weights.is_floating_point():
            raise ValueError(f"combine_bags: weights must be floating point, got {weights.dtype}")
        if weights.device != vectors.device:
            raise ValueError(
                f"combine_bags: weights on {weights.device} but vectors on {vectors.device}"
            )
        weights = weights.contiguous()
    if validate:
        _check_offsets_values(offsets, nnz)
    batch = offsets.numel() - 1
    out = torch.empty((batch, dim), dtype=vectors.dtype, device=vectors.device)
    if batch == 0 or dim == 0:
        return out
    vectors = vectors.contiguous()
    offsets = offsets.contiguous()
    cfg = launch_config("combine_bags", dim)
    grid = (batch, triton.cdiv(dim, cfg.block_d))
    with on_device(vectors.device):
        _combine_bags_kernel[grid](
            vectors,
            offsets,
            weights if weights is not None else vectors,
            out,
            nnz,
            DIM=dim,
            HAS_WEIGHTS=weights is not None,
            COMBINER=_COMBINER_CODE[combiner],
            BLOCK_N=cfg.block_k,
            BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps,
        )
    return out


def np_combine_bags(
    vectors: np.ndarray,
    offsets: np.ndarray,
    weights: np.ndarray | None = None,
    combiner: str = "sum",
) -> np.ndarray:
    """NumPy reference of `combine_bags`, computed in float64, returned as float64."""
    vectors = np.asarray(vectors, dtype=np.float64)
    offsets = np.asarray(offsets, dtype=np.int64)
    batch, dim = offsets.size - 1, vectors.shape[1]
    out = np.zeros((batch, dim), dtype=np.float64)
    for b in range(batch):
        lo, hi = offsets[b], offsets[b + 1]
        rows = vectors[lo:hi]
        w = np.ones(hi - lo) if weights is None else np.asarray(weights[lo:hi], dtype=np.float64)
        s = (rows * w[:, None]).sum(axis=0)
        if combiner == "mean":
            div = w.sum()
        elif combiner == "sqrtn":
            div = np.sqrt((w * w).sum())
        else:
            div = 1.0
        out[b] = s / div if div != 0 else 0.0
    return out
