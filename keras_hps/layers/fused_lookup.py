"""`FusedLookupLayer`: dense ids for several tables of one model, looked up in one op."""

from __future__ import annotations

from typing import Any

import keras

from keras_hps.errors import ConfigError, InvalidInputError
from keras_hps.layers.backend_ops import backend_ops
from keras_hps.layers.lookup import LookupLayer


@keras.saving.register_keras_serializable(package="keras_hps")
class FusedLookupLayer(keras.layers.Layer):
    """`LookupLayer` for several tables of one model at once: a list of id tensors in, a
    list of vector tensors out, `outputs[i] == LookupLayer(model_name, table_ids[i], ...)(
    ids[i])`.

    On the TensorFlow backend (CPU) the lookups of all tables cross into Python in one op
    instead of one op per table, the role HPS's `fuse_embedding_table` played; with 26
    tables of a DLRM this takes most of the layer machinery's cost off each step. On the
    torch backend, and where TensorFlow has a GPU, it calls the tables one after another,
    as separate `LookupLayer`s would.

    Args:
        model_name: the model's `"model"` entry in the parameter-server config.
        table_ids: the tables, in the order of the inputs and outputs.
        emb_vec_sizes: each table's vector size (an int: the same for all).
        emb_vec_dtype, ps_config_file, global_batch_size: as `LookupLayer`, for every table.

    Call arguments:
        ids: a list or tuple of int32/int64 tensors of any rank, one per table.

    Returns:
        a list of `ids[i].shape + [emb_vec_sizes[i]]` tensors of dtype `emb_vec_dtype`.
    """

    def __init__(
        self,
        model_name: str,
        table_ids: list[int],
        emb_vec_sizes: int | list[int],
        emb_vec_dtype: Any = "float32",
        ps_config_file: str | None = None,
        global_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        table_ids = list(table_ids) if isinstance(table_ids, list | tuple) else table_ids
        if not isinstance(table_ids, list) or not table_ids:
            raise ConfigError(f"table_ids must be a non-empty list of ints, got {table_ids!r}")
        if isinstance(emb_vec_sizes, int) and not isinstance(emb_vec_sizes, bool):
            emb_vec_sizes = [emb_vec_sizes] * len(table_ids)
        if not isinstance(emb_vec_sizes, list | tuple):
            raise ConfigError(
                f"emb_vec_sizes must be an int or a list of ints, got {emb_vec_sizes!r}"
            )
        emb_vec_sizes = list(emb_vec_sizes)
        if len(emb_vec_sizes) != len(table_ids):
            raise ConfigError(
                f"emb_vec_sizes has {len(emb_vec_sizes)} entries for {len(table_ids)} tables"
            )
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.tables = [
            LookupLayer(model_name, t, d, emb_vec_dtype=emb_vec_dtype,
                        ps_config_file=ps_config_file, global_batch_size=global_batch_size,
                        name=f"{self.name}_{i}_table{t}")
            for i, (t, d) in enumerate(zip(table_ids, emb_vec_sizes, strict=True))
        ]
        self.model_name = model_name
        self.table_ids = table_ids
        self.emb_vec_sizes = emb_vec_sizes
        self.emb_vec_dtype = self.tables[0].emb_vec_dtype
        self.ps_config_file = self.tables[0].ps_config_file
        self.global_batch_size = global_batch_size
        self.supports_jit = False

    def _check_count(self, ids: Any) -> list[Any]:
        if not isinstance(ids, list | tuple) or len(ids) != len(self.tables):
            got = f"{len(ids)} inputs" if isinstance(ids, list | tuple) else type(ids).__name__
            raise InvalidInputError(
                f"layer {self.name!r} (model {self.model_name!r}, tables {self.table_ids}): "
                f"takes a list of {len(self.tables)} id tensors, one per table, got {got}"
            )
        return list(ids)

    def build(self, input_shape: Any = None) -> None:
        for table in self.tables:
            table.build()
        self.built = True

    def call(self, ids: Any) -> list[Any]:
        ids = self._check_count(ids)
        for table, i in zip(self.tables, ids, strict=True):
            table._check_ids(i)
            table._check_static_count(tuple(i.shape), table._table().spec)
        fetches = [table.lookup_keys for table in self.tables]
        if keras.backend.backend() == "tensorflow":
            from keras_hps.layers import tf_ops

            outs = tf_ops.lookup_many(fetches, ids, self.emb_vec_sizes)
        else:
            ops = backend_ops()
            outs = [ops.lookup(f, i, d) for f, i, d in zip(fetches, ids, self.emb_vec_sizes,
                                                               strict=True)]
        if self.emb_vec_dtype != "float32":
            outs = [keras.ops.cast(o, self.emb_vec_dtype) for o in outs]
        return outs

    def compute_output_spec(self, ids: Any) -> list[keras.KerasTensor]:
        ids = self._check_count(ids)
        return [table.compute_output_spec(i) for table, i in zip(self.tables, ids, strict=True)]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "model_name": self.model_name,
                "table_ids": self.table_ids,
                "emb_vec_sizes": self.emb_vec_sizes,
                "emb_vec_dtype": self.emb_vec_dtype,
                "ps_config_file": self.ps_config_file,
                "global_batch_size": self.global_batch_size,
            }
        )
        return config
