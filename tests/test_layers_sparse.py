"""SparseLookupLayer under the TensorFlow backend: agreement with
tf.nn.safe_embedding_lookup_sparse, one answer for every input form, transfer learning."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from layers_tables import random_table, with_defaults, write_config

import keras_hps
from keras_hps.errors import ConfigError, InvalidInputError
from keras_hps.layers import SparseLookupLayer

VOCAB, DIM, DEFAULT = 60, 6, 0.5
MAX_NNZ, SLOTS, MAX_BATCH = 5, 3, 32


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    rng = np.random.default_rng(11)
    dense, keys, vectors = random_table(rng, VOCAB, DIM, drop=12)
    folder = tmp_path_factory.mktemp("layers_sparse")
    config = write_config(folder, "bags", [(keys, vectors)], [DEFAULT], [SLOTS * MAX_NNZ],
                          MAX_BATCH)
    # As the parameter server answers: absent keys (and keys past VOCAB) hold DEFAULT.
    served = with_defaults(np.vstack([dense, dense[:10]]), keys, DEFAULT)
    return {"config": config, "served": served}


@pytest.fixture
def ps(table):
    return keras_hps.init(str(table["config"]))


def random_bags(seed: int, batch: int, slots: int | None = None):
    """Ragged ids (with duplicates, empty bags, absent keys) and positive weights."""
    rng = np.random.default_rng(seed)
    rows = batch * (slots or 1)
    lengths = rng.integers(0, MAX_NNZ + 1, size=rows)
    lengths[rng.integers(rows)] = 0
    values = rng.integers(0, VOCAB + 10, size=lengths.sum())
    weights = rng.uniform(0.1, 2.0, size=lengths.sum()).astype(np.float32)
    ids = tf.RaggedTensor.from_row_lengths(values, lengths)
    w = tf.RaggedTensor.from_row_lengths(weights, lengths)
    if slots:
        ids = tf.RaggedTensor.from_uniform_row_length(ids, slots)
        w = tf.RaggedTensor.from_uniform_row_length(w, slots)
    return ids, w


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("slots", [None, SLOTS])
def test_matches_safe_embedding_lookup_sparse(table, ps, combiner, weighted, slots):
    seed = 100 + 4 * ["sum", "mean", "sqrtn"].index(combiner) + 2 * weighted + bool(slots)
    ids, w = random_bags(seed, 9, slots)
    sp_ids = ids.to_sparse()
    sp_w = w.to_sparse() if weighted else None
    want = tf.nn.safe_embedding_lookup_sparse(
        tf.constant(table["served"]), sp_ids, sp_w, combiner=combiner
    )
    layer = SparseLookupLayer("bags", 0, DIM, combiner=combiner)
    got = layer(sp_ids, sp_w)
    assert got.shape == want.shape == ((9, slots, DIM) if slots else (9, DIM))
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_ragged_sparse_padded_and_offsets_agree(table, ps, combiner):
    layer = SparseLookupLayer("bags", 0, DIM, combiner=combiner)
    for slots in (None, SLOTS):
        ids, w = random_bags(5, 7, slots)
        forms = [
            layer(ids, w),
            layer(ids.to_sparse(), w.to_sparse()),
            layer(ids.to_tensor(-1), w.to_tensor(0.0)),
        ]
        if slots is None:
            forms.append(layer(ids.values, w.values, offsets=ids.row_splits))
        for out in forms[1:]:
            np.testing.assert_array_equal(out.numpy(), forms[0].numpy())
    # empty bags give zeros; negative ids are padding wherever they appear
    out = layer(tf.constant([[-1, -1], [3, -1]], tf.int64))
    np.testing.assert_array_equal(out.numpy()[0], np.zeros(DIM, np.float32))
    np.testing.assert_allclose(out.numpy()[1], table["served"][3], rtol=1e-6)
    empty = layer(tf.zeros([0, 4], tf.int64))
    assert empty.shape == (0, DIM)


def test_ids_are_made_unique_before_the_lookup(table, ps):
    ids = np.array([[3, 3, 7, -1], [7, 3, 3, 3], [9, -1, -1, -1]])
    before = ps.stats("bags", 0)
    SparseLookupLayer("bags", 0, DIM)(ids)
    after = ps.stats("bags", 0)
    assert after["lookups"] - before["lookups"] == 1
    assert after["keys"] - before["keys"] == 3  # 3, 7, 9: one key each crossed over


def test_in_tf_function_and_functional_model(table, ps):
    layer = SparseLookupLayer("bags", 0, DIM, combiner="sum")
    ids, w = random_bags(8, 6)
    want = layer(ids, w).numpy()

    @tf.function
    def traced(sp, sw):
        return layer(sp, sw)

    np.testing.assert_allclose(traced(ids.to_sparse(), w.to_sparse()).numpy(), want, atol=1e-6)
    inp = keras.Input((MAX_NNZ,), dtype="int64")
    win = keras.Input((MAX_NNZ,), dtype="float32")
    model = keras.Model([inp, win], layer(inp, win))
    assert model.output.shape == (None, DIM)
    got = model.predict([ids.to_tensor(-1, shape=[6, MAX_NNZ]),
                         w.to_tensor(0.0, shape=[6, MAX_NNZ])], verbose=0)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_transfer_learning_trains_dense_only(table, ps):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, VOCAB, size=(256, MAX_NNZ))
    ids[rng.random(ids.shape) < 0.3] = -1
    target = SparseLookupLayer("bags", 0, DIM)(ids).numpy() @ rng.normal(size=(DIM, 1))
    inp = keras.Input((MAX_NNZ,), dtype="int64")
    lookup = SparseLookupLayer("bags", 0, DIM, name="frozen")
    model = keras.Model(inp, keras.layers.Dense(1, name="head")(lookup(inp)))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    assert lookup.weights == [] and len(model.trainable_weights) == 2
    all_keys = np.arange(VOCAB + 10)
    before = ps.lookup("bags", 0, all_keys).copy()
    history = model.fit(ids, target, batch_size=MAX_BATCH, epochs=4, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0], losses
    np.testing.assert_array_equal(ps.lookup("bags", 0, all_keys), before)


def test_config_round_trip(table):
    layer = SparseLookupLayer("bags", 0, DIM, combiner="sqrtn",
                              ps_config_file=str(table["config"]))
    clone = SparseLookupLayer.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.combiner == "sqrtn"


# -- errors -------------------------------------------------------------------------------


def test_wrong_rank_is_refused(ps):
    layer = SparseLookupLayer("bags", 0, DIM)
    rank1 = tf.sparse.from_dense(tf.constant([1, 2, 3], tf.int64))
    with pytest.raises(InvalidInputError, match="rank 2 .* or 3"):
        layer(rank1)
    with pytest.raises(InvalidInputError, match="got rank 4"):
        layer(tf.zeros([2, 2, 2, 2], tf.int64))
    with pytest.raises(InvalidInputError, match="got rank 1"):
        layer(keras.Input((), dtype="int64"))
    with pytest.raises(InvalidInputError, match="1-D"):
        layer(tf.zeros([2, 2], tf.int64), offsets=tf.constant([0, 2, 4]))


def test_float_ids_and_bad_weights_are_refused(ps):
    layer = SparseLookupLayer("bags", 0, DIM)
    with pytest.raises(InvalidInputError, match="int32 or int64"):
        layer(tf.zeros([2, 3], tf.float32))
    with pytest.raises(InvalidInputError, match="weights must be float"):
        layer(tf.zeros([2, 3], tf.int64), tf.zeros([2, 3], tf.int64))
    ids, _ = random_bags(1, 3)
    with pytest.raises(InvalidInputError, match="weights must be ragged"):
        layer(ids, tf.ones([3, MAX_NNZ]))


def test_bad_combiner_is_refused():
    with pytest.raises(ConfigError, match="combiner"):
        SparseLookupLayer("bags", 0, DIM, combiner="max")


def test_too_many_keys_in_one_lookup(ps):
    layer = SparseLookupLayer("bags", 0, DIM, combiner="sum")
    limit = MAX_BATCH * SLOTS * MAX_NNZ
    ids = np.arange(limit + 1).reshape(1, -1)  # unique keys beyond the configured maximum
    with pytest.raises(InvalidInputError, match="exceed the configured maximum"):
        layer(ids)  # eager: the error crosses the numpy_function as it is

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int64)])
    def traced(x):
        return layer(x)

    with pytest.raises(tf.errors.InvalidArgumentError, match="exceed the configured maximum"):
        traced(ids)
    assert traced(ids[:, :limit]).shape == (1, DIM)
