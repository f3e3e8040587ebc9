"""Set-associative layout shared by the GPU embedding-cache kernels.

A cache of ``num_sets`` sets, each of ``SLOTS_PER_SET`` (32) slots, is three flat device arrays:

- ``tags``    int16  ``[num_sets * 32]``: a 15-bit fingerprint per slot (0 = empty). One set's
  tags are 64 contiguous bytes (two sectors of one 128-byte line), so a probe reads one line
  and then only the key of a slot whose tag matches. With 15 bits a tag matches a wrong key of
  the set with probability 31/32767, so the query reads the key and the row of the first
  matching slot at once and falls back to the other candidates only when that key differs.
- ``slots``   int64  ``[num_sets * 32, 2]``: per slot its key (sign-extended to int64;
  ``empty_key(key_dtype)`` when empty) and its score (LRU clock stamp or LFU access count).
  Key and score share one 16-byte record, so the score a query touches on a hit lies in the
  32-byte sector it has just read to compare the key: the touch costs no extra DRAM read.
- ``vectors`` float32 ``[num_sets * 32, dim]``: the embedding rows, separate from the keys.

A key is hashed with MurmurHash3's 64-bit finalizer (applied to the key sign-extended to int64).
The low 32 bits pick the set (``(lo32 * num_sets) >> 32``, any set count works) and the top
15 bits are the tag (0 is remapped to 1, since 0 marks an empty slot).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

SLOTS_PER_SET = 32
EMPTY_TAG = 0
TAG_BITS = 15
TAG_DTYPE = torch.int16
KEY_DTYPES = (torch.int64, torch.int32)
POLICIES = ("lru", "lfu")

_MIX1 = 0xFF51AFD7ED558CCD
_MIX2 = 0xC4CEB9FE1A85EC53


def empty_key(key_dtype: torch.dtype) -> int:
    """The sentinel that marks an empty slot: the key dtype's largest value."""
    if key_dtype not in KEY_DTYPES:
        raise ValueError(f"cache keys must be torch.int64 or torch.int32, got {key_dtype}")
    return torch.iinfo(key_dtype).max


def num_sets_for(capacity: int) -> int:
    """Number of 32-slot sets that holds at least ``capacity`` slots (at least one set)."""
    if capacity < 1:
        raise ValueError(f"cache capacity must be >= 1 slot, got {capacity}")
    return max(1, -(-int(capacity) // SLOTS_PER_SET))


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
def set_and_tag(k, num_sets):
    """Set index (int64) and tag (int32 in 1..32767) of keys ``k``."""
    h = hash_key(k)
    s = ((h & 0xFFFFFFFF) * num_sets.to(tl.uint64)) >> 32
    t = (h >> 49).to(tl.int32)
    t = tl.where(t == 0, 1, t)
    return s.to(tl.int64), t


@triton.jit
def probe(k, s, t, m, tags_ptr, slots_ptr, SLOTS: tl.constexpr, PROBE_1D: tl.constexpr,
          TAG_EVICT: tl.constexpr):
    """Find keys ``k`` (set ``s``, tag ``t``, lanes ``m``).

    Returns (slot in set or -1, the score of that slot, the set's tags). Reads the set's 32
    tags (one sector), then the records (key, score) of the tag-matching slots only: all of
    them at once (``PROBE_1D=False``, a masked [keys, 32] load) or one candidate per key per
    round, lowest slot first (``PROBE_1D=True``).
    """
    sl = tl.arange(0, SLOTS)
    sidx = s[:, None] * SLOTS + sl[None, :]
    tg = tl.load(tags_ptr + sidx, mask=m[:, None], other=0, eviction_policy=TAG_EVICT)
    tg = tg.to(tl.int32)
    cand = (tg == t[:, None]) & m[:, None]
    k64 = k.to(tl.int64)
    if PROBE_1D:
        j_hit = tl.full(k64.shape, -1, tl.int32)
        score = tl.zeros(k64.shape, tl.int64)
        j = tl.min(tl.where(cand, sl[None, :], SLOTS), axis=1)
        active = j < SLOTS
        while tl.max(active.to(tl.int32), axis=0) > 0:
            rec = slots_ptr + 2 * (s * SLOTS + j)
            ck = tl.load(rec, mask=active, other=0)
            cs = tl.load(rec + 1, mask=active, other=0)
            match = active & (ck == k64)
            j_hit = tl.where(match, j, j_hit)
            score = tl.where(match, cs, score)
            cand = cand & (sl[None, :] != j[:, None])
            j = tl.min(tl.where(cand, sl[None, :], SLOTS), axis=1)
            active = active & (~match) & (j < SLOTS)
    else:
        # (key, score) records of the candidates as 16-byte pairs: one vector load each.
        pair = tl.arange(0, 2)
        rec = tl.load(slots_ptr + 2 * sidx[:, :, None] + pair[None, None, :],
                      mask=cand[:, :, None], other=0)
        ck = tl.sum(tl.where(pair[None, None, :] == 0, rec, 0), axis=2)
        cs = tl.sum(tl.where(pair[None, None, :] == 1, rec, 0), axis=2)
        eq = cand & (ck == k64[:, None])
        j_hit = tl.max(tl.where(eq, sl[None, :], -1), axis=1)
        score = tl.sum(tl.where(eq, cs, 0), axis=1)
    return j_hit, score, tg


@triton.jit
def speculative_query(k, s, t, m, offs, tags_ptr, slots_ptr, vec_ptr, out_ptr, stamp,
                      SLOTS: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      TAG_EVICT: tl.constexpr, ROW_EVICT: tl.constexpr,
                      TOUCH_EARLY: tl.constexpr, LFU: tl.constexpr, LRU_ATOMIC: tl.constexpr):
    """Find keys ``k`` (set ``s``, tag ``t``, lanes ``m``) and write their rows to
    ``out_ptr + offs * DIM`` (zeros for misses); returns (slot, hit, score).

    Reads the set's tags, then the record (key, score) and the first row tile of the first
    tag-matching slot together, so that the row does not wait for the key compare. A key
    whose first candidate holds another key while later slots carry the same tag (rare with
    15-bit tags) is resolved by :func:`probe`. With ``TOUCH_EARLY`` the score of a hit is
    written right after the compare, while its sector is still in L2.
    """
    sl = tl.arange(0, SLOTS)
    tg = tl.load(tags_ptr + s[:, None] * SLOTS + sl[None, :], mask=m[:, None], other=0,
                 eviction_policy=TAG_EVICT).to(tl.int32)
    cand = (tg == t[:, None]) & m[:, None]
    j0 = tl.min(tl.where(cand, sl[None, :], SLOTS), axis=1)
    has = j0 < SLOTS
    slot = s * SLOTS + tl.minimum(j0, SLOTS - 1).to(tl.int64)
    ck = tl.load(slots_ptr + 2 * slot, mask=has, other=0)
    score = tl.load(slots_ptr + 2 * slot + 1, mask=has, other=0)
    d = tl.arange(0, BLOCK_D)
    row = tl.load(vec_ptr + slot[:, None] * DIM + d[None, :],
                  mask=has[:, None] & (d < DIM)[None, :], other=0.0, eviction_policy=ROW_EVICT)
    hit = has & (ck == k.to(tl.int64))
    later = tl.max((cand & (sl[None, :] > j0[:, None])).to(tl.int32), axis=1) > 0
    need = has & (~hit) & later
    if TOUCH_EARLY:
        touch_scores(slots_ptr, slot, hit, score, stamp, LFU, LRU_ATOMIC)
    keep = m & (~need)
    tl.store(out_ptr + offs[:, None] * DIM + d[None, :], tl.where(hit[:, None], row, 0.0),
             mask=keep[:, None] & (d < DIM)[None, :], eviction_policy=ROW_EVICT)
    for d0 in tl.static_range(BLOCK_D, DIM, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = (d < DIM)[None, :]
        r = tl.load(vec_ptr + slot[:, None] * DIM + d[None, :], mask=hit[:, None] & dm,
                    other=0.0, eviction_policy=ROW_EVICT)
        tl.store(out_ptr + offs[:, None] * DIM + d[None, :], r, mask=keep[:, None] & dm,
                 eviction_policy=ROW_EVICT)
    if tl.max(need.to(tl.int32), axis=0) > 0:
        j2, score2, _tg = probe(k, s, t, need, tags_ptr, slots_ptr, SLOTS, False, TAG_EVICT)
        hit2 = need & (j2 >= 0)
        slot2 = s * SLOTS + tl.maximum(j2, 0).to(tl.int64)
        for d0 in tl.static_range(0, DIM, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = (d < DIM)[None, :]
            r = tl.load(vec_ptr + slot2[:, None] * DIM + d[None, :], mask=hit2[:, None] & dm,
                        other=0.0)
            tl.store(out_ptr + offs[:, None] * DIM + d[None, :], r, mask=need[:, None] & dm)
        if TOUCH_EARLY:
            touch_scores(slots_ptr, slot2, hit2, score2, stamp, LFU, LRU_ATOMIC)
        hit = hit | hit2
        slot = tl.where(hit2, slot2, slot)
        score = tl.where(hit2, score2, score)
    return slot, hit, score


@triton.jit
def touch_scores(slots_ptr, slot, hit, score, stamp, LFU: tl.constexpr,
                 LRU_ATOMIC: tl.constexpr):
    """Update the scores of hit slots: LFU adds one per hit; LRU stores ``stamp`` only where the
    slot's score (read with its key) is stale, so repeated hits of a hot key that already
    carries this call's stamp write nothing."""
    if LFU:
        tl.atomic_add(slots_ptr + 2 * slot + 1, 1, mask=hit, sem="relaxed")
    elif LRU_ATOMIC:
        tl.atomic_max(slots_ptr + 2 * slot + 1, stamp, mask=hit & (score != stamp),
                      sem="relaxed")
    else:
        tl.store(slots_ptr + 2 * slot + 1, stamp, mask=hit & (score != stamp))


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


def np_set_and_tag(keys: np.ndarray, num_sets: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy twin of :func:`set_and_tag`: (set index int64, tag int64)."""
    h = np_hash(keys)
    with np.errstate(over="ignore"):
        s = ((h & np.uint64(0xFFFFFFFF)) * np.uint64(num_sets)) >> np.uint64(32)
    t = (h >> np.uint64(64 - TAG_BITS)).astype(np.int64)
    t[t == 0] = 1
    return s.astype(np.int64), t


@dataclass
class CacheArrays:
    """The device arrays of one cache (or views into a pooled allocation)."""

    tags: torch.Tensor
    slots: torch.Tensor  # int64 [slots, 2]: key, score
    vectors: torch.Tensor
    num_sets: int
    key_dtype: torch.dtype

    @property
    def keys(self) -> torch.Tensor:
        """Strided int64 view of the slots' keys."""
        return self.slots[:, 0]

    @property
    def scores(self) -> torch.Tensor:
        """Strided int64 view of the slots' scores."""
        return self.slots[:, 1]

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def device(self) -> torch.device:
        return self.slots.device

    def clear(self) -> None:
        """Mark every slot empty (vectors are left as they are)."""
        self.tags.fill_(EMPTY_TAG)
        self.keys.fill_(empty_key(self.key_dtype))
        self.scores.zero_()

    def to_numpy(self) -> NpCacheState:
        """Host copy of the arrays, for the NumPy references and tests."""
        slots = self.slots.cpu().numpy()
        return NpCacheState(
            tags=self.tags.cpu().numpy().astype(np.int64),
            keys=slots[:, 0].copy(),
            scores=slots[:, 1].copy(),
            vectors=self.vectors.cpu().numpy().copy(),
            num_sets=self.num_sets,
            empty=empty_key(self.key_dtype),
        )


@dataclass
class NpCacheState:
    """Host copy of a cache's arrays, mutated in place by the NumPy references."""

    tags: np.ndarray
    keys: np.ndarray
    scores: np.ndarray
    vectors: np.ndarray
    num_sets: int
    empty: int

    def copy(self) -> NpCacheState:
        return NpCacheState(self.tags.copy(), self.keys.copy(), self.scores.copy(),
                            self.vectors.copy(), self.num_sets, self.empty)

    def find(self, key: int) -> int:
        """Flat slot index of ``key``, or -1 if absent."""
        s, t = np_set_and_tag(np.array([key]), self.num_sets)
        base = int(s[0]) * SLOTS_PER_SET
        for j in range(SLOTS_PER_SET):
            if self.tags[base + j] == t[0] and self.keys[base + j] == key:
                return base + j
        return -1


def allocate(num_sets: int, dim: int, key_dtype: torch.dtype,
             device: torch.device | str) -> CacheArrays:
    """Allocate an empty cache of ``num_sets`` sets of rows of ``dim`` float32."""
    if dim < 1:
        raise ValueError(f"embedding dim must be >= 1, got {dim}")
    empty_key(key_dtype)  # validates the dtype
    n = num_sets * SLOTS_PER_SET
    arrays = CacheArrays(
        tags=torch.empty(n, dtype=TAG_DTYPE, device=device),
        slots=torch.empty(n, 2, dtype=torch.int64, device=device),
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


def block_d(dim: int) -> int:
    """Row tile width: the next power of two of ``dim``, capped at 256 (wider rows loop)."""
    return min(256, triton.next_power_of_2(dim))
