"""`SparseLookupLayer`: bags of ids -> one combined vector per bag (sum | mean | sqrtn)."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from keras_hps.errors import ConfigError, InvalidInputError
from keras_hps.layers.backend_ops import backend_ops
from keras_hps.layers.base_layer import TableLookupLayer, input_kind

COMBINERS = ("sum", "mean", "sqrtn")


@keras.saving.register_keras_serializable(package="keras_hps")
class SparseLookupLayer(TableLookupLayer):
    """Looks up bags of ids in a parameter-server table and combines each bag.

    HPS's `hps.SparseLookupLayer` (the role of `tf.nn.safe_embedding_lookup_sparse`), for
    Keras 3 on the TensorFlow and torch backends. Ids below 0 are padding and skipped;
    an empty bag gives zeros. Ids are made unique before the lookup. No weights, not
    trainable.

    Args: as `LookupLayer`, plus
        combiner: "sum", "mean" (default) or "sqrtn"; with weights w:
            sum(w*v), sum(w*v)/sum(w), sum(w*v)/sqrt(sum(w**2)).

    Call arguments:
        ids: int32/int64 bags, one of
            - a `tf.SparseTensor` or `tf.RaggedTensor` (TensorFlow backend), or a dense
              tensor padded with -1, of shape `[batch, nnz]` or `[batch, slots, nnz]`;
            - 1-D values, with `offsets`.
        weights: optional float per-id weights in the same form as `ids`.
        offsets: optional 1-D int `[batch + 1]` CSR row starts followed by the total
            (`torch.nn.EmbeddingBag`'s `include_last_offset=True`); then `ids` are the values.

    Returns:
        `[batch, emb_vec_size]`, or `[batch, slots, emb_vec_size]` for rank-3 ids.
    """

    def __init__(
        self,
        model_name: str,
        table_id: int,
        emb_vec_size: int,
        emb_vec_dtype: Any = "float32",
        ps_config_file: str | None = None,
        global_batch_size: int | None = None,
        combiner: str = "mean",
        **kwargs: Any,
    ) -> None:
        if combiner not in COMBINERS:
            raise ConfigError(f"combiner must be one of {COMBINERS}, got {combiner!r}")
        super().__init__(
            model_name,
            table_id,
            emb_vec_size,
            emb_vec_dtype=emb_vec_dtype,
            ps_config_file=ps_config_file,
            global_batch_size=global_batch_size,
            **kwargs,
        )
        self.combiner = combiner

    def _check_inputs(self, ids: Any, weights: Any, offsets: Any) -> str:
        """Raise `InvalidInputError` for a wrong dtype, rank or form; return the input kind."""
        kind = input_kind(ids)
        self._check_id_dtype(ids.dtype)
        rank = len(ids.shape)
        if offsets is not None:
            if kind != "dense" or rank != 1:
                raise InvalidInputError(
                    f"{self._where()}: with offsets, ids must be the 1-D dense values, got "
                    f"{kind} ids of rank {rank}"
                )
            if len(offsets.shape) != 1:
                raise InvalidInputError(
                    f"{self._where()}: offsets must be 1-D [batch + 1], got shape "
                    f"{tuple(offsets.shape)}"
                )
            self._check_id_dtype(offsets.dtype, "offsets")
        elif rank not in (2, 3):
            raise InvalidInputError(
                f"{self._where()}: {kind} ids must have rank 2 [batch, nnz] or 3 "
                f"[batch, slots, nnz], got rank {rank} (shape {tuple(ids.shape)})"
            )
        if weights is not None:
            if input_kind(weights) != kind:
                raise InvalidInputError(
                    f"{self._where()}: weights must be {kind} like the ids, got "
                    f"{input_kind(weights)}"
                )
            if "float" not in keras.backend.standardize_dtype(weights.dtype):
                raise InvalidInputError(
                    f"{self._where()}: weights must be float, got {weights.dtype}"
                )
            if len(weights.shape) != rank:
                raise InvalidInputError(
                    f"{self._where()}: weights of shape {tuple(weights.shape)} do not match "
                    f"ids of shape {tuple(ids.shape)}"
                )
        return kind

    def call(self, ids: Any, weights: Any = None, offsets: Any = None) -> Any:
        if isinstance(weights, np.ndarray):
            weights = keras.ops.convert_to_tensor(weights)
        if isinstance(offsets, np.ndarray):
            offsets = keras.ops.convert_to_tensor(offsets)
        kind = self._check_inputs(ids, weights, offsets)
        self._table()
        ops = backend_ops()
        if offsets is not None:
            bags = ops.bags_from_offsets(ids, offsets, weights)
        elif kind == "sparse":
            bags = ops.bags_from_sparse(ids, weights)
        elif kind == "ragged":
            bags = ops.bags_from_ragged(ids, weights)
        else:
            bags = ops.bags_from_padded(ids, weights)
        out = ops.combine(self.lookup_keys, bags, self.emb_vec_size, self.combiner)
        if self.emb_vec_dtype != "float32":
            out = keras.ops.cast(out, self.emb_vec_dtype)
        return out

    def compute_output_spec(
        self, ids: Any, weights: Any = None, offsets: Any = None
    ) -> keras.KerasTensor:
        self._check_inputs(ids, weights, offsets)
        if offsets is not None:
            n = offsets.shape[0]
            outer = (None if n is None else n - 1,)
        else:
            outer = tuple(ids.shape[:-1])
        return keras.KerasTensor((*outer, self.emb_vec_size), dtype=self.emb_vec_dtype)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["combiner"] = self.combiner
        return config
