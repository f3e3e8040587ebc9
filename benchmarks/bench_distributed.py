"""The Redis Cluster tier beside the host RAM tier, and update propagation, in the same run.

- lookup: `ParameterServer.lookup` of batches of random keys (all present) of a table whose
  rows live in a local Redis Cluster of 1 and of 3 masters (Debian's redis-server on
  loopback, started by tests/redis_cluster.py; `volatile_db.type: redis_cluster`, no host
  tier in front), against a parameter server holding the same table in its host RAM tier
  (`hash_map`, every row loaded); calls interleaved, median of `--reps`. Also the cluster's
  memory per row.
- propagation: one server calls `ParameterServer.update(model, table, [key], row)`; two other
  servers on the same cluster (each a process of its own), each holding the key in its host
  RAM tier, are asked for the key until they answer the new row. Delay = from `update`
  returning to the last of them answering it; p50 and p99 over `--updates` updates.
  Baseline in the same run: one Redis round trip (PING). The same for the single-machine
  update log (servers poll it every `online_updates.UPDATE_POLL_S`).

    .venv/bin/python benchmarks/bench_distributed.py                  # 1M x 128, 65,536 keys
    .venv/bin/python benchmarks/bench_distributed.py --rows 200000 --masters 3

Results: docs/benchmarks/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ["KERAS_HPS_GPU_TIER"] = "off"  # the CPU tiers alone
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the tables printed

from redis_cluster import LocalRedisCluster  # noqa: E402
from scratch import scratch_dir  # noqa: E402

from keras_hps.formats import write_hdf5_table  # noqa: E402
from keras_hps.online_updates import UPDATE_POLL_S  # noqa: E402
from keras_hps.parameter_server import ParameterServer  # noqa: E402


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


def parser_name() -> str:
    try:
        import hiredis  # noqa: F401

        return "hiredis"
    except ImportError:
        return "pure-Python RESP parser (no hiredis)"


def hmget_usec(cluster: LocalRedisCluster) -> int:
    """Microseconds the masters spent in HMGET so far (INFO commandstats)."""
    return sum(int(cluster.node_client(p).info("commandstats").get("cmdstat_hmget", {})
                   .get("usec", 0)) for p in cluster.master_ports)


def config(path: str, volatile_db: dict, batch: int, dim: int) -> dict:
    """hps.json of the one table `path`, lookups of up to `batch` keys."""
    return {"models": [{"model": "bench", "sparse_files": [path],
                        "embedding_vecsize_per_table": [dim],
                        "maxnum_catfeature_query_per_table_per_sample": [batch],
                        "max_batch_size": 1}],
            "volatile_db": volatile_db}


def bench_lookup(path: str, keys: np.ndarray, dim: int, batch: int, reps: int,
                 masters: list[int], partitions: int) -> None:
    rng = np.random.default_rng(1)
    rows = len(keys)
    batches = [rng.choice(keys, batch) for _ in range(4)]
    nu = int(np.mean([len(np.unique(b)) for b in batches]))
    print(f"\n### lookup through ParameterServer.lookup: {rows:,} rows x dim {dim}, batches of "
          f"{batch:,} random keys (about {nu:,} unique, all present); redis-py "
          f"{parser_name()}\n")
    print("| what | ms / batch | M keys/s | vs host tier |\n|---|---:|---:|---:|")
    calls = [0]

    def pick() -> np.ndarray:  # host and Redis get the same batch, in turn
        calls[0] += 1
        return batches[calls[0] // 2 % len(batches)]

    t0 = time.perf_counter()
    host = ParameterServer(config(path, {"type": "hash_map"}, batch, dim))
    host_load = time.perf_counter() - t0
    for m in masters:
        with LocalRedisCluster(m, persistence=False) as cluster:
            t0 = time.perf_counter()
            redis = ParameterServer(config(path, {"type": "redis_cluster",
                                                  "address": cluster.address,
                                                  "num_partitions": partitions}, batch,
                                           dim))
            fill_s = time.perf_counter() - t0
            assert np.array_equal(redis.lookup("bench", 0, batches[0]),
                                  host.lookup("bench", 0, batches[0]))
            before = hmget_usec(cluster)
            t = interleaved({"host": lambda: host.lookup("bench", 0, pick()),
                             "redis": lambda r=redis: r.lookup("bench", 0, pick())}, reps)
            server_ms = (hmget_usec(cluster) - before) / (reps + 1) / 1e3
            mem = sum(int(cluster.node_client(p).info("memory")["used_memory"])
                      for p in cluster.master_ports)
            redis.close()
        print(f"| host RAM tier (`hash_map`, every row loaded) | {t['host'] * 1e3:.2f} | "
              f"{batch / t['host'] / 1e6:.2f} | - |")
        print(f"| Redis Cluster tier, {m} master{'s' if m > 1 else ''}, {partitions} "
              f"partitions, no host tier | {t['redis'] * 1e3:.2f} | "
              f"{batch / t['redis'] / 1e6:.2f} | {t['host'] / t['redis']:.1%} |")
        print(f"| &nbsp;&nbsp;of which Redis server time (HMGET, all masters) | "
              f"{server_ms:.2f} | | |")
        print(f"| &nbsp;&nbsp;start (fill from the table file): {fill_s:.1f} s "
              f"({rows / fill_s / 1e6:.2f} M rows/s); cluster memory {mem / rows:.0f} B/row "
              f"(the row: {4 * dim} B) | | | |")
    print(f"\n(host RAM tier: loaded in {host_load:.1f} s)")
    host.close()


def _percentiles(delays: list[float]) -> str:
    d = np.array(delays) * 1e3
    return f"{np.percentile(d, 50):.2f} | {np.percentile(d, 99):.2f} | {d.max():.2f}"


# One other server, in a process of its own as in a deployment: for each request "key value"
# it looks the key up (its host tier then holds the old row), answers "ready", then asks for
# the key until it answers `value` and prints that moment (time.monotonic is the machine's
# clock, the same in every process).
_OTHER_SERVER = """
import json, sys, time
import numpy as np
from keras_hps.parameter_server import ParameterServer
ps = ParameterServer(json.loads(sys.argv[1]))
print("up", flush=True)
for line in sys.stdin:
    key, value = line.split()
    keys = np.array([int(key)])
    ps.lookup("bench", 0, keys)
    print("ready", flush=True)
    while ps.lookup("bench", 0, keys)[0, 0] != float(value):
        time.sleep(0.0001)
    print(time.monotonic(), flush=True)
ps.close()
"""


def _propagate(cfg: dict, keys: np.ndarray, dim: int, n: int) -> tuple[list[float], float]:
    """(delays in s from `update` returning in one server to two other servers (processes)
    answering the new row, seconds per `update` call). Each update at a random moment, so it
    does not fall in step with the servers' reads."""
    env = dict(os.environ, TQDM_DISABLE="1")
    others = [subprocess.Popen([sys.executable, "-c", _OTHER_SERVER, json.dumps(cfg)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env=env) for _ in range(2)]
    writer = ParameterServer(cfg)
    try:
        for p in others:
            assert p.stdout.readline().strip() == "up"
        rng = np.random.default_rng(2)
        delays, calls = [], []
        for i in range(n):
            k = int(rng.choice(keys))
            value = 1000.0 + i
            for p in others:
                p.stdin.write(f"{k} {value}\n")
                p.stdin.flush()
            for p in others:
                assert p.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0, UPDATE_POLL_S))
            t = time.monotonic()
            writer.update("bench", 0, [k], np.full((1, dim), value, np.float32))
            t_ret = time.monotonic()
            calls.append(t_ret - t)
            delays.append(max(float(p.stdout.readline()) for p in others) - t_ret)
        return delays, float(np.median(calls))
    finally:
        writer.close()
        for p in others:
            p.stdin.close()
            p.wait(30)


def bench_propagation(path: str, keys: np.ndarray, dim: int, n: int) -> None:
    print(f"\n### update propagation: one key per update, {n} updates; two other servers "
          "(processes) hold the key in their host RAM tier\n")
    print("| path | p50 ms | p99 ms | max ms | `update` call, median ms |\n"
          "|---|---:|---:|---:|---:|")
    with LocalRedisCluster(3, persistence=False) as cluster:
        node = cluster.node_client(cluster.master_ports[0])
        pings = []
        for _ in range(n):
            t = time.perf_counter()
            node.ping()
            pings.append(time.perf_counter() - t)
        vdb = {"type": "redis_cluster", "address": cluster.address, "num_partitions": 16,
               "host_cache_rate": 1.0}
        delays, call = _propagate(config(path, vdb, 64, dim), keys, dim, n)
    print(f"| baseline: one Redis round trip (PING) | {_percentiles(pings)} | |")
    print(f"| Redis Cluster (3 masters): `update` returned -> both other servers answer "
          f"the new row | {_percentiles(delays)} | {call * 1e3:.2f} |")
    log = Path(path).with_name(Path(path).name + ".updates")
    log.unlink(missing_ok=True)
    m = max(50, n // 5)
    delays, call = _propagate(config(path, {"type": "hash_map"}, 64, dim), keys, dim, m)
    log.unlink(missing_ok=True)
    print(f"| one machine, no Redis: update log polled every {UPDATE_POLL_S * 1e3:.0f} ms "
          f"({m} updates) | {_percentiles(delays)} | {call * 1e3:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--masters", default="1,3", help="cluster sizes, comma-separated")
    ap.add_argument("--partitions", type=int, default=16, help="num_partitions")
    ap.add_argument("--updates", type=int, default=500, help="updates timed for propagation")
    ap.add_argument("--skip-lookup", action="store_true")
    a = ap.parse_args()
    print(f"# {platform.node()} {platform.machine()} Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    d = str(scratch_dir("khps-bench-"))
    rng = np.random.default_rng(0)
    keys = np.sort(rng.choice(np.int64(1) << 40, a.rows, replace=False)).astype(np.int64)
    path = os.path.join(d, "t.h5")
    write_hdf5_table(path, keys, rng.standard_normal((a.rows, a.dim), dtype=np.float32))
    if not a.skip_lookup:
        bench_lookup(path, keys, a.dim, a.batch, a.reps,
                     [int(x) for x in a.masters.split(",")], a.partitions)
    bench_propagation(path, keys, a.dim, a.updates)


if __name__ == "__main__":
    main()
