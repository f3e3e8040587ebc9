"""The parameter server's GPU tier: the top of a table's tiers, one `GpuTier` per table.

Modes (a model's `embedding_cache_type`; `use_static_table: true` means "static"):

- ``dynamic``: a set-associative `GpuEmbeddingCache` of
  ``max(gpucacheper x rows, 64)`` slots (rounded up to whole groups of 32 slots, four 8-slot
  sets), filled from the table's lower tiers (host RAM -> cold tier -> default) on misses,
  evicting by LRU.
- ``static``: the whole table in device memory behind a hash index (`GpuStaticTable`).
- ``uvm``: the whole table in pinned host memory, read by the GPU kernel over the bus, with
  a dynamic cache of the same size as in ``dynamic`` mode in device memory in front of it.

A lookup through the tier has two steps, both called by the table that owns the tier
(`keras_hps.parameter_server.TieredTable`), which resolves in between the keys the tier does
not hold through the tiers below it: `query` (unique keys, device-resident rows, what is
missing) and `complete` (the missing rows in, cache fill, back to input order). The tier
never calls up. Results are always exact. ``hit_rate_threshold`` only decides when the rows
from below enter the cache: before the lookup returns when the batch's hit rate (over unique
keys) is below the threshold, on a background thread otherwise. (HPS instead returned the
default vector for the missed keys of a batch at or above the threshold.)

Devices (``deployed_device_list``, ``gpu_placement``): with ``replicate`` (the default, as in
HPS) every device holds a whole GPU tier of the table; with ``shard`` each device holds the
rows of its share of the keys (`keras_hps.gpu_shards`). Either way there is one replica per
device, and a lookup runs on one: that of the keys' device for CUDA keys, else the calling
thread's turn (`thread_turn`), so one request's lookups stay on one GPU and concurrent
requests spread over all of them. A replicated lookup never leaves its device.

Inside a CUDA graph capture (a `CaptureScope`: `keras_hps.capture.CapturedCall`), a lookup
never waits on the host: keys are probed in place, and keys the device does not hold raise the
scope's miss flag instead of going below; the caller answers such a call again eagerly.

The tier is on when the model's ``gpucache`` is true and CUDA is available. The environment
variable ``KERAS_HPS_GPU_TIER`` overrides: ``off`` disables it, ``interpret`` runs it on
the CPU through Triton's interpreter (CPU torch tensors; slow, for tests and CI without a
GPU), ``virtual`` puts every device of ``deployed_device_list`` on GPU 0 (each with its own
memory: the multi-GPU code on one GPU), ``auto`` (the default) is the rule above. Under
``interpret`` every listed device is the CPU.
"""

from __future__ import annotations

import contextvars
import glob
import itertools
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from keras_hps.errors import ConfigError

__all__ = [
    "ENV_VAR",
    "CaptureScope",
    "GpuLookup",
    "GpuTier",
    "active_scope",
    "build_gpu_tier",
    "cache_slots",
    "deferring",
    "device_scope",
    "gpu_tier_devices",
    "gpu_tier_setting",
    "query_tables",
    "thread_turn",
]

ENV_VAR = "KERAS_HPS_GPU_TIER"
_SETTINGS = ("auto", "off", "interpret", "virtual")
PLACEMENTS = ("replicate", "shard")
MIN_SLOTS = 64
_turns = itertools.count()
_thread = threading.local()


def thread_turn() -> int:
    """The calling thread's number, handed out in turn on its first call: a lookup of keys that
    are on no device of the tier runs on replica ``thread_turn() % replicas``."""
    turn = getattr(_thread, "turn", None)
    if turn is None:
        turn = _thread.turn = next(_turns)
    return turn


def gpu_tier_setting() -> str:
    """The value of ``KERAS_HPS_GPU_TIER`` (``auto`` when unset); ConfigError when unknown."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in _SETTINGS:
        raise ConfigError(f"environment variable {ENV_VAR}={value!r}: expected one of {_SETTINGS}")
    return value


def _enable_interpreter() -> None:
    """Make the Triton kernels run interpreted; they must not have been imported compiled."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] not in ("1", "true", "True"):
        raise ConfigError(f"{ENV_VAR}=interpret needs TRITON_INTERPRET=1 (it is set to 0)")
    from keras_hps.triton_interpreter import serialize_interpreted_launches

    serialize_interpreted_launches()
    mod = sys.modules.get("keras_hps.triton_kernels.static_table")
    if mod is not None:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(mod._static_query_kernel, InterpretedFunction):
            raise ConfigError(
                f"{ENV_VAR}=interpret: the Triton kernels were already loaded compiled; set "
                "TRITON_INTERPRET=1 (or the variable) before keras_hps loads them"
            )


def gpu_tier_devices(gpucache: bool, deployed_device_list: Sequence[int]) -> list[Any]:
    """torch devices the GPU tier runs on for a model, one per device of
    ``deployed_device_list``, or [] when the tier is off."""
    setting = gpu_tier_setting()
    if setting == "off" or not gpucache:
        return []
    listed = [int(d) for d in deployed_device_list or (0,)]
    if setting == "interpret":
        _enable_interpreter()
        import torch

        return [torch.device("cpu")] * len(listed)
    if setting == "auto" and "torch" not in sys.modules and not glob.glob("/dev/nvidia[0-9]*"):
        return []  # no GPU here: do not pay for importing torch
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        if setting == "virtual":
            raise ConfigError(f"{ENV_VAR}=virtual needs a CUDA device (CPU: use interpret)")
        return []
    if setting == "virtual":
        return [torch.device("cuda", 0)] * len(listed)
    count = torch.cuda.device_count()
    devices = []
    for d in listed:
        if not 0 <= int(d) < count:
            raise ConfigError(
                f"deployed_device_list names GPU {d}, but this machine has {count} GPU(s)"
            )
        devices.append(torch.device("cuda", int(d)))
    return devices


def cache_slots(gpucacheper: float, rows: int) -> int:
    """Dynamic-cache slots for a table: HPS's ``max(gpucacheper x rows, 64)``, in whole groups
    of 32 slots (what the cache allocates)."""
    from keras_hps.triton_kernels.cache_layout import SETS_PER_WORD, SLOTS_PER_SET

    group = SLOTS_PER_SET * SETS_PER_WORD
    slots = max(int(np.ceil(gpucacheper * rows)), MIN_SLOTS)
    return -(-slots // group) * group


# ---------------------------------------------------------------------------------- capture
# A lookup captured in a CUDA graph cannot wait on the host: while it runs in a CaptureScope,
# the tier answers every key in place on the device and raises the scope's flag for the keys
# it does not hold (keras_hps.capture.CapturedCall reads the flag after each replay and
# answers such a call again eagerly).

_ACTIVE: contextvars.ContextVar[CaptureScope | None] = contextvars.ContextVar(
    "keras_hps_capture_scope", default=None)
_DEVICE_SCOPES: dict[Any, CaptureScope] = {}
_DEVICE_LOCK = threading.Lock()


class CaptureScope:
    """Where lookups that run with no host synchronisation (in a CUDA graph) report keys they
    could not answer on ``device``: ``flag`` (int32 ``[1]`` on the device) becomes 1. The
    caches the lookups read register their ordering (`join`), so that replays and cache writes
    stay in order (`replaying`)."""

    def __init__(self, device: Any) -> None:
        import torch

        self.device = torch.device(device)
        self.flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._orderings: dict[int, Any] = {}

    def join(self, ordering: Any) -> None:
        """Order replays of this scope's graph with the writes of ``ordering`` (a cache's
        `GpuEmbeddingCache.ordering`)."""
        self._orderings.setdefault(id(ordering), ordering)

    def flag_if(self, bad: Any) -> None:
        """Raise the flag, on the device, if any element of the bool tensor ``bad`` is set."""
        import torch

        torch.maximum(self.flag, bad.any().to(torch.int32).reshape(1), out=self.flag)

    @contextmanager
    def replaying(self) -> Iterator[None]:
        """Hold the joined caches' locks around a replay on the current stream: it waits for
        their earlier writes, and their later writes wait for it."""
        import torch

        cuda = self.device.type == "cuda"
        stream = torch.cuda.current_stream(self.device) if cuda else None
        done = torch.cuda.Event() if cuda else None
        with ExitStack() as stack:
            for ordering in sorted(self._orderings.values(), key=id):  # one lock order
                stack.enter_context(ordering.replaying(stream, done))
            yield
            if done is not None:
                done.record(stream)


def active_scope(device: Any) -> CaptureScope | None:
    """The scope a lookup on ``device`` reports to: the `deferring` block's, else, while the
    current CUDA stream is being captured, ``device_scope(device)``; None otherwise (an
    ordinary, exact lookup)."""
    scope = _ACTIVE.get()
    if scope is not None and scope.device == device:
        return scope
    if getattr(device, "type", None) == "cuda":
        import torch

        if torch.cuda.is_current_stream_capturing():
            return device_scope(device)
    return None


def device_scope(device: Any) -> CaptureScope:
    """The scope of lookups captured on ``device`` outside `CapturedCall` (by
    ``torch.cuda.graph`` directly): its ``flag`` is raised by their replays and never reset."""
    import torch

    device = torch.device(device)
    with _DEVICE_LOCK:
        scope = _DEVICE_SCOPES.get(device)
        if scope is None:
            scope = _DEVICE_SCOPES[device] = CaptureScope(device)
        return scope


@contextmanager
def deferring(scope: CaptureScope) -> Iterator[CaptureScope]:
    """Lookups on the scope's device inside the block take the capturable path (no host
    synchronisation; misses raise ``scope.flag``) even when nothing is being captured: what a
    captured graph replays, run eagerly (tests, and CPU devices)."""
    token = _ACTIVE.set(scope)
    try:
        yield scope
    finally:
        _ACTIVE.reset(token)


_REPLICA_UIDS = itertools.count()


class _Replica:
    """The GPU tier of one table on one device."""

    def __init__(self, device: Any, cache: Any, table: Any, default: Any = None) -> None:
        import torch

        self.device = device
        self.cache = cache  # GpuEmbeddingCache or None (static mode)
        self.table = table  # GpuStaticTable or None (dynamic mode)
        # Static fast path: while set, a key the on-device table lacks is in no tier, so it
        # gets this [dim] default on the device. Cleared once an update names a key outside
        # the table (a static table never grows); lookups then fetch misses from below.
        self.default = default
        # (hits, misses) of the lookups that never wait on the host (the static fast path,
        # captured lookups), summed by the kernels themselves; read back by stats().
        self.device_counts = torch.zeros(2, dtype=torch.int64, device=device)
        self.uid = next(_REPLICA_UIDS)  # never reused: keys the fused launches' parameters
        self._fused_row: Any = None

    def fused_row(self) -> Any:
        """This replica's parameter row for the multi-table kernels (`query_tables`): the
        static fast path's (`static_table_params`) or the cache's (`fused_params`)."""
        if self._fused_row is None:
            if self.default is not None:
                from keras_hps.triton_kernels.static_table import static_table_params

                self._fused_row = static_table_params(self.table.index, self.table.device_values,
                                                      self.default, self.device_counts)
            else:
                self._fused_row = self.cache.fused_params(self.device_counts)
        return self._fused_row


@dataclass
class GpuLookup:
    """One lookup between `GpuTier.query` and `GpuTier.complete`.

    ``below_keys`` (int64 NumPy, unique) are the keys the tier does not hold: the table
    resolves them through the tiers below and hands their rows to `complete`. None when the
    tier answered every key."""

    rep: _Replica
    shape: tuple[int, ...]
    vals: Any  # [n unique, dim] on the device (the static fast path: [n keys, dim], final)
    inverse: Any = None  # position of each key among the unique keys; None: vals are final
    n_unique: int = 0
    miss_idx: Any = None  # unique keys the cache (or static table) missed
    mkeys: Any = None  # those keys
    mvals: Any = None  # their rows from the pinned table (uvm), zeros for keys it lacks
    still: Any = None  # positions in mkeys of the keys left for the tiers below
    below_keys: np.ndarray | None = None
    uvm_hits: int = 0
    generation: int = 0


class GpuTier:
    """The GPU tier of one table on ``devices`` (a device listed twice holds two replicas or
    shards: virtual devices).

    ``mode``: dynamic | static | uvm. ``rows``: rows of the table (sizes the cache).
    ``table_path`` (static, uvm): the table file whose rows are loaded onto the tier.
    ``placement``: ``replicate`` (the whole tier on every device) or ``shard`` (each device
    holds the rows of its share of the keys, `keras_hps.gpu_shards`).
    """

    def __init__(
        self,
        *,
        name: str,
        mode: str,
        dim: int,
        rows: int,
        gpucacheper: float,
        hit_rate_threshold: float,
        devices: Sequence[Any],
        table_path: str | None = None,
        default_vector: np.ndarray | None = None,
        admission: str = "none",
        placement: str = "replicate",
    ) -> None:
        import torch

        from keras_hps.gpu_cache import GpuEmbeddingCache

        if mode not in ("dynamic", "static", "uvm"):
            raise ConfigError(
                f"{name}: embedding_cache_type must be dynamic|static|uvm, got {mode!r}"
            )
        if not devices:
            raise ValueError(f"{name}: the GPU tier needs at least one device")
        if placement not in PLACEMENTS:
            raise ConfigError(f"{name}: gpu_placement must be one of {PLACEMENTS}, got "
                              f"{placement!r}")
        self.name = name
        self.mode = mode
        self.placement = placement
        sharded = placement == "shard" and len(devices) > 1
        self._sharded = sharded
        self.dim = int(dim)
        self.hit_rate_threshold = float(hit_rate_threshold)
        self.slots = cache_slots(gpucacheper, rows) if mode != "static" else 0
        self._lock = threading.RLock()
        self._generation = 0
        self._pending: list[Future] = []
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"keras-hps-gpu-insert-{name}")
        self._counts = {"hits": 0, "misses": 0, "uvm_hits": 0, "fetched": 0}
        # uvm: how misses read the table in host memory: "copy" (host threads gather the
        # rows, the copy engine moves them) or "kernel" (zero-copy reads over the bus).
        self.host_read = "copy"
        self._closed = False
        # (replica uids) -> their stacked parameter rows, for the multi-table kernels
        self._fused: dict[tuple[int, ...], Any] = {}
        host_keys = host_vectors = None
        pinned = mode == "uvm" and devices[0].type == "cuda"
        if mode in ("static", "uvm"):
            if table_path is None:
                raise ConfigError(f"{name}: {mode} mode needs the table file")
            host_keys, host_vectors = _load_table(table_path, self.dim, name, pinned=pinned)
        caches: list[Any] = [None] * len(devices)
        tables: list[Any] = [None] * len(devices)
        if sharded:
            from keras_hps.gpu_shards import shard_slots, split_rows, views
        if mode != "static":
            slots = shard_slots(self.slots, len(devices)) if sharded else self.slots
            caches = [GpuEmbeddingCache(slots, self.dim, device=dev, policy="lru",
                                        admission=admission) for dev in devices]
        if host_keys is not None:
            parts = (split_rows(host_keys, host_vectors, len(devices), pinned=pinned) if sharded
                     else itertools.repeat((host_keys, host_vectors)))
            tables = [_static_table(k, v, dev, on_device=mode == "static")
                      for (k, v), dev in zip(parts, devices, strict=False)]
        if sharded:  # one view per device over the same shards
            caches = views(caches, devices) if caches[0] is not None else caches
            tables = views(tables, devices) if tables[0] is not None else tables
        self._replicas: list[_Replica] = []
        self._by_device: dict[Any, list[_Replica]] = {}
        for dev, cache, table in zip(devices, caches, tables, strict=True):
            default = None
            if mode == "static" and default_vector is not None:
                default = torch.as_tensor(
                    np.asarray(default_vector, np.float32).reshape(self.dim), device=dev
                )
            self._replicas.append(_Replica(torch.device(dev), cache, table, default))
            self._by_device.setdefault(torch.device(dev), []).append(self._replicas[-1])

    # ------------------------------------------------------------------ lookup
    @property
    def devices(self) -> list[Any]:
        return [r.device for r in self._replicas]

    def _replica_for(self, device: Any) -> _Replica:
        """The replica a lookup of keys on ``device`` runs on: one on that device, else any;
        among several, the calling thread's turn."""
        reps = self._by_device.get(device, self._replicas)
        return reps[thread_turn() % len(reps)] if len(reps) > 1 else reps[0]

    def _stores(self) -> list[_Replica]:
        """Replicas with distinct device memory: every replica, or one when sharded (each
        device's replica is a view of the same shards)."""
        return self._replicas[:1] if self.placement == "shard" else self._replicas

    def query(self, keys: Any) -> GpuLookup:
        """Start a lookup of checked integer ``keys`` (a torch tensor, any shape): the rows
        the tier holds, and in ``below_keys`` the keys it does not hold."""
        import torch

        if self._closed:
            raise RuntimeError(f"{self.name}: GPU tier is closed")
        rep = self._replica_for(keys.device)
        shape = tuple(keys.shape)
        # contiguous: a 1-D slice (a batch's column of keys) stays strided through reshape
        flat = keys.reshape(-1).to(device=rep.device, dtype=torch.int64,
                                   non_blocking=True).contiguous()
        if flat.numel() == 0:
            empty = torch.empty((0, self.dim), dtype=torch.float32, device=rep.device)
            return GpuLookup(rep, shape, empty)
        if self._sharded and active_scope(rep.device) is not None:
            raise RuntimeError(f"{self.name}: a lookup of a table sharded over GPUs "
                               "(gpu_placement: shard) cannot be captured in a CUDA graph; "
                               "use gpu_placement: replicate or call the model eagerly")
        if rep.default is not None:
            # Static mode: the whole table is on the device, so keys it lacks are in no tier.
            # One probe-and-gather straight into input order (duplicates are just read
            # twice): no unique, no reorder, no host sync. Counts are per key, on the device.
            with self._lock:  # never a row half written by `update`
                vals, _hit = rep.table.query(flat, rep.default, counters=rep.device_counts,
                                             validate=False)
            return GpuLookup(rep, shape, vals, n_unique=flat.numel())
        scope = active_scope(rep.device)
        if scope is not None:
            return self._query_deferred(rep, flat, shape, scope)
        # Unique first (measured against probing every key in place, which saves the sort
        # but probes and counts three times the keys: docs/benchmarks/gpu_hierarchy.md).
        ukeys, inverse = torch.unique(flat, return_inverse=True)
        look = GpuLookup(rep, shape, None, inverse.reshape(-1), ukeys.numel(),
                         generation=self._generation)  # an update meanwhile: rows stale
        if rep.cache is not None:
            # No key-value check (it would cost a device sync): a key equal to the cache's
            # empty-slot sentinel never matches a slot, so it is fetched from below every time.
            look.vals, hit = rep.cache.query(ukeys, validate=False)
        else:
            with self._lock:
                look.vals, hit = rep.table.query(ukeys)
        look.miss_idx = torch.nonzero(~hit).reshape(-1)  # one device sync: the miss count
        if look.miss_idx.numel():
            look.mkeys = ukeys[look.miss_idx]
            self._query_pinned(look)
        return look

    @staticmethod
    def _query_deferred(rep: _Replica, flat: Any, shape: tuple[int, ...],
                        scope: CaptureScope) -> GpuLookup:
        """The capturable lookup (a CUDA graph's, `keras_hps.capture`): every key probed in
        place, rows in input order, no unique and no host synchronisation; keys the device
        does not hold get zero rows and raise ``scope.flag``, and the caller answers the
        lookup again outside the graph. Counts are per key, on the device."""
        if rep.cache is not None:
            scope.join(rep.cache.ordering)
            vals, _hit = rep.cache.query(flat, validate=False, miss_flag=scope.flag,
                                         counters=rep.device_counts)
        else:  # a static table that no longer answers every key on the device
            vals, _hit = rep.table.query(flat, counters=rep.device_counts, miss_flag=scope.flag,
                                         validate=False)
        return GpuLookup(rep, shape, vals, n_unique=flat.numel())

    def _query_pinned(self, look: GpuLookup) -> None:
        """uvm: the missed keys' rows from the pinned table; the keys it lacks go below."""
        import torch

        rep, mkeys = look.rep, look.mkeys
        if rep.cache is not None and rep.table is not None:
            # Host gather + copy engine; the kernel's zero-copy reads when host_read says so.
            with self._lock:
                look.mvals, thit = rep.table.query(mkeys, host_read=self.host_read)
            look.still = torch.nonzero(~thit).reshape(-1)
            look.uvm_hits = mkeys.numel() - look.still.numel()
            if look.still.numel():
                look.below_keys = mkeys[look.still].cpu().numpy()
        else:
            look.below_keys = mkeys.cpu().numpy()

    def complete(self, look: GpuLookup, below_rows: np.ndarray | None = None) -> Any:
        """Finish ``look`` with ``below_rows`` (float32 ``[len(look.below_keys), dim]``, the
        rows of the keys the tier did not hold): fill the cache, count, and return the
        vectors ``keys.shape + (dim,)`` in input order on the tier's device."""
        import torch

        rep, vals = look.rep, look.vals
        fetched = 0
        if look.below_keys is not None:
            fetched = look.below_keys.size
            if below_rows is None or below_rows.shape != (fetched, self.dim):
                got = None if below_rows is None else below_rows.shape
                raise RuntimeError(f"{self.name}: lower tiers returned {got} for {fetched} keys")
            fv = torch.from_numpy(below_rows).to(rep.device, non_blocking=True)
            if look.mvals is None:
                look.mvals = fv
            else:
                look.mvals[look.still] = fv
        if look.miss_idx is not None:
            n_miss = look.miss_idx.numel()
            if n_miss:
                vals[look.miss_idx] = look.mvals
                if rep.cache is not None:
                    self._insert(rep, look.mkeys, look.mvals, 1.0 - n_miss / look.n_unique,
                                 look.generation)
            self._count(look.n_unique - n_miss, n_miss, look.uvm_hits, fetched)
        if look.inverse is not None:
            if rep.device.type == "cuda":
                # Back to input order with the Triton row gather (2x torch indexing on H200).
                from keras_hps.triton_kernels.gather import gather

                vals = gather(vals, look.inverse)
            else:
                vals = vals[look.inverse]
        return vals.reshape(*look.shape, self.dim)

    def _count(self, hits: int, misses: int, uvm_hits: int, fetched: int) -> None:
        with self._lock:
            self._counts["hits"] += hits
            self._counts["misses"] += misses
            self._counts["uvm_hits"] += uvm_hits
            self._counts["fetched"] += fetched

    def _insert(
        self, rep: _Replica, keys: Any, vals: Any, hit_rate: float, generation: int
    ) -> None:
        """Put fetched rows into the cache: now when the hit rate is low, else in background.
        A table update after this lookup fetched the rows makes them stale: they are dropped
        (checked under the lock `update` holds while it invalidates)."""
        if hit_rate < self.hit_rate_threshold:
            with self._lock:
                if generation == self._generation:
                    rep.cache.insert(keys, vals, validate=False)
            return

        def run() -> None:
            with self._lock:
                if generation == self._generation and not self._closed:
                    rep.cache.insert(keys, vals, validate=False)

        with self._lock:
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._executor.submit(run))

    def wait(self) -> None:
        """Block until background cache inserts have finished (re-raises their errors)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    # ------------------------------------------------------------------ updates
    def update(self, keys: np.ndarray, vectors: np.ndarray | None = None) -> None:
        """The lower tiers changed ``keys``: drop them from the caches and, in static and uvm
        mode, write ``vectors`` (the new rows) into the resident table. Safe to call from any
        thread while lookups run: a lookup that fetched the old rows from below before the
        update does not cache them, and no lookup reads a half-written row."""
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        self.wait()
        with self._lock:
            self._generation += 1
            if keys.size:
                self._update_replicas(keys, vectors)

    def _update_replicas(self, keys: np.ndarray, vectors: np.ndarray | None) -> None:
        import torch

        for rep in self._stores():
            tk = torch.from_numpy(keys).to(rep.device)
            if rep.cache is not None:
                rep.cache.invalidate(tk)
            if rep.table is not None:
                if vectors is None:
                    raise ValueError(f"{self.name}: {self.mode} mode needs the updated vectors")
                tv = torch.from_numpy(np.asarray(vectors, dtype=np.float32)).to(rep.device)
                found = rep.table.update(tk, tv.reshape(keys.size, self.dim))
                if rep.default is not None and not bool(found.all()):
                    for r in self._replicas:  # every replica's table holds the same keys
                        r.default = None  # keys outside the static table now exist below

    def clear(self) -> None:
        """Empty the dynamic caches (static tables stay)."""
        self.wait()
        with self._lock:
            self._generation += 1
            for rep in self._stores():
                if rep.cache is not None:
                    rep.cache.clear()

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        """Counts over unique keys per lookup (over every key in static mode and in captured
        lookups, which skip the unique step): ``hits`` (device-resident rows), ``misses``,
        ``uvm_hits`` (misses served from pinned host memory), ``fetched`` (from lower tiers),
        plus the caches' ``evictions``, ``resident`` rows and ``capacity``, summed over
        replicas (over the shards when sharded)."""
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
        for rep in self._replicas:
            hits, misses = (int(v) for v in rep.device_counts.tolist())
            out["hits"] += hits
            out["misses"] += misses
        out.update(
            mode=self.mode,
            placement=self.placement,
            devices=[str(d) for d in self.devices],
            evictions=0,
            resident=0,
            capacity=0,
        )
        for rep in self._stores():
            if rep.cache is not None:
                s = rep.cache.stats()
                out["evictions"] += s["evictions"]
                out["resident"] += s["size"]
                out["capacity"] += s["capacity"]
            if rep.table is not None and self.mode == "static":
                out["resident"] += len(rep.table)
                out["capacity"] += len(rep.table)
        total = out["hits"] + out["misses"]
        out["hit_rate"] = out["hits"] / total if total else 0.0
        return out

    def close(self) -> None:
        """Finish background work and release the device memory."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        self._replicas = []
        self._fused.clear()


def query_tables(tiers: Sequence[GpuTier], keys: Sequence[Any]) -> list[GpuLookup] | None:
    """Start the lookups of ``keys[i]`` (checked torch tensors) in ``tiers[i]``, all in one
    kernel launch, when the device answers every key: every table static (the whole table on
    the device), or every table a dynamic or uvm cache and the lookup captured in a CUDA graph
    (misses raise the capture's flag). The key tensors must have one size, the tables one dim
    and one device. Returns one `GpuLookup` per table (its rows final: `GpuTier.complete`
    only reshapes them), or None when the tables must be looked up one by one."""
    import torch

    if len(tiers) < 2 or any(t._closed or t._sharded for t in tiers):
        return None
    dev, n = keys[0].device, keys[0].numel()
    dim = tiers[0].dim
    reps = [t._replica_for(dev) for t in tiers]
    if n == 0 or any(k.numel() != n or k.device != dev for k in keys) \
            or any(t.dim != dim for t in tiers) or any(r.device != dev for r in reps):
        return None
    if all(r.default is not None and r.table.host_values is None for r in reps):
        from keras_hps.triton_kernels.static_table import static_query_tables

        flat = torch.stack([k.reshape(-1) for k in keys]).to(torch.int64)
        out = static_query_tables(_fused_params(tiers[0], reps), flat, dim)
    else:
        scope = active_scope(dev)
        caches = [r.cache for r in reps]
        if scope is None or any(c is None or c.admission != "none" for c in caches) \
                or len({c.policy for c in caches}) > 1:
            return None
        from keras_hps.triton_kernels.cache_fused_query import fused_cache_query

        scope.join(caches[0].ordering)  # one ordering per device: every cache's
        flat = torch.stack([k.reshape(-1) for k in keys]).to(torch.int64)
        with caches[0].ordering.lock:
            out, _hit = fused_cache_query(_fused_params(tiers[0], reps), flat, [n] * len(reps),
                                          [dim] * len(reps), policy=caches[0].policy,
                                          miss_flag=scope.flag)
    return [GpuLookup(rep, tuple(k.shape), out[i], n_unique=n)
            for i, (rep, k) in enumerate(zip(reps, keys, strict=True))]


def _fused_params(owner: GpuTier, reps: Sequence[_Replica]) -> Any:
    """The replicas' parameter rows stacked, kept by ``owner`` (the first table's tier, so
    they go with the model version that serves them) for the next call, except while a graph
    is being captured: a tensor made then holds its values only once the graph has run."""
    import torch

    key = tuple(r.uid for r in reps)
    params = owner._fused.get(key)
    if params is None:
        params = torch.stack([r.fused_row() for r in reps])
        if not torch.cuda.is_available() or not torch.cuda.is_current_stream_capturing():
            if len(owner._fused) > 256:
                owner._fused.clear()
            owner._fused[key] = params
    return params


def _load_table(path: str, dim: int, name: str, *, pinned: bool) -> tuple[Any, Any]:
    """All keys (int64) and vectors of a table file as CPU torch tensors (vectors pinned)."""
    import torch
    from tqdm.auto import tqdm

    from keras_hps.formats import open_table

    with open_table(path, dim) as table:
        n = table.num_rows
        keys = torch.empty(n, dtype=torch.int64)
        if pinned:
            from keras_hps.gpu_static_table import pinned_empty

            vectors = pinned_empty((n, dim))
        else:
            vectors = torch.empty((n, dim), dtype=torch.float32)
        kn, vn = keys.numpy(), vectors.numpy()
        start = 0
        with tqdm(
            total=n, desc=f"loading {name} onto the GPU tier", unit="rows", disable=n < 1_000_000
        ) as bar:
            for k, v in table.iter_blocks():
                kn[start : start + len(k)] = k
                vn[start : start + len(k)] = v
                start += len(k)
                bar.update(len(k))
    return keys, vectors


def _static_table(keys: Any, vectors: Any, device: Any, *, on_device: bool) -> Any:
    """A GpuStaticTable on ``device``: rows in device memory (static) or host memory (uvm)."""
    from keras_hps.gpu_static_table import GpuStaticTable

    return GpuStaticTable(keys, vectors, device=device, n_device=None if on_device else 0)


def build_gpu_tier(model: Any, spec: Any) -> GpuTier | None:
    """The GPU tier of table ``spec`` of ``model`` (a `ModelConfig`) when the model enables
    one here (``gpucache`` and a device, or ``KERAS_HPS_GPU_TIER``), else None."""
    devices = gpu_tier_devices(model.gpucache, model.deployed_device_list)
    if not devices:
        return None
    return GpuTier(
        name=f"{spec.model}/{spec.name}",
        mode=model.cache_type,
        dim=spec.dim,
        rows=spec.num_rows,
        gpucacheper=model.gpucacheper,
        hit_rate_threshold=model.hit_rate_threshold,
        devices=devices,
        table_path=spec.path,
        default_vector=np.full(spec.dim, spec.default_value, np.float32),
        admission=model.gpu_cache_admission,
        placement=model.gpu_placement,
    )
