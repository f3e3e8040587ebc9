"""The lookup layers on Keras's TensorFlow backend.

A lookup is one op per call (not per key) that crosses into Python and calls the
parameter server: `tf.numpy_function` on CPU; when TensorFlow has a GPU, `tf.py_function`
whose GPU ids cross to torch (and the Triton cache) by DLPack. Everything else (unique,
gather, weighting, segment sums) stays native TF, so it runs in eager mode, inside
`tf.function`, `model.predict` and `model.fit`. The op calls the parameter server directly
(`fetch_from`), never back into the layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from keras_hps import parameter_server
from keras_hps.combiner import combine
from keras_hps.layers.base_layer import Bags, FusedLookupBase, LookupBase, SparseLookupBase

# keys (NumPy int array, or torch tensor on the GPU path) -> float32 vectors keys.shape + (dim,)
Fetch = Callable[[Any], Any]


def fetch_from(ps_config_file: str | None, model: str, table_id: int) -> Fetch:
    """The function a lookup op calls: keys -> vectors of one table of the layer's parameter
    server, resolved when the op runs (a traced function outlives a `keras_hps.init`)."""

    def fetch(keys: Any) -> Any:
        ps = parameter_server.ensure_parameter_server(ps_config_file)
        return ps.lookup(model, table_id, keys)

    return fetch


@functools.lru_cache(maxsize=1)
def tf_has_gpu() -> bool:
    """Whether TensorFlow sees a GPU in this process."""
    return bool(tf.config.list_logical_devices("GPU"))


@functools.lru_cache(maxsize=1)
def torch_has_cuda() -> bool:
    """Whether torch is installed and sees a GPU (the Triton cache lives in torch memory)."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _lookup_dlpack(fetch: Fetch, ids: tf.Tensor) -> tf.Tensor:
    """Eager GPU ids -> torch by DLPack -> parameter server (Triton cache) -> TF by DLPack.

    TensorFlow and torch run on different CUDA streams: wait for TF's pending work before
    torch reads the ids, and for torch's before TF reads the vectors.
    """
    import torch
    import torch.utils.dlpack

    tf.test.experimental.sync_devices()
    keys = torch.from_dlpack(tf.experimental.dlpack.to_dlpack(ids))
    vectors = fetch(keys).contiguous()
    torch.cuda.current_stream(vectors.device).synchronize()
    return tf.experimental.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(vectors))


def _lookup_eager(fetch: Fetch, ids: tf.Tensor) -> tf.Tensor:
    if "GPU" in ids.device.upper() and torch_has_cuda():
        return _lookup_dlpack(fetch, ids)
    return tf.convert_to_tensor(np.asarray(fetch(ids.numpy()), dtype=np.float32))


def lookup_op(fetch: Fetch, ids: tf.Tensor, dim: int) -> tf.Tensor:
    """float32 vectors of shape `ids.shape + [dim]` for int ids of any rank."""
    if tf_has_gpu():
        # int64: TensorFlow keeps int32 tensors of a GPU op in host memory.
        keys = tf.cast(ids, tf.int64)
        out = tf.py_function(functools.partial(_lookup_eager, fetch), [keys], Tout=tf.float32)
    else:
        out = tf.numpy_function(fetch, [ids], tf.float32, stateful=True)
    out.set_shape(ids.shape.concatenate([dim]))  # the server answers keys.shape + (dim,)
    return out


def lookup_many(fetches: list[Fetch], ids: list[tf.Tensor], dims: list[int]) -> list[tf.Tensor]:
    """`lookup_op` for several tables at once: on CPU one op, so one crossing into Python,
    for all of them (each crossing costs tens of microseconds besides the lookup)."""
    if tf_has_gpu():
        return [lookup_op(f, i, d) for f, i, d in zip(fetches, ids, dims, strict=True)]

    def fetch_all(*keys: np.ndarray) -> list[np.ndarray]:
        return [fetch(k) for fetch, k in zip(fetches, keys, strict=True)]

    outs = tf.numpy_function(fetch_all, list(ids), [tf.float32] * len(ids), stateful=True)
    for out, i, d in zip(outs, ids, dims, strict=True):
        out.set_shape(i.shape.concatenate([d]))
    return list(outs)


def _keep_valid(values, segments, weights):
    """Drop negative ids (padding), with their segments and weights."""
    keep = values >= 0
    values = tf.boolean_mask(values, keep)
    segments = tf.boolean_mask(segments, keep)
    if weights is not None:
        weights = tf.boolean_mask(weights, keep)
    return values, segments, weights


def bags_from_sparse(ids: tf.SparseTensor, weights: tf.SparseTensor | None) -> Bags:
    """Rank-2 `[batch, nnz]` or rank-3 `[batch, slots, nnz]` SparseTensor -> bags."""
    outer = ids.dense_shape[:-1]
    strides = tf.math.cumprod(outer, exclusive=True, reverse=True)
    segments = tf.reduce_sum(ids.indices[:, :-1] * strides[None, :], axis=1)
    w = None if weights is None else weights.values
    values, segments, w = _keep_valid(ids.values, segments, w)
    return Bags(values, segments, w, tf.reduce_prod(outer), outer, ids.shape[:-1])


def bags_from_ragged(ids: tf.RaggedTensor, weights: tf.RaggedTensor | None) -> Bags:
    """Rank-2 `[batch, (nnz)]` or rank-3 `[batch, slots, (nnz)]` RaggedTensor -> bags."""
    static_outer = ids.shape[:-1]
    if ids.shape.rank == 3:
        batch = ids.nrows()
        ids = ids.merge_dims(0, 1)
        slots = static_outer[1]
        if slots is None:
            slots = ids.nrows() // tf.maximum(batch, 1)
        outer = tf.stack([batch, tf.cast(slots, tf.int64)])
        if weights is not None:
            weights = weights.merge_dims(0, 1)
    else:
        outer = tf.reshape(ids.nrows(), [1])
    w = None if weights is None else weights.flat_values
    values, segments, w = _keep_valid(ids.flat_values, ids.value_rowids(), w)
    return Bags(values, segments, w, tf.reduce_prod(outer), outer, static_outer)


def bags_from_padded(ids: tf.Tensor, weights: tf.Tensor | None) -> Bags:
    """Dense `[batch, max_nnz]` or `[batch, slots, max_nnz]` ids padded with -1 -> bags."""
    shape = tf.shape(ids, out_type=tf.int64)
    outer = shape[:-1]
    flat = tf.reshape(ids, [-1])
    segments = tf.range(tf.size(flat, out_type=tf.int64)) // shape[-1]
    w = None if weights is None else tf.reshape(weights, [-1])
    values, segments, w = _keep_valid(flat, segments, w)
    return Bags(values, segments, w, tf.reduce_prod(outer), outer, ids.shape[:-1])


def bags_from_offsets(values: tf.Tensor, offsets: tf.Tensor, weights: tf.Tensor | None) -> Bags:
    """1-D values with CSR `offsets` (`[batch + 1]`, row starts then the end) -> bags."""
    rt = tf.RaggedTensor.from_row_splits(values, tf.cast(offsets, tf.int64), validate=True)
    w = None if weights is None else tf.RaggedTensor.from_row_splits(weights, rt.row_splits)
    bags = bags_from_ragged(rt, w)
    bags.static_outer = tf.TensorShape([offsets.shape[0] - 1 if offsets.shape[0] else None])
    return bags


class TensorflowLookupLayer(LookupBase):
    """`LookupLayer` on the TensorFlow backend."""

    def _lookup_ids(self, ps: Any, ids: Any) -> Any:
        fetch = fetch_from(self.ps_config_file, self.model_name, self.table_id)
        return lookup_op(fetch, ids, self.emb_vec_size)


class TensorflowSparseLookupLayer(SparseLookupBase):
    """`SparseLookupLayer` on the TensorFlow backend."""

    def _lookup_bags(self, ps: Any, ids: Any, weights: Any, offsets: Any, kind: str) -> Any:
        if offsets is not None:
            bags = bags_from_offsets(ids, offsets, weights)
        elif kind == "sparse":
            bags = bags_from_sparse(ids, weights)
        elif kind == "ragged":
            bags = bags_from_ragged(ids, weights)
        else:
            bags = bags_from_padded(ids, weights)
        # Look up the unique ids once, then combine each bag (empty bag -> zeros).
        unique, position = tf.unique(bags.values, out_idx=tf.int64)
        fetch = fetch_from(self.ps_config_file, self.model_name, self.table_id)
        vectors = tf.gather(lookup_op(fetch, unique, self.emb_vec_size), position)
        total = combine(vectors, bags.segments, bags.num_bags, self.combiner, bags.weights)
        out = tf.reshape(total, tf.concat([bags.outer_shape, [self.emb_vec_size]], axis=0))
        out.set_shape(bags.static_outer.concatenate([self.emb_vec_size]))
        return out


class TensorflowFusedLookupLayer(FusedLookupBase):
    """`FusedLookupLayer` on the TensorFlow backend: on CPU one op for every table."""

    def _lookup_tables(self, ps: Any, ids: list[Any]) -> list[Any]:
        fetches = [fetch_from(self.ps_config_file, self.model_name, t) for t in self.table_ids]
        return lookup_many(fetches, ids, self.emb_vec_sizes)
