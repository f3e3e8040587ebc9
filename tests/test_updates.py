"""Online updates without Redis: `ParameterServer.update` goes through the table's durable
update log; every tier of the server (GPU tier under the interpreter, a partial host tier,
the table file) answers the new rows once `update` returns, another server on the machine
after its poll interval, and a restarted server still does."""

from __future__ import annotations

import os

import numpy as np
import pytest
from update_checks import encoded_rows, final_rows, updates_under_load

from keras_hps.errors import InvalidInputError, NotFoundError
from keras_hps.formats import write_hdf5_table
from keras_hps.parameter_server import ParameterServer
from keras_hps.update_log import log_path, replay_updates

DIM = 4
ROWS = 400
# the GPU tier's setting for the server with a GPU tier: Triton's interpreter on the CPU here;
# KERAS_HPS_TEST_GPU_TIER=auto runs the same test on a CUDA device
GPU_TIER = os.environ.get("KERAS_HPS_TEST_GPU_TIER", "interpret")


def _config(path, **model):
    return {"models": [{"model": "m", "sparse_files": [str(path)],
                        "embedding_vecsize_per_table": [DIM],
                        "maxnum_catfeature_query_per_table_per_sample": [1024],
                        "max_batch_size": 1, "gpucacheper": 0.5, **model}],
            # a partial host tier: most keys are read from the table file
            "volatile_db": {"overflow_margin": 150, "initial_cache_rate": 0.1}}


@pytest.fixture
def table(tmp_path):
    keys = np.arange(1, ROWS + 1, dtype=np.int64)
    path = tmp_path / "t.h5"
    write_hdf5_table(path, keys, encoded_rows(keys, 0, DIM))
    return path, keys


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_updates_reach_every_tier_and_survive_a_restart(table, monkeypatch, mode):
    path, keys = table
    universe = np.arange(1, ROWS + 60, dtype=np.int64)  # 59 keys the table file lacks
    monkeypatch.setenv("KERAS_HPS_GPU_TIER", GPU_TIER)
    a = ParameterServer(_config(path, embedding_cache_type=mode))
    monkeypatch.setenv("KERAS_HPS_GPU_TIER", "off")
    b = ParameterServer(_config(path), update_poll_s=0.02)  # another server on the machine
    assert a.table("m", 0).gpu is not None and b.table("m", 0).gpu is None
    history, checked = updates_under_load([a, b], universe, keys, 150, DIM, batch=32, seed=1,
                                          delays={0: 0.0, 1: 5.0})
    assert checked > 1000
    want = final_rows(history, universe, DIM)
    np.testing.assert_array_equal(a.lookup("m", 0, universe), want)
    np.testing.assert_array_equal(b.lookup("m", 0, universe), want)
    # the GPU tier holds the rows it fetched last (under load, updates may have dropped every
    # earlier insert): asked again, it answers some of them itself, with the final rows
    np.testing.assert_array_equal(a.lookup("m", 0, universe), want)
    assert a.stats("m", 0)["gpu"]["hits"] > 0
    a.close()
    b.close()
    # the log holds every update, fsynced; a restarted server replays it into every tier
    assert sum(1 for _ in replay_updates(log_path(path), DIM)) == 150
    monkeypatch.setenv("KERAS_HPS_GPU_TIER", GPU_TIER)
    with ParameterServer(_config(path, embedding_cache_type=mode)) as c:
        np.testing.assert_array_equal(c.lookup("m", 0, universe), want)
        np.testing.assert_array_equal(c.lookup("m", 0, universe[::-1]), want[::-1])


def test_bad_updates_are_one_line_errors_and_change_nothing(table, monkeypatch):
    path, keys = table
    monkeypatch.setenv("KERAS_HPS_GPU_TIER", "off")
    with ParameterServer(_config(path)) as ps:
        before = ps.lookup("m", 0, keys[:5])
        for bad_keys, bad_rows, message in [
            (np.array([1.5]), np.zeros((1, DIM)), "update keys must be integers"),
            (np.array([1, 2]), np.zeros((2, DIM + 1)), r"shape \[2, 4\]"),
            (np.array([1, 2]), np.zeros((3, DIM)), r"shape \[2, 4\]"),
            (np.array([1]), np.array([["a"] * DIM]), "numbers"),
        ]:
            with pytest.raises(InvalidInputError, match=message) as e:
                ps.update("m", 0, bad_keys, bad_rows)
            assert "\n" not in str(e.value) and "model 'm' table 0" in str(e.value)
        with pytest.raises(NotFoundError):
            ps.update("m", 3, keys[:1], np.zeros((1, DIM)))
        assert not log_path(path).exists()  # nothing was written
        np.testing.assert_array_equal(ps.lookup("m", 0, keys[:5]), before)
        ps.update("m", 0, [7, 7, 8], encoded_rows(np.array([7, 7, 8]), np.array([1, 2, 1]), DIM))
        np.testing.assert_array_equal(ps.lookup("m", 0, [7, 8])[:, 0], [7002, 8001])
    cfg = {**_config(path), "supportlonglong": False}
    with ParameterServer(cfg) as ps, pytest.raises(InvalidInputError, match="outside the key"):
        ps.update("m", 0, [2**33], np.zeros((1, DIM)))
