"""The Redis Cluster tier beside the host RAM tier, measured in the same run.

- lookup: `RedisClusterTier.lookup` of batches of random keys (all present) from a table held
  in a local Redis Cluster of 1 and of 3 masters (Debian's redis-server on loopback, started
  by tests/redis_cluster.py), against `HostTier.lookup` of the same keys in host RAM; calls
  interleaved, median of `--reps`. Also the cluster's memory per row.
- propagation: (after wiring) the delay from `update` returning to every server answering
  the new row.

    .venv/bin/python benchmarks/bench_distributed.py                  # 1M x 128, 65,536 keys
    .venv/bin/python benchmarks/bench_distributed.py --rows 200000 --masters 3

Results: docs/benchmarks/distributed.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from redis_cluster import LocalRedisCluster  # noqa: E402

from keras_hps.host_tier import HostTier  # noqa: E402
from keras_hps.redis_tier import RedisClusterTier, redis_cluster_settings  # noqa: E402


class ArrayCold:
    """Rows [start, stop) of in-memory arrays (what fill_from reads)."""

    def __init__(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self.keys, self.vectors = keys, vectors

    @property
    def num_rows(self) -> int:
        return len(self.keys)

    def read_block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self.keys[start:stop], self.vectors[start:stop]


def interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds per function, calls interleaved so machine noise hits all alike."""
    for f in fns.values():
        f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in ts.items()}


def time_pair(host: HostTier, tier: RedisClusterTier, batches: list[np.ndarray],
              reps: int) -> dict[str, float]:
    """Median seconds of host and Redis lookups, each pair of calls on the same batch."""
    i = [0]

    def pick() -> np.ndarray:
        i[0] += 1
        return batches[i[0] // 2 % len(batches)]

    return interleaved({"host": lambda: host.lookup(pick()),
                        "redis": lambda: tier.lookup(pick())}, reps)


def hmget_usec(cluster: LocalRedisCluster) -> int:
    """Microseconds the masters spent in HMGET so far (INFO commandstats)."""
    return sum(int(cluster.node_client(p).info("commandstats").get("cmdstat_hmget", {})
                   .get("usec", 0)) for p in cluster.master_ports)


def parser_name() -> str:
    try:
        import hiredis  # noqa: F401

        return "hiredis"
    except ImportError:
        return "pure-Python RESP parser (no hiredis)"


def bench_lookup(rows: int, dim: int, batch: int, reps: int, masters: list[int],
                 partitions: int) -> None:
    rng = np.random.default_rng(0)
    keys = rng.choice(np.int64(1) << 40, rows, replace=False).astype(np.int64)
    vectors = rng.standard_normal((rows, dim), dtype=np.float32)
    host = HostTier(dim, rows)
    host.load(keys, vectors)
    batches = [np.unique(rng.choice(keys, batch)) for _ in range(4)]
    nq = int(np.mean([len(b) for b in batches]))
    print(f"\n### lookup: {rows:,} rows x dim {dim}, batches of {batch:,} random keys "
          f"(about {nq:,} unique, all present); redis-py {parser_name()}\n")
    print("| what | ms / batch | M keys/s | vs host tier |\n|---|---:|---:|---:|")
    for m in masters:
        with LocalRedisCluster(m, persistence=False) as cluster:
            s = redis_cluster_settings({"address": cluster.address,
                                        "num_partitions": partitions})
            tier = RedisClusterTier(s, model="bench", table="t", version="1", dim=dim)
            t0 = time.perf_counter()
            tier.fill_from(ArrayCold(keys, vectors), 1.0, progress=False)
            fill_s = time.perf_counter() - t0
            found, got = tier.lookup(batches[0])
            hf, hv = host.lookup(batches[0])
            assert found.all() and hf.all() and np.array_equal(got, hv)
            before = hmget_usec(cluster)
            t = time_pair(host, tier, batches, reps)
            server_ms = (hmget_usec(cluster) - before) / (reps + 1) / 1e3
            mem = sum(int(cluster.node_client(p).info("memory")["used_memory"])
                      for p in cluster.master_ports)
            tier.close()
        print(f"| HostTier.lookup (host RAM) | {t['host'] * 1e3:.2f} | "
              f"{nq / t['host'] / 1e6:.2f} | - |")
        print(f"| RedisClusterTier.lookup, {m} master{'s' if m > 1 else ''}, "
              f"{partitions} partitions | {t['redis'] * 1e3:.2f} | "
              f"{nq / t['redis'] / 1e6:.2f} | {t['host'] / t['redis']:.1%} |")
        print(f"|   of which Redis server time (HMGET, all masters together) | "
              f"{server_ms:.2f} | | |")
        print(f"|   fill from the cold reader: {fill_s:.1f} s "
              f"({rows / fill_s / 1e6:.2f} M rows/s); cluster memory "
              f"{mem / rows:.0f} B/row (the row itself: {4 * dim} B) | | | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--masters", default="1,3", help="cluster sizes, comma-separated")
    ap.add_argument("--partitions", type=int, default=16, help="num_partitions")
    a = ap.parse_args()
    print(f"# {platform.node()} {platform.machine()} Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    bench_lookup(a.rows, a.dim, a.batch, a.reps, [int(x) for x in a.masters.split(",")],
                 a.partitions)


if __name__ == "__main__":
    main()
