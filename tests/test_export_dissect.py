"""Dissecting models: Sequential, user-named table layers, 2-D weights left alone, pooled bags."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")
ops = keras.ops

from export_models import BagEmbedding, TakeTable  # noqa: E402

from keras_hps.errors import ConfigError  # noqa: E402
from keras_hps.export import build_inference_model, dissect, export_for_serving  # noqa: E402
from keras_hps.layers import LookupLayer, SparseLookupLayer  # noqa: E402
from keras_hps.parameter_server import ParameterServer  # noqa: E402
from keras_hps.servable import load_servable  # noqa: E402


def _served(result, repo):
    ps = ParameterServer(os.path.join(repo, "hps.json")) if result.placement == "external" else None
    return load_servable(result.version_dir, parameter_server=ps), ps


def _check_both_placements(model, repo, name, inputs, want, **kwargs):
    for tables in ("embedded", "external"):
        result = export_for_serving(model, repo, f"{name}_{tables}", tables=tables, **kwargs)
        servable, ps = _served(result, repo)
        try:
            got = servable.run(inputs)
            assert len(got) == 1
            np.testing.assert_allclose(next(iter(got.values())), want, rtol=1e-5, atol=1e-5)
        finally:
            if ps is not None:
                ps.close()


def test_sequential_model(tmp_path):
    model = keras.Sequential([
        keras.Input(shape=(3,), dtype="int64"),
        keras.layers.Embedding(30, 5, name="emb"),
        keras.layers.Flatten(),
        keras.layers.Dense(2, name="head"),
    ])
    tables = dissect(model)
    assert [(t.layer_name, t.rows, t.dim) for t in tables] == [("emb", 30, 5)]
    np.testing.assert_array_equal(tables[0].keys, np.arange(30))
    inference = build_inference_model(model, "seq")
    assert isinstance(inference.get_layer("emb"), LookupLayer)
    # Dense weights are copies, not the same variables.
    assert inference.get_layer("head") is not model.get_layer("head")
    np.testing.assert_array_equal(inference.get_layer("head").get_weights()[0],
                                  model.get_layer("head").get_weights()[0])
    ids = np.random.default_rng(0).integers(0, 30, (9, 3)).astype(np.int64)
    input_name = model.inputs[0]._keras_history.operation.name
    _check_both_placements(model, tmp_path / "repo", "seq", {input_name: ids},
                           model.predict(ids, verbose=0))


def test_named_table_layer_and_unnamed_2d_weights(tmp_path):
    keras.utils.set_random_seed(1)
    ids = keras.Input(shape=(2,), dtype="int64", name="ids")
    other = keras.Input(shape=(2,), dtype="int64", name="other")
    a = keras.layers.Flatten()(keras.layers.Embedding(20, 4, name="emb")(ids))
    b = keras.layers.Flatten()(TakeTable(15, 3, name="take")(other))
    out = keras.layers.Dense(1, name="head")(keras.layers.Concatenate()([a, b]))
    model = keras.Model([ids, other], out)
    rng = np.random.default_rng(1)
    inputs = {"ids": rng.integers(0, 20, (6, 2)), "other": rng.integers(0, 15, (6, 2))}
    want = model.predict([inputs["ids"], inputs["other"]], verbose=0)
    # By default only the Embedding is a table; TakeTable's 2-D weight stays in the graph.
    assert [t.layer_name for t in dissect(model)] == ["emb"]
    inference = build_inference_model(model, "m")
    assert isinstance(inference.get_layer("take"), TakeTable)
    _check_both_placements(model, tmp_path / "repo", "default", inputs, want)
    # Named, both become tables (table ids in graph order).
    tables = dissect(model, embedding_layers=["emb", "take"])
    assert [(t.table_id, t.layer_name, t.dim) for t in tables] == [(0, "emb", 4), (1, "take", 3)]
    np.testing.assert_array_equal(tables[1].vectors, model.get_layer("take").get_weights()[0])
    _check_both_placements(model, tmp_path / "repo", "named", inputs, want,
                           embedding_layers=["emb", "take"])
    with pytest.raises(ConfigError, match="has 2 2-D weights"):
        dissect(_two_kernels_model(), embedding_layers=["two"])


class TwoKernels(keras.layers.Layer):
    def build(self, input_shape):
        self.a = self.add_weight(shape=(4, 2))
        self.b = self.add_weight(shape=(4, 2))

    def call(self, x):
        return x


def _two_kernels_model():
    x = keras.Input(shape=(4,), name="x")
    return keras.Model(x, TwoKernels(name="two")(x))


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_pooled_bags_become_sparse_lookups(tmp_path, combiner):
    keras.utils.set_random_seed(2)
    bags = keras.Input(shape=(4,), dtype="int64", name="bags")
    pooled = BagEmbedding(25, 6, combiner=combiner, name="bag_emb")(bags)
    model = keras.Model(bags, keras.layers.Dense(3, name="head")(pooled))
    inference = build_inference_model(model, "bags")
    layer = inference.get_layer("bag_emb")
    assert isinstance(layer, SparseLookupLayer) and layer.combiner == combiner
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 25, (10, 4)).astype(np.int64)
    ids[0] = -1  # an empty bag
    ids[1, 2:] = -1
    ids[2] = 7  # duplicates in one bag
    keys = rng.choice(10**9, 25, replace=False).astype(np.int64)
    raw = np.where(ids >= 0, keys[np.maximum(ids, 0)], -1)
    raw[3, 0] = 10**9 + 5  # a miss: default vector 0.5 joins the pool
    table = model.get_layer("bag_emb").get_weights()[0]
    vecs = np.where((ids >= 0)[..., None], table[np.maximum(ids, 0)], 0)
    vecs[3, 0] = 0.5
    count = (ids >= 0).sum(axis=1, keepdims=True).astype(np.float32)
    total = vecs.sum(axis=1)
    scale = {"sum": np.ones_like(count), "mean": count, "sqrtn": np.sqrt(count)}[combiner]
    pooled_ref = np.divide(total, scale, out=np.zeros_like(total), where=scale > 0)
    kernel, bias = model.get_layer("head").get_weights()
    _check_both_placements(model, tmp_path / "repo", f"bags_{combiner}", {"bags": raw},
                           pooled_ref @ kernel + bias, keys={"bag_emb": keys},
                           default_value=0.5)


def test_shared_table_and_key_input_used_as_a_feature(tmp_path):
    """One Embedding called on two inputs; one key input also feeds a keras.ops computation."""
    keras.utils.set_random_seed(4)
    a = keras.Input(shape=(1,), dtype="int64", name="a")
    b = keras.Input(shape=(2,), dtype="int64", name="b")
    emb = keras.layers.Embedding(30, 4, name="shared")
    x = keras.layers.Concatenate()([keras.layers.Flatten()(emb(a)), keras.layers.Flatten()(emb(b)),
                                    ops.cast(a, "float32") / 30.0])
    model = keras.Model([a, b], keras.layers.Dense(1, name="o")(x))
    assert len(dissect(model)) == 1
    rng = np.random.default_rng(4)
    inputs = {"a": rng.integers(0, 30, (7, 1)), "b": rng.integers(0, 30, (7, 2))}
    want = model.predict([inputs["a"], inputs["b"]], verbose=0)
    _check_both_placements(model, tmp_path / "repo", "shared", inputs, want)
    hps = json.loads((tmp_path / "repo" / "hps.json").read_text())
    entry = next(m for m in hps["models"] if m["model"] == "shared_external")
    assert entry["maxnum_catfeature_query_per_table_per_sample"] == [3]  # 1 + 2 keys per sample
