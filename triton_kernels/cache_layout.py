"""Set-associative layout shared by the GPU embedding-cache kernels.

A cache of ``num_sets`` sets, each of ``SLOTS_PER_SET`` (8) slots, is four flat device arrays:

- ``keys``    int64  ``[num_sets * 8]``: the slots' keys (sign-extended to int64;
  ``empty_key(key_dtype)`` when empty). One set's 8 keys are one 64-byte block, so a probe is
  one read of that block and a compare of all 8 keys, with no fingerprint step (measured faster
  than 15-bit tags plus a key read: docs/benchmarks/gpu_cache.md, "Layout study").
- ``scores``  int64  ``[num_sets * 8]``: per slot its LRU clock stamp or LFU access count
  (query hits stop counting at ``LFU_CAP``: a key that hot is never a victim anyway, and its
  hits then cost a read instead of contended atomics).
- ``marks``   int32  ``[num_sets * 8 / 32]``: one bit per slot, set by an LRU query hit. At
  1/64 of the keys' size the bitmap stays in L2, so a hit costs an L2 atomic instead of a DRAM
  write. An insert into a set first stamps the set's marked slots with its own clock stamp
  and clears their bits, then picks the victim: LRU ordered to the resolution of the inserts
  into each set.
- ``vectors`` float32 ``[num_sets * 8, dim]``: the embedding rows.

The set count is a multiple of 4, so a cache's slots fill whole bitmap words (and a pooled
group of caches can hand each one a word-aligned view). A key is hashed with MurmurHash3's
64-bit finalizer (applied to the key sign-extended to int64); the low 32 bits pick the set
(``(lo32 * num_sets) >> 32``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

SLOTS_PER_SET = 8
SETS_PER_WORD = 4  # 32 slots: one int32 word of the marks bitmap
KEY_DTYPES = (torch.int64, torch.int32)
POLICIES = ("lru", "lfu")
LFU_CAP = tl.constexpr(1 << 16)  # query hits add to an LFU count only below this

_MIX1 = 0xFF51AFD7ED558CCD
_MIX2 = 0xC4CEB9FE1A85EC53


def empty_key(key_dtype: torch.dtype) -> int:
    """The sentinel that marks an empty slot: the key dtype's largest value."""
    if key_dtype not in KEY_DTYPES:
        raise ValueError(f"cache keys must be torch.int64 or torch.int32, got {key_dtype}")
    return torch.iinfo(key_dtype).max


def num_sets_for(capacity: int) -> int:
    """Number of 8-slot sets that holds at least ``capacity`` slots: whole groups of 4 sets."""
    if capacity < 1:
        raise ValueError(f"cache capacity must be >= 1 slot, got {capacity}")
    group = SLOTS_PER_SET * SETS_PER_WORD
    return max(1, -(-int(capacity) // group)) * SETS_PER_WORD


@triton.jit
def hash_key(k):
    """64-bit finalizer of a key (any int dtype, sign-extended): returns uint64."""
    h = k.to(tl.int64).to(tl.uint64, bitcast=True)
    h ^= h >> 33
    h *= 0xFF51AFD7ED558CCD
    h ^= h >> 33
    h *= 0xC4CEB9FE1A85EC53
    h ^= h >> 33
    return h


@triton.jit
def set_index(k, num_sets):
    """Set index (int64) of keys ``k``."""
    h = hash_key(k)
    return (((h & 0xFFFFFFFF) * num_sets.to(tl.uint64)) >> 32).to(tl.int64)


@triton.jit
def probe(k, s, m, keys_ptr, empty, SLOTS: tl.constexpr):
    """Find keys ``k`` (set ``s``, lanes ``m``): returns (way in the set or -1, the set's
    ``[keys, SLOTS]`` key block). The empty-slot sentinel never matches."""
    w = tl.arange(0, SLOTS)
    kb = tl.load(keys_ptr + s[:, None] * SLOTS + w[None, :], mask=m[:, None], other=empty)
    k64 = k.to(tl.int64)
    eq = (kb == k64[:, None]) & (k64 != empty)[:, None]
    return tl.max(tl.where(eq, w[None, :], -1), axis=1), kb


@triton.jit
def find_slots(keys_ptr, n, cache_keys_ptr, num_sets, empty, BLOCK_K: tl.constexpr,
               SLOTS: tl.constexpr):
    """This program's ``BLOCK_K`` keys: (positions, lane mask, hit, flat slot of each hit)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=0)
    s = set_index(k, num_sets)
    j, _kb = probe(k, s, m, cache_keys_ptr, empty, SLOTS)
    return offs, m, j >= 0, s * SLOTS + tl.maximum(j, 0).to(tl.int64)


@triton.jit
def touch(marks_ptr, scores_ptr, slot, hit, LFU: tl.constexpr, MARK_CHECK: tl.constexpr):
    """Record query hits: LFU adds one to the slot's count; LRU sets the slot's mark bit.
    With ``MARK_CHECK`` a read comes first and the atomic is skipped where it would change
    nothing (the mark is set) or where the count has reached ``LFU_CAP``, so hot keys cost a
    read instead of contended atomics."""
    if LFU:
        if MARK_CHECK:
            hit = hit & (tl.load(scores_ptr + slot, mask=hit, other=LFU_CAP) < LFU_CAP)
        tl.atomic_add(scores_ptr + slot, 1, mask=hit, sem="relaxed")
    else:
        word = marks_ptr + (slot >> 5)
        bit = tl.full(slot.shape, 1, tl.int32) << (slot & 31).to(tl.int32)
        if MARK_CHECK:
            hit = hit & ((tl.load(word, mask=hit, other=0) & bit) == 0)
        tl.atomic_or(word, bit, mask=hit, sem="relaxed")


@triton.jit
def copy_rows(vec_ptr, slot, hit, out_ptr, offs, m, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              ROW_EVICT: tl.constexpr):
    """``out[offs] = vectors[slot]`` where ``hit``, zeros elsewhere (lanes ``m``)."""
    for d0 in tl.static_range(0, DIM, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = (d < DIM)[None, :]
        row = tl.load(vec_ptr + slot[:, None] * DIM + d[None, :], mask=hit[:, None] & dm,
                      other=0.0, eviction_policy=ROW_EVICT)
        tl.store(out_ptr + offs[:, None] * DIM + d[None, :], row, mask=m[:, None] & dm,
                 eviction_policy=ROW_EVICT)


def np_hash(keys: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`hash_key` (uint64)."""
    h = np.asarray(keys).astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(_MIX1)
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(_MIX2)
        h = h ^ (h >> np.uint64(33))
    return h


def np_set_index(keys: np.ndarray, num_sets: int) -> np.ndarray:
    """NumPy twin of :func:`set_index` (int64)."""
    h = np_hash(keys)
    with np.errstate(over="ignore"):
        s = ((h & np.uint64(0xFFFFFFFF)) * np.uint64(num_sets)) >> np.uint64(32)
    return s.astype(np.int64)


@dataclass
class CacheArrays:
    """The device arrays of one cache (or views into a pooled allocation)."""

    keys: torch.Tensor  # int64 [slots]
    scores: torch.Tensor  # int64 [slots]
    marks: torch.Tensor  # int32 [slots / 32]: LRU hit bits
    vectors: torch.Tensor  # float32 [slots, dim]
    num_sets: int
    key_dtype: torch.dtype

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def occupied(self) -> torch.Tensor:
        """Bool mask of the slots that hold a key."""
        return self.keys != empty_key(self.key_dtype)

    def clear(self) -> None:
        """Mark every slot empty (vectors are left as they are)."""
        self.keys.fill_(empty_key(self.key_dtype))
        self.scores.zero_()
        self.marks.zero_()

    def to_numpy(self) -> NpCacheState:
        """Host copy of the arrays, for the NumPy references and tests."""
        words = self.marks.cpu().numpy().view(np.uint32).astype(np.uint64)
        bits = ((words[:, None] >> np.arange(32, dtype=np.uint64)) & np.uint64(1)).astype(bool)
        return NpCacheState(
            keys=self.keys.cpu().numpy().copy(),
            scores=self.scores.cpu().numpy().copy(),
            marks=bits.reshape(-1),
            vectors=self.vectors.cpu().numpy().copy(),
            num_sets=self.num_sets,
            empty=empty_key(self.key_dtype),
        )


@dataclass
class NpCacheState:
    """Host copy of a cache's arrays, mutated in place by the NumPy references."""

    keys: np.ndarray
    scores: np.ndarray
    marks: np.ndarray  # bool per slot
    vectors: np.ndarray
    num_sets: int
    empty: int

    def copy(self) -> NpCacheState:
        return NpCacheState(self.keys.copy(), self.scores.copy(), self.marks.copy(),
                            self.vectors.copy(), self.num_sets, self.empty)

    def find(self, key: int) -> int:
        """Flat slot index of ``key``, or -1 if absent."""
        if key == self.empty:
            return -1
        base = int(np_set_index(np.array([key]), self.num_sets)[0]) * SLOTS_PER_SET
        for j in range(SLOTS_PER_SET):
            if self.keys[base + j] == key:
                return base + j
        return -1

    def refresh(self, base: int, stamp: int) -> None:
        """What an LRU insert does first to the set starting at slot ``base``: stamp its
        marked slots with ``stamp`` and clear their marks."""
        sl = slice(base, base + SLOTS_PER_SET)
        self.scores[sl][self.marks[sl]] = stamp
        self.marks[sl] = False


def allocate(num_sets: int, dim: int, key_dtype: torch.dtype,
             device: torch.device | str) -> CacheArrays:
    """Allocate an empty cache of ``num_sets`` sets (a multiple of 4) of ``dim`` float32 rows."""
    if dim < 1:
        raise ValueError(f"embedding dim must be >= 1, got {dim}")
    if num_sets < 1 or num_sets % SETS_PER_WORD:
        raise ValueError(f"num_sets must be a positive multiple of {SETS_PER_WORD}, "
                         f"got {num_sets}")
    empty_key(key_dtype)  # validates the dtype
    n = num_sets * SLOTS_PER_SET
    arrays = CacheArrays(
        keys=torch.empty(n, dtype=torch.int64, device=device),
        scores=torch.empty(n, dtype=torch.int64, device=device),
        marks=torch.empty(n // 32, dtype=torch.int32, device=device),
        vectors=torch.zeros(n, dim, dtype=torch.float32, device=device),
        num_sets=num_sets,
        key_dtype=key_dtype,
    )
    arrays.clear()
    return arrays


def check_keys(keys: torch.Tensor, key_dtype: torch.dtype, device: torch.device,
               *, validate: bool = True, what: str = "keys") -> torch.Tensor:
    """Flatten ``keys`` to a contiguous 1-D tensor of ``key_dtype`` on ``device``.

    Raises ValueError for a non-integer dtype, a wrong device, the empty-slot sentinel, or
    (for an int32 cache) keys outside int32. ``validate=False`` skips the value checks, which
    read the keys back to the host (a device synchronisation).
    """
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(keys).__name__}")
    if keys.dtype not in KEY_DTYPES:
        raise ValueError(f"{what} must be int32 or int64, got {keys.dtype}")
    if keys.device != device:
        raise ValueError(f"{what} are on {keys.device}, the cache is on {device}")
    keys = keys.reshape(-1)
    if validate and keys.numel():
        sentinel = empty_key(key_dtype)
        if keys.dtype == torch.int64 and key_dtype == torch.int32:
            lo, hi = torch.aminmax(keys)
            if int(lo) < torch.iinfo(torch.int32).min or int(hi) > sentinel:
                bad = keys[(keys < torch.iinfo(torch.int32).min) | (keys > sentinel)][0]
                raise ValueError(
                    f"{what}: key {int(bad)} does not fit this int32-keyed cache "
                    f"(int32 keys must be < {sentinel})")
        elif bool((keys == sentinel).any()):
            raise ValueError(
                f"{what}: key {sentinel} is reserved as the empty-slot sentinel of a "
                f"{str(key_dtype).replace('torch.', '')} cache and cannot be stored or queried")
    if keys.dtype != key_dtype:
        keys = keys.to(key_dtype)
    return keys.contiguous()


def check_values(values: torch.Tensor, n: int, dim: int, device: torch.device) -> torch.Tensor:
    """Check ``values`` is float32-convertible ``[n, dim]`` on ``device``; return it contiguous."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if values.device != device:
        raise ValueError(f"values are on {values.device}, the cache is on {device}")
    if not values.is_floating_point():
        raise ValueError(f"values must be floating point, got {values.dtype}")
    if tuple(values.shape) != (n, dim):
        raise ValueError(f"values must have shape ({n}, {dim}) for {n} keys, got "
                         f"{tuple(values.shape)}")
    return values.to(torch.float32).contiguous()


def small_int64_to_device(values, device: torch.device) -> torch.Tensor:
    """A short int64 vector on ``device``, copied without a stream synchronisation.

    (A copy from ordinary pageable host memory makes CUDA wait for the stream first; from
    pinned memory it is queued like a kernel.)
    """
    t = torch.as_tensor(np.asarray(values, dtype=np.int64))
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
