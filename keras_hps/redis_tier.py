"""The Redis Cluster tier (HPS's `volatile_db.type: "redis_cluster"`): one table's rows in a
Redis Cluster shared by every server, through redis-py's cluster client.

Layout (one namespace per model, table name and table version, so two models with a table of
the same name, or two versions of one table, never share a row):

- rows: `num_partitions` Redis hashes per table, `khps:{<ns>/p<i>}:v`; a key lives in
  partition `mix64(key) % num_partitions`; the field is the key as 8 little-endian bytes,
  the value the row as `dim` little-endian float32 (4 x dim bytes). The `{...}` hash tag
  puts each partition on one slot, so the partitions spread over the cluster's masters.
- eviction metadata (only when `overflow_margin` is set): `khps:{<ns>/p<i>}:t`, field ->
  last access time (ms) or access count. Only rows that have metadata are evictable: rows
  written by `update` have none, so an update is never evicted (it may be the only copy of
  the new value).
- per table: `khps:{<ns>}:layout` (partitions and dim, checked by every server),
  `khps:{<ns>}:fill` (the fill-once lock, then "done"), `khps:{<ns>}:updates` (a counter of
  `update` calls: while it is 0 the cold tier holds the same rows as the cluster).
- a 9-byte sentinel field in every partition, written by the fill: a partition without it
  lost its rows (a master restarted without persistence), and lookups there raise
  `UnavailableError` instead of answering misses.

Reads are pipelined HMGETs, one per partition and `max_get_batch_size` keys; writes are small
Lua scripts (atomic per partition and batch) so that a row from the cold tier never overwrites
a newer update, and an eviction never removes a row that was just updated.

Faults: any Redis error (dead or unreachable node, cluster down, timeout) raises
`UnavailableError`; the answer is never a default or a stale vector. `fetch_with_fallback`
answers from the cold tier instead while that is exact (no update was ever applied to the
table). A password Redis rejects raises `ConfigError` at construction.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from keras_hps.config import NO_OVERFLOW_LIMIT, VolatileDBConfig, check_volatile_db
from keras_hps.errors import ConfigError, TableFormatError, UnavailableError
from keras_hps.schema import Source, load_block
from keras_hps.update_log import last_rows

__all__ = [
    "FillResult",
    "connect_cluster",
    "RedisClusterSettings",
    "RedisClusterTier",
    "fetch_with_fallback",
    "table_content_id",
    "partition_of",
    "redis_cluster_settings",
    "table_namespace",
]

_PREFIX = "khps"
#: 9 bytes: never equal to an 8-byte key field.
_SENTINEL = b"khps:fill"
_LAYOUT_VERSION = 1


# --------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class RedisClusterSettings:
    """HPS's `volatile_db` keys for `type: "redis_cluster"`, as this tier uses them.

    `overflow_margin` is per partition, as in HPS: a partition holding more rows after an
    insert is pruned by `overflow_policy` down to `overflow_resolution_target x margin`."""

    address: tuple[str, ...] = ("127.0.0.1:7000",)
    user_name: str = "default"
    password: str = ""
    num_partitions: int = 16
    num_node_connections: int = 5
    max_get_batch_size: int = 65536
    max_set_batch_size: int = 65536
    overflow_margin: int = NO_OVERFLOW_LIMIT
    overflow_policy: str = "evict_random"
    overflow_resolution_target: float = 0.8
    initial_cache_rate: float = 1.0
    refresh_time_after_fetch: bool = False
    cache_missed_embeddings: bool = False
    #: keras-hps: seconds a Redis command may take before the node counts as unreachable.
    socket_timeout: float = 5.0

    @property
    def limited(self) -> bool:
        """Whether partitions have a row limit (and so eviction metadata)."""
        return self.overflow_margin < NO_OVERFLOW_LIMIT

    @property
    def resolution_margin(self) -> int:
        """Rows a pruned partition keeps (HPS: margin x target, rounded)."""
        return int(self.overflow_margin * self.overflow_resolution_target + 0.5)

    @property
    def nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every address."""
        out = []
        for a in self.address:
            host, _, port = a.rpartition(":")
            out.append((host, int(port)))
        return out


def redis_cluster_settings(volatile_db: Mapping[str, Any] | VolatileDBConfig
                           ) -> RedisClusterSettings:
    """The tier's settings from a `volatile_db` block naming a Redis Cluster: a loaded
    `VolatileDBConfig`, or a raw block (checked by the config schema: `ConfigError` naming
    `volatile_db.<key>` for a wrong type or value, or a key keras-hps does not implement)."""
    if isinstance(volatile_db, VolatileDBConfig):
        vdb = volatile_db
    else:
        src = Source(None, Path.cwd())
        vdb = load_block(src, VolatileDBConfig, {"type": "redis_cluster", **volatile_db},
                         "volatile_db")
        check_volatile_db(src, vdb)
    if not vdb.redis:
        raise ConfigError(f"volatile_db.type: {vdb.type!r} is not a Redis Cluster type "
                          "('redis_cluster', or HPS's aliases 'redis', 'redis_cluster_backend')")
    return RedisClusterSettings(
        address=vdb.address, user_name=vdb.user_name, password=vdb.password,
        num_partitions=vdb.num_partitions, num_node_connections=vdb.num_node_connections,
        max_get_batch_size=vdb.get_batch_size, max_set_batch_size=vdb.set_batch_size,
        overflow_margin=vdb.overflow_margin, overflow_policy=vdb.overflow_policy,
        overflow_resolution_target=vdb.overflow_resolution_target,
        initial_cache_rate=vdb.initial_cache_rate,
        refresh_time_after_fetch=vdb.refresh_time_after_fetch,
        cache_missed_embeddings=vdb.cache_missed_embeddings, socket_timeout=vdb.socket_timeout)


# --------------------------------------------------------------------------------------------
# layout helpers

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def partition_of(keys: np.ndarray, num_partitions: int) -> np.ndarray:
    """Partition of each int64 key: a 64-bit mix of the key modulo `num_partitions`."""
    x = np.asarray(keys, np.int64).view(np.uint64).copy()
    x ^= x >> np.uint64(30)
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    out = x % np.uint64(num_partitions)
    return out.astype(np.uint16 if num_partitions <= 65536 else np.int64)


def table_namespace(model: str, table: str, version: str) -> str:
    """The namespace of one table version: model, table name and version, each escaped so that
    no name can contain the separator or a hash-tag brace."""
    q = lambda s: urllib.parse.quote(str(s), safe="-_.~")  # noqa: E731
    return f"{q(model)}/{q(table)}/{q(version)}"


class ColdReader(Protocol):
    """What `fill_from` reads: rows [start, stop) of the table file (ColdTier has this)."""

    @property
    def num_rows(self) -> int: ...

    def read_block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class FillResult:
    """What `fill_from` did: `filled` rows written by this server (0 when another server
    filled, or had filled, the table), `waited_s` seconds spent waiting for another filler."""

    filled: bool
    rows: int = 0
    waited_s: float = 0.0


# Lua, run atomically on the partition's node. KEYS[1] rows hash, KEYS[2] metadata hash.
# Insert rows absent from the partition (a row from the cold tier never replaces an update);
# ARGV[1] = "" (no metadata) or the metadata value of a new row; ARGV[2..] field, value pairs.
_INSERT_NX = """
local meta = ARGV[1]
local added = 0
for i = 2, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    added = added + 1
    if meta ~= '' then redis.call('HSET', KEYS[2], ARGV[i], meta) end
  end
end
return {added, redis.call('HLEN', KEYS[1])}
"""
# Write rows (new or replacing) and drop their metadata: updated rows are never evicted.
_UPDATE = """
for i = 1, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HDEL', KEYS[2], ARGV[i])
end
return redis.call('HLEN', KEYS[1])
"""
# Evict rows that still have metadata (an update since the candidates were read pinned them).
_EVICT = """
local n = 0
for i = 1, #ARGV do
  if redis.call('HDEL', KEYS[2], ARGV[i]) == 1 then
    n = n + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return {n, redis.call('HLEN', KEYS[1])}
"""
# Record accesses of evictable rows: ARGV[1] "inc" (access count) or "set" (ARGV[2] = time).
_TOUCH = """
for i = 3, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    if ARGV[1] == 'inc' then redis.call('HINCRBY', KEYS[1], ARGV[i], 1)
    else redis.call('HSET', KEYS[1], ARGV[i], ARGV[2]) end
  end
end
return 0
"""
_EXTEND_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_TAKE_DONE = """
if redis.call('GET', KEYS[1]) == 'done' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_FINISH_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], 'done')
  return 1
end
return 0
"""


def redis_errors() -> tuple[type[BaseException], ...]:
    """The exception types redis-py raises for a failed command (imported lazily)."""
    from redis.exceptions import RedisClusterException, RedisError

    return (RedisError, RedisClusterException)


def connect_cluster(settings: RedisClusterSettings, what: str = "Redis Cluster") -> Any:
    """A redis-py `RedisCluster` client for `settings` (bytes replies, HPS's
    `num_node_connections` connections per node at most). ConfigError naming
    `volatile_db.password` when Redis rejects the credentials; UnavailableError when no
    address answers."""
    from redis.backoff import ExponentialBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.connection import BlockingConnectionPool
    from redis.retry import Retry

    s = settings
    auth = {"username": s.user_name or None, "password": s.password} if s.password else {}
    _check_credentials(s, auth, what)
    try:
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in s.nodes],
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2),
            connection_pool_class=BlockingConnectionPool,
            max_connections=s.num_node_connections,
            socket_timeout=s.socket_timeout, socket_connect_timeout=min(2.0, s.socket_timeout),
            **auth)
    except redis_errors() as e:
        raise UnavailableError(f"{what}: cannot connect to {','.join(s.address)}: "
                               f"{type(e).__name__}: {e}") from None


def _check_credentials(s: RedisClusterSettings, auth: dict[str, Any], what: str) -> None:
    """Log in to the first reachable address: ConfigError naming `volatile_db.password` when
    Redis rejects the user or password (or wants one), UnavailableError when no address
    answers."""
    import redis
    from redis.backoff import NoBackoff
    from redis.exceptions import AuthenticationError, ResponseError
    from redis.retry import Retry

    errors = []
    for host, port in s.nodes:
        node = redis.Redis(host=host, port=port, socket_timeout=s.socket_timeout,
                           socket_connect_timeout=min(2.0, s.socket_timeout),
                           retry=Retry(NoBackoff(), 0), **auth)
        try:
            node.ping()
            return
        except (AuthenticationError, ResponseError) as e:
            msg = str(e)
            if isinstance(e, AuthenticationError) or "NOAUTH" in msg or "AUTH" in msg:
                who = f"user {s.user_name!r}" if s.password else "a connection without password"
                raise ConfigError(f"volatile_db.password: the Redis Cluster at {host}:{port} "
                                  f"rejected {who}: {msg}") from None
            errors.append(f"{host}:{port}: {msg}")
        except redis_errors() as e:
            errors.append(f"{host}:{port}: {type(e).__name__}: {e}")
        finally:
            node.close()
    raise UnavailableError(f"{what}: cannot connect to any address: " + "; ".join(errors))


# --------------------------------------------------------------------------------------------
# the tier


class RedisClusterTier:
    """One table version's rows in a Redis Cluster (see the module docstring for the layout).

    `fetch`, `insert`, `update` and `delete` take int64 keys; `fill_from` fills the cluster
    from the cold tier once for all servers. Safe to call from several threads."""

    def __init__(self, settings: RedisClusterSettings, *, model: str, table: str,
                 version: str, dim: int, client: Any = None,
                 fill_lock_ttl_s: float = 30.0) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.settings = settings
        self.dim = int(dim)
        self.row_bytes = 4 * self.dim
        self.namespace = table_namespace(model, table, version)
        self.what = f"Redis Cluster tier {model}/{table}@{version[:19]}"
        self.fill_lock_ttl_ms = int(fill_lock_ttl_s * 1000)
        p = settings.num_partitions
        self._vkeys = [f"{_PREFIX}:{{{self.namespace}/p{i}}}:v".encode() for i in range(p)]
        self._tkeys = [f"{_PREFIX}:{{{self.namespace}/p{i}}}:t".encode() for i in range(p)]
        base = f"{_PREFIX}:{{{self.namespace}}}"
        self._layout_key = f"{base}:layout"
        self._fill_key = f"{base}:fill"
        self._updates_key = f"{base}:updates"
        self._owns_client = client is None
        self._client = client if client is not None else connect_cluster(settings, self.what)
        self._lock = threading.Lock()
        self.hits = self.misses = self.inserts = self.updates = self.deletes = 0
        self.evictions = self.unavailable = self.touch_dropped = 0
        self._closed = False
        try:
            self._check_layout()
            self._updated = int(self._call(self._client.get, self._updates_key) or 0) > 0
        except BaseException:
            self.close()
            raise
        self._touch_queue: queue.Queue | None = None
        self._touch_thread: threading.Thread | None = None
        if settings.limited and (settings.overflow_policy == "evict_least_used" or
                                 (settings.overflow_policy == "evict_oldest"
                                  and settings.refresh_time_after_fetch)):
            self._touch_queue = queue.Queue(maxsize=8)
            self._touch_thread = threading.Thread(target=self._touch_worker, daemon=True,
                                                  name=f"khps-redis-touch-{self.namespace}")
            self._touch_thread.start()

    # -- connection ---------------------------------------------------------------------------

    def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """fn(*args), Redis errors turned into UnavailableError."""
        if self._closed:
            raise RuntimeError(f"{self.what} is closed")
        try:
            return fn(*args, **kw)
        except redis_errors() as e:
            with self._lock:
                self.unavailable += 1
            raise UnavailableError(f"{self.what}: {type(e).__name__}: {e}") from None

    def _pipeline(self, build: Callable[[Any], None]) -> list[Any]:
        """Run the commands `build(pipe)` queues, in one non-transactional cluster pipeline."""

        def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            build(pipe)
            return pipe.execute(raise_on_error=True)

        return self._call(run)

    def _check_layout(self) -> None:
        want = f"v{_LAYOUT_VERSION} partitions={self.settings.num_partitions} dim={self.dim}"
        self._call(self._client.set, self._layout_key, want, nx=True)
        have = self._call(self._client.get, self._layout_key)
        have = have.decode() if isinstance(have, bytes) else str(have)
        if have != want:
            raise ConfigError(
                f"volatile_db.num_partitions: {self.what} is stored in the cluster as "
                f"'{have}', this server has '{want}'; every server sharing a table must use "
                "the same num_partitions and dim")

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _as_keys(keys: Any) -> np.ndarray:
        k = np.asarray(keys)
        if k.ndim != 1 or k.dtype.kind not in "iu":
            raise TypeError(f"keys must be a 1-D integer array, got {k.dtype}{list(k.shape)}")
        return k.astype(np.int64, copy=False)

    def _as_vectors(self, vectors: Any, n: int) -> np.ndarray:
        v = np.ascontiguousarray(vectors, dtype="<f4")
        if v.shape != (n, self.dim):
            raise ValueError(f"{self.what}: vectors must be [{n}, {self.dim}], got "
                             f"{list(v.shape)}")
        return v

    def _by_partition(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(order, bounds): keys[order] grouped by partition; partition p's keys are
        keys[order[bounds[p]:bounds[p + 1]]]."""
        part = partition_of(keys, self.settings.num_partitions)
        order = np.argsort(part, kind="stable")
        counts = np.bincount(part, minlength=self.settings.num_partitions)
        bounds = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=bounds[1:])
        return order, bounds

    @staticmethod
    def _chunks(bounds: np.ndarray, size: int) -> list[tuple[int, int, int]]:
        """(partition, start, stop) slices of at most `size` keys."""
        out = []
        for p in range(len(bounds) - 1):
            for s in range(int(bounds[p]), int(bounds[p + 1]), size):
                out.append((p, s, min(s + size, int(bounds[p + 1]))))
        return out

    @staticmethod
    def _fields(keys: np.ndarray) -> list[bytes]:
        kb = keys.astype("<i8", copy=False).tobytes()
        return [kb[i:i + 8] for i in range(0, len(kb), 8)]

    def _meta_value(self) -> bytes:
        s = self.settings
        if not s.limited:
            return b""
        if s.overflow_policy == "evict_oldest":
            return str(int(time.time() * 1000)).encode()
        return b"0"

    # -- reads --------------------------------------------------------------------------------

    def _read(self, k: np.ndarray) -> tuple[np.ndarray, list[Any]]:
        """(order, values): HMGET of keys k[order] grouped by partition; raises
        UnavailableError when a partition lost its rows."""
        order, bounds = self._by_partition(k)
        fields = self._fields(k[order])
        chunks = self._chunks(bounds, self.settings.max_get_batch_size)

        def build(pipe: Any) -> None:
            for p, s, e in chunks:
                pipe.hmget(self._vkeys[p], [_SENTINEL, *fields[s:e]])

        replies = self._pipeline(build)
        values: list[Any] = []
        for (p, _, _), r in zip(chunks, replies, strict=True):
            if r[0] is None:
                with self._lock:
                    self.unavailable += 1
                raise UnavailableError(
                    f"{self.what}: partition {p} has lost its rows (its master restarted "
                    "without persistence?); a server restart refills it")
            values.extend(r[1:])
        return order, values

    def fetch(self, keys: Any) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, float32 `[n_found, dim]` rows of the found keys in key order).

        Raises UnavailableError when the cluster cannot answer, or a partition the keys fall
        in has lost its rows."""
        k = self._as_keys(keys)
        n = len(k)
        if n == 0:
            return np.zeros(0, bool), np.empty((0, self.dim), np.float32)
        order, values = self._read(k)
        found_sorted = np.fromiter((v is not None for v in values), bool, n)
        data = b"".join(filter(None, values))
        nf = int(found_sorted.sum())
        if len(data) != nf * self.row_bytes:
            bad = next(len(v) for v in values if v is not None and len(v) != self.row_bytes)
            raise TableFormatError(f"{self.what}: a stored row has {bad} bytes, expected "
                                   f"{self.row_bytes} (dim {self.dim})")
        rows = np.frombuffer(data, "<f4").reshape(nf, self.dim)
        found = np.empty(n, bool)
        found[order] = found_sorted
        pos = order[found_sorted]
        if nf > 1 and not np.all(pos[1:] > pos[:-1]):
            rows = rows[np.argsort(pos)]
        with self._lock:
            self.hits += nf
            self.misses += n - nf
        if self._touch_queue is not None and nf:
            self._queue_touch(k[found])
        return found, np.asarray(rows, np.float32)

    def contains(self, keys: Any) -> np.ndarray:
        """Whether each key has a row in the cluster (no counters, no access recorded)."""
        k = self._as_keys(keys)
        out = np.zeros(len(k), bool)
        if len(k):
            order, values = self._read(k)
            out[order] = [v is not None for v in values]
        return out

    # -- writes -------------------------------------------------------------------------------

    def _write(self, script: str, keys: np.ndarray, vectors: np.ndarray | None,
               meta: bytes | None) -> list[Any]:
        """Run `script` over (key, row) pairs (or keys alone) per partition chunk."""
        order, bounds = self._by_partition(keys)
        fields = self._fields(keys[order])
        chunks = self._chunks(bounds, self.settings.max_set_batch_size)
        vb = None if vectors is None else vectors[order].tobytes()
        rb = self.row_bytes

        def build(pipe: Any) -> None:
            for p, s, e in chunks:
                args: list[bytes] = [] if meta is None else [meta]
                if vb is None:
                    args.extend(fields[s:e])
                else:
                    for i in range(s, e):
                        args.append(fields[i])
                        args.append(vb[i * rb:(i + 1) * rb])
                pipe.execute_command("EVAL", script, 2, self._vkeys[p], self._tkeys[p], *args)

        replies = self._pipeline(build)
        return [(p, r) for (p, _, _), r in zip(chunks, replies, strict=True)]

    def insert(self, keys: Any, vectors: Any) -> int:
        """Add rows for keys the cluster does not hold (never replacing a row, which may be a
        newer update); prune partitions over `overflow_margin`. Returns rows added."""
        k = self._as_keys(keys)
        if len(k) == 0:
            return 0
        v = self._as_vectors(vectors, len(k))
        added = 0
        over: dict[int, int] = {}
        for p, (a, size) in self._write(_INSERT_NX, k, v, self._meta_value()):
            added += int(a)
            if int(size) - 1 > self.settings.overflow_margin:  # HLEN counts the fill mark
                over[p] = int(size)
        with self._lock:
            self.inserts += added
        for p, size in over.items():
            self._resolve_overflow(p, size)
        return added

    def update(self, keys: Any, vectors: Any) -> None:
        """Write rows, new or replacing, and pin them (updated rows are never evicted). Marks
        the table as updated: from now on the cold tier is no longer an exact fallback."""
        k = self._as_keys(keys)
        if len(k) == 0:
            return
        v = self._as_vectors(vectors, len(k))
        k, v = last_rows(k, v)  # last row of a duplicated key wins
        # flag first: a row newer than the cold tier never exists without the flag
        self._call(self._client.incr, self._updates_key)
        self._updated = True
        self._write(_UPDATE, k, v, None)
        with self._lock:
            self.updates += len(k)

    def delete(self, keys: Any) -> int:
        """Remove rows from the cluster (the next lookup of these keys misses: the hierarchy
        reads the cold tier). Returns rows removed."""
        k = self._as_keys(keys)
        if len(k) == 0:
            return 0
        order, bounds = self._by_partition(k)
        fields = self._fields(k[order])
        chunks = self._chunks(bounds, self.settings.max_set_batch_size)

        def build(pipe: Any) -> None:
            for p, s, e in chunks:
                pipe.hdel(self._tkeys[p], *fields[s:e])
                pipe.hdel(self._vkeys[p], *fields[s:e])

        replies = self._pipeline(build)
        n = int(sum(replies[1::2]))
        with self._lock:
            self.deletes += n
        return n

    # -- eviction -----------------------------------------------------------------------------

    def _resolve_overflow(self, p: int, size: int) -> None:
        """Evict evictable rows of partition p (`size`: its HLEN, rows + fill mark) by policy
        until it holds at most `resolution_margin` rows (or no evictable row is left)."""
        s = self.settings
        target = s.resolution_margin
        tkey = self._tkeys[p]
        if s.overflow_policy == "evict_random":
            cand = self._call(self._client.hkeys, tkey)
            rng = np.random.default_rng()
            cand = [cand[i] for i in rng.permutation(len(cand))]
        else:
            meta = self._call(self._client.hgetall, tkey)
            cand = sorted(meta, key=lambda f: int(meta[f]))
        evicted = 0
        for i in range(0, len(cand), s.max_set_batch_size):
            if size - 1 <= target:
                break
            batch = cand[i:i + s.max_set_batch_size][:max(0, size - 1 - target)]
            n, size = self._call(self._client.eval, _EVICT, 2, self._vkeys[p], tkey, *batch)
            evicted += int(n)
        with self._lock:
            self.evictions += evicted

    def _queue_touch(self, keys: np.ndarray) -> None:
        assert self._touch_queue is not None
        try:
            self._touch_queue.put_nowait(keys)
        except queue.Full:
            with self._lock:
                self.touch_dropped += len(keys)

    def _touch_worker(self) -> None:
        """Record accesses for the eviction policy off the lookup path (best effort, as HPS)."""
        assert self._touch_queue is not None
        mode = b"inc" if self.settings.overflow_policy == "evict_least_used" else b"set"
        while True:
            keys = self._touch_queue.get()
            if keys is None:
                self._touch_queue.task_done()
                return
            try:
                order, bounds = self._by_partition(keys)
                fields = self._fields(keys[order])
                now = str(int(time.time() * 1000)).encode()
                chunks = self._chunks(bounds, self.settings.max_set_batch_size)
                self._pipeline(lambda pipe, c=chunks, f=fields, t=now: [
                    pipe.execute_command("EVAL", _TOUCH, 1, self._tkeys[p], mode, t, *f[s:e])
                    for p, s, e in c])
            except (UnavailableError, RuntimeError):
                with self._lock:
                    self.touch_dropped += len(keys)
            finally:
                self._touch_queue.task_done()

    def wait_idle(self) -> None:
        """Wait until the recorded accesses queued so far are written."""
        if self._touch_queue is not None and not self._closed:
            self._touch_queue.join()

    # -- fill once ----------------------------------------------------------------------------

    @property
    def updated(self) -> bool:
        """True once any update was applied to this table (read from the cluster at
        construction, set by `update` and `note_update`): the cold tier is then stale."""
        return self._updated

    def note_update(self) -> None:
        """Record that another server updated this table (called by the update consumer)."""
        self._updated = True

    def fill_state(self) -> str:
        """"done", "running" (another server holds the fill lock) or "none"."""
        v = self._call(self._client.get, self._fill_key)
        if v is None:
            return "none"
        return "done" if v == b"done" else "running"

    def _partitions_intact(self) -> bool:
        got = self._pipeline(lambda pipe: [pipe.hexists(vk, _SENTINEL) for vk in self._vkeys])
        return all(got)

    def fill_from(self, cold: ColdReader, initial_cache_rate: float | None = None, *,
                  progress: bool | None = None, poll_s: float = 0.05,
                  timeout_s: float | None = None) -> FillResult:
        """Fill the first `ceil(initial_cache_rate x rows)` rows of `cold` that the cluster
        lacks, once for all servers sharing the table.

        The first server takes a lock (with a TTL it renews while filling) and fills; the
        others wait for its "done" and skip; if the filler dies, its lock expires and a waiting
        server takes over (rows are written only where absent, so nothing is written twice).
        A table marked done whose partitions lost their rows is filled again while it was
        never updated; after an update that would serve stale rows, so it raises
        UnavailableError. Call once after construction, before lookups (rate 0 fills no row
        but marks the partitions)."""
        rate = self.settings.initial_cache_rate if initial_cache_rate is None \
            else float(initial_cache_rate)
        owner = f"fill:{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex}".encode()
        t0 = time.monotonic()
        while True:
            if self._call(self._client.set, self._fill_key, owner, nx=True,
                          px=self.fill_lock_ttl_ms):
                break
            state = self._call(self._client.get, self._fill_key)
            if state == b"done":
                if self._partitions_intact():
                    return FillResult(False, 0, time.monotonic() - t0)
                if self.updated:
                    raise UnavailableError(
                        f"{self.what}: partitions lost their rows after updates were applied; "
                        "the updates are gone from the cluster (run Redis with appendonly or "
                        "replicas) and the cold tier would serve stale rows")
                # refill what was lost: take the lock over "done"
                if self._call(self._client.eval, _TAKE_DONE, 1, self._fill_key, owner,
                              self.fill_lock_ttl_ms):
                    break
                continue
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise UnavailableError(f"{self.what}: another server has been filling the "
                                       f"table for more than {timeout_s} s")
            time.sleep(poll_s)
        waited = time.monotonic() - t0
        rows = min(cold.num_rows, math.ceil(rate * cold.num_rows))
        # the marks first: they count in a partition's size while the rows arrive
        self._pipeline(lambda pipe: [pipe.hset(vk, _SENTINEL, b"1") for vk in self._vkeys])
        written = self._fill_rows(cold, rows, owner, progress)
        self._call(self._client.eval, _FINISH_LOCK, 1, self._fill_key, owner)
        return FillResult(True, written, waited)

    def _fill_rows(self, cold: ColdReader, rows: int, owner: bytes,
                   progress: bool | None) -> int:
        block = self.settings.max_set_batch_size
        bar = None
        if progress or (progress is None and rows * self.row_bytes > (256 << 20)):
            from tqdm.auto import tqdm

            bar = tqdm(total=rows, desc=f"fill {self.what}", unit="row", unit_scale=True)
        written = 0
        try:
            for start in range(0, rows, block):
                k, v = cold.read_block(start, min(rows, start + block))
                written += self.insert(k, v)
                self._call(self._client.eval, _EXTEND_LOCK, 1, self._fill_key, owner,
                           self.fill_lock_ttl_ms)
                release = getattr(cold, "release_pages", None)
                if release is not None:
                    release()
                if bar is not None:
                    bar.update(len(k))
        finally:
            if bar is not None:
                bar.close()
        return written

    # -- bookkeeping --------------------------------------------------------------------------

    def size(self) -> int:
        """Rows this table holds in the cluster now."""
        lens = self._pipeline(lambda pipe: [pipe.hlen(vk) for vk in self._vkeys])
        marks = self._pipeline(lambda pipe: [pipe.hexists(vk, _SENTINEL) for vk in self._vkeys])
        return int(sum(lens) - sum(bool(m) for m in marks))

    def stats(self) -> dict[str, Any]:
        """Counters of this server: hits, misses, inserts, updates, deletes, evictions,
        unavailable (failed calls), touch_dropped; and the table's namespace."""
        with self._lock:
            return {"namespace": self.namespace, "hits": self.hits, "misses": self.misses,
                    "inserts": self.inserts, "updates": self.updates, "deletes": self.deletes,
                    "evictions": self.evictions, "unavailable": self.unavailable,
                    "touch_dropped": self.touch_dropped, "updated": self._updated}

    def drop(self) -> None:
        """Delete every key of this table version from the cluster (tests, `keras-hps`
        maintenance); other servers still using it will miss (or see lost partitions)."""
        keys = [*self._vkeys, *self._tkeys]
        self._pipeline(lambda pipe: [pipe.delete(k) for k in keys])
        for k in (self._layout_key, self._fill_key, self._updates_key):
            self._call(self._client.delete, k)

    def close(self) -> None:
        """Stop the background worker and close the connections (if this tier made them)."""
        if self._closed:
            return
        self._closed = True
        if getattr(self, "_touch_queue", None) is not None:
            try:
                self._touch_queue.put_nowait(None)
            except queue.Full:
                pass
        if self._owns_client and self._client is not None:
            self._client.close()

    def __enter__(self) -> RedisClusterTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fetch_with_fallback(tier: RedisClusterTier,
                        cold_fetch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                        keys: np.ndarray, *, updates_seen: bool = True
                        ) -> tuple[np.ndarray, np.ndarray, str]:
    """`tier.fetch(keys)`, or when the cluster is unavailable and the table was never updated
    (the cold tier then holds exactly the cluster's rows), `cold_fetch(keys)`. Returns
    (found, vectors, "redis" | "cold"); raises UnavailableError when neither is exact.

    `updates_seen=False` says that this server may have missed the news of an update (its
    update stream is disconnected): the cold tier then does not count as exact either."""
    try:
        found, vec = tier.fetch(keys)
        return found, vec, "redis"
    except UnavailableError:
        if tier.updated or not updates_seen:
            raise
    found, vec = cold_fetch(np.asarray(keys, np.int64))
    return found, vec, "cold"


# --------------------------------------------------------------------------------------------
# the content id of a table file: the version part of its namespace


def _file_stats(path: str) -> list[list[Any]]:
    real = os.path.realpath(path)
    files = sorted(os.path.join(real, n) for n in os.listdir(real)) if os.path.isdir(real) \
        else [real]
    return [[os.path.basename(f), st.st_size, st.st_mtime_ns, st.st_ino]
            for f, st in ((f, os.stat(f)) for f in files)]


def table_content_id(path: str, dim: int, *, progress: bool | None = None) -> str:
    """"sha256:<hex>" of a table's content: SHA-256 over dim (int64), the keys (int64) and the
    rows (float32), little-endian, in file order, as `keras-hps export` records it in each
    version's manifest. Every machine computes the same id for the same table, wherever the
    file lies and whenever it was written. Kept in `<path>.sha256` (with the file's size,
    modification time and inode) so that a restart does not read the table again."""
    cache = Path(str(path).rstrip("/") + ".sha256")
    stats = _file_stats(path)
    try:
        saved = json.loads(cache.read_text())
        if saved.get("files") == stats and saved.get("dim") == int(dim):
            return str(saved["id"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    from keras_hps.formats import open_table

    h = hashlib.sha256(np.int64(dim).tobytes())
    with open_table(str(path), dim) as table:
        n = table.num_rows
        bar = None
        if progress or (progress is None and table.nbytes > (1 << 30)):
            from tqdm.auto import tqdm

            bar = tqdm(total=2 * n, desc=f"content id of {path}", unit="row", unit_scale=True)
        block = max(1, (64 << 20) // (4 * dim))
        for part in (table.keys, table.vectors):
            for start in range(0, n, block):
                a = np.asarray(part[start:start + block])
                h.update(np.ascontiguousarray(a, "<i8" if a.ndim == 1 else "<f4").data)
                if bar is not None:
                    bar.update(len(a))
        if bar is not None:
            bar.close()
    cid = "sha256:" + h.hexdigest()
    try:
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"id": cid, "dim": int(dim), "files": stats}))
        os.replace(tmp, cache)
    except OSError:  # a read-only folder: compute it again next time
        pass
    return cid
