"""The export matrix: every model shape of tests/export_models.py, trained briefly, exported
in both placements (or refused by a message naming the layer), and checked on fresh inputs.

- embedded: loaded in a fresh process that imports only TensorFlow (as stock TF Serving
  would see it), the predictions equal the trained model's to 1e-5, and the graph has no
  op outside TensorFlow's registry and no PyFunc;
- external: run the way the keras-hps server runs it (keys step, parameter-server lookups,
  dense part: `keras_hps.external`), the predictions equal the trained model's.

Every model is exported once per placement (module-scoped fixture) and the fresh process
loads all embedded versions in one go.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import traceback

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("keras_rs")

from export_models import CASES, saved_model_ops  # noqa: E402
from tensorflow.python.framework import op_def_registry  # noqa: E402

from keras_hps.errors import ConfigError  # noqa: E402
from keras_hps.export import export_for_serving  # noqa: E402
from keras_hps.parameter_server import ParameterServer  # noqa: E402
from keras_hps.servable import load_servable  # noqa: E402

ROWS = 23  # fresh rows per case
PLACEMENTS = ("embedded", "external")


def _tensors(inputs):
    """Inputs as tensors (Keras takes string inputs as tf.string tensors only)."""
    return {k: tf.constant(v) for k, v in inputs.items()}


def _predict(model, inputs):
    inputs = _tensors(inputs)
    if isinstance(model, keras.Sequential):
        return model(next(iter(inputs.values())), training=False)
    if isinstance(model.input, dict):
        return model(inputs, training=False)
    if len(model.inputs) == 1:
        return model(next(iter(inputs.values())), training=False)
    return model([inputs[t._keras_history.operation.name] for t in model.inputs],
                 training=False)


def _as_dict(result, names):
    if isinstance(result, dict):
        return {k: np.asarray(v, np.float32) for k, v in result.items()}
    flat = keras.tree.flatten(result)
    return {n: np.asarray(v, np.float32) for n, v in zip(names, flat, strict=True)}


def _train(model, case, rng):
    """A short fit on inputs from the same generator (so the export sees a trained model
    with optimizer state); the evaluation inputs are drawn afterwards."""
    x = _tensors(case.inputs(rng, 32))
    y = keras.tree.map_structure(lambda v: np.asarray(v, np.float32) + 1.0, _predict(model, x))
    if isinstance(model, keras.Sequential) or not isinstance(model.input, dict):
        x = [x[n] for n in (t._keras_history.operation.name for t in model.inputs)]
        x = x[0] if len(x) == 1 else x
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    repo = root / "repo"
    out = {}
    for name, case in CASES.items():
        keras.utils.set_random_seed(len(name))
        rng = np.random.default_rng(len(name))
        model = case.build()
        _train(model, case, rng)
        inputs = case.inputs(rng, ROWS)
        entry = {"model": model, "inputs": inputs, "results": {}, "errors": {}}
        for placement in PLACEMENTS:
            try:
                entry["results"][placement] = export_for_serving(
                    model, repo, f"{name}_{placement}", tables=placement, warmup_records=1,
                    **case.export)
            except Exception as e:  # noqa: BLE001 - each case reports its own failure
                entry["errors"][placement] = e
        sig_outputs = None
        if "embedded" in entry["results"]:
            vdir = entry["results"]["embedded"].version_dir
            np.savez(root / f"{name}.npz", **{k: v.astype("S") if v.dtype == object else v
                                              for k, v in case.request(inputs).items()})
            sig_outputs = vdir
        entry["vdir"] = sig_outputs
        out[name] = entry
    return root, repo, out


@pytest.fixture(scope="module")
def fresh_process(matrix):
    """Run every embedded version in one process that imports only TensorFlow."""
    root, _, entries = matrix
    jobs = {name: e["vdir"] for name, e in entries.items() if e["vdir"]}
    script = textwrap.dedent(f"""
        import sys, numpy as np, tensorflow as tf
        root, jobs = {str(root)!r}, {jobs!r}
        for name, vdir in jobs.items():
            fn = tf.saved_model.load(vdir).signatures["serving_default"]
            data = np.load(f"{{root}}/{{name}}.npz")
            out = fn(**{{k: tf.constant(data[k]) for k in data.files}})
            np.savez(f"{{root}}/{{name}}.out.npz",
                     **{{k: tf.cast(v, tf.float32).numpy() for k, v in out.items()}})
        assert not [m for m in sys.modules if m.startswith(("keras_hps", "keras_rs"))], "imported"
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, env=env, cwd=str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return jobs


def _reference(entry, names):
    return _as_dict(_predict(entry["model"], entry["inputs"]), names)


@pytest.mark.parametrize("name", sorted(CASES))
def test_embedded_in_a_tensorflow_only_process(matrix, fresh_process, name):
    root, _, entries = matrix
    entry = entries[name]
    error = entry["errors"].get("embedded")
    assert error is None, "".join(traceback.format_exception(error))
    got = dict(np.load(root / f"{name}.out.npz"))
    want = _reference(entry, sorted(got))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)
    ops = saved_model_ops(fresh_process[name])
    assert not ops & {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
    unknown = [op for op in ops if op_def_registry.get(op) is None]
    assert not unknown, unknown
    assert {"LowerBound", "ResourceGather"} <= ops  # searchsorted + gather over variables


@pytest.mark.parametrize("name", sorted(CASES))
def test_external_run_as_the_server_runs_it(matrix, name):
    _, repo, entries = matrix
    entry = entries[name]
    refusal = CASES[name].refused.get("external")
    if refusal is not None:
        error = entry["errors"]["external"]
        assert isinstance(error, ConfigError), error
        assert str(error).count("\n") == 0
        assert refusal in str(error)
        return
    error = entry["errors"].get("external")
    assert error is None, "".join(traceback.format_exception(error))
    ps = ParameterServer(os.path.join(repo, "hps.json"))
    try:
        runner = load_servable(entry["results"]["external"].version_dir, ps)
        outputs = runner.run(CASES[name].request(entry["inputs"]))
        got = {k: np.asarray(v, np.float32) for k, v in outputs.items()}
        want = _reference(entry, sorted(got))
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)
    finally:
        ps.close()


def test_external_takes_any_batch_the_embedded_takes(matrix):
    """2,500 rows (hps.json's max_batch_size is 1024): the external version looks the keys
    up in pieces and answers what the embedded version answers."""
    _, repo, entries = matrix
    entry = entries["dlrm_slices"]
    rng = np.random.default_rng(99)
    inputs = CASES["dlrm_slices"].inputs(rng, 2500)
    embedded = load_servable(entry["results"]["embedded"].version_dir).run(inputs)
    ps = ParameterServer(os.path.join(repo, "hps.json"))
    try:
        spec = ps.table_spec("dlrm_slices_external", 0)
        assert spec.max_keys_per_lookup < 2500
        external = load_servable(entry["results"]["external"].version_dir, ps).run(inputs)
        np.testing.assert_allclose(external["score"], embedded["score"],
                                   rtol=1e-5, atol=1e-5)
    finally:
        ps.close()


def test_keys_step_and_manifest(matrix):
    """The DLRM version's keys step takes the public inputs and returns one key tensor per
    sliced feature; the dense part reads the dense input directly."""
    _, _, entries = matrix
    vdir = entries["dlrm_slices"]["results"]["external"].version_dir
    manifest = json.loads(open(os.path.join(vdir, "keras_hps_manifest.json")).read())
    assert manifest["format_version"] == 2
    assert manifest["keys_step"] == {"signature": "keras_hps_keys"}
    assert [lk["keys"] for lk in manifest["lookups"]] == [f"hps_keys_{i}" for i in range(4)]
    loaded = tf.saved_model.load(vdir)
    keys_fn = loaded.signatures["keras_hps_keys"]
    assert set(keys_fn.structured_input_signature[1]) == {"cat", "dense"}
    cat = np.arange(12, dtype=np.int64).reshape(3, 4)
    out = keys_fn(cat=tf.constant(cat), dense=tf.zeros((3, 3)))
    for i in range(4):
        np.testing.assert_array_equal(out[f"hps_keys_{i}"].numpy(), cat[:, i])
    dense_inputs = set(loaded.signatures["serving_default"].structured_input_signature[1])
    assert dense_inputs == {"dense"} | {f"hps_lookup_{i}" for i in range(4)}
    # Direct key inputs keep format 1 (readable by older servers).
    vdir1 = entries["dict_two_tables"]["results"]["external"].version_dir
    manifest1 = json.loads(open(os.path.join(vdir1, "keras_hps_manifest.json")).read())
    assert manifest1["format_version"] == 1
    assert {lk["input"] for lk in manifest1["lookups"]} == {"user", "items"}


def test_keys_computed_once_for_the_dense_part(matrix):
    """index_as_feature: the StringLookup index feeds the table and a dense feature; the
    dense part reads it from the keys step instead of looking the strings up again."""
    _, _, entries = matrix
    vdir = entries["index_as_feature"]["results"]["external"].version_dir
    loaded = tf.saved_model.load(vdir)
    dense_inputs = set(loaded.signatures["serving_default"].structured_input_signature[1])
    assert dense_inputs == {"hps_keys_0", "hps_lookup_0"}


def test_warmup_and_inspect_of_a_keys_step_version(matrix, capsys):
    """The warmup requests (empty strings for string inputs) run through the keys step, and
    `keras-hps inspect` shows the public signature: the trained model's string input."""
    from keras_hps.cli import main
    from keras_hps.export.warmup import read_warmup

    _, repo, entries = matrix
    vdir = entries["string_lookup"]["results"]["external"].version_dir
    ps = ParameterServer(os.path.join(repo, "hps.json"))
    try:
        runner = load_servable(vdir, ps)
        for request in read_warmup(vdir):
            assert request["words"].dtype == object
            assert runner.run(request)["score"].shape == (len(request["words"]), 1)
    finally:
        ps.close()
    assert main(["inspect", str(repo)]) == 0
    out = capsys.readouterr().out
    block = out[out.index("model string_lookup_external"):]
    assert "placement external" in block.splitlines()[1]
    assert ("signature serving_default: (dense: float32[?,1], words: object[?,2]) -> "
            "(score: float32[?,1])") in block
