"""`LookupLayer`: dense ids of any rank -> embedding vectors from the parameter server."""

from __future__ import annotations

import keras

from keras_hps.layers.backend import BackendLookupLayer


@keras.saving.register_keras_serializable(package="keras_hps")
class LookupLayer(BackendLookupLayer):
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
