"""FusedLookupLayer under the TensorFlow backend: equals one LookupLayer per table on fresh
random ids (misses, duplicates, empty batches), in one lookup op; errors; serialization."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from layers_tables import random_table, with_defaults, write_config

import keras_hps
from keras_hps.errors import ConfigError, InvalidInputError, NotFoundError
from keras_hps.layers import FusedLookupLayer, LookupLayer

VOCAB = (50, 30, 70)
DIMS = (8, 4, 8)
DEFAULTS = (0.5, -1.0, 0.0)
MAX_BATCH = 32
QUERIES = (3, 1, 2)  # max keys per sample per table


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    rng = np.random.default_rng(31)
    stored, served = [], []
    for vocab, dim, default in zip(VOCAB, DIMS, DEFAULTS, strict=True):
        dense, keys, vectors = random_table(rng, vocab, dim, drop=vocab // 4)
        stored.append((keys, vectors))
        served.append(with_defaults(dense, keys, default))
    folder = tmp_path_factory.mktemp("layers_fused")
    config = write_config(folder, "fz", stored, list(DEFAULTS), list(QUERIES), MAX_BATCH)
    return {"config": config, "served": served}


@pytest.fixture
def ps(tables):
    return keras_hps.init(str(tables["config"]))


def fresh_ids(seed: int, batch: int) -> list[np.ndarray]:
    """Ids for tables 0, 1, 2 with ranks 2, 1, 2; out-of-vocabulary ids (-> default vector)
    and duplicates included; table 1 as int32."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(-3, VOCAB[0] + 5, size=(batch, QUERIES[0])),
           rng.integers(0, VOCAB[1] + 5, size=(batch,)).astype(np.int32),
           rng.integers(0, VOCAB[2], size=(batch, QUERIES[2]))]
    if batch > 1:
        ids[0][1] = ids[0][0]
    return ids


def reference(tables, ids: list[np.ndarray]) -> list[np.ndarray]:
    out = []
    for t, i in enumerate(ids):
        served = tables["served"][t]
        known = (i >= 0) & (i < len(served))
        vec = served[np.clip(i, 0, len(served) - 1)]
        out.append(np.where(known[..., None], vec, np.float32(DEFAULTS[t])))
    return out


def test_matches_reference_eager_compiled_and_predict(tables, ps):
    layer = FusedLookupLayer("fz", [0, 1, 2], list(DIMS))
    step = tf.function(lambda xs: layer(xs))
    inputs = [keras.Input((QUERIES[0],), dtype="int64"), keras.Input((), dtype="int32"),
              keras.Input((QUERIES[2],), dtype="int64")]
    model = keras.Model(inputs, layer(inputs))
    for seed, batch in ((1, MAX_BATCH), (2, 5), (3, 1), (4, 0)):
        ids = fresh_ids(seed, batch)
        want = reference(tables, ids)
        for got in (layer([tf.constant(i) for i in ids]), step([tf.constant(i) for i in ids]),
                    model.predict_on_batch(ids)):
            assert len(got) == 3
            for g, w in zip(got, want, strict=True):
                assert tuple(g.shape) == w.shape
                np.testing.assert_array_equal(np.asarray(g), w)
    ids = [np.concatenate([fresh_ids(s, MAX_BATCH)[t] for s in range(5, 8)]) for t in range(3)]
    got = model.predict(ids, batch_size=MAX_BATCH, verbose=0)
    for g, w in zip(got, reference(tables, ids), strict=True):
        np.testing.assert_array_equal(g, w)
    assert model.layers[-1].trainable_weights == [] and not model.trainable_weights


def test_equals_separate_lookup_layers_in_one_op(tables, ps):
    ids = [tf.constant(i) for i in fresh_ids(9, MAX_BATCH)]
    fused = tf.function(lambda xs: FusedLookupLayer("fz", [2, 0], DIMS[0])(xs))
    separate = tf.function(lambda xs: [LookupLayer("fz", 2, DIMS[2])(xs[0]),
                                       LookupLayer("fz", 0, DIMS[0])(xs[1])])
    args = ([ids[2], ids[0]],)
    for a, b in zip(fused(*args), separate(*args), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    def lookup_ops(fn) -> int:
        graph = fn.get_concrete_function(*args).graph
        return sum(op.type in ("PyFunc", "PyFuncStateless") for op in graph.get_operations())

    assert lookup_ops(fused) == 1 and lookup_ops(separate) == 2


def test_static_shapes_and_dtype(tables, ps):
    layer = FusedLookupLayer("fz", [0, 1], [DIMS[0], DIMS[1]], emb_vec_dtype="float16")
    specs = layer.compute_output_spec([keras.KerasTensor((None, 3), dtype="int64"),
                                       keras.KerasTensor((7,), dtype="int32")])
    assert [s.shape for s in specs] == [(None, 3, DIMS[0]), (7, DIMS[1])]
    ids = fresh_ids(11, 7)[:2]
    got = layer([tf.constant(i) for i in ids])
    assert all(g.dtype == tf.float16 for g in got)
    for g, w in zip(got, reference(tables, ids)[:2], strict=True):
        np.testing.assert_allclose(g.numpy(), w.astype(np.float16))


def test_errors(tables, ps):
    with pytest.raises(ConfigError, match="non-empty list"):
        FusedLookupLayer("fz", [], 8)
    with pytest.raises(ConfigError, match="an int or a list"):
        FusedLookupLayer("fz", [0, 1], None)
    with pytest.raises(ConfigError, match="2 entries for 3 tables"):
        FusedLookupLayer("fz", [0, 1, 2], [8, 4])
    with pytest.raises(ConfigError, match="emb_vec_size"):
        FusedLookupLayer("fz", [0, 1], 8).build()
    with pytest.raises(NotFoundError):
        FusedLookupLayer("fz", [0, 3], 8).build()
    layer = FusedLookupLayer("fz", [0, 2], 8)
    with pytest.raises(InvalidInputError, match="list of 2 id tensors"):
        layer([tf.constant([1, 2])])
    with pytest.raises(InvalidInputError, match="int32 or int64"):
        layer([tf.constant([1.0]), tf.constant([1])])
    too_many = tf.zeros(MAX_BATCH * QUERIES[2] + 1, tf.int64)
    with pytest.raises(InvalidInputError, match="exceed"):
        layer([tf.constant([1]), too_many])


def test_keras_file_round_trip(tables, ps, tmp_path):
    layer = FusedLookupLayer("fz", [1, 2], [DIMS[1], DIMS[2]],
                             ps_config_file=str(tables["config"]), name="fused")
    again = FusedLookupLayer.from_config(layer.get_config())
    assert again.get_config() == layer.get_config()
    inputs = [keras.Input((), dtype="int32"), keras.Input((QUERIES[2],), dtype="int64")]
    model = keras.Model(inputs, keras.layers.Concatenate()(
        [layer(inputs)[0], keras.layers.Flatten()(layer(inputs)[1])]))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    ids = fresh_ids(13, MAX_BATCH)[1:]
    np.testing.assert_array_equal(loaded.predict_on_batch(ids), model.predict_on_batch(ids))
