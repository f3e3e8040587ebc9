"""A real Redis Cluster for tests and benchmarks, from Debian's `redis-server`.

`LocalRedisCluster(masters=3)` starts that many masters (and optionally replicas) on free
loopback ports, each in its own folder under a temporary directory, assigns the 16384 hash
slots evenly, joins the nodes with CLUSTER MEET and waits until every node reports
`cluster_state:ok`. `kill(i)` / `restart(i)` stop and start one node (same port, same
folder, so it rejoins with its data), `stop()` ends every process and removes the folder.

`password=` sets `requirepass` (user "default"); `users={"name": "password"}` adds ACL
users with every permission. When `redis-server` is missing, construction raises
`RedisUnavailable` with the command that installs it: tests that need Redis fail, never skip.

`cluster_fixture(...)` makes a pytest fixture (module scope by default) from these
arguments, so a test module shares one cluster: `redis_cluster = cluster_fixture(masters=3)`.

As a script it runs a command against a fresh local cluster and stops the cluster after it,
`{address}` in the command standing for the cluster's nodes:

    python tests/redis_cluster.py --masters 3 -- keras-hps demo --redis {address}
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["LocalRedisCluster", "RedisUnavailable", "cluster_fixture"]

NUM_SLOTS = 16384
_BUS_OFFSET = 10000  # Redis Cluster's bus port is the client port + 10000


class RedisUnavailable(RuntimeError):
    """redis-server is not installed, or a cluster could not be started."""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_pairs(count: int, taken: set[int]) -> list[int]:
    """`count` ports p with p and p + 10000 both free (random, so parallel workers differ)."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    out: list[int] = []
    for _ in range(10000):
        p = rng.randrange(20000, 55000)
        if p in taken or p in out or p + _BUS_OFFSET in taken:
            continue
        if _port_free(p) and _port_free(p + _BUS_OFFSET):
            out.append(p)
            if len(out) == count:
                return out
    raise RedisUnavailable("no free loopback port pairs for a Redis Cluster")


class LocalRedisCluster:
    """`masters` masters (+ `replicas` per master) of Debian's redis-server on loopback."""

    def __init__(self, masters: int = 3, *, replicas: int = 0, password: str | None = None,
                 users: dict[str, str] | None = None, persistence: bool = True,
                 node_timeout_ms: int = 1000, start: bool = True) -> None:
        self.server_bin = shutil.which("redis-server")
        if self.server_bin is None:
            raise RedisUnavailable(
                "redis-server is not installed; the Redis Cluster tests need it "
                "(apt-get install redis-server; .ci/run does this)")
        self.masters = int(masters)
        self.replicas = int(replicas)
        self.password = password
        self.users = dict(users or {})
        self.persistence = persistence
        self.node_timeout_ms = int(node_timeout_ms)
        self.dir = Path(tempfile.mkdtemp(prefix="khps-redis-"))
        self.ports: list[int] = []
        self._procs: dict[int, subprocess.Popen] = {}
        if start:
            try:
                self.start()
            except BaseException:
                self.stop()
                raise

    # -- addresses ---------------------------------------------------------------------------

    @property
    def master_ports(self) -> list[int]:
        """Ports of the nodes started as masters (the first `masters` ports)."""
        return self.ports[:self.masters]

    @property
    def addresses(self) -> list[str]:
        """"127.0.0.1:port" of every node."""
        return [f"127.0.0.1:{p}" for p in self.ports]

    @property
    def address(self) -> str:
        """HPS's form: the nodes as one comma-separated string."""
        return ",".join(self.addresses)

    def node_client(self, port: int):
        """A plain (non-cluster) redis-py client of one node, authenticated as default."""
        import redis

        return redis.Redis(host="127.0.0.1", port=port, password=self.password,
                           socket_timeout=5, socket_connect_timeout=2)

    # -- processes ---------------------------------------------------------------------------

    def _write_conf(self, port: int) -> Path:
        d = self.dir / str(port)
        d.mkdir(exist_ok=True)
        lines = [
            f"port {port}", "bind 127.0.0.1", "protected-mode no", "daemonize no",
            f"dir {d}", "logfile redis.log", "cluster-enabled yes",
            "cluster-config-file nodes.conf", f"cluster-node-timeout {self.node_timeout_ms}",
            'save ""', "cluster-require-full-coverage yes",
        ]
        if self.persistence:
            # every write on disk before the reply: a SIGKILLed node comes back with its rows
            lines += ["appendonly yes", "appendfsync always"]
        else:
            lines += ["appendonly no"]
        if self.password:
            lines += [f"requirepass {self.password}", f"masterauth {self.password}"]
        for name, pw in self.users.items():
            lines.append(f"user {name} on >{pw} ~* &* +@all")
        conf = d / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def _spawn(self, port: int) -> None:
        conf = self.dir / str(port) / "redis.conf"
        self._procs[port] = subprocess.Popen(
            [self.server_bin, str(conf)], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def _wait_ping(self, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self._procs[port]
            if proc.poll() is not None:
                log = self.dir / str(port) / "redis.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RedisUnavailable(f"redis-server on port {port} exited "
                                       f"({proc.returncode}):\n{tail}")
            try:
                if self.node_client(port).ping():
                    return
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.02)

    def start(self) -> None:
        """Start every node, make the cluster and wait for `cluster_state:ok`."""
        n = self.masters * (1 + self.replicas)
        self.ports = _free_port_pairs(n, set())
        for p in self.ports:
            self._write_conf(p)
            self._spawn(p)
        for p in self.ports:
            self._wait_ping(p)
        clients = [self.node_client(p) for p in self.ports]
        per = NUM_SLOTS // self.masters
        for i, c in enumerate(clients[:self.masters]):
            lo = i * per
            hi = NUM_SLOTS - 1 if i == self.masters - 1 else lo + per - 1
            c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        for p in self.ports[1:]:
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", p)
        self._wait_known(clients)
        if self.replicas:
            ids = [c.execute_command("CLUSTER", "MYID") for c in clients[:self.masters]]
            for j, c in enumerate(clients[self.masters:]):
                c.execute_command("CLUSTER", "REPLICATE", ids[j % self.masters])
        self.wait_ok()

    def _wait_known(self, clients, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        want = len(self.ports)
        while True:
            known = [int(_info(c)["cluster_known_nodes"]) for c in clients]
            if all(k == want for k in known):
                return
            if time.monotonic() > deadline:
                raise RedisUnavailable(f"cluster nodes did not meet: known {known}, want {want}")
            time.sleep(0.02)

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Wait until every running node reports cluster_state:ok and agrees on the slots."""
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for p in self.ports:
                if not self.running(p):
                    continue
                try:
                    info = _info(self.node_client(p))
                    states.append((info["cluster_state"], info["cluster_slots_ok"]))
                except Exception as e:  # node still loading
                    states.append((f"error: {e}", "0"))
            if states and all(s == ("ok", str(NUM_SLOTS)) for s in states):
                return
            if time.monotonic() > deadline:
                raise RedisUnavailable(f"cluster not ok after {timeout}s: {states}")
            time.sleep(0.02)

    def running(self, port: int) -> bool:
        proc = self._procs.get(port)
        return proc is not None and proc.poll() is None

    def kill(self, index: int) -> int:
        """SIGKILL node `index` (in `ports` order); returns its port."""
        port = self.ports[index]
        proc = self._procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return port

    def restart(self, index: int, wait: bool = True) -> None:
        """Start node `index` again from its folder; with `wait`, until the cluster is ok."""
        port = self.ports[index]
        if self.running(port):
            return
        self._spawn(port)
        self._wait_ping(port)
        if wait:
            self.wait_ok()

    def wait_state(self, port: int, state: str, timeout: float = 10.0) -> None:
        """Wait until node `port` reports cluster_state `state` (e.g. "fail" after a kill)."""
        deadline = time.monotonic() + timeout
        while _info(self.node_client(port))["cluster_state"] != state:
            if time.monotonic() > deadline:
                raise RedisUnavailable(f"node {port} did not reach cluster_state:{state}")
            time.sleep(0.02)

    def flush(self) -> None:
        """Delete every key on every master."""
        for p in self.master_ports:
            self.node_client(p).flushall()

    def stop(self) -> None:
        """End every node and remove the cluster's folder."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self._procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalRedisCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _info(client) -> dict[str, str]:
    raw = client.execute_command("CLUSTER", "INFO")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.strip().splitlines() if ":" in line)


def cluster_fixture(scope: str = "module", **kwargs):
    """A pytest fixture yielding one `LocalRedisCluster(**kwargs)` per `scope`."""

    @pytest.fixture(scope=scope)
    def _cluster() -> Iterator[LocalRedisCluster]:
        try:
            cluster = LocalRedisCluster(**kwargs)
        except RedisUnavailable as e:
            pytest.fail(str(e), pytrace=False)
        try:
            yield cluster
        finally:
            cluster.stop()

    return _cluster


def main(argv: list[str] | None = None) -> int:
    """`python tests/redis_cluster.py [--masters N] [--persistence] -- COMMAND ...`: run
    COMMAND (with `{address}` replaced by the nodes) against a fresh cluster; its exit code."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--masters", type=int, default=3)
    parser.add_argument("--persistence", action="store_true",
                        help="every write on disk (appendonly, fsync always)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    with LocalRedisCluster(args.masters, persistence=args.persistence) as cluster:
        print(f"Redis Cluster of {args.masters} masters at {cluster.address}", file=sys.stderr,
              flush=True)
        return subprocess.call([a.replace("{address}", cluster.address) for a in command])


if __name__ == "__main__":
    raise SystemExit(main())
