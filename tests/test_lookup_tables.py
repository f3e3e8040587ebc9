"""`ParameterServer.lookup_tables`: several tables of a model in one kernel launch where their
GPU tiers answer on the device (static tables; dynamic caches while captured), else table by
table, always with `lookup`'s results. Through the interpreter on CPU, on the GPU where there
is one."""

from __future__ import annotations

import numpy as np
import pytest
from served_rows import served

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("h5py")

from keras_hps.capture import CapturedCall  # noqa: E402
from keras_hps.formats import write_hdf5_table, write_hps_table  # noqa: E402
from keras_hps.gpu_cache import GpuEmbeddingCache  # noqa: E402
from keras_hps.gpu_static_table import GpuStaticTable  # noqa: E402
from keras_hps.gpu_tier import CaptureScope, deferring  # noqa: E402
from keras_hps.parameter_server import ParameterServer  # noqa: E402
from keras_hps.triton_kernels import cache_fused_query, static_table  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DIM = 8
DEFAULTS = [0.5, -1.0, 0.0]


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """An Embedding's table (keys 0..n-1), a hashed one, and a tiny identity table."""
    rng = np.random.default_rng()
    folder = tmp_path_factory.mktemp("lookup_tables")
    out = []
    for i, keys in enumerate([np.arange(400), np.unique(rng.integers(-(2**40), 2**40, 300)),
                              np.arange(4)]):
        vectors = rng.standard_normal((keys.size, DIM)).astype(np.float32)
        path = folder / (f"t{i}.h5" if i % 2 else f"t{i}")
        (write_hdf5_table if i % 2 else write_hps_table)(path, keys, vectors)
        out.append((str(path), keys, vectors))
    return out


def config(tables, **model):
    n = len(tables)
    m = {"model": "m", "sparse_files": [p for p, _, _ in tables],
         "embedding_vecsize_per_table": [DIM] * n,
         "maxnum_catfeature_query_per_table_per_sample": [1] * n,
         "default_value_for_each_table": DEFAULTS, "max_batch_size": 256, "gpucache": True,
         "gpucacheper": 1.0, "hit_rate_threshold": 1.0, **model}
    return {"supportlonglong": True, "models": [m]}


def reference(table, default, q):
    _, keys, vectors = table
    return served(keys, vectors, q, default)


def batch(rng, tables, n):
    """One DLRM-like [n, tables] key matrix: known keys, repeats, and keys of no table."""
    cols = [np.r_[rng.choice(keys, n - 3), [-1, 2**45, keys[0]]] for _, keys, _ in tables]
    for c in cols:
        rng.shuffle(c)
    return np.stack(cols, 1)


@pytest.fixture
def launches(monkeypatch):
    """Counts of the single-table and the multi-table query launches."""
    counts = {"one": 0, "many": 0}

    def spy(fn, key):
        def wrapped(*a, **k):
            counts[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(GpuStaticTable, "query", spy(GpuStaticTable.query, "one"))
    monkeypatch.setattr(GpuEmbeddingCache, "query", spy(GpuEmbeddingCache.query, "one"))
    monkeypatch.setattr(static_table, "static_query_tables",
                        spy(static_table.static_query_tables, "many"))
    monkeypatch.setattr(cache_fused_query, "fused_cache_query",
                        spy(cache_fused_query.fused_cache_query, "many"))
    return counts


def test_static_tables_in_one_launch(gpu_tier, tables, launches):
    rng = np.random.default_rng()
    with ParameterServer(config(tables, embedding_cache_type="static")) as ps:
        index = [ps.table("m", t).gpu._replicas[0].table.index for t in range(3)]
        assert [i.identity for i in index] == [True, False, True]
        for n in (33, 1):
            q = batch(rng, tables, max(n, 4))
            cat = torch.as_tensor(q, device=DEV)
            got = ps.lookup_tables("m", [0, 1, 2], [cat[:, t] for t in range(3)])  # strided
            assert launches == {"one": 0, "many": 1}
            for t in range(3):
                assert got[t].device.type == DEV and got[t].shape == (q.shape[0], DIM)
                np.testing.assert_array_equal(got[t].cpu().numpy(),
                                              reference(tables[t], DEFAULTS[t], q[:, t]))
            launches["many"] = 0
        s = ps.stats("m", 1)
        assert s["gpu"]["hits"] + s["gpu"]["misses"] == 33 + 4 and s["lookups"] == 2
        # int32 ids of another shape per table, and the same table twice
        q = rng.integers(-2, 400, (5, 3)).astype(np.int32)
        got = ps.lookup_tables("m", [0, 0], [torch.as_tensor(q, device=DEV)] * 2)
        assert launches == {"one": 0, "many": 1} and got[0].shape == (5, 3, DIM)
        np.testing.assert_array_equal(got[1].cpu().numpy(), reference(tables[0], DEFAULTS[0], q))
        # different sizes, or NumPy keys: table by table, the same answers
        parts = [torch.as_tensor(q[:, 0], device=DEV), torch.as_tensor(q[:2, 1], device=DEV)]
        got = ps.lookup_tables("m", [0, 2], parts)
        assert launches["one"] == 2
        np.testing.assert_array_equal(got[1].cpu().numpy(),
                                      reference(tables[2], DEFAULTS[2], q[:2, 1]))
        got = ps.lookup_tables("m", [1, 2], [q[:, 1], q[:, 2]])
        assert isinstance(got[0], np.ndarray)
        np.testing.assert_array_equal(got[0], reference(tables[1], DEFAULTS[1], q[:, 1]))


@pytest.mark.parametrize("mode", ["dynamic", "uvm"])
def test_caches_in_one_launch_while_captured(gpu_tier, tables, launches, mode):
    rng = np.random.default_rng()
    with ParameterServer(config(tables, embedding_cache_type=mode)) as ps:
        q = batch(rng, tables, 24)
        cols = [torch.as_tensor(q[:, t], device=DEV) for t in range(3)]
        want = [reference(tables[t], DEFAULTS[t], q[:, t]) for t in range(3)]
        got = ps.lookup_tables("m", [0, 1, 2], cols)  # eager: table by table (misses resolved)
        assert launches["many"] == 0
        for t in range(3):
            np.testing.assert_array_equal(got[t].cpu().numpy(), want[t])
        before = ps.stats("m", 1)["gpu"]
        scope = CaptureScope(DEV)
        with deferring(scope):
            got = ps.lookup_tables("m", [0, 1, 2], cols)  # all resident now: one launch
        assert launches["many"] == 1 and int(scope.flag) == 0
        for t in range(3):
            np.testing.assert_array_equal(got[t].cpu().numpy(), want[t])
        after = ps.stats("m", 1)["gpu"]
        assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (24, 0)
        q2 = batch(rng, tables, 24)
        call = CapturedCall(lambda *c: ps.lookup_tables("m", [0, 1, 2], list(c)),
                            *[torch.as_tensor(q2[:, t], device=DEV) for t in range(3)])
        for _ in range(2):
            q3 = batch(rng, tables, 24)
            got = call(*[torch.as_tensor(q3[:, t], device=DEV) for t in range(3)])
            for t in range(3):
                np.testing.assert_array_equal(got[t].cpu().numpy(),
                                              reference(tables[t], DEFAULTS[t], q3[:, t]))
        assert call.reruns >= 1
