"""GpuEmbeddingCache: the dynamic (set-associative, LRU/LFU) GPU embedding cache.

Owns the device arrays (allocated through torch) and runs the Triton kernels of
``keras_hps.triton_kernels`` on them. ``GpuCacheGroup`` pools the caches of several tables in
one allocation so that all of them can be queried in one launch.

Thread safety: every operation takes the lock of the caches of its device (one lock and one
CUDA stream per device, shared by every cache on it) and, on CUDA, runs on that stream, which
first waits for the caller's current stream; the caller's stream then waits for the cache's
stream before it uses the results. So operations from any threads and streams execute one after
another on the device, in the order their calls took the lock, and a query never sees a
half-written insert. A query captured in a CUDA graph (``miss_flag``) runs on the caller's
stream instead; whoever replays the graph orders the replay with ``ordering.replaying`` (the
replay waits for earlier writes, later writes wait for the replay).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from keras_hps.errors import InvalidInputError
from keras_hps.triton_kernels.cache_admission import new_sketch, sketch_add, sketch_width_log2
from keras_hps.triton_kernels.cache_fused_query import cache_params, fused_cache_query
from keras_hps.triton_kernels.cache_insert import cache_insert
from keras_hps.triton_kernels.cache_layout import (
    KEY_DTYPES,
    POLICIES,
    SLOTS_PER_SET,
    CacheArrays,
    allocate,
    check_keys,
    check_values,
    num_sets_for,
)
from keras_hps.triton_kernels.cache_query import cache_query
from keras_hps.triton_kernels.cache_update import cache_invalidate, cache_update

_HITS, _MISSES, _INSERTIONS, _EVICTIONS, _REJECTED = range(5)
ADMISSIONS = ("none", "tinylfu")


def _counter_property(index: int, doc: str) -> property:
    """A read-only property: the cache's device counter `index`, read under its lock."""
    return property(lambda self: self._counter(index), doc=doc)


class _Shared:
    """Lock and stream of the caches of one device, and the
    reads replayed from CUDA graphs that the next write must wait for."""

    _by_device: dict[torch.device, _Shared] = {}
    _registry_lock = threading.Lock()

    def __init__(self, device: torch.device) -> None:
        self.lock = threading.RLock()
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.replayed: dict[int, torch.cuda.Event] = {}  # replaying stream -> its last replay

    @classmethod
    def of(cls, device: torch.device) -> _Shared:
        """The one `_Shared` of ``device``."""
        with cls._registry_lock:
            shared = cls._by_device.get(device)
            if shared is None:
                shared = cls._by_device[device] = cls(device)
            return shared

    @contextmanager
    def replaying(self, stream: torch.cuda.Stream | None,
                  done: torch.cuda.Event | None) -> Iterator[None]:
        """Replay a CUDA graph that reads these caches on ``stream`` inside the block: the
        replay waits for the writes enqueued before it, and ``done`` (recorded on ``stream``
        after the replay, inside the block) is what the next write waits for."""
        with self.lock:
            if self.stream is not None and stream is not None:
                stream.wait_stream(self.stream)
            yield
            if self.stream is not None and stream is not None and done is not None:
                self.replayed[stream.cuda_stream] = done

    def before_write(self) -> None:
        """On the cache stream, under the lock: wait for the replays that read the caches."""
        for event in self.replayed.values():
            self.stream.wait_event(event)
        self.replayed.clear()


def _checked_keys(keys: torch.Tensor, cache: GpuEmbeddingCache, what: str = "keys",
                  validate: bool = True) -> torch.Tensor:
    try:
        return check_keys(keys, cache.key_dtype, cache.device, what=what, validate=validate)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(str(e)) from None


def _checked_values(values: torch.Tensor, n: int, cache: GpuEmbeddingCache) -> torch.Tensor:
    try:
        return check_values(values, n, cache.dim, cache.device)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(str(e)) from None


def _check_common(dim: int, device: torch.device | str, policy: str,
                  key_dtype: torch.dtype) -> torch.device:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if key_dtype not in KEY_DTYPES:
        raise ValueError(f"key_dtype must be torch.int64 or torch.int32, got {key_dtype}")
    if int(dim) < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class GpuEmbeddingCache:
    """A set-associative cache of ``capacity`` float32 rows of width ``dim`` in device memory.

    Keys are ``key_dtype`` integers (int64 by default); the dtype's largest value is reserved
    as the empty-slot marker and is rejected. The capacity is rounded up to whole groups of 32
    slots (four 8-slot sets). ``policy`` picks the victim when a set is full: ``"lru"`` (least
    recently queried or inserted, to the resolution of the inserts into the set: hits are
    marked in a bitmap and stamped by the set's next insert) or ``"lfu"`` (fewest queries
    since insertion). ``admission="tinylfu"`` counts every queried key in a frequency sketch
    and lets a new key evict a resident one only if it was queried more often (TinyLFU);
    ``"none"`` inserts every key.
    """

    def __init__(
        self,
        capacity: int,
        dim: int,
        *,
        device: torch.device | str,
        policy: str = "lru",
        key_dtype: torch.dtype = torch.int64,
        admission: str = "none",
    ) -> None:
        device = _check_common(dim, device, policy, key_dtype)
        if admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {admission!r}")
        self._policy = policy
        self._arrays = allocate(num_sets_for(capacity), int(dim), key_dtype, device)
        self._shared = _Shared.of(device)
        self._counters = torch.zeros(5, dtype=torch.int64, device=device)
        self._sketch: tuple[torch.Tensor, int] | None = None
        self._sketch_count = 0
        self._clock = 0
        if admission == "tinylfu":
            width_log2 = sketch_width_log2(self.capacity)
            self._sketch = (new_sketch(width_log2, device), width_log2)

    # ----------------------------------------------------------------- properties
    @property
    def capacity(self) -> int:
        """Number of slots (rows) the cache holds."""
        return self._arrays.num_sets * SLOTS_PER_SET

    @property
    def dim(self) -> int:
        return self._arrays.dim

    @property
    def device(self) -> torch.device:
        return self._arrays.device

    @property
    def key_dtype(self) -> torch.dtype:
        return self._arrays.key_dtype

    @property
    def policy(self) -> str:
        return self._policy

    @property
    def admission(self) -> str:
        return "tinylfu" if self._sketch is not None else "none"

    @property
    def num_sets(self) -> int:
        return self._arrays.num_sets

    @property
    def arrays(self) -> CacheArrays:
        """The raw device arrays (for kernels and tests; mutate only under :meth:`ordered`)."""
        return self._arrays

    @property
    def size(self) -> int:
        """Number of occupied slots (counts them on the device; synchronises)."""
        with self.ordered():
            return int(self._arrays.occupied.sum())

    def _counter(self, i: int) -> int:
        with self.ordered():
            return int(self._counters[i])

    hits = _counter_property(_HITS, "Query keys found, since creation or `reset_counters`.")
    misses = _counter_property(_MISSES, "Query keys not found.")
    insertions = _counter_property(
        _INSERTIONS, "Keys newly placed by `insert` (updates in place not counted).")
    evictions = _counter_property(_EVICTIONS, "Resident keys replaced by `insert`.")
    rejected = _counter_property(_REJECTED, "New keys that TinyLFU admission kept out.")

    def stats(self) -> dict[str, int]:
        """Counters and occupancy in one read."""
        with self.ordered():
            c = self._counters.tolist()
            size = int(self._arrays.occupied.sum())
        return {"hits": c[_HITS], "misses": c[_MISSES], "insertions": c[_INSERTIONS],
                "evictions": c[_EVICTIONS], "rejected": c[_REJECTED], "size": size,
                "capacity": self.capacity}

    def fused_params(self, counters: torch.Tensor | None = None) -> torch.Tensor:
        """This cache's parameter row for `fused_cache_query` (its arrays' addresses; hits and
        misses go to ``counters``, int64 ``[2]``, or the cache's own)."""
        return cache_params(self._arrays, self._counters if counters is None else counters)

    def reset_counters(self) -> None:
        with self.ordered():
            self._counters.zero_()

    # ----------------------------------------------------------------- ordering
    @property
    def ordering(self) -> _Shared:
        """The lock and stream this cache's operations are ordered by (one per device), for
        whoever replays a CUDA graph holding a captured query (`_Shared.replaying`)."""
        return self._shared

    @contextmanager
    def ordered(self, *, write: bool = True) -> Iterator[None]:
        """Hold the cache's lock and run the block's device work on the cache's stream
        (after the replayed graphs that read the cache, when the block ``write``s)."""
        sh = self._shared
        with sh.lock:
            if sh.stream is None:
                yield
                return
            caller = torch.cuda.current_stream(self.device)
            sh.stream.wait_stream(caller)
            if write:
                sh.before_write()
            with torch.cuda.stream(sh.stream):
                yield
            caller.wait_stream(sh.stream)

    def _on_stream(self, *tensors: torch.Tensor) -> None:
        """Tell the allocator that tensors crossing between streams are in use on both."""
        sh = self._shared
        if sh.stream is None:
            return
        caller = torch.cuda.current_stream(self.device)
        for t in tensors:
            if t.device.type == "cuda":
                t.record_stream(sh.stream)
                t.record_stream(caller)

    # ----------------------------------------------------------------- operations
    def query(self, keys: torch.Tensor, *, touch: bool = True, validate: bool = True,
              miss_flag: torch.Tensor | None = None, counters: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Look ``keys`` (any shape, may repeat) up: ``(values [n, dim] float32, hit [n] bool)``.

        Missed keys get zero rows. Hits mark the slot as recently used (LRU) or count one
        more use (LFU) unless ``touch=False``. ``validate=False`` skips the key-value checks
        (the sentinel, int32 range), which read the keys back to the host; pass it only for
        keys already checked (a wrong dtype or device then raises ValueError). ``counters``
        (int64 ``[2]``) receives +hits and +misses instead of the cache's own counters.

        ``miss_flag`` (int32 ``[1]`` on the device) makes the query capturable in a CUDA
        graph: it runs on the caller's stream, with no host synchronisation, and sets the flag
        to 1 when a key misses; the graph's replays are ordered by :attr:`ordering`.
        """
        # Unvalidated keys (the GPU tier's, flat int64 on the device) go straight to the
        # kernel's wrapper, which checks their dtype and device.
        keys = _checked_keys(keys, self) if validate else keys.reshape(-1)
        counters = self._counters if counters is None else counters
        if miss_flag is not None:
            with self._shared.lock:
                out, hit = cache_query(self._arrays, keys, policy=self._policy, touch=touch,
                                       counters=counters, miss_flag=miss_flag, validate=False)
                if self._sketch is not None and touch:
                    self._count_lookups(keys)
            return out, hit
        with self.ordered(write=False):
            out, hit = cache_query(self._arrays, keys, policy=self._policy, touch=touch,
                                   counters=counters, validate=False)
            if self._sketch is not None and touch:
                self._count_lookups(keys)
            self._on_stream(keys, out, hit)
        return out, hit

    def _count_lookups(self, keys: torch.Tensor) -> None:
        """Add ``keys`` to the TinyLFU sketch; halve it every 10 capacities of lookups."""
        sketch, width_log2 = self._sketch
        sketch_add(sketch, keys, width_log2)
        self._sketch_count += keys.numel()
        if self._sketch_count > 10 * self.capacity:
            sketch.bitwise_right_shift_(1)
            self._sketch_count = 0

    def insert(self, keys: torch.Tensor, values: torch.Tensor, *, validate: bool = True) -> None:
        """Insert rows ``values [n, dim]`` for ``keys``; present keys are updated in place.

        A key repeated in the batch is stored once, with its last row. When a set is full the
        policy's victim is evicted (with TinyLFU admission, only by a key queried more often
        than it; else the new key is not stored). ``validate`` as in :meth:`query`.
        """
        keys = _checked_keys(keys, self, validate=validate)
        values = _checked_values(values, keys.numel(), self)
        with self.ordered():
            self._clock += 1  # the LRU clock: every insert call takes the next tick
            stamp = self._clock
            cache_insert(self._arrays, keys, values, policy=self._policy, stamp=stamp,
                         counters=self._counters, validate=False, sketch=self._sketch)
            self._on_stream(keys, values)

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite the rows of the ``keys`` that are resident; absent keys are ignored."""
        keys = _checked_keys(keys, self)
        values = _checked_values(values, keys.numel(), self)
        with self.ordered():
            cache_update(self._arrays, keys, values, validate=False)
            self._on_stream(keys, values)

    def invalidate(self, keys: torch.Tensor) -> None:
        """Remove ``keys`` from the cache (absent keys are ignored)."""
        keys = _checked_keys(keys, self)
        with self.ordered():
            cache_invalidate(self._arrays, keys, validate=False)
            self._on_stream(keys)

    def clear(self) -> None:
        """Empty the cache (counters are kept)."""
        with self.ordered():
            self._arrays.clear()

    def __repr__(self) -> str:
        return (f"GpuEmbeddingCache(capacity={self.capacity}, dim={self.dim}, "
                f"device={self.device}, policy={self._policy!r}, key_dtype={self.key_dtype})")


class GpuCacheGroup:
    """The caches of several tables on one device, queried together in one launch.

    ``tables`` is a sequence of ``(capacity, dim)``; ``group[i]`` is table ``i``'s
    :class:`GpuEmbeddingCache` (insert/update/invalidate per table as usual), and
    :meth:`query` looks up every table's keys with a single kernel launch.
    """

    def __init__(
        self,
        tables: Sequence[tuple[int, int]],
        *,
        device: torch.device | str,
        policy: str = "lru",
        key_dtype: torch.dtype = torch.int64,
    ) -> None:
        if not tables:
            raise ValueError("GpuCacheGroup needs at least one (capacity, dim) table")
        self._policy = policy
        self._caches = [GpuEmbeddingCache(c, d, device=device, policy=policy,
                                          key_dtype=key_dtype) for c, d in tables]
        self._dims = [c.dim for c in self._caches]
        self._params = torch.stack([c.fused_params() for c in self._caches])

    def __len__(self) -> int:
        return len(self._caches)

    def __getitem__(self, i: int) -> GpuEmbeddingCache:
        return self._caches[i]

    @property
    def caches(self) -> list[GpuEmbeddingCache]:
        return list(self._caches)

    def query(self, keys_per_table: Sequence[torch.Tensor], *, touch: bool = True
              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Query table ``i`` with ``keys_per_table[i]``, all tables in one launch.

        Returns (per-table values ``[n_i, dim_i]``, per-table hit masks ``[n_i]``). Counters
        of each table's cache are updated as by its own :meth:`GpuEmbeddingCache.query`.
        """
        if len(keys_per_table) != len(self._caches):
            raise ValueError(f"expected keys for {len(self._caches)} tables, got "
                             f"{len(keys_per_table)}")
        first = self._caches[0]
        flat = [_checked_keys(k, first, what=f"keys of table {i}", validate=False)
                for i, k in enumerate(keys_per_table)]
        counts = [k.numel() for k in flat]
        keys = torch.cat(flat) if len(flat) > 1 else flat[0]
        try:  # one device read for all tables; per table only to name the bad one
            _checked_keys(keys, first)
        except InvalidInputError:
            for i, k in enumerate(flat):
                _checked_keys(k, first, what=f"keys of table {i}")
            raise
        with first.ordered(write=False):
            values, hit = fused_cache_query(self._params, keys, counts, self._dims,
                                            policy=self._policy, touch=touch)
            first._on_stream(keys, hit, *flat, *values)
        return values, list(hit.split(counts))
