"""The checkpoint (tensor bundle) writer and the SavedModel save that uses it.

Checked against TensorFlow itself: the files equal the ones `SaveV2` writes for the same
tensors, TensorFlow's reader returns every tensor, and a flipped byte is caught by its CRC
check. `save_saved_model` must take the fast path on a standard model (this catches
TensorFlow internals moving) and fall back to `SaveV2` where the writer cannot go.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from keras_hps.export import export_for_serving  # noqa: E402
from keras_hps.export import tensor_bundle as tb  # noqa: E402
from keras_hps.export.saved_model_writer import BUNDLE, SAVEV2, save_saved_model  # noqa: E402


def _random_tensors(rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """Every dtype the writer takes, scalars, empty tensors, strings, and enough keys with
    shared prefixes to fill several 256 KiB index blocks."""
    tensors = [
        ("table/.ATTRIBUTES/VARIABLE_VALUE", rng.standard_normal((257, 33)).astype(np.float32)),
        ("keys", rng.integers(-2**62, 2**62, 300, dtype=np.int64)),
        ("_CHECKPOINTABLE_OBJECT_GRAPH", np.array(rng.bytes(1000), dtype=object)),
        ("strings", np.array([b"", b"a", rng.bytes(300)], dtype=object)),
        ("empty", np.zeros((0, 4), np.float32)),
        ("empty_strings", np.zeros((0,), dtype=object)),
        ("scalar", np.float32(rng.standard_normal())),
        ("mask", rng.random(11) > 0.5),
    ]
    for dtype in (np.float64, np.float16, np.int32, np.int16, np.int8, np.uint8, np.uint16,
                  np.uint32, np.uint64, np.complex64):
        tensors.append((f"dtype_{np.dtype(dtype).name}", (rng.random((3, 5)) * 100).astype(dtype)))
    names = {f"model/layer_{rng.integers(10**9)}/{'w' * int(rng.integers(40))}/VALUE"
             for _ in range(6000)}
    tensors += [(n, rng.standard_normal(int(rng.integers(3))).astype(np.float32))
                for n in sorted(names, key=lambda _: rng.random())]
    return tensors


def _tf_value(value: np.ndarray):
    if value.dtype == object:
        return tf.constant(value.item() if value.ndim == 0 else value.astype(bytes),
                           dtype=tf.string)
    return tf.constant(value)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    rng = np.random.default_rng(11)
    tensors = _random_tensors(rng)
    folder = tmp_path_factory.mktemp("bundles")
    mine, theirs = str(folder / "mine"), str(folder / "theirs")
    old = tb.PIECE_BYTES
    tb.PIECE_BYTES = 4096  # the table is written and checksummed in many pieces
    try:
        tb.write_tensor_bundle(mine, tensors)
    finally:
        tb.PIECE_BYTES = old
    tf.raw_ops.SaveV2(prefix=theirs, tensor_names=[k for k, _ in tensors],
                      shape_and_slices=[""] * len(tensors),
                      tensors=[_tf_value(v) for _, v in tensors])
    return tensors, mine, theirs


def test_files_equal_savev2_byte_for_byte(bundles):
    _, mine, theirs = bundles
    assert os.path.getsize(tb.index_filename(mine)) > tb.BLOCK_SIZE  # more than one block
    assert _read(tb.index_filename(mine)) == _read(tb.index_filename(theirs))
    assert _read(tb.data_filename(mine)) == _read(tb.data_filename(theirs))
    written = {os.path.basename(f(p)) for f in (tb.index_filename, tb.data_filename)
               for p in (mine, theirs)}
    assert set(os.listdir(os.path.dirname(mine))) == written  # no temp files left


def test_tensorflow_reads_every_tensor(bundles):
    tensors, mine, _ = bundles
    reader = tf.train.load_checkpoint(mine)
    dtypes = reader.get_variable_to_dtype_map()
    assert set(dtypes) == {k for k, _ in tensors}
    for key, want in tensors:
        got = reader.get_tensor(key)
        if want.dtype == object:
            want = want.item() if want.ndim == 0 else want.astype(bytes)
            got = got if isinstance(got, bytes) else np.asarray(got).astype(bytes)
        else:
            assert dtypes[key].as_numpy_dtype == want.dtype, key
        np.testing.assert_array_equal(got, want, err_msg=key)


@pytest.mark.parametrize("which", ["table", "strings"])
def test_a_flipped_data_byte_is_caught_by_tensorflow(tmp_path, which):
    rng = np.random.default_rng(5)
    keys = rng.integers(0, 2**40, 100, dtype=np.int64)
    table = rng.standard_normal((64, 32)).astype(np.float32)
    strings = np.array([b"object graph", rng.bytes(500)], dtype=object)
    prefix = str(tmp_path / "flipped")
    tb.write_tensor_bundle(prefix, [("keys", keys), ("table", table), ("strings", strings)])
    data = bytearray(_read(tb.data_filename(prefix)))
    # Data order is the given order: the table ends at keys + table bytes; the strings'
    # bytes end the file.
    end = keys.nbytes + table.nbytes if which == "table" else len(data)
    data[end - 2] ^= 0x10
    with open(tb.data_filename(prefix), "wb") as f:
        f.write(data)
    reader = tf.train.load_checkpoint(prefix)
    np.testing.assert_array_equal(reader.get_tensor("keys"), keys)  # the others still read
    with pytest.raises(tf.errors.OpError, match="Checksum does not match"):
        reader.get_tensor(which)


def test_a_flipped_index_byte_is_caught(bundles, tmp_path):
    tensors, _, _ = bundles
    prefix = str(tmp_path / "index")
    tb.write_tensor_bundle(prefix, tensors[:8])
    index = bytearray(_read(tb.index_filename(prefix)))
    index[20] ^= 0x01  # inside the data block
    with open(tb.index_filename(prefix), "wb") as f:
        f.write(index)
    with pytest.raises(tf.errors.OpError, match="block checksum mismatch"):
        tf.train.load_checkpoint(prefix)


def test_bad_input_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"repeated: \['a'\]"):
        tb.write_tensor_bundle(str(tmp_path / "x"), [("a", np.zeros(1)), ("a", np.zeros(1))])
    with pytest.raises(ValueError, match="non-empty"):
        tb.write_tensor_bundle(str(tmp_path / "x"), [("", np.zeros(1))])
    with pytest.raises(ValueError, match="'t': dtype datetime64"):
        tb.write_tensor_bundle(str(tmp_path / "x"), [("t", np.zeros(2, "datetime64[s]"))])
    assert os.listdir(tmp_path) == []


def _module(rng: np.random.Generator, extra: dict | None = None):
    module = tf.Module()
    module.table = tf.Variable(rng.standard_normal((500, 16)).astype(np.float32))
    module.keys = tf.Variable(np.sort(rng.choice(10**9, 500, replace=False)).astype(np.int64))
    module.bias = tf.Variable(np.float32(0.5))
    for name, value in (extra or {}).items():
        setattr(module, name, tf.Variable(value))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="ids")])
    def serve(ids):
        pos = tf.minimum(tf.searchsorted(module.keys, ids), 499)
        return {"out": tf.reduce_sum(tf.gather(module.table, pos), 1) + module.bias}

    return module, {"serving_default": serve.get_concrete_function()}


def test_saved_model_fast_path_equals_savev2(tmp_path):
    rng = np.random.default_rng(3)
    module, signatures = _module(rng)
    fast, slow = str(tmp_path / "fast"), str(tmp_path / "slow")
    assert save_saved_model(module, fast, signatures) == BUNDLE
    assert save_saved_model(module, slow, signatures, bundle_writer=False) == SAVEV2
    for name in ("variables.index", "variables.data-00000-of-00001"):
        assert _read(f"{fast}/variables/{name}") == _read(f"{slow}/variables/{name}"), name
    assert sorted(os.listdir(f"{fast}/variables")) == sorted(os.listdir(f"{slow}/variables"))
    # fingerprint.pb was recomputed for the rewritten index
    fingerprint = tf.saved_model.experimental.read_fingerprint
    assert fingerprint(fast).checkpoint_hash == fingerprint(slow).checkpoint_hash
    ids = np.concatenate([module.keys.numpy()[rng.integers(0, 500, 20)], [-5, 10**10]])
    got = tf.saved_model.load(fast).signatures["serving_default"](ids=tf.constant(ids))["out"]
    want = signatures["serving_default"](ids=tf.constant(ids))["out"]
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_saved_model_falls_back_to_savev2_for_other_dtypes(tmp_path):
    rng = np.random.default_rng(4)
    half = rng.standard_normal(7).astype(np.float32)
    module, signatures = _module(rng, {"half": tf.constant(half, tf.bfloat16)})
    path = str(tmp_path / "bf16")
    assert save_saved_model(module, path, signatures) == SAVEV2
    loaded = tf.saved_model.load(path)
    np.testing.assert_array_equal(loaded.half.numpy(), module.half.numpy())
    np.testing.assert_array_equal(loaded.table.numpy(), module.table.numpy())


def test_embedded_export_uses_the_writer_and_tf_checks_its_crc(tmp_path):
    ids = keras.Input(shape=(2,), dtype="int64", name="ids")
    emb = keras.layers.Embedding(300, 8, name="emb")
    model = keras.Model(ids, keras.layers.Dense(1)(keras.layers.Flatten()(emb(ids))))
    result = export_for_serving(model, tmp_path / "repo", "m", tables="embedded")
    assert result.checkpoint_writer == BUNDLE
    query = tf.constant([[0, 299], [5, 7]], tf.int64)
    fn = tf.saved_model.load(result.version_dir).signatures["serving_default"]
    np.testing.assert_allclose(fn(ids=query)[model.output_names[0]].numpy(),
                               model.predict(query.numpy(), verbose=0), rtol=1e-6)
    data = f"{result.version_dir}/variables/variables.data-00000-of-00001"
    raw = bytearray(_read(data))
    raw[len(raw) // 2] ^= 0x01
    with open(data, "wb") as f:
        f.write(raw)
    with pytest.raises(Exception, match="Checksum does not match"):
        tf.saved_model.load(result.version_dir)


def test_saved_model_falls_back_when_tensorflow_checks_the_shards(tmp_path, monkeypatch):
    """A TensorFlow that enforces "tensors must not be removed" (its own validate_shards,
    not called by 2.21) makes the save fall back to SaveV2, with a warning."""
    from tensorflow.python.checkpoint.sharding import sharding_util

    import keras_hps.export.saved_model_writer as writer

    real = writer._callback_class

    def validating() -> type:
        class Validated(real()):
            def __call__(self, shardable_tensors):
                shards = super().__call__(shardable_tensors)
                sharding_util.validate_shards(shards, shardable_tensors, self.description)
                return shards

        return Validated

    monkeypatch.setattr(writer, "_callback_class", validating)
    rng = np.random.default_rng(6)
    module, signatures = _module(rng)
    path = str(tmp_path / "checked")
    with pytest.warns(RuntimeWarning, match="refused"):
        assert save_saved_model(module, path, signatures) == SAVEV2
    loaded = tf.saved_model.load(path)
    np.testing.assert_array_equal(loaded.table.numpy(), module.table.numpy())
