"""GpuEmbeddingCache and GpuCacheGroup: the owner API over the cache kernels.

Runs under TRITON_INTERPRET=1 on CPU torch tensors (CI) and unchanged on a CUDA device.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from keras_hps.errors import InvalidInputError  # noqa: E402
from keras_hps.gpu_cache import GpuCacheGroup, GpuEmbeddingCache  # noqa: E402
from keras_hps.triton_kernels.cache_insert import np_cache_insert  # noqa: E402
from keras_hps.triton_kernels.cache_query import np_cache_query  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU_SCALE = 16 if DEVICE == "cuda" else 1


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence().entropy)


def t(keys) -> torch.Tensor:
    return torch.tensor(np.asarray(keys), dtype=torch.int64, device=DEVICE)


def unique_keys(rng, n, lo=-(2**62), hi=2**62) -> np.ndarray:
    """``n`` distinct random keys in random order."""
    keys = np.unique(rng.integers(lo, hi, size=2 * n + 8))
    rng.shuffle(keys)
    return keys[:n]


def rows_of(keys: torch.Tensor, dim: int) -> torch.Tensor:
    """A row that is a function of its key: any served row can be checked against its key."""
    k = keys.to(torch.float64).remainder(1_000_003).to(torch.float32)
    return k[:, None] * 0.5 + torch.arange(dim, device=keys.device, dtype=torch.float32)[None, :]


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_cache_follows_reference_and_counts(rng, policy):
    cache = GpuEmbeddingCache(70, 16, device=DEVICE, policy=policy)
    assert (cache.capacity, cache.dim, cache.num_sets, cache.size) == (96, 16, 12, 0)
    ref = cache.arrays.to_numpy()
    pool = rng.integers(-(2**40), 2**40, size=300)
    exp = {"hits": 0, "misses": 0, "insertions": 0, "evictions": 0}
    for stamp in (1, 2, 3):  # the cache's clock ticks on every insert
        keys = rng.choice(pool, size=64 * GPU_SCALE)
        vals = rng.standard_normal((keys.size, 16)).astype(np.float32)
        cache.insert(t(keys), torch.tensor(vals, device=DEVICE))
        ins, ev = np_cache_insert(ref, keys, vals, policy=policy, stamp=stamp)
        exp["insertions"] += ins
        exp["evictions"] += ev
        q = rng.choice(pool, size=(4, 16))  # any shape
        out, hit = cache.query(t(q))
        ref_out, ref_hit = np_cache_query(ref, q, policy=policy)
        np.testing.assert_array_equal(hit.cpu().numpy(), ref_hit)
        np.testing.assert_array_equal(out.cpu().numpy(), ref_out)
        exp["hits"] += int(ref_hit.sum())
        exp["misses"] += int((~ref_hit).sum())
    st = cache.stats()
    assert {k: st[k] for k in exp} == exp
    assert (cache.hits, cache.misses, cache.insertions, cache.evictions) == tuple(exp.values())
    assert st["size"] == cache.size == int((ref.keys != ref.empty).sum())
    got = cache.arrays.to_numpy()
    np.testing.assert_array_equal(got.scores, ref.scores)
    np.testing.assert_array_equal(got.marks, ref.marks)
    cache.reset_counters()
    assert cache.hits == 0
    cache.clear()
    assert cache.size == 0 and not cache.query(t(pool))[1].any()


def test_invalidate_update_never_serve_stale_rows(rng):
    cache = GpuEmbeddingCache(2048, 8, device=DEVICE)  # 256 sets: no set overflows
    keys = t(unique_keys(rng, 100))
    cache.insert(keys, rows_of(keys, 8))
    cache.update(keys[:30], rows_of(keys[:30], 8) + 1.0)
    out, hit = cache.query(keys)
    assert hit.all()
    assert torch.equal(out[:30], rows_of(keys[:30], 8) + 1.0)
    assert torch.equal(out[30:], rows_of(keys[30:], 8))
    absent = t([-1, -2])
    cache.update(absent, torch.zeros(2, 8, device=DEVICE))  # ignored, not inserted
    assert not cache.query(absent)[1].any()
    cache.invalidate(torch.cat([keys[::2], absent]))
    out, hit = cache.query(keys)
    assert not hit[::2].any() and hit[1::2].all()
    assert not out[::2].any()
    assert cache.size == 50


def test_bad_input_raises_invalid_input_error():
    cache = GpuEmbeddingCache(32, 4, device=DEVICE)
    with pytest.raises(InvalidInputError, match="sentinel"):
        cache.query(t([1, 2**63 - 1]))
    with pytest.raises(InvalidInputError, match="sentinel"):
        cache.insert(t([2**63 - 1]), torch.zeros(1, 4, device=DEVICE))
    with pytest.raises(InvalidInputError, match="int32 or int64"):
        cache.query(torch.tensor([1.5], device=DEVICE))
    with pytest.raises(InvalidInputError, match="shape"):
        cache.insert(t([1, 2]), torch.zeros(2, 5, device=DEVICE))
    with pytest.raises(InvalidInputError, match="torch.Tensor"):
        cache.query([1, 2])
    with pytest.raises(ValueError, match="policy"):
        GpuEmbeddingCache(32, 4, device=DEVICE, policy="fifo")
    with pytest.raises(ValueError, match="key_dtype"):
        GpuEmbeddingCache(32, 4, device=DEVICE, key_dtype=torch.int16)
    with pytest.raises(ValueError, match="capacity"):
        GpuEmbeddingCache(0, 4, device=DEVICE)
    if DEVICE == "cuda":
        with pytest.raises(InvalidInputError, match="cache is on"):
            cache.query(torch.tensor([1]))
    empty = t(np.zeros(0, dtype=np.int64))
    out, hit = cache.query(empty)
    assert out.shape == (0, 4) and hit.shape == (0,) and cache.misses == 0


def test_int32_cache(rng):
    cache = GpuEmbeddingCache(64, 3, device=DEVICE, key_dtype=torch.int32)
    keys = torch.tensor(unique_keys(rng, 50, -(2**31), 2**31 - 1), dtype=torch.int32,
                        device=DEVICE)
    cache.insert(keys, rows_of(keys, 3))
    out, hit = cache.query(keys.to(torch.int64))
    resident = hit.cpu().numpy()
    assert resident.sum() == cache.size >= 32
    assert torch.equal(out[hit], rows_of(keys, 3)[hit])
    with pytest.raises(InvalidInputError, match="2147483647"):
        cache.query(torch.tensor([2**31 - 1], dtype=torch.int32, device=DEVICE))


def test_concurrent_query_and_insert_from_two_threads(rng):
    """A querying thread and an inserting thread on one small, constantly evicting cache.

    Every row served must be the row inserted for that key (rows are a function of the key):
    no torn or foreign rows; afterwards no key is stored twice and the counters add up.
    """
    dim = 8
    cache = GpuEmbeddingCache(96, dim, device=DEVICE, policy="lru")
    base = t(unique_keys(rng, 64, 0, 10**6))
    cache.insert(base, rows_of(base, dim))
    rounds = 12 * GPU_SCALE
    batches = [t(rng.integers(10**6, 2 * 10**6, size=24)) for _ in range(rounds)]
    queries = [torch.cat([base[rng.permutation(64)[:20]], batches[i][:4]])
               for i in range(rounds)]
    errors: list[BaseException] = []
    served = []
    start = threading.Barrier(2)

    def inserter():
        try:
            start.wait()
            for b in batches:
                cache.insert(b, rows_of(b, dim))
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    def querier():
        try:
            start.wait()
            for q in queries:
                out, hit = cache.query(q)
                served.append((q, out, hit))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=inserter), threading.Thread(target=querier)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    assert len(served) == rounds
    n_hits = 0
    for q, out, hit in served:
        assert torch.equal(out[hit], rows_of(q[hit], dim))
        assert not out[~hit].any()
        n_hits += int(hit.sum())
    assert n_hits > 0
    keys = cache.arrays.keys.cpu().numpy()
    keys = keys[cache.arrays.occupied.cpu().numpy()]
    assert np.unique(keys).size == keys.size  # no key stored twice
    resident = t(keys)
    out, hit = cache.query(resident)
    assert hit.all() and torch.equal(out, rows_of(resident, dim))
    assert cache.hits + cache.misses == rounds * 24 + keys.size
    assert cache.insertions - cache.evictions == cache.size


def test_group_queries_all_tables_in_one_launch(rng):
    tables = [(64, 16), (40, 1), (100, 100), (32, 128)]
    group = GpuCacheGroup(tables, device=DEVICE, policy="lfu")
    assert len(group) == 4 and [c.dim for c in group] == [16, 1, 100, 128]
    singles = [GpuEmbeddingCache(c, d, device=DEVICE, policy="lfu") for c, d in tables]
    keys_per_table = []
    for i, (cap, dim) in enumerate(tables):
        ks = t(rng.integers(0, 2 * cap, size=cap))
        vals = torch.tensor(rng.standard_normal((cap, dim)), dtype=torch.float32, device=DEVICE)
        group[i].insert(ks, vals)
        singles[i].insert(ks, vals)
        keys_per_table.append(t(rng.integers(0, 2 * cap, size=(3, 5 * GPU_SCALE))))
    values, hits = group.query(keys_per_table)
    for i, (_cap, dim) in enumerate(tables):
        v, h = singles[i].query(keys_per_table[i])
        assert values[i].shape == (15 * GPU_SCALE, dim)
        assert torch.equal(values[i], v) and torch.equal(hits[i], h)
        assert group[i].hits == singles[i].hits and group[i].misses == singles[i].misses
        np.testing.assert_array_equal(group[i].arrays.to_numpy().scores,
                                      singles[i].arrays.to_numpy().scores)
    with pytest.raises(ValueError, match="expected keys for 4 tables"):
        group.query(keys_per_table[:2])
    with pytest.raises(InvalidInputError, match="table 1"):
        group.query([keys_per_table[0], t([2**63 - 1]), keys_per_table[2], keys_per_table[3]])


def test_tinylfu_admission_keeps_hot_keys_against_a_scan(rng):
    # A hot set of keys, queried again and again, then a scan of one-off keys into the same
    # full cache: without admission the scan evicts hot keys; with TinyLFU it is kept out.
    hot = unique_keys(rng, 24)
    scan = unique_keys(rng, 400, lo=2**50, hi=2**51)
    resident = {}
    for admission in ("none", "tinylfu"):
        cache = GpuEmbeddingCache(32, 4, device=DEVICE, admission=admission)
        assert cache.admission == admission
        for _ in range(5):
            _v, hit = cache.query(t(hot))
            cache.insert(t(hot)[~hit], rows_of(t(hot)[~hit], 4))
        for lo in range(0, scan.size, 40):
            ks = t(scan[lo:lo + 40])
            _v, hit = cache.query(ks)
            cache.insert(ks[~hit], rows_of(ks[~hit], 4))
        out, hit = cache.query(t(hot), touch=False)
        assert torch.equal(out[hit], rows_of(t(hot)[hit], 4))
        resident[admission] = int(hit.sum())
        if admission == "tinylfu":
            assert cache.rejected > 0 and cache.stats()["rejected"] == cache.rejected
        else:
            assert cache.rejected == 0
    assert resident["tinylfu"] > resident["none"]
    with pytest.raises(ValueError, match="admission"):
        GpuEmbeddingCache(32, 4, device=DEVICE, admission="lfu")
