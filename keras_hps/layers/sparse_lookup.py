"""`SparseLookupLayer`: bags of ids -> one combined vector per bag (sum | mean | sqrtn)."""

from __future__ import annotations

import keras

from keras_hps.layers.backend import BackendSparseLookupLayer


@keras.saving.register_keras_serializable(package="keras_hps")
class SparseLookupLayer(BackendSparseLookupLayer):
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
