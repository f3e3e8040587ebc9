"""End to end: train a small two-table model, export it both ways, serve both, compare.

The embedded export is checked in a fresh Python process that never imports keras_hps
(plain tf.saved_model.load), as stock TF Serving would see it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from google.protobuf import text_format  # noqa: E402
from tensorflow_serving.config import model_server_config_pb2  # noqa: E402

from keras_hps.config import load_config  # noqa: E402
from keras_hps.export import export_for_serving  # noqa: E402
from keras_hps.export.warmup import read_warmup  # noqa: E402
from keras_hps.parameter_server import ParameterServer  # noqa: E402
from keras_hps.servable import load_servable  # noqa: E402

USERS, ITEMS, DIM_U, DIM_I, BAG = 40, 60, 8, 4, 3
DEFAULTS = {"emb_user": 0.0, "emb_item": 0.25}


def _two_table_model() -> keras.Model:
    user = keras.Input(shape=(1,), dtype="int64", name="user")
    items = keras.Input(shape=(BAG,), dtype="int64", name="items")
    dense = keras.Input(shape=(2,), name="dense")
    eu = keras.layers.Flatten()(keras.layers.Embedding(USERS, DIM_U, name="emb_user")(user))
    ei = keras.layers.GlobalAveragePooling1D()(
        keras.layers.Embedding(ITEMS, DIM_I, name="emb_item")(items)
    )
    x = keras.layers.Concatenate()([eu, ei, dense])
    x = keras.layers.Dense(8, activation="relu", name="hidden")(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="ctr")(x)
    return keras.Model({"user": user, "items": items, "dense": dense}, out)


def _batch(rng, n):
    return {
        "user": rng.integers(0, USERS, (n, 1)).astype(np.int64),
        "items": rng.integers(0, ITEMS, (n, BAG)).astype(np.int64),
        "dense": rng.standard_normal((n, 2)).astype(np.float32),
    }


def _numpy_forward(model, user_vecs, item_vecs, dense):
    """The trained model's forward pass in NumPy, from per-sample looked-up vectors."""
    w1, b1 = model.get_layer("hidden").get_weights()
    w2, b2 = model.get_layer("ctr").get_weights()
    x = np.concatenate([user_vecs.reshape(len(dense), -1), item_vecs.mean(axis=1), dense], 1)
    h = np.maximum(x @ w1 + b1, 0)
    return 1 / (1 + np.exp(-(h @ w2 + b2)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(7)
    model = _two_table_model()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    train = _batch(rng, 256)
    model.fit(train, rng.integers(0, 2, (256, 1)).astype(np.float32), batch_size=64,
              epochs=1, verbose=0)
    # Item rows serve hashed keys (row i -> item_keys[i]); user rows serve their row index.
    item_keys = rng.choice(2**40, size=ITEMS, replace=False).astype(np.int64) + 2**33
    repo = tmp_path_factory.mktemp("export") / "repo"
    common = dict(keys={"emb_item": item_keys}, default_value=DEFAULTS)
    emb = export_for_serving(model, repo, "ctr_embedded", tables="embedded", **common)
    ext = export_for_serving(model, repo, "ctr_external", tables="external", **common)
    return model, item_keys, repo, emb, ext


def _query(rng, n, item_keys):
    """A raw-key request and the row-index inputs the trained model takes for it."""
    rows = _batch(rng, n)
    raw = dict(rows, items=item_keys[rows["items"]])
    return rows, raw


def test_embedded_in_fresh_process_without_keras_hps(exported, tmp_path):
    model, item_keys, _, emb, _ = exported
    rows, raw = _query(np.random.default_rng(1), 33, item_keys)
    want = model.predict(rows, verbose=0)
    np.savez(tmp_path / "in.npz", **raw)
    script = textwrap.dedent(f"""
        import sys, numpy as np, tensorflow as tf
        from tensorflow.core.protobuf import saved_model_pb2
        from tensorflow.python.framework import op_def_registry
        vdir = {emb.version_dir!r}
        fn = tf.saved_model.load(vdir).signatures["serving_default"]
        data = np.load({str(tmp_path / "in.npz")!r})
        out = fn(**{{k: tf.constant(data[k]) for k in data.files}})
        np.savez({str(tmp_path / "out.npz")!r}, **{{k: v.numpy() for k, v in out.items()}})
        sm = saved_model_pb2.SavedModel()
        sm.ParseFromString(open(vdir + "/saved_model.pb", "rb").read())
        ops = set()
        for mg in sm.meta_graphs:
            ops |= {{n.op for n in mg.graph_def.node}}
            for f in mg.graph_def.library.function:
                ops |= {{n.op for n in f.node_def}}
        unknown = sorted(op for op in ops if op_def_registry.get(op) is None)
        assert not [m for m in sys.modules if m.startswith("keras_hps")]
        print("OPS", ",".join(sorted(ops)))
        print("UNKNOWN", ",".join(unknown))
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) if " " in line else (line, "")
                 for line in proc.stdout.splitlines() if line.startswith(("OPS", "UNKNOWN")))
    ops = set(lines["OPS"].split(","))
    assert lines["UNKNOWN"] == ""
    assert not ops & {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
    assert "LowerBound" in ops and "ResourceGather" in ops, ops  # searchsorted + gather
    got = np.load(tmp_path / "out.npz")["ctr"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_external_through_servable_matches_trained_model(exported):
    model, item_keys, repo, _, ext = exported
    ps = ParameterServer(os.path.join(repo, "hps.json"))
    try:
        servable = load_servable(ext.version_dir, parameter_server=ps)
        assert servable.placement == "external"
        sig = servable.signatures["serving_default"]
        assert set(sig.inputs) == {"user", "items", "dense"} and set(sig.outputs) == {"ctr"}
        assert sig.inputs["items"].dtype == np.int64 and sig.inputs["items"].shape == (None, BAG)
        rng = np.random.default_rng(2)
        for n in (1, 17, 64):
            rows, raw = _query(rng, n, item_keys)
            got = servable.run(raw)["ctr"]
            np.testing.assert_allclose(got, model.predict(rows, verbose=0), rtol=1e-5, atol=1e-5)
        proto = servable.signature_def()
        assert proto.inputs["items"].dtype == tf.int64.as_datatype_enum
        assert "hps_lookup_0" not in proto.inputs
    finally:
        ps.close()


@pytest.mark.parametrize("placement", ["embedded", "external"])
def test_unknown_keys_get_the_default_vector(exported, placement):
    model, item_keys, repo, emb, ext = exported
    ps = ParameterServer(os.path.join(repo, "hps.json"))
    try:
        servable = load_servable((emb if placement == "embedded" else ext).version_dir,
                                 parameter_server=ps)
        rng = np.random.default_rng(3)
        rows, raw = _query(rng, 20, item_keys)
        # Misses: user ids past the table, item keys never exported; duplicates and edge keys.
        raw["user"][:5, 0] = [USERS, -1, 2**62, USERS + 7, USERS]
        raw["items"][5:9] = [[1, 2, item_keys[0]], [item_keys[0]] * 3, [-5, 0, 2**33], [7] * 3]
        u_tab = model.get_layer("emb_user").get_weights()[0]
        i_tab = model.get_layer("emb_item").get_weights()[0]
        row_of = {int(k): i for i, k in enumerate(item_keys)}
        uv = np.array([u_tab[k] if 0 <= k < USERS else np.full(DIM_U, DEFAULTS["emb_user"])
                       for k in raw["user"][:, 0]], np.float32)
        iv = np.array([[i_tab[row_of[int(k)]] if int(k) in row_of
                        else np.full(DIM_I, DEFAULTS["emb_item"]) for k in row]
                       for row in raw["items"]], np.float32)
        want = _numpy_forward(model, uv, iv, raw["dense"])
        np.testing.assert_allclose(servable.run(raw)["ctr"], want, rtol=1e-5, atol=1e-5)
        empty = servable.run({k: v[:0] for k, v in raw.items()})["ctr"]
        assert empty.shape == (0, 1)
    finally:
        ps.close()


def test_repository_files(exported):
    model, item_keys, repo, emb, ext = exported
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((repo / "models.config").read_text(), config)
    entries = {c.name: c for c in config.model_config_list.config}
    assert set(entries) == {"ctr_embedded", "ctr_external"}
    assert entries["ctr_external"].base_path == str(repo / "ctr_external")
    assert entries["ctr_embedded"].model_platform == "tensorflow"
    # hps.json lists only the external model and loads with keras-hps's own config loader.
    ps_config = load_config(str(repo / "hps.json"))
    assert [m.model for m in ps_config.models] == ["ctr_external"]
    m = ps_config.models[0]
    assert m.embedding_vecsize_per_table == (DIM_U, DIM_I)
    assert m.maxnum_catfeature_query_per_table_per_sample == (1, BAG)
    assert m.default_value_for_each_table == (DEFAULTS["emb_user"], DEFAULTS["emb_item"])
    # HPS table directories: key = n int64, emb_vector = n*dim float32, same order.
    tables = {"emb_user": (np.arange(USERS), model.get_layer("emb_user").get_weights()[0]),
              "emb_item": (item_keys, model.get_layer("emb_item").get_weights()[0])}
    for name, (keys, vectors) in tables.items():
        hps_dir = repo / "tables" / "ctr_external" / "1" / name
        n, dim = vectors.shape
        assert os.path.getsize(hps_dir / "key") == n * 8
        assert os.path.getsize(hps_dir / "emb_vector") == n * dim * 4
        np.testing.assert_array_equal(np.fromfile(hps_dir / "key", "<i8"), keys)
        np.testing.assert_array_equal(
            np.fromfile(hps_dir / "emb_vector", "<f4").reshape(n, dim), vectors)
    manifest = json.loads((repo / "ctr_external" / "1" / "keras_hps_manifest.json").read_text())
    assert {lk["input"] for lk in manifest["lookups"]} == {"user", "items"}
    assert not (repo / "ctr_embedded" / "1" / "keras_hps_manifest.json").exists()
    assert not [p for p in os.listdir(repo / "ctr_external") if p.startswith(".")]


def test_warmup_requests_are_valid_requests(exported):
    _, _, repo, emb, ext = exported
    for result in (emb, ext):
        requests = read_warmup(result.version_dir)
        assert len(requests) == 3
        ps = ParameterServer(os.path.join(repo, "hps.json"))
        try:
            servable = load_servable(result.version_dir, parameter_server=ps)
            for inputs in requests:
                assert set(inputs) == {"user", "items", "dense"}
                assert servable.run(inputs)["ctr"].shape == (len(inputs["user"]), 1)
        finally:
            ps.close()


def test_next_version_cli_and_inspect(exported, tmp_path, capsys):
    model, item_keys, repo, _, _ = exported
    from keras_hps.cli import main

    path = tmp_path / "ctr.keras"
    model.save(path)
    np.save(tmp_path / "item_keys.npy", item_keys)
    args = ["export", str(path), "--repo", str(repo), "--name", "ctr_external", "--quiet",
            "--keys", f"emb_item={tmp_path / 'item_keys.npy'}", "--serving-repo-path", "/models"]
    assert main(args) == 0
    assert (repo / "ctr_external" / "2" / "saved_model.pb").exists()
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((repo / "models.config").read_text(), config)
    bases = {c.name: c.base_path for c in config.model_config_list.config}
    assert bases == {"ctr_embedded": str(repo / "ctr_embedded"),
                     "ctr_external": "/models/ctr_external"}
    # The new version serves the same predictions through its own (version 2) tables.
    ps = ParameterServer(os.path.join(repo, "hps.json"))
    try:
        rows, raw = _query(np.random.default_rng(4), 8, item_keys)
        got = load_servable(repo / "ctr_external" / "2", parameter_server=ps).run(raw)["ctr"]
        np.testing.assert_allclose(got, model.predict(rows, verbose=0), rtol=1e-5, atol=1e-5)
    finally:
        ps.close()
    bad = ["export", str(tmp_path / "missing.keras"), "--repo", str(repo), "--name", "x"]
    assert main(bad) == 1
    assert "missing.keras does not exist" in capsys.readouterr().err
    hps = json.loads((repo / "hps.json").read_text())
    assert hps["models"][0]["sparse_files"][0] == "tables/ctr_external/2/emb_user.h5"
    assert main(["inspect", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "model ctr_embedded" in out and "model ctr_external" in out
    assert "versions [1, 2]" in out and "placement external" in out
    assert "placement embedded" in out and "0 emb_user: 40 rows x 8" in out
    assert "items: int64[?,3]" in out


def test_config_files_are_readable_by_others(exported):
    """models.config and hps.json get the mode every other exported file gets (0644 under
    the usual umask), not mkstemp's 0600: a server running as another user reads them."""
    _, _, repo, emb, _ = exported
    umask = os.umask(0o022)
    os.umask(umask)
    want = 0o666 & ~umask
    for name in ("models.config", "hps.json"):
        assert os.stat(repo / name).st_mode & 0o777 == want, name
    warmup = os.path.join(emb.version_dir, "assets.extra", "tf_serving_warmup_requests")
    assert os.stat(warmup).st_mode & 0o777 == want


def test_dissect_prints_a_summary(exported):
    from keras_hps.export import dissect

    model = exported[0]
    text = repr(dissect(model, keys={"emb_item": exported[1]}))
    assert text == ("[EmbeddingTable(table_id=0, layer_name='emb_user', rows=40, dim=8, "
                    "combiner=None), EmbeddingTable(table_id=1, layer_name='emb_item', rows=60, "
                    "dim=4, combiner=None)]")
