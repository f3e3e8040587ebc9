"""torch-backend lookup and combine ops for the lookup layers.

The parameter server takes torch tensors directly and answers on the ids' device, so on
CUDA the ids never leave the GPU for cache hits. Bags are combined by the Triton kernel
`combine_bags` on CUDA (and under `TRITON_INTERPRET=1`), by torch ops on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

Fetch = Callable[[torch.Tensor], torch.Tensor]


def lookup(fetch: Fetch, ids: torch.Tensor, dim: int) -> torch.Tensor:
    """float32 vectors of shape `ids.shape + (dim,)` for int ids of any rank."""
    return fetch(ids).reshape(*ids.shape, dim)


class Bags:
    """Ids as CSR bags: `values[offsets[b]:offsets[b+1]]` form bag b of `outer_shape`."""

    def __init__(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        weights: torch.Tensor | None,
        outer_shape: tuple[int, ...],
    ) -> None:
        self.values = values
        self.offsets = offsets
        self.weights = weights
        self.outer_shape = outer_shape


def _to_bags(values, segments, weights, outer_shape) -> Bags:
    """Drop negative ids (padding); `segments` must be non-decreasing."""
    keep = values >= 0
    values = values[keep]
    segments = segments[keep]
    if weights is not None:
        weights = weights[keep]
    num_bags = 1
    for n in outer_shape:
        num_bags *= n
    counts = torch.bincount(segments, minlength=num_bags)
    offsets = torch.zeros(num_bags + 1, dtype=torch.int64, device=values.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return Bags(values, offsets, weights, tuple(outer_shape))


def bags_from_padded(ids: torch.Tensor, weights: torch.Tensor | None) -> Bags:
    """Dense `[batch, max_nnz]` or `[batch, slots, max_nnz]` ids padded with -1 -> bags."""
    width = ids.shape[-1]
    flat = ids.reshape(-1)
    segments = torch.arange(flat.numel(), device=ids.device) // max(width, 1)
    w = None if weights is None else weights.reshape(-1)
    return _to_bags(flat, segments, w, tuple(ids.shape[:-1]))


def bags_from_offsets(
    values: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None
) -> Bags:
    """1-D values with CSR `offsets` (`[batch + 1]`, row starts then the end) -> bags."""
    offsets = offsets.to(torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    batch = lengths.numel()
    segments = torch.repeat_interleave(torch.arange(batch, device=values.device), lengths)
    return _to_bags(values, segments, weights, (batch,))


def _use_triton(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def combine_torch(
    vectors: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None, combiner: str
) -> torch.Tensor:
    """`combine_bags` in torch ops, for CPU tensors (Triton has no CPU target)."""
    batch = offsets.numel() - 1
    segments = torch.repeat_interleave(
        torch.arange(batch, device=vectors.device), offsets[1:] - offsets[:-1]
    )
    w = torch.ones(vectors.shape[0], device=vectors.device) if weights is None else weights
    out = torch.zeros(batch, vectors.shape[1], dtype=torch.float32, device=vectors.device)
    out.index_add_(0, segments, vectors.float() * w[:, None])
    if combiner == "sum":
        return out
    wsum = torch.zeros(batch, dtype=torch.float32, device=vectors.device)
    wsum.index_add_(0, segments, w if combiner == "mean" else w * w)
    divisor = wsum if combiner == "mean" else wsum.sqrt()
    safe = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return torch.where((divisor == 0)[:, None], torch.zeros_like(out), out / safe[:, None])


def combine(fetch: Fetch, bags: Bags, dim: int, combiner: str) -> torch.Tensor:
    """Look up the unique ids once, then combine each bag (empty bag -> zeros)."""
    unique, position = torch.unique(bags.values, return_inverse=True)
    vectors = lookup(fetch, unique, dim)[position]
    weights = None if bags.weights is None else bags.weights.to(torch.float32)
    if _use_triton(vectors.device):
        from keras_hps.triton_kernels.combiners import combine_bags

        out = combine_bags(vectors, bags.offsets, weights, combiner, validate=False)
    else:
        out = combine_torch(vectors, bags.offsets, weights, combiner)
    return out.reshape(*bags.outer_shape, dim)
