"""`keras-hps export` from the command line, in a fresh process as a user runs it: custom
classes through --custom-module, and a load failure as one line naming the class."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

import export_models  # noqa: E402

from keras_hps.servable import load_servable  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _export(*args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH="")
    return subprocess.run([sys.executable, "-m", "keras_hps.cli", "export", *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_custom_classes_need_their_module(tmp_path):
    keras.utils.set_random_seed(3)
    model = export_models.custom_layer_table()
    path = tmp_path / "tower.keras"
    model.save(path)
    repo = tmp_path / "repo"
    common = [str(path), "--repo", str(repo), "--name", "tower", "--tables", "embedded",
              "--quiet"]
    failed = _export(*common, cwd=str(tmp_path))
    assert failed.returncode == 1
    lines = [ln for ln in failed.stderr.splitlines() if ln.startswith("keras-hps export")]
    assert len(lines) == 1, failed.stderr[-2000:]
    assert "class 'ItemTower' is not registered" in lines[0]
    assert "--custom-module" in lines[0]
    assert not repo.exists()
    # A missing module is one line too.
    missing = _export(*common, "--custom-module", "no_such_module_xyz", cwd=str(tmp_path))
    assert missing.returncode == 1
    assert "--custom-module no_such_module_xyz: cannot import it: ModuleNotFoundError" in \
        missing.stderr
    # By file path (the module lives outside the working directory and sys.path).
    ok = _export(*common, "--custom-module", os.path.join(HERE, "export_models.py"),
                 cwd=str(tmp_path))
    assert ok.returncode == 0, ok.stderr[-2000:]
    ids = np.random.default_rng(0).integers(0, 21, (5, 3)).astype(np.int64)
    got = load_servable(repo / "tower" / "1").run({"ids": ids})["score"]
    np.testing.assert_allclose(got, model.predict(ids, verbose=0), rtol=1e-5, atol=1e-5)
