"""Static hash table (static and UVM modes): the kernels and their owner `GpuStaticTable`,
against the NumPy reference."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from keras_hps.gpu_static_table import GpuStaticTable  # noqa: E402
from keras_hps.triton_kernels.static_table import (  # noqa: E402
    EMPTY_KEY,
    build_index,
    np_static_query,
    static_find,
    static_query,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _table(rng, n, dim, key_dtype=np.int64):
    info = np.iinfo(key_dtype)
    keys = np.unique(rng.integers(info.min, info.max, size=n + n // 10, dtype=key_dtype))
    keys = keys[keys != EMPTY_KEY]
    rng.shuffle(keys)
    keys = keys[:n]
    values = rng.standard_normal((keys.size, dim)).astype(np.float32)
    return keys, values


def _queries(rng, keys, n_hit, n_miss, key_dtype=np.int64):
    info = np.iinfo(key_dtype)
    q = np.concatenate(
        [rng.choice(keys, n_hit), rng.integers(info.min, info.max, n_miss, dtype=key_dtype)]
    )
    rng.shuffle(q)
    return q


@pytest.mark.parametrize("dim", [1, 16, 100, 128])
@pytest.mark.parametrize("n_device_frac", [1.0, 0.3])  # 1.0: static mode; 0.3: UVM split
def test_query_matches_reference(dim, n_device_frac):
    rng = np.random.default_rng()
    keys, values = _table(rng, 700, dim)
    n_device = int(n_device_frac * keys.size)
    table = GpuStaticTable(
        torch.from_numpy(keys), torch.from_numpy(values), device=DEVICE, n_device=n_device
    )
    assert len(table) == keys.size
    assert (table.host_values is None) == (n_device == keys.size)
    if DEVICE == "cuda" and table.host_values is not None:
        assert table.host_values.is_pinned()
    q = _queries(rng, keys, 300, 100)  # duplicates among the 300 hits are likely
    default = rng.standard_normal(dim).astype(np.float32)
    out, hit = table.query(torch.from_numpy(q).to(DEVICE), torch.from_numpy(default))
    ref, ref_hit = np_static_query(keys, values, q, default)
    np.testing.assert_array_equal(hit.cpu().numpy(), ref_hit)
    np.testing.assert_array_equal(out.cpu().numpy(), ref)
    assert (~ref_hit).any() and len(np.unique(q[ref_hit])) < ref_hit.sum()


def test_no_default_gives_zeros_and_int32_keys():
    rng = np.random.default_rng()
    keys, values = _table(rng, 300, 16, key_dtype=np.int32)
    table = GpuStaticTable(torch.from_numpy(keys), torch.from_numpy(values), device=DEVICE)
    q = _queries(rng, keys, 100, 50, key_dtype=np.int32).reshape(10, 15)  # any shape
    out, hit = table.query(torch.from_numpy(q).to(DEVICE))
    ref, ref_hit = np_static_query(keys, values, q, None)
    assert out.shape == (150, 16)
    np.testing.assert_array_equal(hit.cpu().numpy(), ref_hit)
    np.testing.assert_array_equal(out.cpu().numpy(), ref)


def test_dense_index_with_long_probes():
    """Load factor 0.9 and clustered keys: displacements span several probe windows."""
    rng = np.random.default_rng()
    keys = (rng.permutation(1800) * 64 + rng.integers(0, 2)).astype(np.int64)
    index = build_index(torch.from_numpy(keys).to(DEVICE), load_factor=0.9)
    assert index.n_windows > 1 and index.size == keys.size
    values = rng.standard_normal((keys.size, 8)).astype(np.float32)
    dv = torch.from_numpy(values).to(DEVICE)
    q = _queries(rng, keys, 400, 200)
    out, hit = static_query(index, torch.from_numpy(q).to(DEVICE), dv)
    ref, ref_hit = np_static_query(keys, values, q, None)
    np.testing.assert_array_equal(hit.cpu().numpy(), ref_hit)
    np.testing.assert_array_equal(out.cpu().numpy(), ref)
    # Every key is in exactly one slot.
    held = index.pairs[:, 0].cpu().numpy()
    assert np.array_equal(np.sort(held[held != EMPTY_KEY]), np.sort(keys))


def test_empty_batch_empty_table_and_sentinel():
    rng = np.random.default_rng()
    keys, values = _table(rng, 50, 4)
    table = GpuStaticTable(torch.from_numpy(keys), torch.from_numpy(values), device=DEVICE)
    out, hit = table.query(torch.empty(0, dtype=torch.int64, device=DEVICE))
    assert out.shape == (0, 4) and hit.shape == (0,)
    # The sentinel is never a hit (it cannot be stored).
    q = torch.tensor([EMPTY_KEY, int(keys[0])], device=DEVICE)
    out, hit = table.query(q)
    assert hit.tolist() == [False, True]
    np.testing.assert_array_equal(out[1].cpu().numpy(), values[0])
    empty = GpuStaticTable(torch.empty(0, dtype=torch.int64), torch.empty((0, 4)), device=DEVICE)
    out, hit = empty.query(torch.from_numpy(keys[:5]).to(DEVICE))
    assert not hit.any() and (out == 0).all()


def test_bad_tables_are_rejected():
    with pytest.raises(ValueError, match="duplicate key 7"):
        build_index(torch.tensor([3, 7, 9, 7]))
    with pytest.raises(ValueError, match="reserved"):
        build_index(torch.tensor([1, EMPTY_KEY]))
    with pytest.raises(ValueError, match="int32 or int64"):
        build_index(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="values must be"):
        GpuStaticTable(torch.tensor([1, 2]), torch.zeros((3, 4)), device=DEVICE)
    table = GpuStaticTable(torch.tensor([1, 2]), torch.zeros((2, 4)), device=DEVICE)
    with pytest.raises(ValueError, match="default must have shape"):
        table.query(torch.tensor([1], device=DEVICE), torch.zeros(3))


def test_find_and_update_in_both_parts():
    rng = np.random.default_rng()
    keys, values = _table(rng, 400, 12)
    table = GpuStaticTable(
        torch.from_numpy(keys), torch.from_numpy(values), device=DEVICE, n_device=150
    )
    q = _queries(rng, keys, 100, 40)
    rows = static_find(table.index, torch.from_numpy(q).to(DEVICE)).cpu().numpy()
    pos = {int(k): i for i, k in enumerate(keys)}
    np.testing.assert_array_equal(rows, [pos.get(int(k), -1) for k in q])
    # Update keys on the device part, the host part and absent keys.
    upd = np.concatenate([keys[rng.choice(400, 60, replace=False)], q[rows < 0][:5]])
    new = rng.standard_normal((upd.size, 12)).astype(np.float32)
    found = table.update(torch.from_numpy(upd).to(DEVICE), torch.from_numpy(new).to(DEVICE))
    assert found.cpu().numpy().tolist() == [True] * 60 + [False] * 5
    values2 = values.copy()
    values2[[pos[int(k)] for k in upd[:60]]] = new[:60]
    out, hit = table.query(torch.from_numpy(q).to(DEVICE))
    ref, ref_hit = np_static_query(keys, values2, q, None)
    np.testing.assert_array_equal(hit.cpu().numpy(), ref_hit)
    np.testing.assert_array_equal(out.cpu().numpy(), ref)


@pytest.mark.parametrize("n_device_frac", [0.0, 0.4])  # 0.0: the UVM mode; 0.4: split
@pytest.mark.parametrize("dim,share", [(16, 0.0), (100, 0.0), (16, 0.3)])
def test_copying_query_through_copy_engine_matches_reference(dim, share, n_device_frac):
    # host_read="copy" gathers host rows on the host and copies them (chunked on CUDA); it
    # must equal the reference and the kernel's query for hits, misses and duplicates, in
    # several calls (the pinned staging buffer is reused and grown).
    rng = np.random.default_rng()
    keys, values = _table(rng, 900, dim)
    table = GpuStaticTable(torch.from_numpy(keys), torch.from_numpy(values), device=DEVICE,
                        n_device=int(n_device_frac * keys.size))
    assert table.host_values is not None
    table.copy_chunk_bytes = 64 * dim * 4  # many chunks of 64 rows (8 MiB by default)
    table.zero_copy_share = share  # this share of the keys read by the kernel, by row
    for n_hit, n_miss in ((50, 0), (400, 90), (0, 7), (0, 0), (2000, 10)):
        q = _queries(rng, keys, n_hit, n_miss)
        out, hit = table.query(torch.from_numpy(q).to(DEVICE), host_read="copy")
        ref, ref_hit = np_static_query(keys, values, q, None)
        np.testing.assert_array_equal(hit.cpu().numpy(), ref_hit)
        np.testing.assert_array_equal(out.cpu().numpy(), ref)
        kq, kh = table.query(torch.from_numpy(q).to(DEVICE))
        assert torch.equal(kq, out) and torch.equal(kh, hit)


@pytest.mark.parametrize("in_order", [True, False])
@pytest.mark.parametrize("n_device_frac", [1.0, 0.4])  # static; split as in uvm
def test_identity_keys_need_no_index(in_order, n_device_frac):
    """Keys 0..n-1 (a table trained as keras.layers.Embedding): no hash index at all, key k is
    row k; out-of-range ids, negatives and the sentinel get the default."""
    rng = np.random.default_rng()
    n, dim = 500, 16
    keys = np.arange(n, dtype=np.int64)
    if not in_order:
        rng.shuffle(keys)  # a table file written in another order
    values = rng.standard_normal((n, dim)).astype(np.float32)
    table = GpuStaticTable(torch.from_numpy(keys), torch.from_numpy(values), device=DEVICE,
                           n_device=int(n_device_frac * n))
    assert table.index.identity and table.index.nbytes == 0 and len(table) == n
    q = np.concatenate([rng.integers(0, n, 300), rng.integers(-(2**40), 2**40, 30),
                        [-1, n, n - 1, 0, EMPTY_KEY, -(2**63)]])
    rng.shuffle(q)
    default = rng.standard_normal(dim).astype(np.float32)
    ref, ref_hit = np_static_query(keys, values, q, default)
    out, hit = table.query(torch.from_numpy(q).to(DEVICE), torch.from_numpy(default))
    np.testing.assert_array_equal(hit.cpu().numpy(), ref_hit)
    np.testing.assert_array_equal(out.cpu().numpy(), ref)
    q32 = q[(q >= -(2**31)) & (q < 2**31 - 1)].astype(np.int32)  # int32 ids too
    out, hit = table.query(torch.from_numpy(q32).to(DEVICE))
    np.testing.assert_array_equal(out.cpu().numpy(), np_static_query(keys, values, q32, None)[0])
    rows = static_find(table.index, torch.from_numpy(q).to(DEVICE)).cpu().numpy()
    np.testing.assert_array_equal(rows, np.where((q >= 0) & (q < n), q, -1))
    upd = np.array([3, n - 1, n + 5, -2])
    new = rng.standard_normal((4, dim)).astype(np.float32)
    found = table.update(torch.from_numpy(upd).to(DEVICE), torch.from_numpy(new).to(DEVICE))
    assert found.cpu().numpy().tolist() == [True, True, False, False]
    values[[int(np.flatnonzero(keys == 3)[0]), int(np.flatnonzero(keys == n - 1)[0])]] = new[:2]
    out, _ = table.query(torch.from_numpy(q).to(DEVICE), host_read="copy")
    np.testing.assert_array_equal(out.cpu().numpy(), np_static_query(keys, values, q, None)[0])
    # a table that is 0..n-1 but for one key keeps its hash index
    keys[0] = n + 7
    hashed = build_index(torch.from_numpy(keys).to(DEVICE))
    assert not hashed.identity and hashed.nbytes == hashed.slots * 16


def test_several_tables_in_one_launch_match_reference():
    """static_query_tables: identity and hashed tables in one launch, each with its default
    row and counters; misses, duplicates, the sentinel and an empty batch."""
    from keras_hps.triton_kernels.static_table import static_query_tables, static_table_params

    rng = np.random.default_rng()
    dim = 16
    tables = []
    for keys in (np.arange(300), _table(rng, 200, dim)[0], np.arange(3)):
        values = rng.standard_normal((keys.size, dim)).astype(np.float32)
        index = build_index(torch.from_numpy(keys).to(DEVICE))
        default = torch.from_numpy(rng.standard_normal(dim).astype(np.float32)).to(DEVICE)
        counters = torch.zeros(2, dtype=torch.int64, device=DEVICE)
        dv = torch.from_numpy(values).to(DEVICE)
        # the params row holds raw addresses: keep the index and the arrays alive
        tables.append((keys, values, static_table_params(index, dv, default, counters),
                       (index, dv), default, counters))
    params = torch.stack([t[2] for t in tables])
    counted = np.zeros((3, 2), np.int64)
    for n in (97, 0):
        q = np.stack([np.r_[rng.choice(k, n)][:n] for k, *_ in tables])
        if n:
            q[:, :3] = [[-1, EMPTY_KEY, 2**40]] * 3  # misses in every table
        out = static_query_tables(params, torch.from_numpy(q).to(DEVICE), dim)
        assert out.shape == (3, n, dim)
        for t, (keys, values, _p, _alive, default, counters) in enumerate(tables):
            ref, hit = np_static_query(keys, values, q[t], default.cpu().numpy())
            np.testing.assert_array_equal(out[t].cpu().numpy(), ref)
            counted[t] += [hit.sum(), (~hit).sum()]
            assert counters.tolist() == counted[t].tolist()
    with pytest.raises(ValueError, match="keys must be int64"):
        static_query_tables(params, torch.zeros((2, 4), dtype=torch.int64, device=DEVICE), dim)
