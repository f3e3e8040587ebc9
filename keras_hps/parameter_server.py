"""The parameter server: every table of a config, each serving lookups through its tiers.

```
keys -> checked (once, here) -> TieredTable: unique -> [GPU tier] -> host RAM tier
        -> [Redis Cluster tier | rows updated on this machine] -> cold tier -> default vector
        -> fill the upper tiers -> input order
```

`ParameterServer.lookup(model, table_id, keys)` checks the keys where they enter (`check_keys`)
and hands them to the table; a `TieredTable` owns its tiers in order, top first, and calls each
one down in turn: no tier calls up. Tier verbs: `lookup` answers every key (the server, a table,
a layer); a tier below the GPU's `fetch(unique_keys)` returns `(found, rows of the found keys)`;
a device tier's `query` returns rows for every key with zeros where it missed, and a hit mask.
`ParameterServer._build_table` is the one place a table's tiers are put together.

`ParameterServer.update(model, table_id, keys, vectors)` changes rows online: through the
shared Redis Cluster tier and its update stream when the config names one, else through the
table's durable update log (`keras_hps.online_updates`). A table applies a change
(`TieredTable.apply_update`) to every tier it owns, so a lookup that starts after `update`
returned answers the new rows.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from keras_hps.cold_tier import ColdTier
from keras_hps.config import ModelConfig, PSConfig, load_config
from keras_hps.errors import ConfigError, InvalidInputError, UnavailableError
from keras_hps.formats import check_config_tables, open_table
from keras_hps.gpu_tier import active_scope, query_tables
from keras_hps.host_tier import HostTier
from keras_hps.online_updates import UPDATE_POLL_S, LogUpdates, SharedUpdates
from keras_hps.output_buffers import aligned_empty, gather_rows
from keras_hps.redis_tier import fetch_with_fallback, redis_cluster_settings, table_content_id
from keras_hps.update_log import UpdatedRows, last_rows

__all__ = [
    "Init",
    "ParameterServer",
    "TableSpec",
    "TieredTable",
    "check_keys",
    "check_update",
    "close_all",
    "ensure_parameter_server",
    "get_parameter_server",
    "init",
    "table_spec",
]

#: Show a progress bar when loading more than this many bytes into the host tier.
_PROGRESS_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class TableSpec:
    """What a caller needs to know about one table."""

    model: str
    table_id: int
    name: str
    dim: int
    default_value: float
    key_dtype: np.dtype
    max_keys_per_lookup: int
    num_rows: int
    path: str
    cache_type: str


def table_spec(config: PSConfig, m: ModelConfig, t: int, num_rows: int = 0) -> TableSpec:
    """The spec of table `t` of model `m` in `config` (`num_rows`: of its file, when open)."""
    return TableSpec(
        model=m.model, table_id=t, name=m.table_name(t), dim=m.dim(t),
        default_value=m.default_value(t), key_dtype=config.key_dtype,
        max_keys_per_lookup=m.max_keys_per_lookup(t), num_rows=num_rows,
        path=m.sparse_files[t], cache_type=m.cache_type,
    )


# ----------------------------------------------------------------------------------------------
# keys, checked once where they enter the parameter server

#: (a lookup's key dtype, NumPy or torch; the table's key dtype) -> whether the lookup's dtype
#: holds values outside the table's key type. Only then are its keys range-checked (a pass
#: over them; a device sync on the GPU).
_WIDER: dict[tuple[Any, np.dtype], bool] = {}


def _wider(dtype: Any, key_dtype: np.dtype, iinfo: Any) -> bool:
    wider = _WIDER.get((dtype, key_dtype))
    if wider is None:
        info, table = iinfo(dtype), np.iinfo(key_dtype)
        wider = _WIDER[(dtype, key_dtype)] = info.min < table.min or info.max > table.max
    return wider


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _too_many(spec: TableSpec, where: str, count: int) -> InvalidInputError:
    return InvalidInputError(
        f"{where}: {count} keys in one lookup, more than max_batch_size x "
        f"maxnum_catfeature_query_per_table_per_sample = {spec.max_keys_per_lookup}; split "
        f"batches that exceed the configured maximum")


def _out_of_range(spec: TableSpec, where: str, lo: int, hi: int) -> InvalidInputError | None:
    info = np.iinfo(spec.key_dtype)
    if lo >= info.min and hi <= info.max:
        return None
    bad = lo if lo < info.min else hi
    return InvalidInputError(
        f"{where}: key {bad} is outside the key type {spec.key_dtype} [{info.min}, {info.max}] "
        f"(supportlonglong={spec.key_dtype == np.int64})")


def check_keys(spec: TableSpec, keys: Any) -> Any:
    """``keys`` for table ``spec``, checked: integers, at most ``max_keys_per_lookup`` of them,
    each within the table's key type. NumPy (or anything array-like) comes back as an array, a
    torch tensor as it is. Raises InvalidInputError naming the model and table."""
    where = f"model {spec.model!r} table {spec.table_id}"
    if _is_torch(keys):
        return _check_torch_keys(spec, keys, where)
    arr = np.asarray(keys)
    if arr.dtype.kind not in "iu":
        kind = {"f": "float", "c": "complex", "b": "bool"}.get(arr.dtype.kind, str(arr.dtype))
        raise InvalidInputError(f"{where}: keys must be integers, got {kind} ({arr.dtype})")
    if arr.size > spec.max_keys_per_lookup:
        raise _too_many(spec, where, arr.size)
    if arr.size and _wider(arr.dtype, spec.key_dtype, np.iinfo):
        err = _out_of_range(spec, where, int(arr.min()), int(arr.max()))
        if err is not None:
            raise err
    return arr


def check_update(spec: TableSpec, keys: Any, vectors: Any) -> tuple[np.ndarray, np.ndarray]:
    """(int64 keys, float32 `[n, dim]` rows) of an update of table ``spec``, checked: integer
    keys within the table's key type (any shape, flattened) and one float row of `dim` per
    key. Raises InvalidInputError naming the model and table."""
    where = f"model {spec.model!r} table {spec.table_id}"
    arr = keys.detach().cpu().numpy() if _is_torch(keys) else np.asarray(keys)
    if arr.dtype.kind not in "iu":
        raise InvalidInputError(f"{where}: update keys must be integers, got {arr.dtype}")
    arr = arr.reshape(-1)
    if arr.size:
        err = _out_of_range(spec, where, int(arr.min()), int(arr.max()))
        if err is not None:
            raise err
    vec = vectors.detach().cpu().numpy() if _is_torch(vectors) else np.asarray(vectors)
    if vec.dtype.kind not in "fiu" or vec.shape != (arr.size, spec.dim):
        raise InvalidInputError(f"{where}: update rows must be numbers of shape "
                                f"[{arr.size}, {spec.dim}] (one row of dim {spec.dim} per key), "
                                f"got {vec.dtype} {list(vec.shape)}")
    return arr.astype(np.int64, copy=False), np.ascontiguousarray(vec, np.float32)


def _check_torch_keys(spec: TableSpec, keys: Any, where: str) -> Any:
    import torch

    if keys.is_floating_point() or keys.is_complex() or keys.dtype == torch.bool:
        raise InvalidInputError(f"{where}: keys must be integers, got {keys.dtype}")
    if keys.numel() > spec.max_keys_per_lookup:
        raise _too_many(spec, where, keys.numel())
    if keys.numel() and _wider(keys.dtype, spec.key_dtype, torch.iinfo):
        scope = active_scope(keys.device)
        if scope is not None:  # captured: no sync; out-of-range keys raise the miss flag
            info = np.iinfo(spec.key_dtype)
            scope.flag_if((keys < int(info.min)) | (keys > int(info.max)))
            return keys
        lo, hi = int(keys.min()), int(keys.max())  # a device sync on the GPU
        err = _out_of_range(spec, where, lo, hi)
        if err is not None:
            raise err
    return keys


# ----------------------------------------------------------------------------------------------
# one table and its tiers


class TieredTable:
    """One (model, table): its tiers in order, top first, and the default vector below them.

    ``gpu`` (a `keras_hps.gpu_tier.GpuTier`, or None) -> ``host`` (`HostTier`, or None) ->
    ``redis`` (`RedisClusterTier`, shared by every server) or ``updated`` (`UpdatedRows`: the
    rows this machine's update log changed) -> ``cold`` (`ColdTier`, the table file) ->
    default. `lookup` takes keys already checked (`check_keys`); rows found below the host
    tier are filled into the tiers above it. The host, updated and cold tiers are serialised
    by a per-table lock; a Redis read runs outside it."""

    def __init__(self, spec: TableSpec, host: HostTier | None, cold: ColdTier,
                 gpu: Any = None, *, redis: Any = None, cache_missed: bool = False) -> None:
        self.spec = spec
        self.gpu = gpu
        self.host = host
        self.redis = redis
        self.updated: UpdatedRows | None = None  # without Redis, made by the first update
        self.cold = cold
        self.cache_missed = cache_missed  # add rows found in the cold tier to the Redis tier
        self.lock = threading.Lock()
        self.update_lock = threading.Lock()  # one update at a time (held by the update path)
        # Whether this server hears of every update of the shared tier now (its update
        # stream is connected): the cold tier is an exact stand-in for an unavailable Redis
        # Cluster only then, and only while the table was never updated.
        self.updates_seen: Callable[[], bool] = lambda: True
        self.generation = 0  # bumped by every change of rows; host fills of older reads drop
        self.default_vector = np.full(spec.dim, spec.default_value, np.float32)
        self.defaults = 0
        self.lookups = 0
        self.keys = 0
        self.unique_keys = 0
        self._closed = False

    @property
    def host_complete(self) -> bool:
        """True while the host tier holds every row of the table file, and no other tier holds
        rows (misses there and in the updated rows are then unknown keys and the cold tier is
        skipped)."""
        return (self.host is not None and self.redis is None
                and self.host.resident_rows == self.cold.num_rows)

    def lookup(self, keys: Any) -> Any:
        """float32 vectors ``keys.shape + (dim,)`` for checked integer keys: NumPy in ->
        NumPy out (64-byte aligned, from `output_buffers.output_pool`), torch in -> torch out
        on the keys' device. Raises UnavailableError when the Redis Cluster tier cannot answer
        and the cold tier is no exact stand-in."""
        if self.gpu is not None:
            return self._lookup_gpu(keys)
        torch_in = _is_torch(keys)
        if torch_in and active_scope(keys.device) is not None:
            raise InvalidInputError(
                f"model {self.spec.model!r} table {self.spec.table_id}: a lookup captured in a "
                "CUDA graph needs the table's GPU tier (gpucache: true), which it has not here")
        arr = keys.detach().cpu().numpy() if torch_in else keys
        shape = arr.shape
        flat = arr.reshape(-1).astype(np.int64, copy=False)
        if flat.size == 0:
            out = aligned_empty((*shape, self.spec.dim))
        else:
            uniq, inv = np.unique(flat, return_inverse=True)
            out = self._below_gpu(uniq, inv.reshape(-1)).reshape(*shape, self.spec.dim)
            self._count(flat.size, len(uniq))
        if torch_in:
            import torch

            return torch.from_numpy(out).to(keys.device)
        return out

    def _lookup_gpu(self, keys: Any) -> Any:
        import torch

        as_numpy = not isinstance(keys, torch.Tensor)
        tkeys = torch.from_numpy(np.ascontiguousarray(keys).astype(np.int64, copy=False)) \
            if as_numpy else keys
        return self.complete_gpu(self.gpu.query(tkeys), tkeys, as_numpy)

    def complete_gpu(self, look: Any, tkeys: Any, as_numpy: bool = False) -> Any:
        """Finish a lookup the GPU tier started (`GpuTier.query`, or `query_tables` for
        several tables): the keys it did not hold from the tiers below, the counts, the
        result on the keys' device (NumPy when ``as_numpy``)."""
        below = None if look.below_keys is None else self._below_gpu(look.below_keys)
        out = self.gpu.complete(look, below)
        if look.n_unique:
            self._count(tkeys.numel(), look.n_unique)
        if as_numpy:
            return out.cpu().numpy()
        return out.to(tkeys.device, non_blocking=True)

    def _below_gpu(self, unique_keys: np.ndarray, inverse: np.ndarray | None = None) -> np.ndarray:
        """float32 `[len(unique_keys), dim]` for unique int64 keys, from the tiers below the
        GPU and the default vector, filling the host tier with rows from below it.

        With `inverse` (indices into `unique_keys`) the result is `[len(inverse), dim]`, rows
        in that order; when the host tier holds every key this is a single gather. The result
        is 64-byte aligned and comes from `output_buffers.output_pool`."""
        keys = unique_keys
        n = len(keys)
        dim = self.spec.dim
        with self.lock:
            if self._closed:
                raise RuntimeError(f"table {self.spec.model}/{self.spec.table_id} is closed")
            if n == 0:
                return aligned_empty((0 if inverse is None else len(inverse), dim))
            host = self.host
            if host is not None:
                slots = host.find(keys)
                found = slots >= 0
                if found.all():
                    host.touch(slots)
                    rows = slots if inverse is None else slots[inverse]
                    return gather_rows(host.vectors, rows)
                out = aligned_empty((n, dim))
                hit = slots[found]
                host.touch(hit, n - len(hit))
                out[found] = np.take(host.vectors, hit, axis=0)
                miss = np.flatnonzero(~found)
            else:
                out = aligned_empty((n, dim))
                miss = np.arange(n)
            if self.redis is None:
                self._below_host(keys, miss, out)
            generation = self.generation
        if self.redis is not None:
            self._below_host_shared(keys, miss, out, generation)
        return out if inverse is None else gather_rows(out, inverse)

    def _below_host(self, keys: np.ndarray, miss: np.ndarray, out: np.ndarray) -> None:
        """Without Redis, under the lock: `out[miss]` from the updated rows, the table file
        (filling the host tier) and the default vector."""
        if self.updated is not None:
            ufound, urows = self.updated.fetch(keys[miss])
            out[miss[ufound]] = urows
            miss = miss[~ufound]
        if self.host_complete:
            absent = miss
        else:
            mkeys = keys[miss]
            cfound, cvec = self.cold.fetch(mkeys)
            out[miss[cfound]] = cvec
            absent = miss[~cfound]
            if self.host is not None and len(cvec):
                self.host.insert(mkeys[cfound], cvec)
        out[absent] = self.default_vector
        self.defaults += len(absent)

    def _below_host_shared(self, keys: np.ndarray, miss: np.ndarray, out: np.ndarray,
                           generation: int) -> None:
        """With Redis: `out[miss]` from the Redis Cluster tier (read outside the lock), the
        table file and the default vector; the rows fill the host tier unless an update
        changed the table since `generation` (they may be older than the update)."""
        mkeys = keys[miss]
        rfound, rvec, source = fetch_with_fallback(self.redis, self._cold_fetch, mkeys,
                                                   updates_seen=self.updates_seen())
        out[miss[rfound]] = rvec
        rest = miss[~rfound]
        cfound, cvec = np.zeros(len(rest), bool), rvec[:0]
        if source == "redis" and len(rest):
            cfound, cvec = self._cold_fetch(keys[rest])
            out[rest[cfound]] = cvec
        absent = rest[~cfound]
        out[absent] = self.default_vector
        with self.lock:
            self.defaults += len(absent)
            if self.host is not None and generation == self.generation and not self._closed:
                got = miss[rfound] if not len(cvec) else np.concatenate([miss[rfound],
                                                                        rest[cfound]])
                fresh = got[self.host.find(keys[got]) < 0]  # another lookup may have filled
                if len(fresh):
                    self.host.insert(keys[fresh], out[fresh])
        if self.cache_missed and source == "redis" and len(cvec):
            try:  # only where absent: a newer update in the cluster is never replaced
                self.redis.insert(keys[rest[cfound]], cvec)
            except UnavailableError:
                pass

    def _cold_fetch(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            return self.cold.fetch(keys)

    def _count(self, nkeys: int, nunique: int) -> None:
        with self.lock:
            self.lookups += 1
            self.keys += nkeys
            self.unique_keys += nunique

    def apply_update(self, keys: np.ndarray, vectors: np.ndarray | None) -> None:
        """Rows of unique ``keys`` changed below this server's tiers: ``vectors`` are the new
        rows (None: unknown here, the tiers drop the keys and read them again). Kept in the
        updated rows (without Redis), written over the host tier's copies and the GPU
        tier's (dynamic caches drop them), so no tier serves the old rows once this
        returns."""
        with self.lock:
            self.generation += 1
            if self.redis is None and vectors is not None:
                if self.updated is None:
                    self.updated = UpdatedRows(self.spec.dim)
                self.updated.put(keys, vectors)
            if self.host is not None:
                if vectors is None:
                    self.host.remove(keys)
                else:
                    self.host.update(keys, vectors)
        if self.gpu is not None:
            self.gpu.update(keys, vectors)

    def drop_cached(self) -> None:
        """Forget every row the host and GPU tiers hold (after updates may have been missed):
        they are read again from the shared tier."""
        with self.lock:
            self.generation += 1
            if self.host is not None:
                self.host.clear()
        if self.gpu is not None:
            self.gpu.clear()

    def stats(self) -> dict[str, Any]:
        """Per-tier counters of this table (``gpu``, ``redis`` and ``updated`` when it has
        those tiers)."""
        with self.lock:
            host = self.host.stats() if self.host is not None else None
            out = {
                "model": self.spec.model,
                "table_id": self.spec.table_id,
                "lookups": self.lookups,
                "keys": self.keys,
                "unique_keys": self.unique_keys,
                "host": host,
                "cold": self.cold.stats(),
                "default": {"hits": self.defaults},
                "resident_rows": 0 if host is None else host["resident_rows"],
                "evictions": 0 if host is None else host["evictions"],
            }
            if self.updated is not None:
                out["updated"] = {"hits": self.updated.hits, "rows": len(self.updated)}
        if self.redis is not None:
            out["redis"] = self.redis.stats()
        if self.gpu is not None:
            out["gpu"] = self.gpu.stats()
        return out

    def close(self) -> None:
        """Release the device memory, the table file and host memory."""
        if self.gpu is not None:
            self.gpu.close()
        with self.lock:
            if not self._closed:
                self._closed = True
                self.cold.close()
                self.host = None
                if self.redis is not None:
                    self.redis.close()


# ----------------------------------------------------------------------------------------------
# the parameter server


class ParameterServer:
    """Serves `lookup(model, table_id, keys)` for every model and table of a config, and
    applies `update(model, table_id, keys, vectors)`.

    `digests` ((model, table id) -> "sha256:<hex>", as an export's manifest records them)
    name the tables' contents in a shared Redis Cluster tier; tables without one get theirs
    from their file (`redis_tier.table_content_id`). `update_poll_s`: how often this server
    reads its tables' update logs for updates other processes appended (without Redis)."""

    def __init__(self, config: str | os.PathLike | Mapping[str, Any] | PSConfig, *,
                 digests: Mapping[tuple[str, int], str] | None = None,
                 update_poll_s: float = UPDATE_POLL_S) -> None:
        self.config = load_config(config)
        check_config_tables(self.config)  # a missing or mismatched table names its key
        self._tables: dict[tuple[str, int], TieredTable] = {}
        self._digests = dict(digests or {})
        self.closed = False  # True once `close` ran
        self.updates: SharedUpdates | LogUpdates | None = None
        try:
            vdb = self.config.volatile_db
            if vdb.redis:  # the update streams are read from before the tables fill
                self.updates = SharedUpdates(redis_cluster_settings(vdb),
                                             self.config.model_names)
            else:
                self.updates = LogUpdates(update_poll_s)
            for m in self.config.models:
                for t in range(m.num_tables):
                    table = self._tables[(m.model, t)] = self._build_table(m, t)
                    self.updates.add(table)
            self.updates.start()
        except BaseException:
            self.close()
            raise

    # -- construction -----------------------------------------------------------------------

    def _build_table(self, m: ModelConfig, t: int) -> TieredTable:
        """The table serving (model m, table t): the one place its tiers are put together."""
        from keras_hps.gpu_tier import build_gpu_tier

        cold = ColdTier(open_table(m.sparse_files[t], m.dim(t)))
        spec = table_spec(self.config, m, t, cold.num_rows)
        vdb = self.config.volatile_db
        what = f"{m.model}/{spec.name}"
        host = redis = None
        try:
            rows = cold.num_rows
            cap = vdb.host_rows(rows)
            if cap:
                host = HostTier(spec.dim, cap, policy=vdb.overflow_policy,
                                resolution_target=vdb.overflow_resolution_target,
                                key_range=cold.key_range)
            if isinstance(self.updates, SharedUpdates):
                version = self._digests.get((m.model, t)) or table_content_id(spec.path, spec.dim)
                redis = self.updates.tier(spec, version)
                redis.fill_from(cold, vdb.initial_cache_rate)
            elif host is not None:
                preload = min(cap, math.ceil(vdb.initial_cache_rate * rows))
                self._preload(host, cold, preload, what)
            gpu = build_gpu_tier(m, spec)
        except BaseException:
            if redis is not None:
                redis.close()
            cold.close()
            raise
        return TieredTable(spec, host, cold, gpu, redis=redis,
                           cache_missed=vdb.cache_missed_embeddings)

    @staticmethod
    def _preload(host: HostTier, cold: ColdTier, rows: int, what: str) -> None:
        if rows <= 0:
            return
        block = max(1, (64 << 20) // (4 * host.dim + 8))
        bar = None
        if rows * host.dim * 4 > _PROGRESS_BYTES:
            from tqdm.auto import tqdm

            bar = tqdm(total=rows, desc=f"load {what}", unit="row", unit_scale=True)
        for start in range(0, rows, block):
            k, v = cold.read_block(start, min(rows, start + block))
            host.load(k, v)
            cold.release_pages()
            if bar is not None:
                bar.update(len(k))
        if bar is not None:
            bar.close()

    # -- queries ----------------------------------------------------------------------------

    def table(self, model: str, table_id: int) -> TieredTable:
        """The table serving (model, table id): NotFoundError when the config has none,
        RuntimeError once this server is closed."""
        if self.closed:
            raise RuntimeError("this parameter server is closed (keras_hps.init replaced it?)")
        table = self._tables.get((model, table_id)) if type(table_id) is int else None
        if table is None:
            m = self.config.model(model)  # NotFoundError for an unknown model
            table = self._tables[(m.model, m.check_table_id(table_id))]
        return table

    def table_spec(self, model: str, table_id: int) -> TableSpec:
        """dim, default value, key dtype, max keys per lookup, rows and path of one table."""
        return self.table(model, table_id).spec

    def lookup(self, model: str, table_id: int, keys: Any) -> Any:
        """float32 vectors of shape `keys.shape + (dim,)`; a torch tensor in -> torch out.

        Keys found in no tier get the table's default value. A NumPy result is 64-byte
        aligned, so TensorFlow adopts it without a copy (`tf.numpy_function`). Raises
        InvalidInputError for non-integer keys, keys beyond the key type or too many keys,
        NotFoundError for an unknown model or table."""
        table = self.table(model, table_id)
        return table.lookup(check_keys(table.spec, keys))

    def lookup_tables(self, model: str, table_ids: list[int], keys: list[Any]) -> list[Any]:
        """`lookup` of ``keys[i]`` in table ``table_ids[i]`` of ``model``, for every i: the
        same results. Where the tables' GPU tiers answer every key on the device (static
        tables; dynamic caches inside a CUDA graph capture) and the key tensors (torch) have
        one size, one kernel launch looks all of them up; otherwise one table after another."""
        tables = [self.table(model, t) for t in table_ids]
        checked = [check_keys(t.spec, k) for t, k in zip(tables, keys, strict=True)]
        if all(t.gpu is not None for t in tables) and all(_is_torch(k) for k in checked):
            looks = query_tables([t.gpu for t in tables], checked)
            if looks is not None:
                return [t.complete_gpu(look, k)
                        for t, look, k in zip(tables, looks, checked, strict=True)]
        return [t.lookup(k) for t, k in zip(tables, checked, strict=True)]

    def stats(self, model: str | None = None, table_id: int | None = None) -> dict[str, Any]:
        """Per-tier hits/misses, evictions and resident rows: of one table, or with no
        arguments {model: {table_id: stats}} for every table."""
        if model is not None and table_id is not None:
            return self.table(model, table_id).stats()
        out: dict[str, dict[int, Any]] = {}
        for (m, t), table in self._tables.items():
            if model is None or m == model:
                out.setdefault(m, {})[t] = table.stats()
        if model is not None and not out:
            self.config.model(model)
        return out

    def update(self, model: str, table_id: int, keys: Any, vectors: Any) -> None:
        """Give `keys` the rows `vectors` (float `[len(keys), dim]`) in this server and every
        server sharing the table; a key the table lacks is added. Returns once the update is
        acknowledged: written to the Redis Cluster tier and announced on the model's update
        stream, or appended to the table's update log and fsynced. A lookup that starts after
        `update` returned answers the new rows here at once, on other servers after their
        propagation delay (docs/deployment.md). Where a key repeats, its last row wins.

        Raises InvalidInputError for keys that are not integers of the table's key type or
        rows of another shape, UnavailableError when the Redis Cluster cannot take it."""
        table = self.table(model, table_id)
        keys, vectors = check_update(table.spec, keys, vectors)
        if len(keys):
            assert self.updates is not None
            self.updates.update(table, *last_rows(keys, vectors))

    def close(self) -> None:
        """Release every table; later lookups raise RuntimeError."""
        self.closed = True
        if self.updates is not None:
            self.updates.close_readers()
        for table in self._tables.values():
            table.close()
        if self.updates is not None:
            self.updates.close()

    def __enter__(self) -> ParameterServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# the process's parameter servers for the Keras layers: a default one, and a registry by config
#
# `init` and `Init` set the default (HPS's semantics: `init` again closes the old default and
# installs the new one; `Init` and the layers' lazy init are call-once). A layer that names a
# `ps_config_file` reads the server of that config from the registry (the default when it was
# loaded from that config), created on first use. The model server uses none of this: it holds
# explicit `ParameterServer` objects.

_lock = threading.RLock()
_default: ParameterServer | None = None
_by_config: dict[PSConfig, ParameterServer] = {}
_by_file: dict[str, ParameterServer] = {}  # absolute ps_config_file -> its server (a cache)


def _server_for_file(ps_config_file: str | os.PathLike) -> tuple[ParameterServer, bool]:
    """(the registry's server for this config file, whether it was created now); under
    `_lock`."""
    path = os.path.abspath(os.fspath(ps_config_file))
    ps = _by_file.get(path)
    if ps is not None and not ps.closed:
        return ps, False
    config = load_config(path)
    ps = _by_config.get(config)
    created = ps is None or ps.closed
    if created:
        ps = _by_config[config] = ParameterServer(config)
    _by_file[path] = ps
    return ps, created


def _forget(ps: ParameterServer) -> None:
    """Drop every registry entry of `ps`; under `_lock`."""
    for table in (_by_config, _by_file):
        for key in [k for k, v in table.items() if v is ps]:
            del table[key]


def init(config: str | os.PathLike | Mapping[str, Any] | PSConfig) -> ParameterServer:
    """Load `config` (hps.json path or dict), install it as the process's default parameter
    server and return it. The previous default (and a previous server of the same config) is
    closed after the new one loads."""
    global _default
    new = ParameterServer(config)
    with _lock:
        old = [ps for ps in (_default, _by_config.get(new.config)) if ps is not None]
        for ps in old:
            _forget(ps)
        _default = _by_config[new.config] = new
        if new.config.source:
            _by_file[new.config.source] = new
    for ps in {id(p): p for p in old}.values():
        ps.close()
    return new


def Init(*, global_batch_size: int, ps_config_file: str | os.PathLike) -> str:  # noqa: N802
    """HPS's `hps.Init`: initialise the default parameter server once from `ps_config_file`;
    later calls do nothing. Returns "OK". Unlike HPS, a `global_batch_size` above a model's
    `max_batch_size` is an error, not a log line."""
    global _default
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) \
            or global_batch_size < 1:
        raise ConfigError(f"global_batch_size must be an int >= 1, got {global_batch_size!r}")
    with _lock:
        if _default is not None:
            src = _default.config.source
            if src and os.path.abspath(os.fspath(ps_config_file)) != src:
                warnings.warn(f"keras_hps.Init: a parameter server from {src} is already "
                              f"running; {ps_config_file} is ignored (call-once)", stacklevel=2)
            return "OK"
        ps, created = _server_for_file(ps_config_file)
        for m in ps.config.models:
            if global_batch_size > m.max_batch_size:
                if created:
                    _forget(ps)
                    ps.close()
                raise ConfigError(
                    f"{ps.config.source}: models ({m.model}).max_batch_size: "
                    f"{m.max_batch_size} is below global_batch_size={global_batch_size}")
        _default = ps
    return "OK"


def get_parameter_server() -> ParameterServer:
    """The default parameter server; RuntimeError if none was initialised."""
    ps = _default
    if ps is None:
        raise RuntimeError("no parameter server: call keras_hps.init('hps.json') "
                           "(or keras_hps.Init(global_batch_size=..., ps_config_file=...)) first")
    return ps


def ensure_parameter_server(ps_config_file: str | os.PathLike | None = None) -> ParameterServer:
    """The parameter server a layer reads: without `ps_config_file` the default one
    (RuntimeError when there is none); with it, the registry's server for that config,
    initialised once (thread-safely) on first use, and made the default if there is none."""
    global _default
    if ps_config_file is None:
        ps = _default
        if ps is None:
            raise RuntimeError(
                "no parameter server: call keras_hps.init('hps.json') first, or pass "
                "ps_config_file=... to the layer")
        return ps
    ps = _by_file.get(os.path.abspath(os.fspath(ps_config_file)))
    if ps is not None and not ps.closed:
        return ps
    with _lock:
        ps, _created = _server_for_file(ps_config_file)
        if _default is None:
            _default = ps
        return ps


def close_all() -> None:
    """Close the default parameter server and every other one the registry holds (tests,
    notebooks)."""
    global _default
    with _lock:
        servers = {id(p): p for p in (_default, *_by_config.values(), *_by_file.values())
                   if p is not None}
        _default = None
        _by_config.clear()
        _by_file.clear()
    for ps in servers.values():
        ps.close()
