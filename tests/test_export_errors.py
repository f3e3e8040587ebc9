"""Bad export inputs: each is a clear error and leaves the repository exactly as it was."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")

from keras_hps.errors import ConfigError, NotFoundError  # noqa: E402
from keras_hps.export import build_inference_model, export_for_serving  # noqa: E402


def _model(rows: int = 12) -> keras.Model:
    ids = keras.Input(shape=(2,), dtype="int64", name="ids")
    x = keras.layers.Flatten()(keras.layers.Embedding(rows, 3, name="table")(ids))
    return keras.Model(ids, keras.layers.Dense(1, name="out")(x))


def _snapshot(root) -> dict[str, str]:
    """Every path under `root` with a hash of its content (folders map to '')."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(folder, d), root)] = ""
        for f in files:
            path = os.path.join(folder, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha1(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors") / "repo"
    model = _model()
    export_for_serving(model, root, "existing", tables="external")
    export_for_serving(model, root, "existing_emb", tables="embedded")
    return root, model


class SubclassedCTR(keras.Model):
    def __init__(self):
        super().__init__()
        self.table = keras.layers.Embedding(10, 3, name="sub_table")
        self.out = keras.layers.Dense(1)

    def call(self, ids):
        return self.out(keras.ops.sum(self.table(ids), axis=1))


def _no_embedding_model():
    x = keras.Input(shape=(4,), name="x")
    return keras.Model(x, keras.layers.Dense(2, name="d")(x))


def _variable_length_model():
    ids = keras.Input(shape=(None,), dtype="int64", name="ids")
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(9, 3, name="var")(ids))
    return keras.Model(ids, keras.layers.Dense(1)(pooled))


def _keys_from_vectors_model():
    ids = keras.Input(shape=(1,), dtype="int64", name="ids")
    first = keras.layers.Flatten()(keras.layers.Embedding(9, 4, name="first")(ids))
    second_ids = keras.ops.argmax(first, axis=-1)
    second = keras.layers.Embedding(4, 2, name="second")(second_ids)
    return keras.Model(ids, keras.layers.Dense(1)(second))


class TablesInAList(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tables = [keras.layers.Embedding(5, 2, name="listed")]

    def call(self, ids):
        return keras.ops.sum(self.tables[0](ids), axis=1)


def _tables_in_a_list_model():
    ids = keras.Input(shape=(2,), dtype="int64", name="ids")
    return keras.Model(ids, TablesInAList(name="holder")(ids))


def _same_table_names_model():
    def tower(name):
        ids = keras.Input(shape=(1,), dtype="int64")
        x = keras.layers.Flatten()(keras.layers.Embedding(5, 2, name="emb")(ids))
        return keras.Model(ids, x, name=name)

    a = keras.Input(shape=(1,), dtype="int64", name="a")
    b = keras.Input(shape=(1,), dtype="int64", name="b")
    return keras.Model([a, b], keras.layers.Concatenate()([tower("ta")(a), tower("tb")(b)]))


def _input_named_like_a_vector_model():
    ids = keras.Input(shape=(2,), dtype="int64", name="ids")
    clash = keras.Input(shape=(2,), name="hps_lookup_0")
    x = keras.layers.Flatten()(keras.layers.Embedding(5, 3, name="t")(ids[:, :1] + 1))
    return keras.Model([ids, clash], keras.layers.Concatenate()([x, clash]))


def _subclassed():
    m = SubclassedCTR()
    m(np.zeros((1, 2), np.int64))
    return m


CASES = {
    "missing model file": (lambda r, m: export_for_serving(
        str(r.parent / "nope.keras"), r, "fresh"), NotFoundError, "nope.keras"),
    "missing repository parent": (lambda r, m: export_for_serving(
        m, r.parent / "no" / "such" / "repo", "fresh"), NotFoundError, "does not exist"),
    "existing version": (lambda r, m: export_for_serving(
        m, r, "existing", version=1), ConfigError, "exists already"),
    "existing embedded version": (lambda r, m: export_for_serving(
        m, r, "existing_emb", version=1, tables="embedded"), ConfigError, "exists already"),
    "slash in name": (lambda r, m: export_for_serving(m, r, "a/b"), ConfigError, "'a/b'"),
    "colon in name": (lambda r, m: export_for_serving(m, r, "m:1"), ConfigError, "not allowed"),
    "space in name": (lambda r, m: export_for_serving(m, r, "my model"), ConfigError,
                      "not allowed"),
    "empty name": (lambda r, m: export_for_serving(m, r, ""), ConfigError, "not allowed"),
    "short key array": (lambda r, m: export_for_serving(
        m, r, "fresh", keys={"table": np.arange(11)}), ConfigError,
        "11 entries but the table has 12"),
    "repeated keys": (lambda r, m: export_for_serving(
        m, r, "fresh", keys={"table": np.zeros(12, np.int64)}), ConfigError, "repeat"),
    "one repeated hashed key": (lambda r, m: export_for_serving(
        m, r, "fresh", keys={"table": np.array([90, 2**40, -7, 33, 5, 2**40, 12, 8, 1, 0, 61,
                                                 4])}), ConfigError,
        r"repeat \(key 1099511627776 and 0 more\)"),
    "float keys": (lambda r, m: export_for_serving(
        m, r, "fresh", keys={"table": np.arange(12.0)}), ConfigError, "integer"),
    "keys for unknown layer": (lambda r, m: export_for_serving(
        m, r, "fresh", keys={"out": np.arange(12)}), ConfigError, "not table layers"),
    "unknown placement": (lambda r, m: export_for_serving(m, r, "fresh", tables="remote"),
                          ConfigError, "tables must be one of"),
    "no embeddings": (lambda r, m: export_for_serving(_no_embedding_model(), r, "fresh"),
                      ConfigError, "no embedding table"),
    "unknown layer name": (lambda r, m: export_for_serving(
        m, r, "fresh", embedding_layers=["nope"]), ConfigError, "no layer"),
    "subclassed model": (lambda r, m: export_for_serving(_subclassed(), r, "fresh"),
                         ConfigError, "inference_model="),
    "variable keys per sample": (lambda r, m: export_for_serving(
        _variable_length_model(), r, "fresh"), ConfigError, "max_keys_per_sample"),
    "version zero": (lambda r, m: export_for_serving(m, r, "fresh", version=0), ConfigError,
                     "positive"),
    "keys computed from another table's vectors (external)": (
        lambda r, m: export_for_serving(_keys_from_vectors_model(), r, "fresh"), ConfigError,
        r"the keys of lookup 'second' are computed from the vectors of 'first'"),
    "a table in a list attribute": (
        lambda r, m: export_for_serving(_tables_in_a_list_model(), r, "fresh",
                                        tables="embedded"), ConfigError,
        r"layer 'holder' \(TablesInAList\) holds table\(s\) \['listed'\] inside a list"),
    "two tables of one name": (
        lambda r, m: export_for_serving(_same_table_names_model(), r, "fresh"), ConfigError,
        r"several table layers named \['emb'\]"),
    "an input named like the placement's own tensors": (
        lambda r, m: export_for_serving(_input_named_like_a_vector_model(), r, "fresh"),
        ConfigError, r"model input\(s\) \['hps_lookup_0'\]"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_a_clear_error_and_changes_nothing(repo, case):
    root, model = repo
    before = _snapshot(root)
    call, error, message = CASES[case]
    with pytest.raises(error, match=message):
        call(root, model)
    assert _snapshot(root) == before


@pytest.mark.parametrize("tables,target", [
    ("external", "exporter.write_warmup"),
    ("embedded", "exporter.write_warmup"),
    ("external", "formats.write_hps_table"),  # fails in a table-writing thread
])
def test_failure_while_writing_rolls_back(repo, monkeypatch, tables, target):
    root, model = repo
    before = _snapshot(root)
    import keras_hps.export.exporter as exporter
    import keras_hps.formats as formats

    def broken(*args, **kwargs):
        raise OSError("disk full (injected)")

    module, name = target.split(".")
    monkeypatch.setattr({"exporter": exporter, "formats": formats}[module], name, broken)
    with pytest.raises(OSError, match="injected"):
        export_for_serving(model, root, "half_written", tables=tables)
    assert _snapshot(root) == before


def test_concurrent_exports_keep_each_others_entries(tmp_path):
    import json
    import threading

    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    root = tmp_path / "repo"
    root.mkdir()
    models = {f"m{i}": _model(5 + i) for i in range(4)}
    errors = []

    def run(name, model):
        try:
            export_for_serving(model, root, name, tables="external")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=item) for item in models.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((root / "models.config").read_text(), config)
    assert sorted(c.name for c in config.model_config_list.config) == sorted(models)
    hps = json.loads((root / "hps.json").read_text())
    assert sorted(m["model"] for m in hps["models"]) == sorted(models)


def test_variable_length_keys_with_max_keys_per_sample(tmp_path):
    model = _variable_length_model()
    result = export_for_serving(model, tmp_path / "repo", "var", max_keys_per_sample={"var": 5})
    import json

    hps = json.loads((tmp_path / "repo" / "hps.json").read_text())
    assert hps["models"][0]["maxnum_catfeature_query_per_table_per_sample"] == [5]
    from keras_hps.parameter_server import ParameterServer
    from keras_hps.servable import load_servable

    ps = ParameterServer(str(tmp_path / "repo" / "hps.json"))
    try:
        servable = load_servable(result.version_dir, parameter_server=ps)
        assert servable.signatures["serving_default"].inputs["ids"].shape == (None, None)
        ids = np.array([[1, 2, 3, 4], [8, 8, 0, 1]], np.int64)
        np.testing.assert_allclose(next(iter(servable.run({"ids": ids}).values())),
                                   model.predict(ids, verbose=0), rtol=1e-5, atol=1e-5)
    finally:
        ps.close()


def test_subclassed_model_with_an_inference_model(tmp_path):
    """The documented way out for subclassed models: pass the inference model."""
    from keras_hps.layers import LookupLayer

    trained = _subclassed()
    ids = keras.Input(shape=(2,), dtype="int64", name="ids")
    lookup = LookupLayer("sub", 0, 3, name="sub_table")
    lookup.built = True
    dense = keras.layers.Dense(1)
    inference = keras.Model(ids, dense(keras.ops.sum(lookup(ids), axis=1)))
    dense.set_weights(trained.out.get_weights())
    with pytest.raises(ConfigError, match="subclassed"):
        build_inference_model(trained, "sub")
    result = export_for_serving(trained, tmp_path / "repo", "sub", tables="embedded",
                                inference_model=inference)
    from keras_hps.servable import load_servable

    ids_in = np.array([[0, 9], [3, 3], [10, -1]], np.int64)
    table = trained.table.get_weights()[0]
    padded = np.concatenate([table, np.zeros((1, 3), np.float32)])  # misses -> default 0.0
    rows = np.where((ids_in >= 0) & (ids_in < 10), ids_in, 10)
    kernel, bias = trained.out.get_weights()
    want = padded[rows].sum(axis=1) @ kernel + bias
    got = load_servable(result.version_dir).run({"ids": ids_in})
    np.testing.assert_allclose(next(iter(got.values())), want, rtol=1e-5, atol=1e-5)
    # An inference model bound to another model name is refused.
    with pytest.raises(ConfigError, match="bound to model 'sub'"):
        export_for_serving(trained, tmp_path / "repo", "other", tables="embedded",
                           inference_model=inference)


def test_keys_from_vectors_export_embedded(tmp_path):
    """What the external placement refuses (keys computed from another table's vectors) the
    embedded placement holds: the whole graph runs as native TF ops."""
    from keras_hps.servable import load_servable

    model = _keys_from_vectors_model()
    result = export_for_serving(model, tmp_path / "repo", "chain", tables="embedded")
    ids = np.arange(9, dtype=np.int64).reshape(9, 1)
    got = next(iter(load_servable(result.version_dir).run({"ids": ids}).values()))
    np.testing.assert_allclose(got, model.predict(ids, verbose=0), rtol=1e-5, atol=1e-5)
