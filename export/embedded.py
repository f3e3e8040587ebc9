"""The embedded placement's lookup: a table held in SavedModel variables, read with native TF ops.

Stock `tensorflow_model_server` runs it unchanged: `searchsorted` over the sorted keys,
`gather` of the rows, and the default vector where the key is absent. No py_function.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from keras_hps.combiner import COMBINERS, combine


def sorted_table(keys: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(keys, vectors)` ordered by key; arrays already in order are returned as they are."""
    if keys.shape[0] < 2 or bool(np.all(keys[1:] > keys[:-1])):
        return keys, vectors
    order = np.argsort(keys, kind="stable")
    return keys[order], vectors[order]


class EmbeddedLookup(keras.layers.Layer):
    """Looks ids up in a table stored as two variables (sorted int64 keys, rows).

    Ids absent from the table get `default_value` in every component. With `combiner`,
    ids of rank 2 or more are bags (`[..., n]`, padded with -1) and each bag is pooled into
    one vector (sum | mean | sqrtn; an empty bag gives zeros), like `SparseLookupLayer`.
    `variable`, when given, is the model variable holding `vectors`; it is saved as is (no
    copy) when the keys are already sorted. Rows are stored in `variable`'s dtype (float32
    without one: float16 and bfloat16 tables stay half size) and returned in `output_dtype`.
    TensorFlow backend only: it exists to be written into a SavedModel.
    """

    def __init__(
        self,
        keys: np.ndarray,
        vectors: np.ndarray,
        default_value: float = 0.0,
        combiner: str | None = None,
        variable: Any = None,
        output_dtype: str = "float32",
        **kwargs: Any,
    ) -> None:
        super().__init__(trainable=False, **kwargs)
        if combiner not in (None, *COMBINERS):
            raise ValueError(f"combiner must be one of {COMBINERS} or None, got {combiner!r}")
        keys = np.asarray(keys, np.int64)
        sorted_keys, vectors = sorted_table(keys, np.asarray(vectors, np.float32))
        self.rows, self.dim = int(vectors.shape[0]), int(vectors.shape[1])
        self.default_value = float(default_value)
        self.combiner = combiner
        self.output_dtype = str(output_dtype)
        storage = "float32" if variable is None else str(variable.dtype)
        # Variables, never constants: the table must stay out of the 2 GB graph proto.
        self.table_keys = self.add_weight(
            shape=keys.shape, dtype="int64", trainable=False, name="keys",
            initializer=lambda shape, dtype=None: sorted_keys,
        )
        if variable is not None and sorted_keys is keys:
            # Rows already in key order: save the model's own table variable (no copy).
            self.table_vectors = variable
        else:
            self.table_vectors = self.add_weight(
                shape=vectors.shape, dtype=storage, trainable=False, name="vectors",
                initializer=lambda shape, dtype=None: keras.ops.cast(vectors, storage),
            )

    def _lookup(self, flat: Any) -> Any:
        import tensorflow as tf

        keys = self.table_keys.value
        pos = tf.searchsorted(keys, flat, side="left")
        pos = tf.minimum(pos, self.rows - 1)
        hit = tf.equal(tf.gather(keys, pos), flat)
        rows = tf.cast(tf.gather(self.table_vectors.value, pos), self.output_dtype)
        default = tf.fill(tf.shape(rows), tf.constant(self.default_value, self.output_dtype))
        return tf.where(hit[:, None], rows, default)

    def call(self, ids: Any) -> Any:
        import tensorflow as tf

        ids = tf.cast(ids, tf.int64)
        flat = tf.reshape(ids, [-1])
        found = self._lookup(flat)
        shape = tf.shape(ids, out_type=tf.int64)
        if not self._pools(ids.shape):
            return tf.reshape(found, tf.concat([shape, [self.dim]], axis=0))
        # Bags along the last axis, padding (-1) weighted 0.
        outer = shape[:-1]
        segments = tf.range(tf.size(flat, out_type=tf.int64)) // tf.maximum(shape[-1], 1)
        total = combine(found, segments, tf.reduce_prod(outer), self.combiner,
                        tf.cast(flat >= 0, tf.float32))
        return tf.cast(tf.reshape(total, tf.concat([outer, [self.dim]], axis=0)),
                       self.output_dtype)

    def _pools(self, shape: Any) -> bool:
        return self.combiner is not None and len(shape) >= 2

    def compute_output_shape(self, input_shape: tuple[Any, ...]) -> tuple[Any, ...]:
        if not self._pools(input_shape):
            return (*input_shape, self.dim)
        return (*input_shape[:-1], self.dim)

    def compute_output_spec(self, ids: Any) -> keras.KerasTensor:
        return keras.KerasTensor(self.compute_output_shape(tuple(ids.shape)),
                                 dtype=self.output_dtype)
