"""The lookup layers on Keras's torch backend.

The parameter server takes torch tensors directly and answers on the ids' device, so on
CUDA the ids never leave the GPU for cache hits. Bags are combined by `keras_hps.combiner`
(the Triton kernel `combine_bags` on CUDA and under `TRITON_INTERPRET=1`).
"""

from __future__ import annotations

from typing import Any

import torch

from keras_hps.combiner import combine
from keras_hps.layers.base_layer import Bags, FusedLookupBase, LookupBase, SparseLookupBase


def _to_bags(values: torch.Tensor, segments: torch.Tensor, weights: torch.Tensor | None,
             outer_shape: tuple[int, ...]) -> Bags:
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
    return Bags(values, segments, weights, num_bags, tuple(outer_shape), offsets=offsets)


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


class TorchLookupLayer(LookupBase):
    """`LookupLayer` on the torch backend."""

    def _lookup_ids(self, ps: Any, ids: Any) -> Any:
        return ps.lookup(self.model_name, self.table_id, ids)


class TorchSparseLookupLayer(SparseLookupBase):
    """`SparseLookupLayer` on the torch backend (dense padded ids, or values with offsets)."""

    def _lookup_bags(self, ps: Any, ids: Any, weights: Any, offsets: Any, kind: str) -> Any:
        bags = (bags_from_offsets(ids, offsets, weights) if offsets is not None
                else bags_from_padded(ids, weights))
        # Look up the unique ids once, then combine each bag (empty bag -> zeros).
        unique, position = torch.unique(bags.values, return_inverse=True)
        vectors = ps.lookup(self.model_name, self.table_id, unique)[position]
        out = combine(vectors, bags.segments, bags.num_bags, self.combiner, bags.weights,
                      bags.offsets)
        return out.reshape(*bags.outer_shape, self.emb_vec_size)


class TorchFusedLookupLayer(FusedLookupBase):
    """`FusedLookupLayer` on the torch backend: `ParameterServer.lookup_tables`, one kernel
    launch for every table where their GPU tiers allow it."""

    def _lookup_tables(self, ps: Any, ids: list[Any]) -> list[Any]:
        return ps.lookup_tables(self.model_name, self.table_ids, ids)
