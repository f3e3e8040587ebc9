"""`LookupLayer`: dense ids of any rank -> embedding vectors from the parameter server."""

from __future__ import annotations

import math
from typing import Any

import keras

from keras_hps.errors import InvalidInputError
from keras_hps.layers.backend_ops import backend_ops
from keras_hps.layers.base_layer import TableLookupLayer, input_kind


@keras.saving.register_keras_serializable(package="keras_hps")
class LookupLayer(TableLookupLayer):
    """Looks up dense int ids in a parameter-server table; the inference twin of `Embedding`.

    HPS's `hps.LookupLayer`, for Keras 3 on the TensorFlow and torch backends. It holds
    no weights and is not trainable. Ids absent from the table get the table's
    `default_value_for_each_table` vector.

    Args: as `keras_hps.layers.base_layer.TableLookupLayer` (model_name, table_id,
        emb_vec_size, emb_vec_dtype="float32", ps_config_file=None, global_batch_size=None),
        plus the usual layer keyword arguments (name, ...).

    Call arguments:
        ids: int32 or int64 tensor of any rank.

    Returns:
        `ids.shape + [emb_vec_size]` vectors of dtype `emb_vec_dtype`.
    """

    def _check_ids(self, ids: Any) -> None:
        if input_kind(ids) != "dense":
            raise InvalidInputError(
                f"{self._where()}: LookupLayer takes dense ids; use SparseLookupLayer for "
                "sparse or ragged input"
            )
        self._check_id_dtype(ids.dtype)

    def _check_static_count(self, shape: tuple[Any, ...], spec: Any) -> None:
        if all(d is not None for d in shape):
            self._check_key_count(math.prod(shape), spec)

    def call(self, ids: Any) -> Any:
        self._check_ids(ids)
        self._check_static_count(tuple(ids.shape), self._table().spec)
        out = backend_ops().lookup(self.lookup_keys, ids, self.emb_vec_size)
        if self.emb_vec_dtype != "float32":
            out = keras.ops.cast(out, self.emb_vec_dtype)
        return out

    def compute_output_shape(self, input_shape: tuple[Any, ...]) -> tuple[Any, ...]:
        return (*input_shape, self.emb_vec_size)

    def compute_output_spec(self, ids: Any) -> keras.KerasTensor:
        self._check_ids(ids)
        return keras.KerasTensor(
            self.compute_output_shape(tuple(ids.shape)), dtype=self.emb_vec_dtype
        )
