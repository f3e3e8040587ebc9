"""Lookups with no host synchronisation (what a CUDA graph replays) and `CapturedCall`.

On CPU the GPU tier runs through Triton's interpreter and `CapturedCall` runs its protocol
without a graph (the capturable path, the miss flag, the eager rerun); the `gpu` tests capture
real CUDA graphs and check, with torch's sync debug mode, that the captured path never waits
on the host."""

from __future__ import annotations

import numpy as np
import pytest
from served_rows import served

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("h5py")

from keras_hps.capture import CapturedCall  # noqa: E402
from keras_hps.errors import InvalidInputError  # noqa: E402
from keras_hps.formats import write_hdf5_table  # noqa: E402
from keras_hps.gpu_tier import CaptureScope, active_scope, deferring  # noqa: E402
from keras_hps.parameter_server import ParameterServer  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
ROWS, DIM, DEFAULT = 600, 8, -0.5


def config(path, **model):
    m = {"model": "m", "sparse_files": [path], "embedding_vecsize_per_table": [DIM],
         "maxnum_catfeature_query_per_table_per_sample": [4],
         "default_value_for_each_table": [DEFAULT], "max_batch_size": 64, "gpucache": True,
         "gpucacheper": 1.0, "hit_rate_threshold": 1.0, **model}
    return {"supportlonglong": True, "models": [m], "volatile_db": {"initial_cache_rate": 0.5}}


def reference(keys, vectors, q):
    return served(keys, vectors, q, DEFAULT)


def tk(q):
    return torch.as_tensor(np.asarray(q, np.int64), device=DEV)


def test_query_kernels_raise_the_flag_exactly_when_a_key_misses():
    from keras_hps.triton_kernels.cache_insert import cache_insert
    from keras_hps.triton_kernels.cache_layout import allocate
    from keras_hps.triton_kernels.cache_query import cache_query, np_cache_query
    from keras_hps.triton_kernels.static_table import build_index, np_static_query, static_query

    rng = np.random.default_rng()
    keys = np.unique(rng.integers(-(2**40), 2**40, 300))
    rows = rng.standard_normal((keys.size, 4)).astype(np.float32)
    arrays = allocate(256, 4, torch.int64, DEV)  # 2048 slots: every key stays
    cache_insert(arrays, tk(keys), torch.as_tensor(rows, device=DEV))
    index = build_index(tk(keys))
    for q in (rng.choice(keys, 77), np.r_[rng.choice(keys, 50), [2**45]], np.r_[[], ][:0],
              np.array([2**63 - 1])):
        ref_c = np_cache_query(arrays.to_numpy(), q)
        ref_s = np_static_query(keys, rows, q, None)
        for ref, run in ((ref_c, lambda f, q=q: cache_query(arrays, tk(q), miss_flag=f,
                                                            validate=False)),
                         (ref_s, lambda f, q=q: static_query(index, tk(q),
                                                             torch.as_tensor(rows, device=DEV),
                                                             miss_flag=f, validate=False))):
            flag = torch.zeros(1, dtype=torch.int32, device=DEV)
            out, hit = run(flag)
            np.testing.assert_array_equal(out.cpu().numpy(), ref[0])
            assert int(flag) == int((~ref[1]).any())


@pytest.mark.parametrize("mode", ["dynamic", "uvm"])
def test_deferred_lookup_writes_hits_and_flags_misses(gpu_tier, table, mode):
    path, keys, vectors = table
    rng = np.random.default_rng()
    with ParameterServer(config(path, embedding_cache_type=mode)) as ps:
        warm = rng.choice(keys, 40, replace=False)
        ps.lookup("m", 0, tk(warm))  # resident now (40 keys, 608 slots: no set overflows)
        before = ps.stats("m", 0)["gpu"]
        scope = CaptureScope(DEV)
        q = rng.choice(warm, (5, 6))  # repeated keys, any shape
        with deferring(scope):
            assert active_scope(torch.device(DEV)) is scope
            got = ps.lookup("m", 0, tk(q))
        assert active_scope(torch.device(DEV)) is None
        assert int(scope.flag) == 0 and got.shape == (5, 6, DIM)
        np.testing.assert_array_equal(got.cpu().numpy(), reference(keys, vectors, q))
        after = ps.stats("m", 0)["gpu"]  # counted per key, on the device
        assert after["hits"] - before["hits"] == q.size and after["misses"] == before["misses"]
        fresh = np.setdiff1d(keys, warm)[:3]
        q2 = np.r_[warm[:4], fresh, [2**45]]  # cache misses and a key of no tier
        with deferring(scope):
            got = ps.lookup("m", 0, tk(q2)).cpu().numpy()
        assert int(scope.flag) == 1
        np.testing.assert_array_equal(got[:4], reference(keys, vectors, warm[:4]))
        assert (got[4:] == 0).all()  # zero rows: the caller answers them outside the graph


@pytest.mark.parametrize("mode", ["dynamic", "static", "uvm"])
def test_captured_call_is_exact_and_fills_the_cache(gpu_tier, table, mode):
    path, keys, vectors = table
    rng = np.random.default_rng()
    with ParameterServer(config(path, embedding_cache_type=mode)) as ps:
        q0 = rng.choice(keys, (16, 2))
        call = CapturedCall(lambda k: ps.lookup("m", 0, k), tk(q0))
        assert (call.graph is not None) == CUDA
        n0 = call.reruns
        for _ in range(2):  # new keys: the first call reruns them eagerly, the second hits
            fresh = np.setdiff1d(keys, q0)
            q = np.concatenate([rng.choice(fresh, (14, 2)), [[2**44, -3], [keys[0], 2**50]]])
            for _ in range(2):
                got = call(tk(q))
                np.testing.assert_array_equal(got.cpu().numpy(), reference(keys, vectors, q))
                # static: the whole table is on the device, never a rerun; dynamic and uvm:
                # the rerun put the rows in the cache (keys of no tier with the default row)
                assert call.reruns == n0 + (mode != "static")
            n0 = call.reruns
            q0 = q
        assert call.replays == 4 and call.reruns == 2 * (mode != "static")
        with pytest.raises(ValueError, match="captured for"):
            call(tk(q0[:3]))


def test_static_table_after_an_update_outside_it(gpu_tier, table):
    """Once an update adds a key the static table lacks, the table answers on the device only
    the keys it holds: a captured lookup flags the others and the rerun fetches them."""
    path, keys, vectors = table
    with ParameterServer(config(path, embedding_cache_type="static")) as ps:
        tiered = ps.table("m", 0)
        extra = np.array([2**41 + 7], np.int64)
        row = np.full((1, DIM), 3.0, np.float32)
        tiered.apply_update(extra, row)
        q = np.r_[keys[:5], extra]
        scope = CaptureScope(DEV)
        with deferring(scope):
            ps.lookup("m", 0, tk(keys[:5]))
        assert int(scope.flag) == 0
        with deferring(scope):
            ps.lookup("m", 0, tk(q))
        assert int(scope.flag) == 1
        call = CapturedCall(lambda k: ps.lookup("m", 0, k), tk(q))
        want = np.r_[vectors[:5], row]
        np.testing.assert_array_equal(call(tk(q)).cpu().numpy(), want)
        assert call.reruns >= 1


def test_keys_outside_the_key_type_are_flagged_then_raised(gpu_tier, table, tmp_path):
    path, keys, vectors = table
    small = np.arange(50, dtype=np.int64)
    write_hdf5_table(tmp_path / "small.h5", small, vectors[:50])
    cfg = config(str(tmp_path / "small.h5"), embedding_cache_type="static")
    cfg["supportlonglong"] = False  # uint32 keys: int64 ids are range-checked
    with ParameterServer(cfg) as ps:
        scope = CaptureScope(DEV)
        with deferring(scope):
            ps.lookup("m", 0, tk([1, 2, 3]))
        assert int(scope.flag) == 0
        with deferring(scope):
            ps.lookup("m", 0, tk([1, -2, 3]))  # no sync to raise here: the flag instead
        assert int(scope.flag) == 1
        call = CapturedCall(lambda k: ps.lookup("m", 0, k), tk([1, 2, 3]))
        np.testing.assert_array_equal(call(tk([4, 5, 6])).cpu().numpy(), vectors[4:7])
        with pytest.raises(InvalidInputError, match="outside the key type"):
            call(tk([4, 2**33, 6]))


def test_a_table_without_gpu_tier_cannot_be_captured(table, monkeypatch):
    path, _keys, _vectors = table
    monkeypatch.setenv("KERAS_HPS_GPU_TIER", "off")
    with ParameterServer(config(path)) as ps, deferring(CaptureScope(DEV)):
        with pytest.raises(InvalidInputError, match="GPU tier"):
            ps.lookup("m", 0, tk([1, 2]))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_deferred_lookup_never_synchronises(gpu_tier, table, mode):
    path, keys, vectors = table
    with ParameterServer(config(path, embedding_cache_type=mode)) as ps:
        q = tk(np.random.default_rng().choice(keys[:40], (32, 4)))
        ps.lookup("m", 0, q)
        scope = CaptureScope(DEV)
        with deferring(scope):
            ps.lookup("m", 0, q)  # kernels compiled
            torch.cuda.set_sync_debug_mode("error")
            try:
                got = ps.lookup("m", 0, q)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        assert int(scope.flag) == 0
        np.testing.assert_array_equal(got.cpu().numpy(), reference(keys, vectors, q.cpu().numpy()))
