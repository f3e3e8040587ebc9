"""The parameter server's GPU tier: the top of the hierarchy, one `GpuTableTier` per table.

Modes (a model's `embedding_cache_type`; `use_static_table: true` means "static"):

- ``dynamic``: a set-associative `GpuEmbeddingCache` of
  ``max(gpucacheper x rows, 64)`` slots (rounded up to whole groups of 32 slots, four 8-slot
  sets), filled from the table's lower tiers (host RAM -> cold tier -> default) on misses,
  evicting by LRU.
- ``static``: the whole table in device memory behind a hash index (`StaticTable`).
- ``uvm``: the whole table in pinned host memory, read by the GPU kernel over the bus, with
  a dynamic cache of the same size as in ``dynamic`` mode in device memory in front of it.

Results are always exact. A key the GPU tier does not hold is looked up in the lower tiers
(the parameter server's ``fetch``), in every mode. ``hit_rate_threshold`` only decides when
the fetched rows enter the cache: before the lookup returns when the batch's hit rate (over
unique keys) is below the threshold, on a background thread otherwise. (HPS instead
returned the default vector for the missed keys of a batch at or above the threshold.)

The tier is replicated on every device of ``deployed_device_list``, as in HPS. A lookup of a
CUDA key tensor runs on that device's replica (the first one when the device has none); a
NumPy lookup runs on the first. Hits never leave the device.

The tier is on when the model's ``gpucache`` is true and CUDA is available. The environment
variable ``KERAS_HPS_GPU_TIER`` overrides: ``off`` disables it, ``interpret`` runs it on
the CPU through Triton's interpreter (CPU torch tensors; slow, for tests and CI without a
GPU), ``auto`` (the default) is the rule above.
"""

from __future__ import annotations

import glob
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from keras_hps.errors import ConfigError, InvalidInputError

__all__ = [
    "ENV_VAR",
    "GpuTableTier",
    "GpuTieredTable",
    "wrap_with_gpu_tier",
    "cache_slots",
    "gpu_tier_devices",
    "gpu_tier_setting",
]

ENV_VAR = "KERAS_HPS_GPU_TIER"
_SETTINGS = ("auto", "off", "interpret")
MIN_SLOTS = 64

Fetch = Callable[[np.ndarray], np.ndarray]


def gpu_tier_setting() -> str:
    """The value of ``KERAS_HPS_GPU_TIER`` (``auto`` when unset); ConfigError when unknown."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in _SETTINGS:
        raise ConfigError(f"environment variable {ENV_VAR}={value!r}: expected one of {_SETTINGS}")
    return value


def serialize_interpreted_launches() -> None:
    """Under ``TRITON_INTERPRET=1``, make every kernel launch take one process-wide lock.

    Triton's interpreter rebinds ``triton.language`` module-wide for each launch and restores
    it afterwards, so two threads launching at once break each other's kernels ("Did you
    forget to add @triton.jit ?"). The GPU tier launches from a background insert thread and
    from serving threads, so interpreted runs (``KERAS_HPS_GPU_TIER=interpret``, the tests)
    need launches one at a time. Compiled kernels are unaffected. Idempotent.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
        return
    from triton.runtime import interpreter

    executor = interpreter.GridExecutor
    if getattr(executor.__call__, "_serialized", False):
        return
    launch = executor.__call__
    lock = threading.RLock()

    def serialized(self: Any, *args: Any, **kwargs: Any) -> Any:
        with lock:
            return launch(self, *args, **kwargs)

    serialized._serialized = True  # type: ignore[attr-defined]
    executor.__call__ = serialized


def _enable_interpreter() -> None:
    """Make the Triton kernels run interpreted; they must not have been imported compiled."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] not in ("1", "true", "True"):
        raise ConfigError(f"{ENV_VAR}=interpret needs TRITON_INTERPRET=1 (it is set to 0)")
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
    """torch devices the GPU tier runs on for a model, or [] when the tier is off."""
    setting = gpu_tier_setting()
    if setting == "off" or not gpucache:
        return []
    if setting == "interpret":
        _enable_interpreter()
        import torch

        return [torch.device("cpu")]
    if "torch" not in sys.modules and not glob.glob("/dev/nvidia[0-9]*"):
        return []  # no GPU here: do not pay for importing torch
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    devices = []
    for d in deployed_device_list or (0,):
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


class _Replica:
    """The GPU tier of one table on one device."""

    def __init__(self, device: Any, cache: Any, table: Any, default: Any = None) -> None:
        import torch

        self.device = device
        self.cache = cache  # GpuEmbeddingCache or None (static mode)
        self.table = table  # StaticTable or None (dynamic mode)
        # Static fast path: while set, a key the on-device table lacks is in no tier, so it
        # gets this [dim] default on the device. Cleared once an update names a key outside
        # the table (a static table never grows); lookups then fetch misses from below.
        self.default = default
        # (keys looked up, keys found) on the fast path, summed by the lookup kernel itself
        # so a lookup never waits on the host for its counts; read back by stats().
        self.static_counts = (
            torch.zeros(2, dtype=torch.int64, device=device) if default is not None else None
        )


class GpuTableTier:
    """The GPU tier of one table, replicated on ``devices``.

    ``mode``: dynamic | static | uvm. ``rows``: rows of the table (sizes the cache).
    ``table_path`` (static, uvm): the table file whose rows are loaded onto the tier.
    ``fetch(unique_keys int64) -> float32 [n, dim]`` resolves keys through the lower tiers.
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
        fetch: Fetch,
        table_path: str | None = None,
        default_vector: np.ndarray | None = None,
        admission: str = "none",
    ) -> None:
        import torch

        from keras_hps.gpu_cache import GpuEmbeddingCache

        if mode not in ("dynamic", "static", "uvm"):
            raise ConfigError(
                f"{name}: embedding_cache_type must be dynamic|static|uvm, got {mode!r}"
            )
        if not devices:
            raise ValueError(f"{name}: the GPU tier needs at least one device")
        self.name = name
        self.mode = mode
        self.dim = int(dim)
        self.hit_rate_threshold = float(hit_rate_threshold)
        self.slots = cache_slots(gpucacheper, rows) if mode != "static" else 0
        self._fetch = fetch
        self._lock = threading.RLock()
        self._generation = 0
        self._pending: list[Future] = []
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"keras-hps-gpu-insert-{name}")
        self._counts = {"hits": 0, "misses": 0, "uvm_hits": 0, "fetched": 0}
        # uvm: how misses read the table in host memory: "copy" (host threads gather the
        # rows, the copy engine moves them) or "kernel" (zero-copy reads over the bus).
        self.host_read = "copy"
        self._closed = False
        host_keys = host_vectors = None
        if mode in ("static", "uvm"):
            if table_path is None:
                raise ConfigError(f"{name}: {mode} mode needs the table file")
            host_keys, host_vectors = _load_table(
                table_path, self.dim, name, pinned=mode == "uvm" and devices[0].type == "cuda"
            )
        self._replicas: list[_Replica] = []
        for dev in devices:
            cache = table = None
            if mode != "static":
                cache = GpuEmbeddingCache(self.slots, self.dim, device=dev, policy="lru",
                                          admission=admission)
            if host_keys is not None:
                table = _static_table(host_keys, host_vectors, dev, on_device=mode == "static")
            default = None
            if mode == "static" and default_vector is not None:
                default = torch.as_tensor(
                    np.asarray(default_vector, np.float32).reshape(self.dim), device=dev
                )
            self._replicas.append(_Replica(torch.device(dev), cache, table, default))

    # ------------------------------------------------------------------ lookup
    @property
    def devices(self) -> list[Any]:
        return [r.device for r in self._replicas]

    def _replica_for(self, device: Any) -> _Replica:
        for r in self._replicas:
            if r.device == device:
                return r
        return self._replicas[0]

    def lookup(self, keys: Any) -> Any:
        """Vectors of ``keys`` (NumPy or torch, any shape): ``keys.shape + (dim,)`` float32.

        A torch tensor gives a torch tensor on the keys' device; NumPy gives NumPy.
        """
        return self.lookup_counted(keys)[0]

    def lookup_counted(self, keys: Any) -> tuple[Any, int]:
        """``(lookup(keys), number of unique keys)``."""
        import torch

        if self._closed:
            raise RuntimeError(f"{self.name}: GPU tier is closed")
        as_numpy = not isinstance(keys, torch.Tensor)
        tkeys = torch.from_numpy(np.ascontiguousarray(keys)) if as_numpy else keys
        if tkeys.dtype not in (torch.int64, torch.int32, torch.uint32):
            raise InvalidInputError(f"{self.name}: keys must be integers, got {tkeys.dtype}")
        rep = self._replica_for(tkeys.device)
        shape = tuple(tkeys.shape)
        flat = tkeys.reshape(-1).to(device=rep.device, dtype=torch.int64, non_blocking=True)
        n_unique = 0
        if flat.numel() == 0:
            out = torch.empty((*shape, self.dim), dtype=torch.float32, device=rep.device)
        elif rep.default is not None:
            # Static mode: the whole table is on the device, so keys it lacks are in no tier.
            # One probe-and-gather straight into input order (duplicates are just read
            # twice): no unique, no reorder, no host sync. Counts are per key, on the device.
            vals, _hit = rep.table.query(flat, rep.default, counters=rep.static_counts,
                                         validate=False)
            n_unique = flat.numel()
            out = vals.reshape(*shape, self.dim)
        else:
            # Unique first (measured against probing every key in place, which saves the sort
            # but probes and counts three times the keys: docs/benchmarks/gpu_hierarchy.md).
            ukeys, inverse = torch.unique(flat, return_inverse=True)
            n_unique = ukeys.numel()
            uvals = self._lookup_unique(rep, ukeys)
            if rep.device.type == "cuda":
                # Back to input order with the Triton row gather (2x torch indexing on H200).
                from keras_hps.triton_kernels.gather import gather

                out = gather(uvals, inverse.reshape(-1)).reshape(*shape, self.dim)
            else:
                out = uvals[inverse].reshape(*shape, self.dim)
        if as_numpy:
            return out.cpu().numpy(), n_unique
        return out.to(tkeys.device, non_blocking=True), n_unique

    def _lookup_unique(self, rep: _Replica, ukeys: Any) -> Any:
        """Vectors of unique int64 keys on ``rep.device``."""
        import torch

        n = ukeys.numel()
        generation = self._generation  # an update during the fetch makes its rows stale
        if rep.cache is not None:
            # No key-value check (it would cost a device sync): a key equal to the cache's
            # empty-slot sentinel never matches a slot, so it is fetched from below every time.
            vals, hit = rep.cache.query(ukeys, validate=False)
        else:
            vals, hit = rep.table.query(ukeys)
        miss_idx = torch.nonzero(~hit).reshape(-1)  # one device sync: the miss count
        n_miss = miss_idx.numel()
        uvm_hits = fetched = 0
        if n_miss:
            mkeys = ukeys[miss_idx]
            mvals, uvm_hits, fetched = self._resolve(rep, mkeys)
            vals[miss_idx] = mvals
            if rep.cache is not None:
                self._insert(rep, mkeys, mvals, 1.0 - n_miss / n, generation)
        self._count(n - n_miss, n_miss, uvm_hits, fetched)
        return vals

    def _count(self, hits: int, misses: int, uvm_hits: int, fetched: int) -> None:
        with self._lock:
            self._counts["hits"] += hits
            self._counts["misses"] += misses
            self._counts["uvm_hits"] += uvm_hits
            self._counts["fetched"] += fetched

    def _resolve(self, rep: _Replica, mkeys: Any) -> tuple[Any, int, int]:
        """Rows of the distinct missed keys ``mkeys`` on ``rep.device``: from the pinned table
        (uvm), else from the tiers below. Returns ``(rows, keys served by the pinned table,
        keys fetched from below)``."""
        import torch

        n_miss = mkeys.numel()
        mvals = None
        if rep.cache is not None and rep.table is not None:  # uvm: the table in host memory
            # Host gather + copy engine; the kernel's zero-copy reads when host_read says so.
            mvals, thit = rep.table.query(mkeys, host_read=self.host_read)
            still = torch.nonzero(~thit).reshape(-1)
        else:
            still = torch.arange(n_miss, device=mkeys.device)
        n_below = still.numel()
        if n_below:
            fk = mkeys[still].cpu().numpy()
            with self._lock:
                fetched = np.asarray(self._fetch(fk), dtype=np.float32)
            if fetched.shape != (fk.size, self.dim):
                raise RuntimeError(
                    f"{self.name}: lower tiers returned {fetched.shape} for {fk.size} keys"
                )
            fv = torch.from_numpy(fetched).to(rep.device, non_blocking=True)
            if mvals is None:
                mvals = fv
            else:
                mvals[still] = fv
        return mvals, n_miss - n_below, n_below

    def _insert(
        self, rep: _Replica, keys: Any, vals: Any, hit_rate: float, generation: int
    ) -> None:
        """Put fetched rows into the cache: now when the hit rate is low, else in background."""
        if hit_rate < self.hit_rate_threshold:
            rep.cache.insert(keys, vals, validate=False)
            return

        def run() -> None:
            # A table update after this lookup fetched the rows makes them stale: drop them.
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
        mode, write ``vectors`` (the new rows) into the resident table."""
        import torch

        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        with self._lock:
            self._generation += 1
        self.wait()
        if keys.size == 0:
            return
        for rep in self._replicas:
            tk = torch.from_numpy(keys).to(rep.device)
            if rep.cache is not None:
                rep.cache.invalidate(tk)
            if rep.table is not None:
                if vectors is None:
                    raise ValueError(f"{self.name}: {self.mode} mode needs the updated vectors")
                tv = torch.from_numpy(np.asarray(vectors, dtype=np.float32)).to(rep.device)
                found = rep.table.update(tk, tv.reshape(keys.size, self.dim))
                if rep.default is not None and not bool(found.all()):
                    rep.default = None  # keys outside the static table now exist below

    def clear(self) -> None:
        """Empty the dynamic caches (static tables stay)."""
        with self._lock:
            self._generation += 1
        self.wait()
        for rep in self._replicas:
            if rep.cache is not None:
                rep.cache.clear()

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        """Counts over unique keys per lookup (over every key in static mode, which skips
        the unique step): ``hits`` (device-resident rows), ``misses``,
        ``uvm_hits`` (misses served from pinned host memory), ``fetched`` (from lower tiers),
        plus the caches' ``evictions``, ``resident`` rows and ``capacity``, summed over
        replicas."""
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
        for rep in self._replicas:
            if rep.static_counts is not None:
                looked, found = (int(v) for v in rep.static_counts.tolist())
                out["hits"] += found
                out["misses"] += looked - found
        out.update(
            mode=self.mode,
            devices=[str(d) for d in self.devices],
            evictions=0,
            resident=0,
            capacity=0,
        )
        for rep in self._replicas:
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


class GpuTieredTable:
    """One (model, table) served by a GPU tier above its `TableHierarchy` (host -> cold ->
    default). Has the hierarchy's interface (`spec`, `fetch`, `record_call`, `stats`,
    `close`) plus `lookup(keys)` and `on_update(keys, vectors)`."""

    def __init__(self, hierarchy: Any, tier: GpuTableTier, validate: Callable[..., Any]) -> None:
        self.hierarchy = hierarchy
        self.gpu_tier = tier
        self._validate = validate
        self._narrow: dict[Any, bool] = {}  # torch key dtype -> needs a value range check

    @property
    def spec(self) -> Any:
        return self.hierarchy.spec

    def fetch(self, unique_keys: np.ndarray) -> np.ndarray:
        """The hierarchy below the GPU tier (host -> cold -> default)."""
        return self.hierarchy.fetch(unique_keys)

    def record_call(self, nkeys: int, nunique: int) -> None:
        self.hierarchy.record_call(nkeys, nunique)

    def _validate_torch(self, keys: Any) -> None:
        import torch

        spec = self.spec
        narrow = self._narrow.get(keys.dtype)
        if narrow is False and keys.numel() <= spec.max_keys_per_lookup:
            return  # an integer dtype within the key type, a count within the limit
        where = f"model {spec.model!r} table {spec.table_id}"
        if keys.is_floating_point() or keys.is_complex() or keys.dtype == torch.bool:
            raise InvalidInputError(f"{where}: keys must be integers, got {keys.dtype}")
        if keys.numel() > spec.max_keys_per_lookup:
            raise InvalidInputError(
                f"{where}: {keys.numel()} keys in one lookup, more than max_batch_size x "
                f"maxnum_catfeature_query_per_table_per_sample = {spec.max_keys_per_lookup}"
            )
        info = np.iinfo(spec.key_dtype)
        tinfo = torch.iinfo(keys.dtype)
        # Whether this key dtype can hold values outside the table's key type.
        self._narrow[keys.dtype] = tinfo.min < info.min or tinfo.max > info.max
        if keys.numel() and self._narrow[keys.dtype]:
            lo, hi = int(keys.min()), int(keys.max())  # a device sync, only for narrow key types
            if lo < info.min or hi > info.max:
                bad = lo if lo < info.min else hi
                raise InvalidInputError(
                    f"{where}: key {bad} is outside the key type {spec.key_dtype} "
                    f"[{info.min}, {info.max}]"
                )

    def lookup(self, keys: Any) -> Any:
        """float32 vectors ``keys.shape + (dim,)``: torch in (same device) -> torch out."""
        import torch

        if isinstance(keys, torch.Tensor):
            self._validate_torch(keys)
        else:
            keys = np.asarray(self._validate(self.spec, keys)).astype(np.int64, copy=False)
        out, n_unique = self.gpu_tier.lookup_counted(keys)
        if n_unique:
            self.record_call(keys.numel() if hasattr(keys, "numel") else keys.size, n_unique)
        return out

    def on_update(self, keys: np.ndarray, vectors: np.ndarray | None = None) -> None:
        """Rows of ``keys`` changed in the lower tiers: never serve the old ones again."""
        self.gpu_tier.update(keys, vectors)

    def stats(self) -> dict[str, Any]:
        """The hierarchy's per-tier stats plus ``gpu``: the GPU tier's."""
        out = self.hierarchy.stats()
        out["gpu"] = self.gpu_tier.stats()
        return out

    def close(self) -> None:
        self.gpu_tier.close()
        self.hierarchy.close()


def wrap_with_gpu_tier(
    model: Any, table_id: int, hierarchy: Any, validate: Callable[..., Any]
) -> Any:
    """``hierarchy`` behind a GPU tier when the model enables one here, else unchanged."""
    devices = gpu_tier_devices(model.gpucache, model.deployed_device_list)
    if not devices:
        return hierarchy
    spec = hierarchy.spec
    try:
        tier = GpuTableTier(
            name=f"{spec.model}/{spec.name}",
            mode=model.cache_type,
            dim=spec.dim,
            rows=spec.num_rows,
            gpucacheper=model.gpucacheper,
            hit_rate_threshold=model.hit_rate_threshold,
            devices=devices,
            fetch=hierarchy.fetch,
            table_path=spec.path,
            default_vector=np.full(spec.dim, spec.default_value, np.float32),
            admission=model.gpu_cache_admission,
        )
    except BaseException:
        hierarchy.close()
        raise
    return GpuTieredTable(hierarchy, tier, validate)
