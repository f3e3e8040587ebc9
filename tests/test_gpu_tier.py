"""The parameter server's GPU tier, run through the Triton interpreter on CPU
(KERAS_HPS_GPU_TIER=gpu_tier): GPU cache -> host RAM -> HDF5 -> default, against NumPy."""

import numpy as np
import pytest
from served_rows import served

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("h5py")

from keras_hps.errors import ConfigError  # noqa: E402
from keras_hps.formats import write_hdf5_table  # noqa: E402
from keras_hps.gpu_tier import cache_slots, gpu_tier_devices  # noqa: E402
from keras_hps.parameter_server import ParameterServer  # noqa: E402

ROWS, DIM, DEFAULT = 900, 8, 0.25


def _config(path, **model):
    m = {
        "model": "m",
        "sparse_files": [path],
        "embedding_vecsize_per_table": [DIM],
        "maxnum_catfeature_query_per_table_per_sample": [64],
        "default_value_for_each_table": [DEFAULT],
        "max_batch_size": 64,
        "gpucache": True,
        "gpucacheper": 0.05,  # 45 rows -> 64 slots: eight 8-slot sets, so evictions happen
        "hit_rate_threshold": 1.0,
    }
    m.update(model)
    # Host tier holds 30% of the rows at start; the rest comes from the HDF5 cold tier.
    return {"models": [m], "volatile_db": {"initial_cache_rate": 0.3}}


def _reference(keys, vectors, q):
    return served(keys, vectors, q, DEFAULT)


def _batch(rng, keys, n_known, n_unknown, hot=None):
    pool = keys if hot is None else hot
    q = np.concatenate([rng.choice(pool, n_known), rng.integers(-(2**40), 2**40, n_unknown)])
    rng.shuffle(q)
    return q


def test_dynamic_whole_hierarchy_exact_with_evictions(gpu_tier, table):
    path, keys, vectors = table
    rng = np.random.default_rng()
    with ParameterServer(_config(path)) as ps:
        tiered = ps.table("m", 0)
        assert tiered.gpu.mode == "dynamic" and tiered.gpu.slots == 64
        hot = keys[:20]
        for i in range(6):
            q = _batch(rng, keys, 100, 10, hot=hot if i % 2 else None).reshape(10, 11)
            out = ps.lookup("m", 0, q)
            assert out.shape == (10, 11, DIM) and out.dtype == np.float32
            np.testing.assert_array_equal(out, _reference(keys, vectors, q))
        gpu = ps.stats("m", 0)["gpu"]
        assert gpu["hits"] > 0 and gpu["misses"] > 0 and gpu["evictions"] > 0
        assert gpu["resident"] <= gpu["capacity"] == 64
        # The tiers below served the misses: host, HDF5 and defaults all used.
        st = ps.stats("m", 0)
        assert st["cold"]["hits"] > 0 and st["default"]["hits"] > 0
        # Empty batch, and torch in -> torch out.
        assert ps.lookup("m", 0, np.zeros((0, 3), np.int64)).shape == (0, 3, DIM)
        q = _batch(rng, keys, 30, 5)
        tout = ps.lookup("m", 0, torch.from_numpy(q))
        assert isinstance(tout, torch.Tensor)
        np.testing.assert_array_equal(tout.numpy(), _reference(keys, vectors, q))


def test_tinylfu_admission_from_the_config_stays_exact(gpu_tier, table):
    path, keys, vectors = table
    rng = np.random.default_rng()
    with ParameterServer(_config(path, gpu_cache_admission="tinylfu")) as ps:
        tier = ps.table("m", 0).gpu
        assert all(r.cache.admission == "tinylfu" for r in tier._replicas)
        hot = keys[:20]
        for i in range(6):
            q = _batch(rng, keys, 60, 5, hot=hot if i % 3 else None)
            np.testing.assert_array_equal(ps.lookup("m", 0, q), _reference(keys, vectors, q))
        assert sum(r.cache.rejected for r in tier._replicas) > 0
        # The cache's empty-slot key is a valid lookup key: never cached, still exact.
        q = np.array([2**63 - 1, keys[0], 2**63 - 1], dtype=np.int64)
        for _ in range(2):
            np.testing.assert_array_equal(ps.lookup("m", 0, q), _reference(keys, vectors, q))
    with pytest.raises(ConfigError, match="gpu_cache_admission"):
        ParameterServer(_config(path, gpu_cache_admission="sometimes"))


@pytest.mark.parametrize("mode", ["dynamic", "uvm"])
def test_repeated_keys_fetched_once_counted_once(gpu_tier, table, mode):
    """A key repeated in a batch is looked up once: fetched from below once, counted once in
    the GPU tier's hits and misses and in the table's unique keys, and cached once."""
    path, keys, vectors = table
    rng = np.random.default_rng()
    with ParameterServer(_config(path, embedding_cache_type=mode, gpucacheper=0.5)) as ps:
        tier = ps.table("m", 0).gpu
        known = rng.choice(keys, 5, replace=False)
        unknown = np.setdiff1d(rng.integers(-(2**40), 2**40, 3), keys)
        q = np.repeat(np.r_[known, unknown], rng.integers(1, 5, known.size + unknown.size))
        rng.shuffle(q)
        q = q.reshape(1, -1)
        distinct = known.size + unknown.size
        np.testing.assert_array_equal(ps.lookup("m", 0, q), _reference(keys, vectors, q))
        s = tier.stats()
        assert (s["hits"], s["misses"]) == (0, distinct)
        if mode == "dynamic":
            assert (s["fetched"], s["uvm_hits"]) == (distinct, 0)
        else:  # the pinned table serves the known keys; only unknown ones go below
            assert (s["fetched"], s["uvm_hits"]) == (unknown.size, known.size)
        st = ps.stats("m", 0)
        assert (st["lookups"], st["keys"], st["unique_keys"]) == (1, q.size, distinct)
        below = (st["host"]["hits"] if st["host"] else 0) + st["cold"]["hits"]
        assert below + st["default"]["hits"] == s["fetched"]
        assert s["resident"] == distinct
        np.testing.assert_array_equal(ps.lookup("m", 0, q), _reference(keys, vectors, q))
        s = tier.stats()
        assert (s["hits"], s["misses"]) == (distinct, distinct)


@pytest.mark.parametrize("threshold", [1.0, 0.0])
def test_hit_rate_threshold_never_changes_results(gpu_tier, table, threshold):
    """Below the threshold misses are inserted before returning; at or above it in the
    background. Either way the result is exact (HPS returned defaults in the second case)."""
    path, keys, vectors = table
    rng = np.random.default_rng()
    with ParameterServer(_config(path, hit_rate_threshold=threshold, gpucacheper=0.5)) as ps:
        tier = ps.table("m", 0).gpu
        q = rng.choice(keys, 40, replace=False)
        np.testing.assert_array_equal(ps.lookup("m", 0, q), _reference(keys, vectors, q))
        assert tier.stats()["hits"] == 0
        if threshold == 0.0:
            tier.wait()  # background inserts done
        np.testing.assert_array_equal(ps.lookup("m", 0, q), _reference(keys, vectors, q))
        s = tier.stats()
        assert s["hits"] == 40 and s["misses"] == 40


@pytest.mark.parametrize("mode", ["static", "uvm"])
def test_static_and_uvm_modes_exact(gpu_tier, table, mode):
    path, keys, vectors = table
    rng = np.random.default_rng()
    cfg = _config(path, embedding_cache_type=mode)
    with ParameterServer(cfg) as ps:
        tier = ps.table("m", 0).gpu
        looked = known = 0
        for _ in range(2):
            q = _batch(rng, keys, 200, 20)
            np.testing.assert_array_equal(ps.lookup("m", 0, q), _reference(keys, vectors, q))
            looked += q.size
            known += int(np.isin(q, keys).sum())
        s = tier.stats()
        if mode == "static":
            # The whole table is on the device: every key is counted (no unique step),
            # unknown keys get the default vector there and nothing is fetched from below.
            assert s["resident"] == ROWS
            assert (s["hits"], s["misses"]) == (known, looked - known)
            assert looked > known > 0 and s["fetched"] == 0
        else:
            assert s["uvm_hits"] > 0 and s["fetched"] > 0 and s["capacity"] == 64


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_update_invalidates_gpu_rows(gpu_tier, table, mode):
    path, keys, vectors = table
    rng = np.random.default_rng()
    with ParameterServer(_config(path, embedding_cache_type=mode, gpucacheper=0.5)) as ps:
        tiered = ps.table("m", 0)
        q = keys[:10]
        ps.lookup("m", 0, q)  # now resident on the GPU tier
        new = rng.standard_normal((5, DIM)).astype(np.float32)
        # The host tier changes: resident rows in place, the others inserted.
        host = tiered.host
        slots = host._index.find(q[:5])
        host.vectors[slots[slots >= 0]] = new[slots >= 0]
        host.insert(q[:5][slots < 0], new[slots < 0])
        found, below = host.fetch(q[:5])  # the tiers below the GPU serve the new rows
        assert found.all()
        np.testing.assert_array_equal(below, new)
        stale = ps.lookup("m", 0, q)
        np.testing.assert_array_equal(stale, vectors[:10])  # GPU tier still has old rows
        tiered.apply_update(q[:5], new)
        fresh = ps.lookup("m", 0, q)
        np.testing.assert_array_equal(fresh[:5], new)
        np.testing.assert_array_equal(fresh[5:], vectors[5:10])
        # A key the table file never held, added below and announced: served, not defaulted.
        extra = np.array([keys.max() + 12345], np.int64)
        extra_vec = rng.standard_normal((1, DIM)).astype(np.float32)
        host.insert(extra, extra_vec)
        tiered.apply_update(extra, extra_vec)
        np.testing.assert_array_equal(ps.lookup("m", 0, np.r_[extra, q[5:7]]),
                                      np.r_[extra_vec, vectors[5:7]])


@pytest.mark.parametrize("mode", ["dynamic", "static", "uvm"])
def test_strided_torch_keys_in_every_mode(gpu_tier, table, mode):
    """A DLRM passes each table ``cat[:, i]``: a 1-D torch view whose keys are 26 apart."""
    path, keys, vectors = table
    rng = np.random.default_rng()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with ParameterServer(_config(path, embedding_cache_type=mode, gpucacheper=0.5)) as ps:
        for _ in range(2):  # the second round meets the rows the first put in the cache
            cols = [_batch(rng, keys, 50, 8) for _ in range(5)]
            cat = torch.as_tensor(np.stack(cols, 1), device=dev)
            for i in range(5):
                view = cat[:, i]
                assert not view.is_contiguous()
                got = ps.lookup("m", 0, view)
                assert got.device.type == dev
                np.testing.assert_array_equal(got.cpu().numpy(), _reference(keys, vectors,
                                                                            cols[i]))
            got = ps.lookup("m", 0, cat.t())  # 2-D, not contiguous
            np.testing.assert_array_equal(got.cpu().numpy(),
                                          _reference(keys, vectors, np.stack(cols)))


def test_static_identity_table_is_a_plain_gather(gpu_tier, tmp_path):
    """An Embedding's table (keys 0..n-1, here written out of order) is served without a hash
    index; ids outside 0..n-1 get the default vector, as every static miss does."""
    rng = np.random.default_rng()
    n = 300
    keys = rng.permutation(n)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    write_hdf5_table(tmp_path / "ids.h5", keys, vectors)
    with ParameterServer(_config(str(tmp_path / "ids.h5"), embedding_cache_type="static")) as ps:
        index = ps.table("m", 0).gpu._replicas[0].table.index
        assert index.identity and index.nbytes == 0
        q = np.concatenate([rng.integers(0, n, 50), [-1, n, 2**40, n - 1, 0]])
        np.testing.assert_array_equal(ps.lookup("m", 0, q), _reference(keys, vectors, q))
        s = ps.stats("m", 0)["gpu"]
        assert (s["hits"], s["misses"], s["resident"]) == (52, 3, n)


def test_tier_off_and_settings(table, monkeypatch):
    path, _keys, _vectors = table
    monkeypatch.setenv("KERAS_HPS_GPU_TIER", "off")
    with ParameterServer(_config(path)) as ps:
        assert "gpu" not in ps.stats("m", 0)
    monkeypatch.setenv("KERAS_HPS_GPU_TIER", "auto")
    assert gpu_tier_devices(False, (0,)) == []  # gpucache: false
    monkeypatch.setenv("KERAS_HPS_GPU_TIER", "fast")
    with pytest.raises(ConfigError, match="KERAS_HPS_GPU_TIER"):
        gpu_tier_devices(True, (0,))
    assert cache_slots(0.0, 10) == 64 and cache_slots(0.1, 1000) == 128
    assert cache_slots(0.2, 10**6) == 200_000
    assert cache_slots(4.0, 100) == 416  # more slots than rows: every key fits its set
