"""The bag combiner (sum | mean | sqrtn), written once on `keras.ops`.

`combine(vectors, segments, num_bags, combiner, weights)` reduces rows of `vectors` that share
a segment id, with TensorFlow's `tf.nn.safe_embedding_lookup_sparse` arithmetic (w = 1 when no
weights are given):

- ``sum``:   sum_i w_i * v_i
- ``mean``:  sum_i w_i * v_i / sum_i w_i
- ``sqrtn``: sum_i w_i * v_i / sqrt(sum_i w_i**2)

An empty bag, or a zero divisor, gives zeros (`divide_no_nan`). On Keras's TensorFlow backend
these are native TF ops (what the SavedModel of the embedded placement holds); on the torch
backend, bags in CSR form (`offsets`) on CUDA, or under Triton's interpreter, go to the Triton
kernel `combine_bags` instead (one program per bag, no scatter of `nnz x dim` ids), which is
where it pays.
"""

from __future__ import annotations

import os
from typing import Any

import keras

__all__ = ["COMBINERS", "combine"]

COMBINERS = ("sum", "mean", "sqrtn")

# Picked once at import: only the torch backend can hand its tensors to the Triton kernel.
_TORCH = keras.backend.backend() == "torch"


def _triton_pays(vectors: Any) -> bool:
    return vectors.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def combine(vectors: Any, segments: Any, num_bags: Any, combiner: str,
            weights: Any = None, offsets: Any = None) -> Any:
    """``[num_bags, dim]`` float32: the rows of ``vectors [nnz, dim]`` combined per bag.

    ``segments [nnz]`` is the bag of each row; ``weights [nnz]`` optional per-row weights;
    ``offsets [num_bags + 1]`` (optional, torch backend) the same bags in CSR form, rows
    sorted by bag, which lets the Triton kernel run; without them, or where the kernel does
    not pay, `keras.ops` segment sums run."""
    if combiner not in COMBINERS:
        raise ValueError(f"combiner must be one of {COMBINERS}, got {combiner!r}")
    if not _TORCH:
        return _combine_segments(vectors, segments, num_bags, combiner, weights)
    if offsets is not None and _triton_pays(vectors):
        from keras_hps.triton_kernels.combiners import combine_bags

        w = None if weights is None else weights.float()
        return combine_bags(vectors.float(), offsets, w, combiner, validate=False)
    with keras.device(str(vectors.device)):  # torch's segment sums allocate on Keras's device
        return _combine_segments(vectors, segments, num_bags, combiner, weights)


def _combine_segments(vectors: Any, segments: Any, num_bags: Any, combiner: str,
                      weights: Any = None) -> Any:
    ops = keras.ops
    if isinstance(num_bags, int) and num_bags == 0:  # (torch's segment_sum needs a bag)
        return ops.zeros((0, vectors.shape[1]), "float32")
    vectors = ops.cast(vectors, "float32")
    if weights is None:
        weights = ops.ones_like(segments, dtype="float32")
    weights = ops.cast(weights, "float32")
    total = ops.segment_sum(vectors * weights[:, None], segments, num_segments=num_bags)
    if combiner == "sum":
        return total
    divisor = ops.segment_sum(weights if combiner == "mean" else weights * weights, segments,
                              num_segments=num_bags)
    if combiner == "sqrtn":
        divisor = ops.sqrt(divisor)
    return ops.divide_no_nan(total, divisor[:, None])
