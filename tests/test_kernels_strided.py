"""Every kernel wrapper takes keys (and rows) of any strides: the view a DLRM passes is
``cat[:, i]``, a 1-D tensor whose elements are ``cat.shape[1]`` apart. Each wrapper is called
with strided views and must give exactly what its NumPy reference gives for the same values
(the kernels read element i at ``ptr + i``, so a wrapper that forgets to make its input
contiguous reads the wrong elements)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from keras_hps.gpu_cache import GpuEmbeddingCache  # noqa: E402
from keras_hps.gpu_static_table import GpuStaticTable  # noqa: E402
from keras_hps.triton_kernels.cache_admission import (  # noqa: E402
    new_sketch,
    np_sketch_add,
    sketch_add,
)
from keras_hps.triton_kernels.cache_insert import (  # noqa: E402
    cache_insert,
    np_cache_insert,
    sort_by_set,
)
from keras_hps.triton_kernels.cache_layout import allocate, np_set_index  # noqa: E402
from keras_hps.triton_kernels.cache_query import cache_query, np_cache_query  # noqa: E402
from keras_hps.triton_kernels.cache_update import (  # noqa: E402
    cache_invalidate,
    cache_update,
    np_cache_invalidate,
    np_cache_update,
)
from keras_hps.triton_kernels.combiners import combine_bags, np_combine_bags  # noqa: E402
from keras_hps.triton_kernels.gather import gather, np_gather  # noqa: E402
from keras_hps.triton_kernels.static_table import (  # noqa: E402
    build_index,
    home_slots,
    np_static_query,
    static_find,
    static_query,
    static_rows,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIM = 8


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence().entropy)


def column(values: np.ndarray, *, width: int = 5, at: int = 2) -> torch.Tensor:
    """``values`` as column ``at`` of a ``[n, width]`` tensor: a 1-D view with stride
    ``width`` (the DLRM's ``cat[:, i]``); the other columns hold other numbers."""
    v = torch.as_tensor(np.asarray(values), device=DEVICE)
    block = torch.stack([v + 7 * (c - at) + 1 for c in range(width)], 1)
    block[:, at] = v
    view = block[:, at]
    assert not view.is_contiguous() and torch.equal(view, v)
    return view


def strided_rows(rows: np.ndarray) -> torch.Tensor:
    """``rows`` ``[n, d]`` as a non-contiguous view (every other column of a wider tensor)."""
    wide = torch.zeros(rows.shape[0], 2 * rows.shape[1], device=DEVICE)
    wide[:, ::2] = torch.as_tensor(rows, device=DEVICE)
    wide[:, 1::2] = -99.0
    view = wide[:, ::2]
    assert not view.is_contiguous()
    return view


def static_table(rng, n=300):
    keys = np.unique(rng.integers(-(2**40), 2**40, 2 * n))[:n]
    rng.shuffle(keys)
    return keys, rng.standard_normal((n, DIM)).astype(np.float32)


def test_static_query_find_rows_and_index(rng):
    keys, values = static_table(rng)
    index = build_index(column(keys))
    assert index.size == keys.size
    dev_vals = torch.as_tensor(values, device=DEVICE)
    q = np.concatenate([rng.choice(keys, 200), rng.integers(-(2**40), 2**40, 40)])
    rng.shuffle(q)
    default = rng.standard_normal(DIM).astype(np.float32)
    want, want_hit = np_static_query(keys, values, q, default)
    for validate in (True, False):
        tdefault = column(default)  # a strided default row too
        out, hit = static_query(index, column(q), dev_vals, None, tdefault, validate=validate)
        np.testing.assert_array_equal(out.cpu().numpy(), want)
        np.testing.assert_array_equal(hit.cpu().numpy(), want_hit)
    # 2-D keys that are not contiguous (a transposed view)
    q2 = q[:240].reshape(12, 20)
    out, hit = static_query(index, torch.as_tensor(q2, device=DEVICE).t(), dev_vals, None,
                            torch.as_tensor(default, device=DEVICE), validate=False)
    w2, h2 = np_static_query(keys, values, q2.T, default)
    np.testing.assert_array_equal(out.cpu().numpy(), w2)
    rows = static_find(index, column(q))
    pos = {int(k): i for i, k in enumerate(keys)}
    np.testing.assert_array_equal(rows.cpu().numpy(), [pos.get(int(k), -1) for k in q])
    got = torch.empty(len(q), DIM, device=DEVICE)
    static_rows(column(rows.cpu().numpy()), dev_vals[:100], dev_vals[100:], got)
    np.testing.assert_array_equal(got.cpu().numpy(), np.where(want_hit[:, None], want, 0.0))
    with pytest.raises(ValueError, match="contiguous"):
        static_rows(rows, dev_vals[:100], dev_vals[100:], strided_rows(np.zeros((len(q), DIM))))
    slots = home_slots(column(keys), index.slot_mask)
    np.testing.assert_array_equal(slots.cpu().numpy(),
                                  home_slots(torch.as_tensor(keys, device=DEVICE),
                                             index.slot_mask).cpu().numpy())


@pytest.mark.parametrize("n_device", [None, 120])  # static, and split like uvm
def test_static_table_owner_query_and_update(rng, n_device):
    keys, values = static_table(rng)
    table = GpuStaticTable(column(keys), strided_rows(values), device=DEVICE, n_device=n_device)
    q = np.concatenate([rng.choice(keys, 100), [-5, 2**41]])
    want, want_hit = np_static_query(keys, values, q, None)
    for host_read in ("kernel", "copy"):
        out, hit = table.query(column(q), host_read=host_read)
        np.testing.assert_array_equal(out.cpu().numpy(), want)
        np.testing.assert_array_equal(hit.cpu().numpy(), want_hit)
    upd = rng.choice(keys, 30, replace=False)
    new = rng.standard_normal((30, DIM)).astype(np.float32)
    found = table.update(column(upd), strided_rows(new))
    assert bool(found.all())
    values[[int(np.flatnonzero(keys == k)[0]) for k in upd]] = new
    out, _ = table.query(column(keys))
    np.testing.assert_array_equal(out.cpu().numpy(), values)


def test_cache_query_insert_update_invalidate(rng):
    arrays = allocate(8, DIM, torch.int64, DEVICE)
    ref = arrays.to_numpy()
    pool = rng.integers(-(2**50), 2**50, 120)
    keys = rng.choice(pool, 90)
    vals = rng.standard_normal((90, DIM)).astype(np.float32)
    counters = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    cache_insert(arrays, column(keys), strided_rows(vals), stamp=3, counters=counters)
    assert counters[2:].tolist() == list(np_cache_insert(ref, keys, vals, stamp=3))
    q = rng.choice(pool, 70)
    out, hit = cache_query(arrays, column(q), validate=False)
    ref_out, ref_hit = np_cache_query(ref, q)
    np.testing.assert_array_equal(out.cpu().numpy(), ref_out)
    np.testing.assert_array_equal(hit.cpu().numpy(), ref_hit)
    assert 0 < ref_hit.sum() < q.size
    upd = rng.choice(pool, 40)
    uvals = rng.standard_normal((40, DIM)).astype(np.float32)
    cache_update(arrays, column(upd), strided_rows(uvals), validate=False)
    np_cache_update(ref, upd, uvals)
    gone = rng.choice(pool, 30)
    cache_invalidate(arrays, column(gone), validate=False)
    np_cache_invalidate(ref, gone)
    state = arrays.to_numpy()
    for field in ("keys", "scores", "marks", "vectors"):
        np.testing.assert_array_equal(getattr(state, field), getattr(ref, field), err_msg=field)
    sets, order = sort_by_set(column(keys), arrays.num_sets)
    want_sets = np_set_index(keys, arrays.num_sets)
    np.testing.assert_array_equal(order.cpu().numpy(), np.argsort(want_sets, kind="stable"))
    np.testing.assert_array_equal(sets.cpu().numpy(), np.sort(want_sets))


def test_cache_owner_query_and_insert(rng):
    cache = GpuEmbeddingCache(512, DIM, device=DEVICE)  # 40 keys: no set overflows
    keys = np.unique(rng.integers(0, 2**40, 40))
    vals = rng.standard_normal((keys.size, DIM)).astype(np.float32)
    cache.insert(column(keys), strided_rows(vals))
    for validate in (True, False):
        out, hit = cache.query(column(keys), validate=validate)
        assert bool(hit.all())
        np.testing.assert_array_equal(out.cpu().numpy(), vals)


def test_sketch_gather_and_combiner(rng):
    keys = rng.integers(-(2**40), 2**40, 50)
    sketch = new_sketch(10, DEVICE)
    sketch_add(sketch, column(keys), 10)
    ref = np.zeros(4 << 10, np.int32)
    np_sketch_add(ref, keys, 10)
    np.testing.assert_array_equal(sketch.cpu().numpy(), ref)
    table = rng.standard_normal((40, DIM)).astype(np.float32)
    idx = rng.integers(0, 40, 33)
    got = gather(torch.as_tensor(table, device=DEVICE), column(idx))
    np.testing.assert_array_equal(got.cpu().numpy(), np_gather(table, idx))
    offsets = np.array([0, 3, 3, 9, 20])
    vecs = rng.standard_normal((20, DIM)).astype(np.float32)
    w = rng.random(20).astype(np.float32)
    got = combine_bags(strided_rows(vecs), column(offsets), column(w), "mean")
    np.testing.assert_allclose(got.cpu().numpy(), np_combine_bags(vecs, offsets, w, "mean"),
                               rtol=1e-5, atol=1e-6)


def test_fused_query_over_strided_keys(rng):
    from keras_hps.gpu_cache import GpuCacheGroup
    from keras_hps.triton_kernels.cache_fused_query import fused_cache_query

    group = GpuCacheGroup([(512, DIM), (256, DIM)], device=DEVICE)
    keys = [np.unique(rng.integers(0, 2**40, 30)) for _ in range(2)]
    rows = [rng.standard_normal((k.size, DIM)).astype(np.float32) for k in keys]
    for cache, k, r in zip(group, keys, rows, strict=True):
        cache.insert(column(k), strided_rows(r))
    values, hits = group.query([column(k) for k in keys])
    flat = np.concatenate(keys)
    direct, dhit = fused_cache_query(group._params, column(flat), [k.size for k in keys],
                                     [DIM, DIM])
    for i in range(2):
        assert bool(hits[i].all())
        np.testing.assert_array_equal(values[i].cpu().numpy(), rows[i])
        np.testing.assert_array_equal(direct[i].cpu().numpy(), rows[i])
    assert bool(dhit.all())
