"""Host RAM tier (both key indexes, each overflow policy) and cold tier against NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

from keras_hps import cold_tier
from keras_hps.cold_tier import ColdTier
from keras_hps.formats import open_table, write_hdf5_table, write_hps_table
from keras_hps.host_tier import HostTier


def reference_lookup(ref: dict[int, np.ndarray], keys: np.ndarray, dim: int):
    found = np.array([int(k) in ref for k in keys], bool)
    vecs = np.stack([ref[int(k)] for k in keys[found]]) if found.any() else np.empty((0, dim))
    return found, vecs


@pytest.mark.parametrize("index", ["dense", "hash"])
def test_host_tier_insert_and_lookup_match_a_dict(index):
    rng = np.random.default_rng(10)
    dim, n = 6, 3000
    if index == "dense":
        keys = rng.permutation(np.arange(-1000, 2000))[:n]
        key_range = (-1000, 1999, n)
    else:
        keys = np.unique(np.concatenate([[0, -1, np.iinfo(np.int64).min, np.iinfo(np.int64).max],
                                         rng.integers(-(2**63), 2**63 - 1, n)]))[:n]
        key_range = None
    vecs = rng.standard_normal((len(keys), dim)).astype(np.float32)
    tier = HostTier(dim, len(keys), key_range=key_range)
    assert tier.index_kind == index
    ref: dict[int, np.ndarray] = {}
    for part in np.array_split(np.arange(len(keys)), 7):
        tier.insert(keys[part], vecs[part])
        ref.update({int(k): v for k, v in zip(keys[part], vecs[part], strict=True)})
        q = np.unique(np.concatenate([rng.choice(keys, 400), rng.integers(-3000, 3000, 100)]))
        found, got = tier.fetch(q)
        want_found, want = reference_lookup(ref, q, dim)
        np.testing.assert_array_equal(found, want_found)
        np.testing.assert_array_equal(got, want)
    assert tier.resident_rows == len(keys) and tier.evictions == 0
    assert sorted(tier.resident_keys().tolist()) == sorted(ref)


@pytest.mark.parametrize("index", ["dense", "hash"])
def test_host_tier_update_remove_clear_match_a_dict(index):
    """Random updates, removals, inserts (keys outside the dense range included: an update
    may add keys the table file lacks) and a clear, against a dict."""
    rng = np.random.default_rng(11)
    dim, cap = 4, 300
    table = np.arange(1000, 1600, dtype=np.int64)
    key_range = (1000, 1599, len(table)) if index == "dense" else None
    tier = HostTier(dim, cap, policy="evict_oldest", key_range=key_range, seed=1)
    assert tier.index_kind == index
    ref: dict[int, np.ndarray] = {}
    outside = np.array([-5, 0, 999, 1600, 2**40], np.int64)
    for step in range(60):
        op = step % 3
        k = np.unique(np.concatenate([rng.choice(table, 30), outside[rng.random(5) < 0.3]]))
        v = rng.standard_normal((len(k), dim)).astype(np.float32)
        if op == 0:  # insert the absent ones (what a lookup does)
            absent = ~tier.fetch(k)[0]
            tier.insert(k[absent], v[absent])
            keep = absent if index == "hash" else absent & (k >= 1000) & (k <= 1599)
            ref.update({int(a): b for a, b in zip(k[keep], v[keep], strict=True)})
        elif op == 1:
            hit = tier.update(k, v)
            np.testing.assert_array_equal(hit, [int(x) in ref for x in k])
            ref.update({int(a): b for a, b in zip(k[hit], v[hit], strict=True)})
        elif op == 2:
            n = tier.remove(k)
            assert n == sum(ref.pop(int(x), None) is not None for x in k)
        resident = set(tier.resident_keys().tolist())
        assert resident <= set(ref)  # nothing resident that was not inserted
        for x in [x for x in ref if x not in resident]:  # evicted by an insert
            del ref[x]
        q = np.unique(np.concatenate([rng.choice(table, 100), outside]))
        found, got = tier.fetch(q)
        want_found, want = reference_lookup(ref, q, dim)
        np.testing.assert_array_equal(found, want_found)
        np.testing.assert_array_equal(got, want.reshape(-1, dim))
        assert tier.resident_rows == len(ref) <= cap
    tier.clear()
    assert tier.resident_rows == 0 and not tier.fetch(table)[0].any()
    tier.insert(table[:cap], np.ones((cap, dim), np.float32))  # every row free again
    assert tier.resident_rows == cap and tier.evictions >= 0


def fill(tier: HostTier, keys: np.ndarray, dim: int) -> None:
    tier.insert(keys, np.repeat(keys[:, None].astype(np.float32), dim, axis=1))


@pytest.mark.parametrize("index", ["dense", "hash"])
@pytest.mark.parametrize("policy", ["evict_least_used", "evict_oldest", "evict_random"])
def test_overflow_policies(policy, index):
    dim, cap = 3, 100
    key_range = (0, 10_000, 10_001) if index == "dense" else None
    tier = HostTier(dim, cap, policy=policy, resolution_target=0.6, key_range=key_range, seed=7)
    fill(tier, np.arange(100), dim)
    assert tier.resident_rows == 100 and tier.evictions == 0
    # make keys 0..29 "used": several hits each; keys 30..99 got no hits since insertion
    for _ in range(3):
        found, _ = tier.fetch(np.arange(30))
        assert found.all()
    fill(tier, np.arange(1000, 1020), dim)  # 20 new rows overflow 100: evict down to 60 first
    assert tier.evictions == 40 and tier.resident_rows == 80
    resident = set(tier.resident_keys().tolist())
    assert set(range(1000, 1020)) <= resident
    kept_old = resident - set(range(1000, 1020))
    assert len(kept_old) == 60
    if policy in ("evict_least_used", "evict_oldest"):
        assert set(range(30)) <= kept_old  # hit rows are the most used and the most recent
    # whatever stayed still returns its own row, whatever left is a miss
    q = np.arange(0, 1100)
    found, got = tier.fetch(q)
    np.testing.assert_array_equal(found, np.isin(q, sorted(resident)))
    np.testing.assert_array_equal(got[:, 0], q[found].astype(np.float32))


def test_evict_oldest_is_least_recently_used_and_least_used_counts_hits():
    dim = 2
    lru = HostTier(dim, 10, policy="evict_oldest", resolution_target=0.5)
    lfu = HostTier(dim, 10, policy="evict_least_used", resolution_target=0.5)
    for tier in (lru, lfu):
        fill(tier, np.arange(10), dim)
        for _ in range(5):
            tier.fetch(np.array([0, 1, 2]))  # many hits, long ago
        tier.fetch(np.array([7, 8, 9]))  # one hit, most recent
        fill(tier, np.array([100]), dim)  # overflow: keep 5 (4 old + the new one)
    assert set(lru.resident_keys().tolist()) >= {7, 8, 9, 100}
    assert set(lfu.resident_keys().tolist()) >= {0, 1, 2, 100}


def test_random_eviction_depends_on_seed_and_insert_larger_than_capacity():
    dim = 1
    kept = []
    for seed in (1, 2):
        tier = HostTier(dim, 50, policy="evict_random", resolution_target=0.5, seed=seed)
        fill(tier, np.arange(50), dim)
        fill(tier, np.array([500]), dim)
        kept.append(set(tier.resident_keys().tolist()))
        assert len(kept[-1]) == 26
    assert kept[0] != kept[1]
    tier = HostTier(dim, 10)
    fill(tier, np.arange(25), dim)  # more than fit at all: the last 10 stay
    assert sorted(tier.resident_keys().tolist()) == list(range(15, 25))


def test_hash_index_survives_churn_with_tombstones():
    """Many insert/evict rounds: lookups stay exact through tombstones and rebuilds."""
    rng = np.random.default_rng(11)
    dim, cap = 2, 256
    tier = HostTier(dim, cap, policy="evict_random", resolution_target=0.5, seed=3)
    assert tier.index_kind == "hash"
    universe = rng.integers(-(2**62), 2**62, 5000)
    for _ in range(60):
        q = np.unique(rng.choice(universe, 120))
        found, got = tier.fetch(q)
        np.testing.assert_array_equal(got[:, 0], (q[found] % 1009).astype(np.float32))
        resident = set(tier.resident_keys().tolist())
        np.testing.assert_array_equal(found, [int(k) in resident for k in q])
        new = q[~found]
        tier.insert(new, np.repeat((new % 1009).astype(np.float32)[:, None], dim, axis=1))
    assert tier.evictions > 0 and tier.resident_rows <= cap


@pytest.mark.parametrize("two_level", [False, True], ids=["searchsorted", "coarse-index"])
@pytest.mark.parametrize("kind", ["hps-unsorted", "hps-sorted", "hdf5"])
def test_cold_tier_matches_reference(tmp_path, kind, two_level, monkeypatch):
    monkeypatch.setattr(cold_tier, "_TWO_LEVEL_MIN", 1 if two_level else 10**9)
    rng = np.random.default_rng(12)
    dim = 9
    keys = rng.permutation(np.unique(np.concatenate([[0, -5, 2**40],
                                                     rng.integers(-(10**9), 10**9, 4000)])))
    if kind == "hps-sorted":
        keys = np.sort(keys)
    vecs = rng.standard_normal((len(keys), dim)).astype(np.float32)
    path = tmp_path / ("t.h5" if kind == "hdf5" else "t")
    (write_hdf5_table if kind == "hdf5" else write_hps_table)(path, keys, vecs)
    cold = ColdTier(open_table(path))
    assert (cold._coarse is not None) == two_level
    assert cold.index_nbytes == cold_tier.index_nbytes(len(keys), kind != "hps-unsorted")
    ref = {int(k): v for k, v in zip(keys, vecs, strict=True)}
    assert cold.key_range == (int(keys.min()), int(keys.max()), len(keys))
    for _ in range(5):
        q = np.unique(np.concatenate([rng.choice(keys, 500), rng.integers(-(10**9), 10**9, 50),
                                      [0, -5, -6, np.iinfo(np.int64).max]]))
        found, got = cold.fetch(q)
        want_found, want = reference_lookup(ref, q, dim)
        np.testing.assert_array_equal(found, want_found)
        np.testing.assert_array_equal(got, want)
    empty_found, empty = cold.fetch(np.empty(0, np.int64))
    assert empty_found.shape == (0,) and empty.shape == (0, dim)
    assert cold.hits + cold.misses == cold.stats()["hits"] + cold.stats()["misses"] > 0
    cold.close()
