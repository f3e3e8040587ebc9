"""Parameter servers sharing one real Redis Cluster (Debian's redis-server, 3 masters): they
answer identically, 1,000 random updates made while clients query are never answered stale
(GPU tier under the interpreter, host tier, Redis tier, table file), a dead master gives
UNAVAILABLE or an exact answer and serving recovers (each write on disk there), and a gap in
the update stream drops what a server cached."""

from __future__ import annotations

import time

import numpy as np
import pytest
from redis.crc import key_slot
from redis_cluster import LocalRedisCluster, cluster_fixture
from update_checks import encoded_rows, final_rows, updates_under_load

from keras_hps.errors import UnavailableError
from keras_hps.formats import write_hdf5_table
from keras_hps.parameter_server import ParameterServer
from keras_hps.update_stream import stream_keys

redis_cluster = cluster_fixture(masters=3, persistence=False)

DIM = 4


def _config(cluster, path, model="m", **volatile_db):
    return {"models": [{"model": model, "sparse_files": [str(path)],
                        "embedding_vecsize_per_table": [DIM],
                        "maxnum_catfeature_query_per_table_per_sample": [1024],
                        "max_batch_size": 1, "gpucacheper": 1.0}],
            "volatile_db": {"type": "redis_cluster", "address": cluster.address,
                            "num_partitions": 6, "socket_timeout": 1.0, **volatile_db}}


def _table(tmp_path, rows, first=1, name="t.h5"):
    """A table whose every row names its key and version 0 (its content is unique per
    `first`, so each test gets a namespace of its own)."""
    keys = np.arange(first, first + rows, dtype=np.int64)
    path = tmp_path / name
    write_hdf5_table(path, keys, encoded_rows(keys, 0, DIM))
    return path, keys


def test_two_servers_share_a_cluster_through_1000_updates(redis_cluster, tmp_path, monkeypatch):
    path, keys = _table(tmp_path, 300, first=1)
    universe = np.arange(1, 341, dtype=np.int64)  # 40 keys the table file lacks
    # a: the writer, with a host tier in front of the cluster; b: a GPU tier (interpreted)
    # and no host tier, as HPS put Redis right under the GPU cache
    monkeypatch.setenv("KERAS_HPS_GPU_TIER", "off")
    a = ParameterServer(_config(redis_cluster, path, host_cache_rate=0.3,
                                initial_cache_rate=0.5, cache_missed_embeddings=True))
    monkeypatch.setenv("KERAS_HPS_GPU_TIER", "interpret")
    b = ParameterServer(_config(redis_cluster, path, initial_cache_rate=0.5))
    try:
        ta, tb = a.table("m", 0), b.table("m", 0)
        assert ta.gpu is None and ta.host is not None
        assert tb.gpu is not None and tb.host is None
        assert ta.redis.namespace == tb.redis.namespace
        assert ta.redis.fill_state() == "done" and ta.redis.size() == 150  # filled once
        # before any update both answer the table file, through different tiers
        want0 = np.where((universe <= 300)[:, None], encoded_rows(universe, 0, DIM), 0.0)
        np.testing.assert_array_equal(a.lookup("m", 0, universe), want0)
        np.testing.assert_array_equal(b.lookup("m", 0, universe), want0)
        assert ta.redis.size() == 300  # cache_missed_embeddings: a's misses filled the cluster

        # a: at once; b: within its update stream's propagation delay (5 s: a loose bound on
        # a loaded 2-core machine; docs/benchmarks/distributed.md measures the real one)
        history, checked = updates_under_load([a, b], universe, keys, 1000, DIM, seed=2,
                                              max_keys=3, delays={0: 0.0, 1: 5.0})
        assert checked > 2000
        want = final_rows(history, universe, DIM)
        deadline = time.monotonic() + 5
        while not np.array_equal(b.lookup("m", 0, universe), want):
            assert time.monotonic() < deadline, "b never caught up"
            time.sleep(0.01)
        np.testing.assert_array_equal(a.lookup("m", 0, universe), want)  # identical answers
        sa, sb = a.stats("m", 0), b.stats("m", 0)
        assert sa["host"]["hits"] > 0 and sb["gpu"]["hits"] > 0
        assert sa["redis"]["hits"] > 0 and sb["redis"]["hits"] > 0 and sb["redis"]["updated"]
    finally:
        a.close()
        b.close()
    # a third server starting later sees every update (nothing is filled over them)
    with ParameterServer(_config(redis_cluster, path)) as c:
        np.testing.assert_array_equal(c.lookup("m", 0, universe), want)


def test_killed_master_gives_no_wrong_answer_and_serving_recovers(tmp_path):
    fresh, fkeys = _table(tmp_path, 200, first=5000, name="fresh.h5")
    upd, ukeys = _table(tmp_path, 200, first=9000, name="upd.h5")
    with LocalRedisCluster(3, persistence=True) as cluster:
        _killed_master(cluster, fresh, fkeys, upd, ukeys)


def _killed_master(redis_cluster, fresh, fkeys, upd, ukeys):
    ps = ParameterServer({"models": [*_config(redis_cluster, fresh, "never")["models"],
                                     *_config(redis_cluster, upd, "updated")["models"]],
                          "volatile_db": _config(redis_cluster, fresh)["volatile_db"]})
    try:
        ps.update("updated", 0, ukeys[:50], encoded_rows(ukeys[:50], 1, DIM))
        want_u = np.concatenate([encoded_rows(ukeys[:50], 1, DIM),
                                 encoded_rows(ukeys[50:], 0, DIM)])
        want_f = encoded_rows(fkeys, 0, DIM)
        # the never-updated model's update stream lives on master 0 (slot 4947): this server
        # hears of every update of it while master 1 is down
        assert key_slot(stream_keys("never")[0].encode()) < 16384 // 3
        redis_cluster.kill(1)
        try:
            # the never-updated table: the table file is exact, so it answers from there
            np.testing.assert_array_equal(ps.lookup("never", 0, fkeys), want_f)
            # the updated one: UNAVAILABLE, never the table file's stale rows
            with pytest.raises(UnavailableError):
                ps.lookup("updated", 0, ukeys)
            with pytest.raises(UnavailableError):  # not acknowledged
                ps.update("updated", 0, ukeys[:1], encoded_rows(ukeys[:1], 7, DIM))
            redis_cluster.wait_state(redis_cluster.ports[0], "fail")
            for _ in range(3):  # and while the cluster knows the node is gone
                with pytest.raises(UnavailableError):
                    ps.lookup("updated", 0, ukeys[40:60])
                np.testing.assert_array_equal(ps.lookup("never", 0, fkeys[:20]), want_f[:20])
        finally:
            redis_cluster.restart(1)
        deadline = time.monotonic() + 20
        while True:
            try:
                got = ps.lookup("updated", 0, ukeys)
                break
            except UnavailableError:
                assert time.monotonic() < deadline, "no recovery after the master returned"
                time.sleep(0.1)
        # the refused update may or may not have reached its partition; every other row is
        # the acknowledged one
        np.testing.assert_array_equal(got[1:], want_u[1:])
        assert got[0, 0] in (want_u[0, 0], encoded_rows(ukeys[:1], 7, DIM)[0, 0])
        ps.update("updated", 0, ukeys[:2], encoded_rows(ukeys[:2], 8, DIM))
        np.testing.assert_array_equal(ps.lookup("updated", 0, ukeys[:2]),
                                      encoded_rows(ukeys[:2], 8, DIM))
    finally:
        ps.close()


def test_a_gap_in_the_update_stream_drops_cached_rows(redis_cluster, tmp_path, monkeypatch):
    path, keys = _table(tmp_path, 100, first=20000)
    monkeypatch.setenv("KERAS_HPS_GPU_TIER", "off")
    with ParameterServer(_config(redis_cluster, path, "gap", host_cache_rate=1.0)) as ps:
        table = ps.table("gap", 0)
        ps.lookup("gap", 0, keys)
        assert table.host.resident_rows == 100
        stream, seq = stream_keys("gap")
        client = ps.updates.client
        # another writer's update whose news was trimmed away: its row is in the cluster,
        # and the stream's next message jumps a sequence number
        table.redis.update(keys[:1], encoded_rows(keys[:1], 3, DIM))
        client.incr(seq)
        ps.updates._publishers["gap"].publish(0, table.redis.namespace, keys[5:6])
        deadline = time.monotonic() + 5
        while table.host.resident_rows == 100 or ps.updates.gaps == 0:
            assert time.monotonic() < deadline, "the gap was not noticed"
            time.sleep(0.01)
        np.testing.assert_array_equal(ps.lookup("gap", 0, keys[:1]),
                                      encoded_rows(keys[:1], 3, DIM))
        # a message that cannot be applied (malformed) drops them too
        ps.lookup("gap", 0, keys)
        client.xadd(stream, {"s": str(int(client.get(seq)) + 1), "t": "0",
                             "ns": table.redis.namespace})  # no keys
        client.incr(seq)
        while table.host.resident_rows == 100:
            assert time.monotonic() < deadline + 5, "the bad message was not noticed"
            time.sleep(0.01)
        assert ps.updates.drops == 2
