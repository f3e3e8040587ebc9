"""keras_hps.servable on small SavedModels built here: plain and external placement."""

from __future__ import annotations

import threading

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from keras_hps.errors import InvalidInputError, NotFoundError  # noqa: E402
from keras_hps.servable import load_servable  # noqa: E402

DIM = 4
ROWS = 50


def _weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    w = rng.standard_normal((DIM + 3, 2)).astype(np.float32)
    return table, w


def _reference(table, w, ids, dense):
    emb = table[np.clip(ids, 0, ROWS - 1)].mean(axis=1)
    feats = np.concatenate([emb, dense], axis=1)
    logits = feats @ w
    return {"logits": logits, "prob": 1.0 / (1.0 + np.exp(-logits[:, :1]))}


class _Plain(tf.Module):
    """ids [?, 2] int64 + dense [?, 3] float32 -> logits [?, 2], prob [?, 1]."""

    def __init__(self, table, w):
        super().__init__()
        self.table = tf.Variable(table)
        self.w = tf.Variable(w)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 2], tf.int64, name="ids"),
            tf.TensorSpec([None, 3], tf.float32, name="dense"),
        ]
    )
    def serve(self, ids, dense):
        emb = tf.reduce_mean(tf.gather(self.table, tf.clip_by_value(ids, 0, ROWS - 1)), axis=1)
        return self._head(emb, dense)

    def _head(self, emb, dense):
        logits = tf.matmul(tf.concat([emb, dense], axis=1), self.w)
        return {"logits": logits, "prob": tf.sigmoid(logits[:, :1])}

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="dense")])
    def dense_only(self, dense):
        return {"sum": tf.reduce_sum(dense, axis=1)}


class _DensePart(_Plain):
    """The external placement's dense part: vectors [?, 2, DIM] instead of ids."""

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 2, DIM], tf.float32, name="ids__hps_vectors"),
            tf.TensorSpec([None, 3], tf.float32, name="dense"),
        ]
    )
    def serve_vectors(self, ids__hps_vectors, dense):
        return self._head(tf.reduce_mean(ids__hps_vectors, axis=1), dense)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    table, w = _weights()
    module = _Plain(table, w)
    vdir = tmp_path_factory.mktemp("repo") / "plain" / "3"
    tf.saved_model.save(
        module,
        str(vdir),
        signatures={"serving_default": module.serve, "dense_only": module.dense_only},
    )
    return load_servable(vdir), table, w


def _inputs(rng, batch):
    return {
        "ids": rng.integers(0, ROWS, size=(batch, 2)).astype(np.int64),
        "dense": rng.standard_normal((batch, 3)).astype(np.float32),
    }


def test_plain_metadata(plain):
    servable, _, _ = plain
    assert (servable.name, servable.version, servable.placement) == ("plain", 3, "embedded")
    assert set(servable.signatures) == {"serving_default", "dense_only"}
    sig = servable.signatures["serving_default"]
    assert sig.method_name == "tensorflow/serving/predict"
    assert sig.inputs["ids"].dtype == np.int64 and sig.inputs["ids"].shape == (None, 2)
    assert sig.inputs["dense"].dtype == np.float32 and sig.inputs["dense"].shape == (None, 3)
    assert sig.outputs["logits"].shape == (None, 2) and sig.outputs["prob"].shape == (None, 1)
    proto = servable.signature_def("serving_default")
    assert set(proto.inputs) == {"ids", "dense"} and set(proto.outputs) == {"logits", "prob"}
    assert proto.inputs["ids"].dtype == tf.int64.as_datatype_enum


@pytest.mark.parametrize("batch", [1, 7, 0])
def test_plain_run_matches_numpy(plain, batch):
    servable, table, w = plain
    rng = np.random.default_rng(batch)
    inputs = _inputs(rng, batch)
    got = servable.run(inputs)
    want = _reference(table, w, inputs["ids"], inputs["dense"])
    assert set(got) == {"logits", "prob"}
    for k in want:
        assert got[k].shape == want[k].shape
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)
    only = servable.run(inputs, output_keys=["prob"])
    assert list(only) == ["prob"]
    other = servable.run({"dense": inputs["dense"]}, signature_name="dense_only")
    np.testing.assert_allclose(other["sum"], inputs["dense"].sum(axis=1), rtol=1e-5, atol=1e-5)


def test_plain_validation_errors(plain):
    servable, _, _ = plain
    rng = np.random.default_rng(1)
    good = _inputs(rng, 3)
    with pytest.raises(NotFoundError, match='signature key "nope" not found'):
        servable.run(good, signature_name="nope")
    with pytest.raises(NotFoundError):
        servable.signature_def("nope")
    with pytest.raises(InvalidInputError, match=r"Missing but required: \{dense\}"):
        servable.run({"ids": good["ids"]})
    extra_only = r"Sent extra: \{extra\}\. Missing but required: \{\}"
    with pytest.raises(InvalidInputError, match=extra_only):
        servable.run({**good, "extra": good["dense"]})
    with pytest.raises(InvalidInputError, match="input size does not match signature"):
        servable.run({"ids": good["ids"], "other": good["dense"]})
    with pytest.raises(InvalidInputError, match="'ids'.*int64.*int32"):
        servable.run({**good, "ids": good["ids"].astype(np.int32)})
    with pytest.raises(InvalidInputError, match=r"'dense'.*\[3,4\].*\[\?,3\]"):
        servable.run({**good, "dense": np.zeros((3, 4), np.float32)})
    with pytest.raises(InvalidInputError, match=r"'ids'.*\[6\]"):
        servable.run({**good, "ids": good["ids"].reshape(-1)})
    with pytest.raises(InvalidInputError, match="output tensor alias not found in signature: x"):
        servable.run(good, output_keys=["x"])


def test_plain_concurrent_runs(plain):
    servable, table, w = plain
    errors: list[BaseException] = []

    def worker(seed):
        try:
            rng = np.random.default_rng(100 + seed)
            for _ in range(20):
                inputs = _inputs(rng, int(rng.integers(1, 16)))
                got = servable.run(inputs)
                want = _reference(table, w, inputs["ids"], inputs["dense"])
                np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-5)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_missing_directory_and_close(tmp_path, plain):
    with pytest.raises(NotFoundError, match="no saved_model.pb"):
        load_servable(tmp_path / "absent" / "1")
    servable, _, _ = plain
    inputs = _inputs(np.random.default_rng(2), 2)
    # A second load of the same directory is independent of the first.
    again = load_servable(servable.path)
    again.close()
    with pytest.raises(NotFoundError, match="unloaded"):
        again.run(inputs)
    assert set(servable.run(inputs)) == {"logits", "prob"}
