"""The host RAM tier (HPS's `volatile_db`): key -> row over NumPy arrays, vectorised.

One `HostTier` holds up to `capacity` rows of one table in a `[capacity, dim]` float32 array.
Keys map to rows through a dense index array when the table's keys are compact (a key range
at most a few times the row count), otherwise through an open-addressing hash table probed a
whole batch at a time. When an insert would pass `capacity` (HPS's `overflow_margin`), rows
are evicted by `policy` until `resolution_target x capacity` rows remain:

- `evict_least_used`: fewest hits since insertion (LFU);
- `evict_oldest`: least recently used (oldest last access; HPS's name for LRU);
- `evict_random`: uniformly at random.

Not thread-safe by itself: the parameter server serialises calls per table.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["HashIndex", "HostTier", "OVERFLOW_POLICIES"]

OVERFLOW_POLICIES = ("evict_least_used", "evict_oldest", "evict_random")

#: Use the dense index when (key range) <= DENSE_FACTOR x rows (and at most DENSE_MAX keys).
DENSE_FACTOR = 4
DENSE_MAX = 1 << 31

_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)
_EMPTY, _TOMB = -1, -2


class _DenseIndex:
    """key -> slot through an int32/int64 array over [lo, hi]; -1 where absent."""

    def __init__(self, lo: int, hi: int, capacity: int) -> None:
        self.lo, self.hi = int(lo), int(hi)
        dtype = np.int32 if capacity < 2**31 else np.int64
        self.slot = np.full(self.hi - self.lo + 1, -1, dtype=dtype)
        self._lo = np.int64(self.lo)

    def find(self, keys: np.ndarray) -> np.ndarray:
        if len(keys) == 0:
            return np.empty(0, np.int64)
        if keys.min() >= self.lo and keys.max() <= self.hi:
            return self.slot[keys - self._lo].astype(np.int64, copy=False)
        inr = (keys >= self.lo) & (keys <= self.hi)
        out = np.full(len(keys), -1, np.int64)
        out[inr] = self.slot[keys[inr] - self._lo]
        return out

    def insert(self, keys: np.ndarray, slots: np.ndarray) -> None:
        self.slot[keys - self._lo] = slots

    def remove(self, keys: np.ndarray) -> None:
        self.slot[keys - self._lo] = -1

    @property
    def nbytes(self) -> int:
        return self.slot.nbytes


class HashIndex:
    """key -> slot through linear-probing open addressing, probed for a whole batch per round.

    One int64 `[size, 2]` array holds (key, slot) pairs, so a probe touches one cache line;
    the slot is -1 for a never-used entry and -2 for a deleted one (tombstone). At most a
    quarter of the entries are live, which keeps probe sequences short."""

    LOAD = 4  # entries per live key (at least)

    def __init__(self, max_entries: int) -> None:
        self.bits = max(4, math.ceil(math.log2(max(2, self.LOAD * max_entries))))
        self.size = 1 << self.bits
        self.kv = np.zeros((self.size, 2), np.int64)
        self.kv[:, 1] = _EMPTY
        self.live = 0
        self.tombs = 0

    def _home(self, keys: np.ndarray) -> np.ndarray:
        h = keys.view(np.uint64) * _HASH_MUL
        return (h >> np.uint64(64 - self.bits)).astype(np.int64)

    def _probe(self, keys: np.ndarray, want_pos: bool = False) -> np.ndarray:
        """Slot of each key (-1 if absent), or with `want_pos` its entry index (-1 if absent)."""
        mask = self.size - 1
        pos = self._home(keys)
        e = np.take(self.kv, pos, axis=0)
        hit = (e[:, 0] == keys) & (e[:, 1] >= 0)
        out = np.where(hit, pos if want_pos else e[:, 1], -1)
        todo = np.flatnonzero(~hit & (e[:, 1] != _EMPTY))
        k = keys[todo]
        p = pos[todo]
        while len(todo):
            p = (p + 1) & mask
            e = np.take(self.kv, p, axis=0)
            hit = (e[:, 0] == k) & (e[:, 1] >= 0)
            out[todo[hit]] = p[hit] if want_pos else e[hit, 1]
            more = ~hit & (e[:, 1] != _EMPTY)
            todo, k, p = todo[more], k[more], p[more]
        return out

    def find(self, keys: np.ndarray) -> np.ndarray:
        return self._probe(keys)

    def insert(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Insert keys known to be absent."""
        if self.LOAD * (self.live + len(keys)) > self.size or \
                self.live + self.tombs + len(keys) > self.size // 2:
            self._rebuild(len(keys))
        mask = self.size - 1
        pos = self._home(keys)
        idx = np.arange(len(keys))
        while len(idx):
            v = self.kv[pos, 1]
            free = np.flatnonzero(v < 0)
            keep = np.ones(len(idx), bool)
            if len(free):
                _, first = np.unique(pos[free], return_index=True)
                win = free[first]
                p = pos[win]
                self.tombs -= int(np.count_nonzero(self.kv[p, 1] == _TOMB))
                self.kv[p, 0] = keys[idx[win]]
                self.kv[p, 1] = slots[idx[win]]
                keep[win] = False
            idx = idx[keep]
            pos = (pos[keep] + 1) & mask
        self.live += len(keys)

    def remove(self, keys: np.ndarray) -> None:
        where = self._probe(keys, want_pos=True)
        where = where[where >= 0]
        self.kv[where, 1] = _TOMB
        self.live -= len(where)
        self.tombs += len(where)

    def _rebuild(self, extra: int) -> None:
        live = self.kv[:, 1] >= 0
        keys, slots = self.kv[live, 0].copy(), self.kv[live, 1].copy()
        self.__init__(max(self.size // self.LOAD, len(keys) + extra))  # type: ignore[misc]
        if len(keys):
            self.insert(keys, slots)

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes


def uses_dense_index(key_range: tuple[int, int, int] | None) -> bool:
    """Whether a table with `key_range=(lo, hi, rows)` gets the dense key index."""
    if key_range is None or key_range[2] <= 0:
        return False
    span = key_range[1] - key_range[0] + 1
    return span <= min(DENSE_MAX, max(DENSE_FACTOR * key_range[2], 1 << 16))


def index_nbytes(capacity: int, key_range: tuple[int, int, int] | None) -> int:
    """Bytes of the key index a HostTier(capacity, key_range=key_range) allocates."""
    if uses_dense_index(key_range):
        assert key_range is not None
        return (key_range[1] - key_range[0] + 1) * (4 if capacity < 2**31 else 8)
    bits = max(4, math.ceil(math.log2(max(2, HashIndex.LOAD * max(1, capacity)))))
    return (1 << bits) * 16


#: Host-tier bytes per resident row besides its vector: key, used flag, last access,
#: hit count, free-list entry.
ROW_OVERHEAD = 8 + 1 + 8 + 8 + 8


class HostTier:
    """Up to `capacity` rows of one `dim`-wide table in host RAM.

    `key_range=(lo, hi, num_rows)` (the table's smallest and largest key and its row count)
    lets the tier pick the dense index for compact keys, and skip per-row bookkeeping when the
    whole table fits; keys outside [lo, hi] (added by an update) are then never kept, and are
    read from the tiers below every time. `fetch`, `insert`, `update` and `remove` take unique
    int64 keys."""

    def __init__(self, dim: int, capacity: int, *, policy: str = "evict_random",
                 resolution_target: float = 0.8, key_range: tuple[int, int, int] | None = None,
                 seed: int | None = None) -> None:
        if policy not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow policy must be one of {OVERFLOW_POLICIES}, got {policy!r}")
        if not 0.0 <= resolution_target <= 1.0:
            raise ValueError(f"resolution_target must be in [0, 1], got {resolution_target}")
        self.dim = int(dim)
        self.capacity = max(0, int(capacity))
        self.policy = policy
        self.resolution_target = float(resolution_target)
        self._rng = np.random.default_rng(seed)
        self.vectors = np.empty((self.capacity, self.dim), np.float32)
        self._slot_key = np.zeros(self.capacity, np.int64)
        self._used = np.zeros(self.capacity, bool)
        self._last_access = np.zeros(self.capacity, np.int64)
        self._hits_per_slot = np.zeros(self.capacity, np.int64)
        self._free = np.arange(self.capacity - 1, -1, -1, dtype=np.int64)  # stack, pop from end
        self._nfree = self.capacity
        self._clock = 0
        if uses_dense_index(key_range):
            assert key_range is not None
            self._index: _DenseIndex | HashIndex = _DenseIndex(key_range[0], key_range[1],
                                                                self.capacity)
        else:
            self._index = HashIndex(max(1, self.capacity))
        # Per-row bookkeeping only where the policy reads it, and none when the whole table
        # fits (key_range promises that only the table's keys are inserted: no eviction ever).
        fits = key_range is not None and self.capacity >= key_range[2]
        self._track = None if fits or policy == "evict_random" else policy
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.inserts = 0

    @property
    def index_kind(self) -> str:
        """"dense" or "hash": how keys map to rows."""
        return "dense" if isinstance(self._index, _DenseIndex) else "hash"

    @property
    def resident_rows(self) -> int:
        """Rows held now."""
        return self.capacity - self._nfree

    @property
    def nbytes(self) -> int:
        """Host memory held by this tier (vectors, per-row metadata, index)."""
        return (self.vectors.nbytes + self._slot_key.nbytes + self._used.nbytes
                + self._last_access.nbytes + self._hits_per_slot.nbytes + self._free.nbytes
                + self._index.nbytes)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Row of `vectors` holding each key, -1 where not resident (counts nothing)."""
        return self._index.find(keys)

    def touch(self, slots: np.ndarray, misses: int = 0) -> None:
        """Record hits on resident rows `slots` (unique) and `misses` misses."""
        self._clock += 1
        if self._track == "evict_oldest":
            self._last_access[slots] = self._clock
        elif self._track == "evict_least_used":
            self._hits_per_slot[slots] += 1
        self.hits += len(slots)
        self.misses += misses

    def fetch(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, float32 vectors of the found keys in key order) for unique `keys`."""
        slots = self.find(keys)
        found = slots >= 0
        s = slots[found] if not found.all() else slots
        self.touch(s, len(keys) - len(s))
        return found, np.take(self.vectors, s, axis=0)

    def insert(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add rows for unique keys not yet resident, evicting by policy when full."""
        if isinstance(self._index, _DenseIndex) and len(keys):
            inr = (keys >= self._index.lo) & (keys <= self._index.hi)
            if not inr.all():
                keys, vectors = keys[inr], vectors[inr]
        n = len(keys)
        if n == 0 or self.capacity == 0:
            return
        if n > self.capacity:  # more than fits at all: keep the last `capacity`
            keys, vectors, n = keys[-self.capacity:], vectors[-self.capacity:], self.capacity
        if n > self._nfree:
            target = min(int(self.resolution_target * self.capacity), self.capacity - n)
            self._evict(self.resident_rows - max(0, target))
        slots = self._free[self._nfree - n:self._nfree][::-1].copy()
        self._nfree -= n
        self.vectors[slots] = vectors
        self._slot_key[slots] = keys
        self._used[slots] = True
        self._clock += 1
        self._last_access[slots] = self._clock
        self._hits_per_slot[slots] = 0
        self._index.insert(keys, slots)
        self.inserts += n

    def load(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Bulk-fill at startup (same as insert; rows beyond capacity are not loaded)."""
        room = self._nfree
        if room <= 0:
            return
        self.insert(keys[:room], vectors[:room])

    def _evict(self, count: int) -> None:
        if count <= 0:
            return
        used = np.flatnonzero(self._used)
        count = min(count, len(used))
        if self.policy == "evict_random":
            victims = self._rng.choice(used, size=count, replace=False)
        else:
            score = (self._hits_per_slot if self.policy == "evict_least_used"
                     else self._last_access)[used]
            if count < len(used):
                part = np.argpartition(score, count - 1)[:count]
            else:
                part = np.arange(len(used))
            victims = used[part]
        self._release(victims)
        self.evictions += count

    def _release(self, slots: np.ndarray) -> None:
        """Forget the keys of resident rows `slots` and put the rows back on the free stack."""
        self._index.remove(self._slot_key[slots])
        self._used[slots] = False
        self._free[self._nfree:self._nfree + len(slots)] = slots
        self._nfree += len(slots)

    def update(self, keys: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """Overwrite the rows of the resident keys among unique `keys` with `vectors` (absent
        keys stay absent); returns which keys were resident."""
        slots = self.find(keys)
        hit = slots >= 0
        self.vectors[slots[hit]] = vectors[hit]
        return hit

    def remove(self, keys: np.ndarray) -> int:
        """Drop the rows of unique `keys` (absent keys are ignored); returns rows dropped."""
        slots = self.find(keys)
        slots = slots[slots >= 0]
        if len(slots):
            self._release(slots)
        return len(slots)

    def clear(self) -> None:
        """Drop every row (counters are kept)."""
        self._release(np.flatnonzero(self._used))

    def resident_keys(self) -> np.ndarray:
        """Keys held now (unordered)."""
        return self._slot_key[self._used].copy()

    def stats(self) -> dict[str, int | str]:
        """Counters: hits, misses, evictions, inserts, resident_rows, capacity, index."""
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "inserts": self.inserts, "resident_rows": self.resident_rows,
                "capacity": self.capacity, "index": self.index_kind}
