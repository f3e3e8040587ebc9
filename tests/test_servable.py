"""keras_hps.servable on small SavedModels built here: plain and external placement."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from keras_hps.errors import ConfigError, InvalidInputError, NotFoundError  # noqa: E402
from keras_hps.servable import MANIFEST_NAME, load_servable  # noqa: E402

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

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def lengths(self, text):
        return {"length": tf.strings.length(text), "upper": tf.strings.upper(text)}


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
        signatures={"serving_default": module.serve, "dense_only": module.dense_only,
                    "lengths": module.lengths},
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
    assert set(servable.signatures) == {"serving_default", "dense_only", "lengths"}
    assert servable.signatures["lengths"].inputs["text"].dtype == object
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


def test_string_inputs(plain):
    servable = plain[0]
    words = ["", "keras", "hps-\u00e9"]
    for text in (np.array(words), np.array([w.encode() for w in words]), np.array(words, object)):
        got = servable.run({"text": text}, signature_name="lengths")
        np.testing.assert_array_equal(got["length"], [len(w.encode()) for w in words])
        assert list(got["upper"]) == [w.encode().upper() for w in words]  # ASCII only
    with pytest.raises(InvalidInputError, match="'text'.*object.*int64"):
        servable.run({"text": np.arange(3)}, signature_name="lengths")


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


def test_shapes_are_the_graphs_business(plain):
    """As in TF Serving, a shape the signature does not declare is computed when the graph
    can compute it ([2, 2] strings for a [?] signature), and fails, naming the input, when
    it cannot."""
    servable = plain[0]
    text = np.array([[b"a", b"bcd"], [b"", b"xy"]], dtype=object)
    got = servable.run({"text": text}, signature_name="lengths")
    np.testing.assert_array_equal(got["length"], [[1, 3], [0, 2]])
    with pytest.raises(InvalidInputError, match=r"'dense'.*\[2\].*\[\?,3\].*failed on it"):
        servable.run({"dense": np.zeros(2, np.float32)}, signature_name="dense_only")


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


# -- external placement: a dense part fed vectors, keys resolved through the parameter server --

KEYS = np.arange(ROWS, dtype=np.int64) * 1000 + 17  # row i serves key KEYS[i]
DEFAULT = -0.5


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    from keras_hps.formats import write_hdf5_table

    table, w = _weights(1)
    repo = tmp_path_factory.mktemp("ext_repo")
    write_hdf5_table(repo / "tables" / "t.h5", KEYS, table)
    (repo / "hps.json").write_text(json.dumps({
        "supportlonglong": True,
        "models": [{
            "model": "ext", "sparse_files": ["tables/t.h5"], "embedding_vecsize_per_table": [DIM],
            "maxnum_catfeature_query_per_table_per_sample": [2],
            "default_value_for_each_table": [DEFAULT], "max_batch_size": 256,
        }],
    }))
    module = _DensePart(table, w)
    vdir = repo / "ext" / "5"
    tf.saved_model.save(module, str(vdir), signatures={"serving_default": module.serve_vectors})
    manifest = {
        "format": "keras-hps-external", "format_version": 1, "model_name": "ext",
        "hps_config": "../../hps.json",
        "lookups": [{"input": "ids", "feeds": "ids__hps_vectors", "model": "ext", "table_id": 0,
                     "dtype": "int64", "shape": [None, 2], "combiner": None}],
    }
    (vdir / MANIFEST_NAME).write_text(json.dumps(manifest))
    from keras_hps.parameter_server import ParameterServer

    ps = ParameterServer(str(repo / "hps.json"))
    yield load_servable(vdir, parameter_server=ps), table, w, repo, vdir, ps
    ps.close()


def _external_reference(table, w, raw_keys, dense):
    row_of = {int(k): i for i, k in enumerate(KEYS)}
    vecs = np.array([[table[row_of[int(k)]] if int(k) in row_of else np.full(DIM, DEFAULT)
                      for k in row] for row in raw_keys], np.float32).reshape(-1, 2, DIM)
    feats = np.concatenate([vecs.mean(axis=1), dense], axis=1)
    logits = feats @ w
    return {"logits": logits, "prob": 1.0 / (1.0 + np.exp(-logits[:, :1]))}


def test_external_signature_takes_raw_keys(external):
    servable = external[0]
    assert (servable.name, servable.version, servable.placement) == ("ext", 5, "external")
    sig = servable.signatures["serving_default"]
    assert set(sig.inputs) == {"ids", "dense"}
    assert sig.inputs["ids"].dtype == np.int64 and sig.inputs["ids"].shape == (None, 2)
    proto = servable.signature_def()
    assert set(proto.inputs) == {"ids", "dense"}
    assert proto.inputs["ids"].dtype == tf.int64.as_datatype_enum
    assert [d.size for d in proto.inputs["ids"].tensor_shape.dim] == [-1, 2]


@pytest.mark.parametrize("batch", [0, 1, 9])
def test_external_run_matches_numpy(external, batch):
    servable, table, w = external[:3]
    rng = np.random.default_rng(10 + batch)
    raw = KEYS[rng.integers(0, ROWS, (batch, 2))]
    if batch:
        raw[0, 0] = 999_999_999  # never exported: default vector
        raw[-1] = KEYS[3]  # duplicate keys in one row
    dense = rng.standard_normal((batch, 3)).astype(np.float32)
    got = servable.run({"ids": raw, "dense": dense})
    want = _external_reference(table, w, raw, dense)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInputError, match="'ids'.*int64.*float32"):
        servable.run({"ids": raw.astype(np.float32), "dense": dense})
    with pytest.raises(InvalidInputError, match=r"Missing but required: \{ids\}"):
        servable.run({"ids__hps_vectors": np.zeros((batch, 2, DIM), np.float32), "dense": dense})


def test_external_without_a_parameter_server_opens_the_config_it_pins(external, monkeypatch):
    """No parameter server given: the version opens the config its manifest names (never a
    process-wide one) and closes it with the servable."""
    import keras_hps.parameter_server as ps_module

    servable, table, w, repo, vdir, ps = external
    monkeypatch.setattr(ps_module, "get_parameter_server", lambda: ps)  # must not be used
    opened, closed = [], []

    class Recording(ps_module.ParameterServer):
        def __init__(self, config):
            opened.append(config)
            super().__init__(config)

        def close(self):
            closed.append(self)
            super().close()

    monkeypatch.setattr(ps_module, "ParameterServer", Recording)
    fresh = load_servable(vdir)
    assert opened == [os.path.join(str(repo), "hps.json")]
    assert isinstance(fresh.parameter_server, Recording) and fresh.parameter_server is not ps
    own = fresh.parameter_server
    rng = np.random.default_rng(5)
    raw = KEYS[rng.integers(0, ROWS, (4, 2))]
    dense = rng.standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_allclose(fresh.run({"ids": raw, "dense": dense})["logits"],
                               _external_reference(table, w, raw, dense)["logits"],
                               rtol=1e-5, atol=1e-5)
    fresh.close()
    assert closed == [own]
    with pytest.raises(NotFoundError, match="unloaded"):
        fresh.run({"ids": raw, "dense": dense})
    fresh.close()  # a second close does nothing
    assert closed == [own]


def test_external_bad_manifests(external, tmp_path):
    import shutil

    servable, _, _, _, vdir, ps = external
    manifest = json.loads((vdir / MANIFEST_NAME).read_text())

    def with_manifest(content) -> str:
        target = tmp_path / "m" / str(len(list(tmp_path.glob("m/*"))) + 1)
        shutil.copytree(vdir, target)
        (target / MANIFEST_NAME).write_text(content if isinstance(content, str)
                                            else json.dumps(content))
        return str(target)

    with pytest.raises(ConfigError, match="cannot read"):
        load_servable(with_manifest("{not json"), parameter_server=ps)
    with pytest.raises(ConfigError, match="format_version"):
        load_servable(with_manifest({**manifest, "format_version": 99}), parameter_server=ps)
    bad_feed = {**manifest, "lookups": [{**manifest["lookups"][0], "feeds": "nope"}]}
    with pytest.raises(ConfigError, match="'nope'"):
        load_servable(with_manifest(bad_feed), parameter_server=ps)
    bad_combiner = {**manifest, "lookups": [{**manifest["lookups"][0], "combiner": "max"}]}
    with pytest.raises(ConfigError, match="combiner"):
        load_servable(with_manifest(bad_combiner), parameter_server=ps)
    unknown_model = {**manifest, "lookups": [{**manifest["lookups"][0], "model": "other"}]}
    with pytest.raises(NotFoundError, match="other"):
        load_servable(with_manifest(unknown_model), parameter_server=ps)
