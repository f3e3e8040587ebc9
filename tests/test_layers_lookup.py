"""LookupLayer under the TensorFlow backend: equivalence with keras.layers.Embedding,
serialization (.keras reloaded in a fresh process), and the errors users hit first."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from layers_tables import random_table, with_defaults, write_config

import keras_hps
from keras_hps.errors import ConfigError, InvalidInputError, NotFoundError
from keras_hps.layers import LookupLayer

VOCAB = (100, 40)
DIMS = (8, 4)
DEFAULTS = (0.25, -0.5)
SLOTS = 3
MAX_BATCH = 64


def build_model(emb0: keras.layers.Layer, emb1: keras.layers.Layer) -> keras.Model:
    """Multi-slot ids through table 0, one id through table 1, then a small MLP."""
    cat = keras.Input((SLOTS,), dtype="int64", name="cat")
    one = keras.Input((), dtype="int64", name="one")
    x = keras.layers.Flatten()(emb0(cat))
    h = keras.layers.Concatenate()([x, emb1(one)])
    h = keras.layers.Dense(16, activation="relu", name="d1")(h)
    return keras.Model([cat, one], keras.layers.Dense(1, name="d2")(h))


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """Trained-model stand-in: an Embedding model whose tables are dumped (some rows left
    out) to an HPS directory and an HDF5 file, with the reference model patched so the
    left-out rows hold the default vector."""
    rng = np.random.default_rng(7)
    ref = build_model(
        keras.layers.Embedding(VOCAB[0], DIMS[0], name="emb0"),
        keras.layers.Embedding(VOCAB[1], DIMS[1], name="emb1"),
    )
    stored, served = [], []
    for i in range(2):
        dense, keys, vectors = random_table(rng, VOCAB[i], DIMS[i], drop=VOCAB[i] // 5)
        stored.append((keys, vectors))
        served.append(with_defaults(dense, keys, DEFAULTS[i]))
        ref.get_layer(f"emb{i}").set_weights([served[i]])
    folder = tmp_path_factory.mktemp("layers_lookup")
    config = write_config(folder, "ranker", stored, list(DEFAULTS), [SLOTS, 1], MAX_BATCH)
    return {"ref": ref, "config": config, "served": served, "folder": folder}


@pytest.fixture
def ps(tables):
    return keras_hps.init(str(tables["config"]))


def lookup_model(tables, **layer_kwargs) -> keras.Model:
    model = build_model(
        LookupLayer("ranker", 0, DIMS[0], name="emb0", **layer_kwargs),
        LookupLayer("ranker", 1, DIMS[1], name="emb1", **layer_kwargs),
    )
    for name in ("d1", "d2"):
        model.get_layer(name).set_weights(tables["ref"].get_layer(name).get_weights())
    return model


def fresh_ids(seed: int, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "cat": rng.integers(0, VOCAB[0], size=(batch, SLOTS)),
        "one": rng.integers(0, VOCAB[1], size=(batch,)),
    }


def test_predictions_match_embedding_model(tables, ps):
    model = lookup_model(tables)
    ids = fresh_ids(1, 50)
    absent0 = np.setdiff1d(np.arange(VOCAB[0]), ps_keys(tables, 0))
    ids["cat"][:5, 0] = absent0[:5]  # make sure left-out rows are asked for
    want = tables["ref"].predict(ids, verbose=0)
    got = model.predict(ids, verbose=0, batch_size=16)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    eager = model({k: tf.constant(v) for k, v in ids.items()})
    np.testing.assert_allclose(eager.numpy(), want, rtol=0, atol=1e-6)


def ps_keys(tables, table_id: int) -> np.ndarray:
    served = tables["served"][table_id]
    return np.flatnonzero(~np.all(served == DEFAULTS[table_id], axis=1))


def test_vectors_and_shapes_for_any_rank(tables, ps):
    layer = LookupLayer("ranker", 0, DIMS[0])
    rng = np.random.default_rng(2)
    # keys past the vocabulary and negative keys are absent: they get the default vector
    ids = rng.integers(-5, VOCAB[0] + 50, size=(4, 3, 2))
    want = np.full(ids.shape + (DIMS[0],), DEFAULTS[0], np.float32)
    inside = (ids >= 0) & (ids < VOCAB[0])
    want[inside] = tables["served"][0][ids[inside]]
    for x in (ids, ids.astype(np.int32)):
        out = layer(x)
        assert out.shape == ids.shape + (DIMS[0],) and out.dtype == tf.float32
        np.testing.assert_array_equal(out.numpy(), want)
    scalar_batch = layer(np.array([], dtype=np.int64))
    assert scalar_batch.shape == (0, DIMS[0])

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int64)])
    def traced(x):
        y = layer(x)
        assert y.shape.as_list() == [None, None, DIMS[0]]  # static shape kept
        return y

    np.testing.assert_array_equal(traced(tf.constant(ids[0])).numpy(), want[0])
    sym = layer(keras.Input((7, 3), dtype="int32"))
    assert sym.shape == (None, 7, 3, DIMS[0]) and sym.dtype == "float32"


def test_compiled_step_takes_the_lookup_result_without_a_copy(tables, ps, monkeypatch):
    """The vectors cross from the parameter server into TensorFlow by address: TF adopts a
    64-byte-aligned NumPy result of the lookup op and copies an unaligned one."""
    results = []
    lookup = ps.lookup

    def recording_lookup(model, table_id, keys):
        results.append(lookup(model, table_id, keys))
        return results[-1]

    monkeypatch.setattr(ps, "lookup", recording_lookup)
    layer = LookupLayer("ranker", 0, DIMS[0])

    def address(x: np.ndarray) -> np.ndarray:
        return np.array(x.ctypes.data, np.int64)

    @tf.function
    def step(ids):
        out = layer(ids)
        return out, tf.numpy_function(address, [out], tf.int64, stateful=True)

    for seed, batch in ((3, MAX_BATCH), (4, 7), (5, 1)):
        ids = fresh_ids(seed, batch)["cat"]
        ids[0, 0] = ids[-1, -1]  # a duplicate
        got, where = step(tf.constant(ids))
        np.testing.assert_array_equal(got.numpy(), tables["served"][0][ids])
        assert int(where) == results[-1].ctypes.data  # the layer's output is that buffer


def test_config_round_trip(tables):
    layer = LookupLayer(
        "ranker", 1, DIMS[1], ps_config_file=str(tables["config"]), global_batch_size=32,
        name="look",
    )
    config = layer.get_config()
    assert json.loads(json.dumps(config)) == config
    clone = LookupLayer.from_config(config)
    assert clone.get_config() == config
    for key, value in {
        "model_name": "ranker", "table_id": 1, "emb_vec_size": DIMS[1],
        "emb_vec_dtype": "float32", "ps_config_file": str(tables["config"]),
        "global_batch_size": 32, "trainable": False,
    }.items():
        assert config[key] == value
    assert layer.weights == [] and not layer.trainable


def test_keras_file_reloads_in_fresh_process(tables, ps, tmp_path):
    model = lookup_model(tables, ps_config_file=str(tables["config"]))
    ids = fresh_ids(3, 20)
    want = model.predict(ids, verbose=0)
    np.testing.assert_allclose(want, tables["ref"].predict(ids, verbose=0), atol=1e-6)
    path = tmp_path / "ranker.keras"
    model.save(path)
    np.savez(tmp_path / "ids.npz", **ids)
    code = textwrap.dedent(
        f"""
        import numpy as np, keras
        import keras_hps.layers  # registers the layer classes
        # without a parameter server: building works, the first call says how to init
        layer = keras_hps.layers.LookupLayer("ranker", 0, {DIMS[0]})
        layer(keras.Input((2,), dtype="int64"))
        try:
            layer(np.zeros((1, 2), np.int64))
            raise SystemExit("a lookup without a parameter server did not fail")
        except RuntimeError as err:
            assert "keras_hps.init" in str(err), err
        model = keras.models.load_model({str(path)!r})
        ids = dict(np.load({str(tmp_path / "ids.npz")!r}))
        np.save({str(tmp_path / "got.npy")!r}, model.predict(ids, verbose=0))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "got.npy"), want, rtol=0, atol=1e-6)


# -- errors -------------------------------------------------------------------------------


def test_unknown_model_or_table_fails_at_build(ps):
    with pytest.raises(NotFoundError, match="nope"):
        LookupLayer("nope", 0, DIMS[0])(keras.Input((SLOTS,), dtype="int64"))
    with pytest.raises(NotFoundError, match="table"):
        LookupLayer("ranker", 2, DIMS[0])(keras.Input((SLOTS,), dtype="int64"))


def test_wrong_emb_vec_size_fails_at_build(ps):
    with pytest.raises(ConfigError, match="emb_vec_size=7"):
        LookupLayer("ranker", 0, 7)(keras.Input((SLOTS,), dtype="int64"))


def test_float_ids_are_refused(ps):
    layer = LookupLayer("ranker", 0, DIMS[0])
    with pytest.raises(InvalidInputError, match="int32 or int64"):
        layer(keras.Input((SLOTS,), dtype="float32"))
    with pytest.raises(InvalidInputError, match="int32 or int64"):
        layer(np.array([[1.0, 2.0, 3.0]], dtype=np.float32))


def test_batch_beyond_configured_maximum(ps):
    layer = LookupLayer("ranker", 0, DIMS[0])
    too_many = np.zeros((MAX_BATCH + 1, SLOTS), dtype=np.int64)
    with pytest.raises(InvalidInputError, match="exceed"):
        layer(too_many)  # shape known when called: refused before any lookup
    assert layer(too_many[:MAX_BATCH]).shape == (MAX_BATCH, SLOTS, DIMS[0])

    @tf.function(input_signature=[tf.TensorSpec([None, SLOTS], tf.int64)])
    def traced(x):
        return layer(x)

    with pytest.raises(tf.errors.InvalidArgumentError, match="exceed the configured maximum"):
        traced(tf.constant(too_many))  # only known at run time


def test_jax_backend_is_refused_at_construction(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match="tensorflow.*torch"):
        LookupLayer("ranker", 0, DIMS[0])


@pytest.mark.gpu
@pytest.mark.skipif(not tf.config.list_physical_devices("GPU"), reason="TensorFlow sees no GPU")
def test_gpu_ids_cross_by_dlpack(tables, ps):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no GPU")
    layer = LookupLayer("ranker", 0, DIMS[0])
    ids = np.random.default_rng(9).integers(0, VOCAB[0] + 10, size=(64, SLOTS))
    with tf.device("/GPU:0"):
        x = tf.constant(ids)
        out = layer(x)
        traced = tf.function(layer)(x)
    want = np.full(ids.shape + (DIMS[0],), DEFAULTS[0], np.float32)
    inside = ids < VOCAB[0]
    want[inside] = tables["served"][0][ids[inside]]
    np.testing.assert_array_equal(out.numpy(), want)
    np.testing.assert_array_equal(traced.numpy(), want)


def test_emb_vec_dtype_casts_the_vectors(tables, ps):
    layer = LookupLayer("ranker", 1, DIMS[1], emb_vec_dtype="float16")
    ids = np.random.default_rng(12).integers(0, VOCAB[1], size=(5, 2))
    out = layer(ids)
    assert out.dtype == tf.float16
    np.testing.assert_array_equal(out.numpy(), tables["served"][1][ids].astype(np.float16))
    assert layer(keras.Input((2,), dtype="int64")).dtype == "float16"
    with pytest.raises(ConfigError, match="float dtype"):
        LookupLayer("ranker", 1, DIMS[1], emb_vec_dtype="int32")


def test_layer_naming_a_config_reads_that_configs_tables(tables, ps, tmp_path):
    """The default server holds one version of the tables; a layer naming another config
    file reads that config's tables (the registry by config), the others the default's."""
    rng = np.random.default_rng(19)
    dense, keys, vectors = random_table(rng, VOCAB[0], DIMS[0], drop=10)
    other = write_config(tmp_path / "other", "ranker", [(keys, vectors)], [9.0], [SLOTS],
                         MAX_BATCH)
    ids = np.random.default_rng(20).integers(0, VOCAB[0], size=(6, SLOTS))
    mine = LookupLayer("ranker", 0, DIMS[0], ps_config_file=str(other))
    default = LookupLayer("ranker", 0, DIMS[0])
    np.testing.assert_array_equal(mine(ids).numpy(), with_defaults(dense, keys, 9.0)[ids])
    np.testing.assert_array_equal(default(ids).numpy(), tables["served"][0][ids])
    assert keras_hps.get_parameter_server() is ps


def test_one_cpu_lookup_crosses_few_modules_and_never_calls_back(tables, ps):
    """docs/architecture.md's CPU lookup, followed through the code (TensorFlow backend, host
    tier and table file): six modules, never a call back up into one it left (the lookup op
    calls the parameter server directly)."""
    from lookup_trace import Trace

    layer = LookupLayer("ranker", 0, DIMS[0])
    ids = np.random.default_rng().integers(0, VOCAB[0] + 20, size=(8, SLOTS))
    layer(ids)  # binds the table
    trace = Trace()
    out = trace.run(layer, ids)
    known = ids < VOCAB[0]
    np.testing.assert_array_equal(out.numpy()[known], tables["served"][0][ids[known]])
    assert trace.modules[:3] == ["keras_hps.layers.base_layer",
                                 "keras_hps.layers.tensorflow_backend",
                                 "keras_hps.parameter_server"]
    assert set(trace.modules) <= {*trace.modules[:3], "keras_hps.host_tier",
                                  "keras_hps.output_buffers", "keras_hps.cold_tier"}
    assert "keras_hps.output_buffers" in trace.modules and len(trace.modules) <= 7
    assert not trace.callbacks
