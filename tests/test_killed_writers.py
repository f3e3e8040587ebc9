"""`keras-hps export` and `keras-hps convert` SIGKILLed at the steps where a kill is the
hardest to survive, and at seeded random moments while they write: a server (and
`load_servable`) then sees the repository's old state or its new one, every file a server
reads names only published things, and the next run finishes or undoes the killed one and
leaves no stranded file."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from serving_models import ServeProcess, free_port

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")

from keras_hps.convert import convert  # noqa: E402
from keras_hps.export import export_for_serving  # noqa: E402
from keras_hps.export import repository as repo_files  # noqa: E402
from keras_hps.formats import open_table, write_hps_table  # noqa: E402
from keras_hps.servable import load_servable  # noqa: E402

HERE = Path(__file__).parent
ROWS, DIM = 400, 8
# kill_at.py's points: in the table writes, the journal written, the tables published but not
# the version, the version published but not listed, half listed, listed but the journal not
# removed; then random moments
EXPORT_POINTS = ["table-file", "journal", "tables-renamed", "version-renamed", "hps-json",
                 "models-config"]
RANDOM_EXPORTS = 2
PARALLEL = 3  # kill trials running at once
SEED = 20241207


def _model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    ids = keras.Input(shape=(2,), dtype="int64", name="ids")
    x = keras.layers.Flatten()(keras.layers.Embedding(ROWS, DIM, name="table")(ids))
    return keras.Model(ids, keras.layers.Dense(1, name="out")(x))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Version 1's model (in a repository already exported) and the model the killed
    exports write as version 2, with a batch of ids and each model's answer to it, and how
    long the export took."""
    root = tmp_path_factory.mktemp("killed")
    old, new = _model(1), _model(2)
    new.save(root / "new.keras")
    began = time.monotonic()
    export_for_serving(old, root / "base", "m", tables="external")
    seconds = time.monotonic() - began  # about what an export's writing takes here
    ids = np.random.default_rng(0).integers(0, ROWS, size=(16, 2)).astype(np.int64)
    answers = {"old": np.asarray(old(ids)), "new": np.asarray(new(ids))}
    return root, ids, answers, seconds


def _kill_run(point: str, args: list[str], delay: float | None = None
              ) -> tuple[str, int, float]:
    """Runs `kill_at.py POINT keras-hps ARGS`; for "window" with a `delay`, SIGKILLs it
    `delay` seconds after it starts writing. Returns its output, its return code and the
    seconds from the start of the writing to its end."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([sys.executable, str(HERE / "kill_at.py"), point, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    lines: list[str] = []
    began = None
    for line in proc.stdout:
        if "KILL-WINDOW" in line and began is None:
            began = time.monotonic()
            if delay is not None:
                threading.Timer(delay, lambda: proc.poll() is None and proc.kill()).start()
        lines.append(line)
    code = proc.wait()
    return "".join(lines), code, 0.0 if began is None else time.monotonic() - began


def _random_delays(args: list[str], rng: np.random.Generator, count: int) -> list[float]:
    """`count` moments, uniform over the writing of `keras-hps ARGS` as one run of it (not
    killed) takes here."""
    output, code, seconds = _kill_run("window", args)
    assert code == 0, output
    return rng.uniform(0.0, seconds, size=count).tolist()


def _hidden(root: Path) -> list[str]:
    """Hidden names anywhere under `root`, but the repository's lock file."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*")
                  if p.name != repo_files.LOCK_FILE)


def _check_repository(repo: Path, ids: np.ndarray, answers: dict, published: bool) -> list[int]:
    """What a server reading `repo` finds: models.config lists m with version 1 (the old
    state) or 1 and 2 (the new one) and nothing that is not published; hps.json names the
    tables of a published version; every version loads and answers as its model does.
    Returns the versions."""
    config = repo_files.read_models_config(str(repo / "models.config"))
    assert [c.name for c in config.model_config_list.config] == ["m"]
    versions = repo_files.versions(str(repo / "m"))
    if published:
        assert versions[:2] == [1, 2], versions
    else:
        assert versions in ([1], [1, 2]), versions
    hps = json.loads((repo / "hps.json").read_text())
    (entry,) = hps["models"]
    for f in entry["sparse_files"]:
        model, version = Path(f).parts[1:3]
        assert (repo / f).exists() and int(version) in versions, f
    for version in versions:
        servable = load_servable(str(repo / "m" / str(version)))
        try:
            out = servable.run({"ids": ids})
        finally:
            servable.close()
        want = answers["old" if version == 1 else "new"]
        np.testing.assert_allclose(next(iter(out.values())), want, rtol=1e-5, atol=1e-6)
    return versions


def _check_after_rerun(repo: Path, ids: np.ndarray, answers: dict) -> None:
    versions = _check_repository(repo, ids, answers, published=True)
    assert _hidden(repo) == []
    assert sorted(int(v) for v in os.listdir(repo / "tables" / "m")) == versions
    hps = json.loads((repo / "hps.json").read_text())
    assert all(Path(f).parts[2] == str(versions[-1]) for f in hps["models"][0]["sparse_files"])


def test_killed_exports_leave_the_old_or_the_new_repository(models, caplog):
    root, ids, answers, seconds = models
    rng = np.random.default_rng(SEED)
    trials = EXPORT_POINTS + ["window"] * RANDOM_EXPORTS
    delays = [None] * len(EXPORT_POINTS) + rng.uniform(0, seconds, RANDOM_EXPORTS).tolist()
    repos = []
    for i, point in enumerate(trials):
        repo = root / f"export-{i}-{point}"
        shutil.copytree(root / "base", repo)
        config = str(repo / "models.config")  # base_path: the copy's own model folder
        repo_files.write_text_atomically(
            config, repo_files.models_config_with(config, "m", str(repo / "m")))
        repos.append(repo)
    with ThreadPoolExecutor(PARALLEL) as pool:
        runs = list(pool.map(
            lambda t: _kill_run(t[0], ["export", str(root / "new.keras"), "--repo", str(t[1]),
                                       "--name", "m", "--quiet"], t[2]),
            zip(trials, repos, delays, strict=True)))
    for point, repo, (output, code, _) in zip(trials, repos, runs, strict=True):
        assert code in (-signal.SIGKILL, 0), (point, output)  # 0: finished before the kill
        if point != "window":
            assert code == -signal.SIGKILL, (point, output)
        versions = _check_repository(repo, ids, answers, published=False)
        if point in ("journal", "tables-renamed"):
            assert versions == [1]
        if point == "version-renamed":  # published, not listed yet: a real server serves it
            assert versions == [1, 2]
            _check_served(repo, ids, answers["new"])
        left = _hidden(repo)
        assert point == "window" or left, point
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            export_for_serving(str(root / "new.keras"), repo, "m")  # the rerun
        assert ("killed" in caplog.text) == bool(left), (point, left, caplog.text)
        _check_after_rerun(repo, ids, answers)


def _check_served(repo: Path, ids: np.ndarray, want: np.ndarray) -> None:
    """`keras-hps serve` on the repository serves version 2, from version 2's tables."""
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from keras_hps.serving.tensors import from_proto, to_proto

    port = free_port()
    with ServeProcess(f"--port={port}", "--host=127.0.0.1",
                      f"--model_config_file={repo / 'models.config'}",
                      "--file_system_poll_wait_seconds=0") as serve:
        assert "model m version 2: AVAILABLE" in serve.output, serve.output
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "m"
            request.inputs["ids"].CopyFrom(to_proto(ids))
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                request, timeout=60)
    assert response.model_spec.version.value == 2
    np.testing.assert_allclose(from_proto(next(iter(response.outputs.values()))), want,
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- convert --force
CONVERT_POINTS = ["staged", "swapped", "aside"]
RANDOM_CONVERTS = 4


def _table(seed: int, rows: int = 400_000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(10 * rows, rows, replace=False)), rng.random((rows, 32), "f4")


def _same_table(path: Path, keys: np.ndarray, vectors: np.ndarray) -> bool:
    with open_table(path) as t:
        got_keys, got_vectors = t.in_key_order()
        return bool(np.array_equal(got_keys, keys) and np.array_equal(np.asarray(got_vectors),
                                                                       vectors))


@pytest.mark.parametrize("dst_name", ["table", "table.h5"])
def test_killed_convert_force_keeps_the_old_or_the_new_table(tmp_path, caplog, dst_name):
    """`keras-hps convert SRC DST --force` onto an HPS directory or an HDF5 file, killed at
    each step and at random moments: DST is the old table or the new one, never missing
    (where the file system swaps two names in one step, as Linux's do); the rerun removes
    what the kill left (with a warning) and publishes the new table. Without the swap
    ("aside"), a kill between the two renames leaves the old table under a hidden name,
    and the rerun puts it back first."""
    new_keys, new_vectors = _table(1)
    old_keys, old_vectors = _table(2, rows=20_000)
    src = tmp_path / "src"
    write_hps_table(src, new_keys, new_vectors)
    points = CONVERT_POINTS if dst_name == "table" else ["staged"]
    args = ["convert", str(src), str(tmp_path / f"measure-{dst_name}"), "--quiet"]
    delays = _random_delays(args, np.random.default_rng(SEED), RANDOM_CONVERTS)
    for i, (point, delay) in enumerate(zip(points + ["window"] * RANDOM_CONVERTS,
                                           [None] * len(points) + delays, strict=True)):
        folder = tmp_path / f"{i}-{point}"
        folder.mkdir()
        dst = folder / dst_name
        if dst_name.endswith(".h5"):
            from keras_hps.formats import write_hdf5_table

            write_hdf5_table(dst, old_keys, old_vectors)
        else:
            write_hps_table(dst, old_keys, old_vectors)
        output, code, _ = _kill_run(point, ["convert", str(src), str(dst), "--force",
                                            "--quiet"], delay)
        assert code in (-signal.SIGKILL, 0), (point, output)
        if point != "window":
            assert code == -signal.SIGKILL, (point, output)
        if point == "aside":  # no RENAME_EXCHANGE: the old table waits under a hidden name
            (aside,) = folder.glob(f".{dst_name}.old-*")
            assert not dst.exists() and _same_table(aside, old_keys, old_vectors)
        else:
            old = _same_table(dst, old_keys, old_vectors)
            assert old or _same_table(dst, new_keys, new_vectors), point
            assert old == (point != "swapped") or point == "window", point
        left = _hidden(folder)
        assert point == "window" or left, point
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            convert(src, dst, overwrite=True)  # the rerun
        assert ("killed" in caplog.text) == bool(left), (point, left, caplog.text)
        assert ("put back" in caplog.text) == (point == "aside"), caplog.text
        assert _same_table(dst, new_keys, new_vectors)
        assert _hidden(folder) == []
