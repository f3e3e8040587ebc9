"""`FusedLookupLayer`: dense ids for several tables of one model, looked up in one op."""

from __future__ import annotations

import keras

from keras_hps.layers.backend import BackendFusedLookupLayer


@keras.saving.register_keras_serializable(package="keras_hps")
class FusedLookupLayer(BackendFusedLookupLayer):
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
