"""`keras-hps update` without Redis: it appends to the table's update log, a running server
applies the rows within its poll interval, and bad input is one line and changes nothing.
(With Redis: tests/test_serving_redis.py, against two running `keras-hps serve`.)"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from update_checks import encoded_rows

from keras_hps import cli
from keras_hps.formats import write_hdf5_table, write_hps_table
from keras_hps.parameter_server import ParameterServer
from keras_hps.update_log import log_path

DIM = 4


@pytest.fixture
def deployed(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HPS_GPU_TIER", "off")
    keys = np.arange(1, 201, dtype=np.int64)
    write_hdf5_table(tmp_path / "t.h5", keys, encoded_rows(keys, 0, DIM))
    config = tmp_path / "hps.json"
    config.write_text(json.dumps({"models": [{
        "model": "m", "sparse_files": ["t.h5"], "embedding_table_names": ["items"],
        "embedding_vecsize_per_table": [DIM],
        "maxnum_catfeature_query_per_table_per_sample": [300]}]}))
    with ParameterServer(config, update_poll_s=0.02) as ps:  # the running server
        yield tmp_path, config, ps


def _wait_for(ps, keys, want, timeout=5.0) -> float:
    t0 = time.monotonic()
    while not np.array_equal(ps.lookup("m", 0, keys), want):
        assert time.monotonic() - t0 < timeout, "the running server never applied the update"
        time.sleep(0.005)
    return time.monotonic() - t0


def test_update_reaches_a_running_server_and_later_ones(deployed, capsys):
    folder, config, ps = deployed
    keys = np.array([3, 5, 250, 3], np.int64)  # 250: new; 3 twice: the last row wins
    rows = encoded_rows(keys, np.array([1, 1, 1, 2]), DIM)
    np.savez(folder / "rows.npz", keys=keys, vectors=rows)
    assert cli.main(["update", "--config", str(config), "--model", "m", "--table", "items",
                     "--npz", str(folder / "rows.npz")]) == 0
    out = capsys.readouterr().out
    assert "updated 4 rows of m/items" in out and str(log_path(folder / "t.h5")) in out
    want = encoded_rows(np.array([3, 5, 250]), np.array([2, 1, 1]), DIM)
    assert _wait_for(ps, np.array([3, 5, 250]), want) < 2.0
    # a table file as the source, the table by id, in several log records
    more = np.arange(10, 20, dtype=np.int64)
    write_hps_table(folder / "more", more, encoded_rows(more, 5, DIM))
    assert cli.main(["update", "--config", str(config), "--model", "m", "--table", "0",
                     "--table-file", str(folder / "more"), "--batch-rows", "3"]) == 0
    _wait_for(ps, more, encoded_rows(more, 5, DIM))
    with ParameterServer(config) as later:  # started after: replays the log
        np.testing.assert_array_equal(later.lookup("m", 0, np.r_[3, 5, 250, more]),
                                      np.concatenate([want, encoded_rows(more, 5, DIM)]))


@pytest.mark.parametrize(("argv", "message"), [
    (["--table", "nope", "--npz", "{f}/rows.npz"], "model 'm' has no table 'nope'"),
    (["--table", "7", "--npz", "{f}/rows.npz"], "no table 7"),
    (["--table", "0", "--npz", "{f}/bad_dim.npz"], r"shape [2, 4]"),
    (["--table", "0", "--npz", "{f}/no_vectors.npz"], "no array 'vectors'"),
    (["--table", "0", "--npz", "{f}/float_keys.npz"], "update keys must be integers"),
    (["--table", "0", "--npz", "{f}/missing.npz"], "missing.npz"),
    (["--table", "0", "--npz", "{f}/hps.json"], "not a readable .npz"),
    (["--table", "0", "--npz", "{f}/rows.npz", "--batch-rows", "0"], "--batch-rows"),
])
def test_bad_input_is_one_line_and_writes_nothing(deployed, capsys, argv, message):
    folder, config, ps = deployed
    np.savez(folder / "rows.npz", keys=np.array([1, 2]), vectors=np.ones((2, DIM)))
    np.savez(folder / "bad_dim.npz", keys=np.array([1, 2]), vectors=np.ones((2, DIM + 1)))
    np.savez(folder / "no_vectors.npz", keys=np.array([1, 2]))
    np.savez(folder / "float_keys.npz", keys=np.array([1.0, 2.0]), vectors=np.ones((2, DIM)))
    argv = [a.format(f=folder) for a in argv]
    code = cli.main(["update", "--config", str(config), "--model", "m", *argv])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("keras-hps update: error: ") and err.count("\n") == 1
    assert message in err
    assert not log_path(folder / "t.h5").exists()
    np.testing.assert_array_equal(ps.lookup("m", 0, [1, 2]), encoded_rows(np.array([1, 2]), 0,
                                                                           DIM))
