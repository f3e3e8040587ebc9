"""Online updates on a Redis Stream per model, against a real Redis Cluster (3 masters)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from redis_cluster import cluster_fixture

from keras_hps.errors import UnavailableError
from keras_hps.redis_tier import (
    RedisClusterTier,
    connect_cluster,
    redis_cluster_settings,
)
from keras_hps.update_stream import (
    StreamPosition,
    UpdatePublisher,
    UpdateSubscriber,
    stream_keys,
)

redis_cluster = cluster_fixture(masters=3, persistence=True)

DIM = 4
NKEYS = 200


def _row(key: int, version: int) -> np.ndarray:
    """The row of `key` at `version` (0: the table's initial row); exact in float32."""
    return np.array([key, version, key * 0.5 + version, -version], np.float32)


@pytest.fixture
def clients(redis_cluster):
    s = redis_cluster_settings({"address": redis_cluster.address, "num_partitions": 8,
                                "socket_timeout": 1.0})
    made = [connect_cluster(s) for _ in range(3)]
    yield s, made
    for c in made:
        c.close()


class _Cold:
    num_rows = NKEYS

    def read_block(self, start, stop):
        keys = np.arange(start, stop, dtype=np.int64)
        return keys, np.stack([_row(int(k), 0) for k in keys]).reshape(-1, DIM)


def test_concurrent_updates_are_old_or_new_and_converge(clients):
    settings, (c_pub, c_sub, c_tier) = clients
    model = "stream_convergence"
    writer = RedisClusterTier(settings, model=model, table="t", version="1", dim=DIM,
                              client=c_pub)
    server_tier = RedisClusterTier(settings, model=model, table="t", version="1", dim=DIM,
                                   client=c_tier)
    writer.fill_from(_Cold(), 1.0)
    # the server: subscriber made before it loads from the shared tier, started after
    state: dict[int, np.ndarray] = {}

    def on_update(table_id: int, keys: np.ndarray, rows: np.ndarray | None) -> None:
        assert table_id == 3
        if rows is None:  # a reference: the rows are in the shared tier already
            found, rows = server_tier.fetch(keys)
            assert found.all()
        state.update(zip(keys.tolist(), rows, strict=True))

    sub = UpdateSubscriber(c_sub, model, on_update, tables={writer.namespace: 3})
    found, rows = server_tier.fetch(np.arange(NKEYS))
    assert found.all()
    state.update(zip(range(NKEYS), rows, strict=True))
    sub.start()

    published: dict[int, set[int]] = {k: {0} for k in range(NKEYS)}
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[str] = []
    observed = [0]

    def reader() -> None:
        rng = np.random.default_rng(1)
        while not stop.is_set():
            for k in rng.integers(0, NKEYS, 50).tolist():
                v = state[k]
                ver = int(v[1])
                with lock:
                    ok = ver in published[k]
                if not ok or not np.array_equal(v, _row(k, ver)):
                    errors.append(f"key {k}: observed {v}, versions {sorted(published[k])}")
                observed[0] += 1
            time.sleep(0)

    th = threading.Thread(target=reader)
    th.start()
    pub = UpdatePublisher(c_pub, model, max_inline_bytes=2 * DIM * 4)
    rng = np.random.default_rng(2)
    version = {k: 0 for k in range(NKEYS)}
    stale_after_ack = 0
    try:
        for i in range(1000):
            keys = rng.choice(NKEYS, int(rng.integers(1, 6)), replace=False)
            for k in keys.tolist():
                version[k] += 1
            rows = np.stack([_row(k, version[k]) for k in keys.tolist()])
            with lock:
                for k in keys.tolist():
                    published[k].add(version[k])
            writer.update(keys, rows)  # the shared tier first, then the announcement
            pos = pub.publish(3, writer.namespace, keys, rows)  # > 2 rows: a reference
            if i % 50 == 0:  # after propagation, this server answers the new row or newer
                assert sub.wait_for(pos.seq, timeout=5)
                stale_after_ack += sum(int(state[k][1]) < version[k] for k in keys.tolist())
        final = pub.position()
        assert sub.wait_for(final.seq, timeout=10)
    finally:
        stop.set()
        th.join()
        sub.stop()
    assert not errors, errors[:5]
    assert observed[0] > 1000
    assert stale_after_ack == 0
    assert sub.applied == 1000 and sub.gaps == 0 and sub.errors == 0
    for k in range(NKEYS):
        np.testing.assert_array_equal(state[k], _row(k, version[k]))
    # the shared tier holds the same final state
    np.testing.assert_array_equal(server_tier.fetch(np.arange(NKEYS))[1],
                                  np.stack([_row(k, version[k]) for k in range(NKEYS)]))
    writer.drop()


def _collect(client, model, **kw):
    got: list[tuple[int, list[int], np.ndarray | None]] = []
    sub = UpdateSubscriber(client, model,
                           lambda t, k, v: got.append((t, k.tolist(), v)), **kw)
    return sub, got


def test_start_positions(clients):
    _, (c_pub, c_sub, c_other) = clients
    model = "stream_start"
    pub = UpdatePublisher(c_pub, model)
    assert pub.position() == StreamPosition("0-0", 0)
    pub.publish(0, "ns", [1])
    sub, got = _collect(c_sub, model)          # "$": the end of the stream now
    p2 = pub.publish(0, "ns", [2])              # lands while the server loads
    sub.start()
    p3 = pub.publish(1, "ns", [3], np.ones((1, 2)))
    assert sub.wait_for(p3.seq)
    assert [(t, k) for t, k, _ in got] == [(0, [2]), (1, [3])]
    np.testing.assert_array_equal(got[1][2], np.ones((1, 2)))
    assert sub.position == p3 and p2.seq == p3.seq - 1
    sub.stop()
    all_sub, all_got = _collect(c_other, model, start="0")
    all_sub.start()
    assert all_sub.wait_for(p3.seq)
    assert [k for _, k, _ in all_got] == [[1], [2], [3]]
    all_sub.stop()
    # resume where the first left off: the next message only, no gap
    p4 = pub.publish(0, "ns", [4, 5])
    resumed, rgot = _collect(c_sub, model, start=sub.position)
    resumed.start()
    assert resumed.wait_for(p4.seq)
    assert [k for _, k, _ in rgot] == [[4, 5]] and resumed.gaps == 0
    resumed.stop()
    # namespaces filter: another version of the model is skipped
    filt, fgot = _collect(c_sub, model, start=p4, tables={"ns-v2": 7})
    filt.start()
    pub.publish(0, "ns", [6])
    p6 = pub.publish(0, "ns-v2", [7])
    assert filt.wait_for(p6.seq)
    assert [(t, k) for t, k, _ in fgot] == [(7, [7])] and filt.skipped == 1
    filt.stop()
    with pytest.raises(ValueError, match="start"):
        UpdateSubscriber(c_sub, model, lambda *a: None, start="latest")


def test_large_updates_are_split_and_referenced(clients):
    _, (c_pub, c_sub, _) = clients
    model = "stream_split"
    pub = UpdatePublisher(c_pub, model, max_keys_per_message=1000, max_inline_bytes=4000)
    sub, got = _collect(c_sub, model)
    sub.start()
    keys = np.arange(2500)
    rows = np.random.default_rng(3).standard_normal((2500, 2)).astype(np.float32)
    pos = pub.publish(0, "ns", keys, rows)
    assert sub.wait_for(pos.seq)
    sub.stop()
    assert [len(k) for _, k, _ in got] == [1000, 1000, 500]
    assert [v is None for _, _, v in got] == [True, True, False]  # 8000 B > 4000 B
    np.testing.assert_array_equal(got[2][2], rows[2000:])
    assert sum((k for _, k, _ in got), []) == keys.tolist()


def test_trimmed_or_reset_stream_reports_a_gap(clients):
    _, (c_pub, c_sub, _) = clients
    model = "stream_gap"
    pub = UpdatePublisher(c_pub, model)
    start = pub.publish(0, "ns", [0])
    for i in range(1, 6):
        pub.publish(0, "ns", [i])
    # messages 2..4 are trimmed before being read
    c_pub.xtrim(stream_keys(model)[0], maxlen=2, approximate=False)
    gaps: list[str] = []
    sub, got = _collect(c_sub, model, start=start, on_gap=gaps.append)
    sub.start()
    assert sub.wait_for(6)
    assert [k for _, k, _ in got] == [[4], [5]] and len(gaps) == 1 and "2..4" in gaps[0]
    # the stream's node lost its data: the stream starts again at sequence 1
    c_pub.delete(*stream_keys(model))
    p = pub.publish(0, "ns", [9])
    assert p.seq == 1
    deadline = time.monotonic() + 5
    while len(gaps) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    sub.stop()
    assert len(gaps) == 2 and "reset" in gaps[1] and got[-1][1] == [9]


def test_subscriber_survives_a_node_failure(clients, redis_cluster):
    _, (c_pub, c_sub, _) = clients
    model = "stream_fault"
    key = stream_keys(model)[0]
    pub = UpdatePublisher(c_pub, model)
    gaps: list[str] = []
    failures: list[BaseException] = []
    sub, got = _collect(c_sub, model, on_gap=gaps.append, on_error=failures.append)
    sub.start()
    p1 = pub.publish(0, "ns", [1])
    assert sub.wait_for(p1.seq)
    node = c_pub.get_node_from_key(key)
    index = redis_cluster.ports.index(node.port)
    redis_cluster.kill(index)
    with pytest.raises(UnavailableError, match="stream_fault"):
        pub.publish(0, "ns", [2])
    deadline = time.monotonic() + 5
    while sub.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not sub.connected and failures
    redis_cluster.restart(index)
    deadline = time.monotonic() + 15
    while True:
        try:
            p3 = pub.publish(0, "ns", [3])
            break
        except UnavailableError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert sub.wait_for(p3.seq, timeout=15)
    assert sub.connected and not gaps
    assert [k for _, k, _ in got] == [[1], [3]]
    sub.stop()


def test_stop_is_prompt_and_callback_errors_do_not_stop_reading(clients):
    _, (c_pub, c_sub, _) = clients
    model = "stream_stop"
    pub = UpdatePublisher(c_pub, model)
    seen: list[list[int]] = []
    failures: list[BaseException] = []

    def on_update(t, keys, rows):
        if keys[0] == 13:
            raise RuntimeError("bad row")
        seen.append(keys.tolist())

    sub = UpdateSubscriber(c_sub, model, on_update, on_error=failures.append).start()
    pub.publish(0, "ns", [13])
    c_pub.xadd(stream_keys(model)[0], {b"junk": b"1"})  # not a keras-hps message
    p = pub.publish(0, "ns", [14])
    assert sub.wait_for(p.seq)
    assert seen == [[14]] and sub.errors == 2 and sub.gaps == 0
    assert "bad row" in str(failures[0]) and isinstance(failures[1], KeyError)
    assert sub.position == p
    t0 = time.monotonic()
    sub.stop()
    assert time.monotonic() - t0 < 1.0 and not sub._thread.is_alive()
