"""The Redis Cluster tier against a real Redis Cluster (Debian's redis-server, 3 masters)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from redis_cluster import LocalRedisCluster, cluster_fixture

from keras_hps.cold_tier import ColdTier
from keras_hps.errors import ConfigError, UnavailableError
from keras_hps.formats import write_hdf5_table
from keras_hps.redis_tier import (
    RedisClusterSettings,
    RedisClusterTier,
    fetch_with_fallback,
    partition_of,
    redis_cluster_settings,
)

redis_cluster = cluster_fixture(masters=3, persistence=False)

SENTINEL_KEY = np.iinfo(np.int64).max  # the GPU cache's empty key: an ordinary key here


def _settings(cluster: LocalRedisCluster, **kw) -> RedisClusterSettings:
    raw = {"type": "redis_cluster", "address": cluster.address, "num_partitions": 8, **kw}
    return redis_cluster_settings(raw)


def _table(rng: np.random.Generator, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    keys = rng.choice(np.int64(2) ** 40, n, replace=False).astype(np.int64) - (1 << 39)
    keys[0] = SENTINEL_KEY
    return keys, rng.standard_normal((n, dim)).astype(np.float32)


class ArrayCold:
    """A cold reader over arrays (what fill_from needs: num_rows and read_block)."""

    def __init__(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self.keys, self.vectors = keys, vectors
        self.blocks = 0

    @property
    def num_rows(self) -> int:
        return len(self.keys)

    def read_block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        self.blocks += 1
        return self.keys[start:stop], self.vectors[start:stop]


def _reference(ref: dict[int, np.ndarray], q: np.ndarray, dim: int):
    found = np.array([int(k) in ref for k in q], bool)
    vec = np.array([ref[int(k)] for k in q if int(k) in ref], np.float32).reshape(-1, dim)
    return found, vec


@pytest.fixture
def tier_factory(redis_cluster):
    made: list[RedisClusterTier] = []

    def make(model="m", table="t", version="1", dim=8, **kw) -> RedisClusterTier:
        t = RedisClusterTier(_settings(redis_cluster, **kw), model=model, table=table,
                             version=version, dim=dim)
        made.append(t)
        return t

    yield make
    for t in made:
        if not t._closed:
            t.drop()
        t.close()


# -- settings -------------------------------------------------------------------------------


def test_hps_settings_load_unchanged():
    raw = {"type": "redis_cluster", "address": "127.0.0.1:7000,127.0.0.1:7001, 127.0.0.1:7002",
           "user_name": "default", "password": "", "num_partitions": 8,
           "max_get_batch_size": 100000, "max_set_batch_size": 50000,
           "overflow_margin": 10000000, "overflow_policy": "evict_oldest",
           "overflow_resolution_target": 0.8, "initial_cache_rate": 1.0,
           "refresh_time_after_fetch": False, "cache_missed_embeddings": True,
           "allocation_rate": 268435456, "shared_memory_size": 1, "enable_tls": False,
           "update_filters": ["^hps_.+$"], "num_node_connections": 5}
    s = redis_cluster_settings(raw)
    assert s.address == ("127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002")
    assert s.nodes[2] == ("127.0.0.1", 7002)
    assert (s.max_get_batch_size, s.max_set_batch_size) == (100000, 50000)
    assert s.overflow_policy == "evict_oldest" and s.limited
    assert s.resolution_margin == 8000000
    assert s.cache_missed_embeddings
    # HPS 23.x+ writes one max_batch_size; a list of nodes works too
    s2 = redis_cluster_settings({"type": "redis", "address": ["h1:1", "h2:2"],
                                 "max_batch_size": 1000})
    assert (s2.max_get_batch_size, s2.max_set_batch_size) == (1000, 1000)
    assert not s2.limited
    s3 = redis_cluster_settings({"max_batch_size": 1000, "max_get_batch_size": 7})
    assert (s3.max_get_batch_size, s3.max_set_batch_size) == (7, 1000)


@pytest.mark.parametrize("raw, key", [
    ({"enable_tls": True}, "volatile_db.enable_tls"),
    ({"update_filters": ["("]}, "volatile_db.update_filters"),  # [".+"] is HPS's example
    ({"frobnicate": 1}, "volatile_db.frobnicate"),
    ({"address": "localhost"}, "volatile_db.address"),
    ({"address": 7000}, "volatile_db.address"),
    ({"num_partitions": 0}, "volatile_db.num_partitions"),
    ({"num_partitions": True}, "volatile_db.num_partitions"),
    ({"overflow_policy": "evict_lru"}, "volatile_db.overflow_policy"),
    ({"overflow_resolution_target": 1.5}, "volatile_db.overflow_resolution_target"),
    ({"password": 123}, "volatile_db.password"),
    ({"type": "hash_map"}, "volatile_db.type"),
])
def test_settings_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        redis_cluster_settings(raw)


def test_partitions_spread_keys():
    keys = np.arange(100000, dtype=np.int64)
    counts = np.bincount(partition_of(keys, 16), minlength=16)
    assert counts.min() > 0.9 * 100000 / 16  # consecutive keys spread evenly


# -- lookups ----------------------------------------------------------------------------------


def test_lookup_matches_reference(tier_factory):
    rng = np.random.default_rng(1)
    dim = 12
    keys, vec = _table(rng, 3000, dim)
    tier = tier_factory(dim=dim)
    assert tier.fill_from(ArrayCold(keys, vec), 0.6).rows == math.ceil(0.6 * 3000)
    ref = {int(k): v for k, v in zip(keys[:1800], vec[:1800], strict=True)}
    assert tier.size() == 1800
    for _ in range(5):
        q = np.concatenate([rng.choice(keys, 500), rng.integers(-2**40, 2**40, 200),
                            [SENTINEL_KEY, SENTINEL_KEY, -1, 0]])
        rng.shuffle(q)
        found, got = tier.fetch(q)
        want_found, want = _reference(ref, q, dim)
        np.testing.assert_array_equal(found, want_found)
        np.testing.assert_array_equal(got, want)
    found, got = tier.fetch(np.array([], np.int64))
    assert found.shape == (0,) and got.shape == (0, dim)
    assert tier.fetch(np.array([SENTINEL_KEY]))[0].tolist() == [True]
    np.testing.assert_array_equal(tier.contains(keys[1795:1805]), [True] * 5 + [False] * 5)
    st = tier.stats()
    assert st["hits"] + st["misses"] == 5 * 704 + 1 and st["hits"] > 0 and st["misses"] > 0


def test_models_and_versions_never_collide(tier_factory):
    rng = np.random.default_rng(2)
    keys = np.arange(100, dtype=np.int64)
    a, b, c = (rng.standard_normal((100, 4)).astype(np.float32) for _ in range(3))
    ta = tier_factory(model="wdl", table="sparse_embedding0", dim=4)
    tb = tier_factory(model="dlrm", table="sparse_embedding0", dim=4)
    tc = tier_factory(model="wdl", table="sparse_embedding0", version="2", dim=4)
    for t, v in ((ta, a), (tb, b), (tc, c)):
        t.fill_from(ArrayCold(keys, v), 1.0)
    for t, v in ((ta, a), (tb, b), (tc, c)):
        found, got = t.fetch(keys)
        assert found.all()
        np.testing.assert_array_equal(got, v)
    # a table name with the namespace's separators and hash-tag braces stays separate
    td = tier_factory(model="wdl", table="{sparse/embedding0}", dim=4)
    td.fill_from(ArrayCold(keys[:10], a[:10] + 1), 1.0)
    np.testing.assert_array_equal(td.fetch(keys[:10])[1], a[:10] + 1)
    np.testing.assert_array_equal(ta.fetch(keys[:10])[1], a[:10])


def test_layout_mismatch_is_an_error(tier_factory, redis_cluster):
    tier_factory(dim=8)
    with pytest.raises(ConfigError, match="num_partitions"):
        RedisClusterTier(_settings(redis_cluster, num_partitions=4), model="m", table="t",
                         version="1", dim=8)
    with pytest.raises(ConfigError, match="dim=8"):
        RedisClusterTier(_settings(redis_cluster), model="m", table="t", version="1", dim=16)


def _calls(cluster: LocalRedisCluster, command: str) -> int:
    total = 0
    for port in cluster.master_ports:
        stats = cluster.node_client(port).info("commandstats")
        total += int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))
    return total


def test_batches_are_chunked(tier_factory, redis_cluster):
    rng = np.random.default_rng(3)
    keys, vec = _table(rng, 400, 4)
    tier = tier_factory(dim=4, max_get_batch_size=7, max_set_batch_size=5, num_partitions=3)
    evals = _calls(redis_cluster, "eval")
    tier.fill_from(ArrayCold(keys, vec), 1.0)
    # fill blocks of max_set_batch_size rows, each split by partition
    blocks = [keys[i:i + 5] for i in range(0, 400, 5)]
    want_evals = sum(len(np.unique(partition_of(b, 3))) for b in blocks)
    # + one lock renewal per block and the finishing EVAL
    assert _calls(redis_cluster, "eval") - evals == want_evals + len(blocks) + 1
    hmgets = _calls(redis_cluster, "hmget")
    q = rng.choice(keys, 100, replace=False)
    found, got = tier.fetch(q)
    per_part = np.bincount(partition_of(q, 3), minlength=3)
    assert _calls(redis_cluster, "hmget") - hmgets == sum(math.ceil(c / 7) for c in per_part)
    ref = {int(k): v for k, v in zip(keys, vec, strict=True)}
    assert found.all()
    np.testing.assert_array_equal(got, np.array([ref[int(k)] for k in q]))


# -- writes -------------------------------------------------------------------------------------


def test_update_insert_delete(tier_factory):
    rng = np.random.default_rng(4)
    keys, vec = _table(rng, 200, 6)
    tier = tier_factory(dim=6)
    tier.fill_from(ArrayCold(keys, vec), 1.0)
    assert not tier.updated
    new_keys = np.array([keys[3], keys[7], 10**15, keys[3]])
    new_vec = rng.standard_normal((4, 6)).astype(np.float32)
    tier.update(new_keys, new_vec)
    assert tier.updated
    found, got = tier.fetch(new_keys[:3])
    assert found.all()
    np.testing.assert_array_equal(got, new_vec[[3, 1, 2]])  # the last of a duplicate wins
    # an insert (a row read from the cold tier) never replaces an update
    assert tier.insert(keys[[3, 7]], vec[[3, 7]]) == 0
    np.testing.assert_array_equal(tier.fetch(keys[[3, 7]])[1], new_vec[[3, 1]])
    assert tier.insert(np.array([10**15 + 1]), vec[:1]) == 1
    assert tier.delete(np.array([keys[5], 10**15, 12345])) == 2
    np.testing.assert_array_equal(tier.contains(np.array([keys[5], 10**15, keys[6]])),
                                  [False, False, True])
    # another server sees the update flag
    other = RedisClusterTier(tier.settings, model="m", table="t", version="1", dim=6)
    assert other.updated
    other.close()
    with pytest.raises(ValueError, match=r"\[2, 6\]"):
        tier.update(keys[:2], vec[:3])


@pytest.mark.parametrize("policy", ["evict_random", "evict_least_used", "evict_oldest"])
def test_overflow_policies(tier_factory, policy):
    rng = np.random.default_rng(5)
    keys = np.arange(2000, dtype=np.int64)
    vec = rng.standard_normal((2000, 4)).astype(np.float32)
    tier = tier_factory(dim=4, num_partitions=1, overflow_margin=100, overflow_policy=policy,
                        overflow_resolution_target=0.5, refresh_time_after_fetch=True)
    tier.update(keys[1000:1005], vec[1000:1005])  # pinned: never evicted
    tier.fill_from(ArrayCold(keys[:95], vec[:95]), 1.0)  # 100 rows: at the margin
    assert tier.stats()["evictions"] == 0 and tier.size() == 100
    time.sleep(0.005)
    for _ in range(3):
        tier.fetch(keys[:10])  # hot rows: more uses, later use
    tier.wait_idle()
    time.sleep(0.005)
    tier.insert(keys[100:101], vec[100:101])  # 101 > 100: prune to 50
    held = tier.contains(keys)
    assert tier.size() == 50 and held.sum() == 50
    assert tier.stats()["evictions"] == 51
    assert held[1000:1005].all()  # updates stay
    if policy != "evict_random":
        assert held[:10].all()
    if policy == "evict_oldest":
        assert held[100]
    found, got = tier.fetch(keys[held])
    np.testing.assert_array_equal(got, vec[held])


def test_overflow_margin_is_per_partition(tier_factory):
    rng = np.random.default_rng(11)
    keys = np.arange(3000, dtype=np.int64)
    vec = rng.standard_normal((3000, 4)).astype(np.float32)
    tier = tier_factory(dim=4, num_partitions=4, overflow_margin=200, max_set_batch_size=100)
    tier.fill_from(ArrayCold(keys, vec), 1.0)
    held = tier.contains(keys)
    parts = partition_of(keys, 4)
    for p in range(4):
        assert 160 <= held[parts == p].sum() <= 200
    assert tier.stats()["evictions"] == 3000 - held.sum()
    np.testing.assert_array_equal(tier.fetch(keys[held])[1], vec[held])


# -- fill once ---------------------------------------------------------------------------------


def test_fill_once_with_concurrent_fillers(tier_factory, redis_cluster):
    rng = np.random.default_rng(6)
    keys, vec = _table(rng, 20000, 8)
    settings = _settings(redis_cluster, max_set_batch_size=1000)
    colds = [ArrayCold(keys, vec) for _ in range(3)]
    tiers = [RedisClusterTier(settings, model="m", table="fill", version="1", dim=8)
             for _ in range(3)]
    results: list = [None] * 3
    barrier = threading.Barrier(3)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = tiers[i].fill_from(colds[i], 0.75, poll_s=0.005)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert sorted(r.filled for r in results) == [False, False, True]
        filler = next(i for i in range(3) if results[i].filled)
        assert results[filler].rows == 15000
        assert [c.blocks for c in colds].count(0) == 2  # the others never read the cold tier
        assert tiers[0].size() == 15000
        assert all(t.fill_state() == "done" for t in tiers)
        # a server started later skips at once
        late = RedisClusterTier(settings, model="m", table="fill", version="1", dim=8)
        cold = ArrayCold(keys, vec)
        assert not late.fill_from(cold, 0.75).filled and cold.blocks == 0
        late.close()
    finally:
        tiers[0].drop()
        for t in tiers:
            t.close()


_FILLER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from keras_hps.redis_tier import RedisClusterTier, redis_cluster_settings

    class Cold:
        num_rows = 30000
        def read_block(self, start, stop):
            keys = np.arange(start, stop, dtype=np.int64) * 7919
            return keys, np.repeat(keys[:, None], 8, axis=1).astype(np.float32)

    s = redis_cluster_settings({"address": sys.argv[1], "num_partitions": 8,
                                "max_batch_size": 2000})
    tier = RedisClusterTier(s, model="m", table="procs", version="1", dim=8)
    sys.stdin.readline()  # start together
    r = tier.fill_from(Cold(), 1.0, poll_s=0.005)
    print(json.dumps({"filled": r.filled, "rows": r.rows}), flush=True)
""")


def test_fill_once_across_processes(redis_cluster):
    procs = [subprocess.Popen([sys.executable, "-c", _FILLER, redis_cluster.address],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted((r["filled"], r["rows"]) for r in results) == [(False, 0), (True, 30000)]
    tier = RedisClusterTier(_settings(redis_cluster, max_batch_size=2000), model="m",
                            table="procs", version="1", dim=8)
    keys = np.arange(30000, dtype=np.int64) * 7919
    found, got = tier.fetch(keys)
    assert found.all() and tier.size() == 30000
    np.testing.assert_array_equal(got, np.repeat(keys[:, None], 8, axis=1).astype(np.float32))
    tier.drop()
    tier.close()


def test_dead_filler_is_taken_over(tier_factory):
    rng = np.random.default_rng(7)
    keys, vec = _table(rng, 500, 4)
    tier = tier_factory(table="takeover", dim=4)
    # a filler that took the lock and died: the lock expires after its TTL
    tier._client.set(tier._fill_key, b"fill:dead", px=300)
    assert tier.fill_state() == "running"
    t0 = time.monotonic()
    r = tier.fill_from(ArrayCold(keys, vec), 1.0, poll_s=0.01)
    assert r.filled and r.rows == 500 and 0.2 < r.waited_s and time.monotonic() - t0 < 5
    with pytest.raises(UnavailableError, match="more than"):
        other = tier_factory(table="takeover2", dim=4)
        other._client.set(other._fill_key, b"fill:slow", px=60000)
        other.fill_from(ArrayCold(keys, vec), 1.0, timeout_s=0.2)


def test_lost_partition_is_unavailable_then_refilled(tier_factory, redis_cluster):
    rng = np.random.default_rng(8)
    keys, vec = _table(rng, 1000, 4)
    cold = ArrayCold(keys, vec)
    tier = tier_factory(table="lost", dim=4)
    tier.fill_from(cold, 1.0)
    # one master loses its data (restarted without persistence): its partitions are empty
    redis_cluster.node_client(redis_cluster.master_ports[0]).flushall()
    with pytest.raises(UnavailableError, match="lost its rows"):
        tier.fetch(keys)
    found, got, source = fetch_with_fallback(tier, _cold_fetch(keys, vec), keys[:50])
    assert source == "cold" and found.all()
    np.testing.assert_array_equal(got, vec[:50])
    # the next server start refills the lost rows (the table was never updated)
    r = tier.fill_from(cold, 1.0)
    assert r.filled and 0 < r.rows < 1000
    found, got = tier.fetch(keys)
    assert found.all()
    np.testing.assert_array_equal(got, vec)
    # after an update, lost rows cannot be refilled from the stale cold tier
    tier.update(keys[:1], vec[:1] + 1)
    redis_cluster.node_client(redis_cluster.master_ports[0]).flushall()
    with pytest.raises(UnavailableError, match="updates"):
        tier.fill_from(cold, 1.0)
    with pytest.raises(UnavailableError):
        fetch_with_fallback(tier, _cold_fetch(keys, vec), keys)


def _cold_fetch(keys: np.ndarray, vec: np.ndarray):
    ref = {int(k): i for i, k in enumerate(keys)}

    def lookup(q: np.ndarray):
        rows = np.array([ref.get(int(k), -1) for k in q])
        return rows >= 0, vec[rows[rows >= 0]]

    return lookup


def test_fill_from_hdf5_cold_tier(tier_factory, tmp_path):
    rng = np.random.default_rng(9)
    keys, vec = _table(rng, 3000, 16)
    write_hdf5_table(tmp_path / "t.h5", keys, vec)
    cold = ColdTier.open(str(tmp_path / "t.h5"))
    tier = tier_factory(table="h5", dim=16)
    assert tier.fill_from(cold, 1.0).rows == 3000
    q = rng.choice(keys, 300)
    found, got = tier.fetch(q)
    cf, cv = cold.fetch(np.unique(q))
    assert found.all() and cf.all()
    ref = dict(zip(np.unique(q).tolist(), cv, strict=True))
    np.testing.assert_array_equal(got, np.array([ref[int(k)] for k in q]))
    cold.close()


# -- faults -----------------------------------------------------------------------------------


def test_wrong_password_is_a_clear_error_at_construction(tmp_path):
    with LocalRedisCluster(3, password="s3cret", users={"alice": "wonder"},
                           persistence=False) as c:
        base = {"type": "redis_cluster", "address": c.address}
        # a parameter server refuses to start, with one line naming the key
        from keras_hps.parameter_server import ParameterServer

        write_hdf5_table(tmp_path / "t.h5", np.arange(10), np.ones((10, 4), np.float32))
        cfg = {"models": [{"model": "m", "sparse_files": [str(tmp_path / "t.h5")],
                           "embedding_vecsize_per_table": [4],
                           "maxnum_catfeature_query_per_table_per_sample": [1]}],
               "volatile_db": {**base, "password": "wrong"}}
        with pytest.raises(ConfigError, match=r"^volatile_db\.password: the Redis Cluster at "
                                              r"\S+ rejected user 'default': [^\n]+$"):
            ParameterServer(cfg)
        with ParameterServer({**cfg, "volatile_db": {**base, "password": "s3cret"}}) as ps:
            assert ps.lookup("m", 0, [3])[0, 0] == 1
        with pytest.raises(ConfigError, match="volatile_db.password.*rejected user .default."):
            RedisClusterTier(redis_cluster_settings({**base, "password": "wrong"}),
                             model="m", table="t", version="1", dim=4)
        with pytest.raises(ConfigError, match="volatile_db.password"):
            RedisClusterTier(redis_cluster_settings(base), model="m", table="t",
                             version="1", dim=4)
        with pytest.raises(ConfigError, match="rejected user 'alice'"):
            RedisClusterTier(redis_cluster_settings({**base, "user_name": "alice",
                                                     "password": "s3cret"}),
                             model="m", table="t", version="1", dim=4)
        for user, pw in (("default", "s3cret"), ("alice", "wonder")):
            s = redis_cluster_settings({**base, "user_name": user, "password": pw})
            with RedisClusterTier(s, model="m", table=user, version="1", dim=4) as t:
                t.fill_from(ArrayCold(np.arange(10), np.ones((10, 4), np.float32)), 1.0)
                assert t.fetch(np.arange(12))[0].sum() == 10


def test_unreachable_cluster_is_unavailable():
    s = redis_cluster_settings({"address": "127.0.0.1:1", "socket_timeout": 0.5})
    with pytest.raises(UnavailableError, match="cannot connect to any address"):
        RedisClusterTier(s, model="m", table="t", version="1", dim=4)


def test_killed_master_fails_cleanly_and_recovers():
    rng = np.random.default_rng(10)
    keys, vec = _table(rng, 2000, 8)
    with LocalRedisCluster(3, persistence=True) as c:
        s = redis_cluster_settings({"address": c.address, "num_partitions": 8,
                                    "socket_timeout": 1.0})
        tier = RedisClusterTier(s, model="m", table="t", version="1", dim=8)
        tier.fill_from(ArrayCold(keys, vec), 1.0)
        cold = _cold_fetch(keys, vec)
        c.kill(1)
        for wait in (False, True):  # at once, and after the cluster marked the node failed
            if wait:
                c.wait_state(c.ports[0], "fail")
            t0 = time.monotonic()
            with pytest.raises(UnavailableError):
                tier.fetch(keys)
            assert time.monotonic() - t0 < 3
            found, got, source = fetch_with_fallback(tier, cold, keys[:100])
            assert source == "cold" and found.all()
            np.testing.assert_array_equal(got, vec[:100])
        c.restart(1)
        deadline = time.monotonic() + 15
        while True:
            try:
                found, got = tier.fetch(keys)
                break
            except UnavailableError:
                assert time.monotonic() < deadline, "no recovery after the master returned"
                time.sleep(0.1)
        assert found.all()
        np.testing.assert_array_equal(got, vec)
        # an updated table has no exact fallback while a master is down
        tier.update(keys[:5], vec[:5] * 2)
        c.kill(1)
        with pytest.raises(UnavailableError):
            fetch_with_fallback(tier, cold, keys[:100])
        tier.close()


# -- the table's content id (the version of its namespace) ------------------------------------


def test_content_id_is_the_exporters_digest_and_is_cached(tmp_path, monkeypatch):
    """The id is the SHA-256 that `keras-hps export` records per table in the manifest
    (export/exporter.py `_table_digest`: dim, keys, rows; not imported here, it loads
    TensorFlow), whatever the file format, and a restart reads it back from the cache."""
    import hashlib

    from keras_hps.formats import write_hps_table
    from keras_hps.redis_tier import table_content_id

    rng = np.random.default_rng(12)
    keys = np.sort(rng.choice(10**9, 300, replace=False)).astype(np.int64)
    vec = rng.standard_normal((300, 6)).astype(np.float32)
    h = hashlib.sha256(np.int64(6).tobytes())
    h.update(keys.astype("<i8").tobytes())
    h.update(vec.astype("<f4").tobytes())
    want = "sha256:" + h.hexdigest()
    h5, hps = tmp_path / "t.h5", tmp_path / "t_hps"
    write_hdf5_table(h5, keys, vec)
    write_hps_table(hps, keys, vec)
    assert table_content_id(str(h5), 6) == want  # the same id whatever the format
    assert table_content_id(str(hps), 6) == want
    # a restart reads the id back without reading the table
    monkeypatch.setattr("keras_hps.formats.open_table", lambda *a, **k: 1 / 0)
    assert table_content_id(str(h5), 6) == want
    monkeypatch.undo()
    vec[5, 0] += 1  # another table under the same name gets another id
    write_hdf5_table(h5, keys, vec)
    assert table_content_id(str(h5), 6) not in (want, None)
