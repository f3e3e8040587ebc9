"""One table's GPU tier split by key over several devices (``gpu_placement: "shard"``).

Each key has one owner shard (`keras_hps.triton_kernels.shard_route.shard_owner`). A
`ShardedCache` (modes ``dynamic`` and ``uvm``) holds one `GpuEmbeddingCache` per device and a
`ShardedStaticTable` (modes ``static`` and ``uvm``) one `GpuStaticTable` per device, each with
its own keys' rows only, so N devices hold N times the rows of one. Both present the interface
`keras_hps.gpu_tier.GpuTier` uses on a single device's cache or table (`query`, `insert`,
`update`, `invalidate`, `clear`, `stats`), seen from a *home* device: keys arrive there, each
goes to its owner's device, and the rows come back there in input order. The GPU tier makes
one such view per device of ``deployed_device_list``, all over the same shards (`views`), so a
lookup is assembled on the GPU it runs on.

Between devices, keys and rows move by torch's device-to-device copies
(``tensor.to(device, non_blocking=True)``): peer to peer over NVLink or PCIe where the two
GPUs can reach each other (`torch.cuda.can_device_access_peer`; torch enables peer access for
them), ordered against both devices' current streams by CUDA events, without waiting on the
host. Grouping a batch's keys by owner waits on the home device once (for the group sizes).
The shards of a table may share one device (virtual shards: the CPU under Triton's
interpreter, or one GPU): the same code runs, and copies within a device are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from keras_hps.gpu_cache import GpuEmbeddingCache, _checked_keys, _checked_values
from keras_hps.gpu_static_table import GpuStaticTable, pinned_empty
from keras_hps.triton_kernels.shard_route import np_shard_owner, shard_owner
from keras_hps.triton_kernels.static_table import flat_int64_keys

__all__ = [
    "KeyRoute",
    "ROUTE_BYTES_PER_KEY",
    "ShardedCache",
    "ShardedStaticTable",
    "peer_access",
    "shard_slots",
    "split_rows",
    "views",
]

#: Bytes a `KeyRoute` holds per key on its home device: the owner (int32), the owners sorted
#: (int32, until the order is known), the order (int64) and the keys grouped by owner (int64).
ROUTE_BYTES_PER_KEY = 4 + 4 + 8 + 8
_SLOT_GROUP = 32  # a cache's slots come in groups of 32 (four 8-slot sets)


def shard_slots(slots: int, n_shards: int) -> int:
    """Slots of each shard of a dynamic cache of ``slots`` split ``n_shards`` ways: a share
    rounded up to whole groups of 32 (what each shard's cache allocates)."""
    group = _SLOT_GROUP * int(n_shards)
    return -(-int(slots) // group) * _SLOT_GROUP


def split_rows(keys: torch.Tensor, vectors: torch.Tensor, n_shards: int, *, pinned: bool
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The (keys, vectors) of each shard of a table, in shard order, one shard at a time (CPU
    tensors, the vectors in pinned memory when ``pinned``)."""
    owner = np_shard_owner(keys.numpy(), n_shards)
    dim = vectors.shape[1]
    for i in range(n_shards):
        rows = torch.from_numpy(np.flatnonzero(owner == i))
        out = (pinned_empty((rows.numel(), dim), vectors.dtype) if pinned
               else torch.empty((rows.numel(), dim), dtype=vectors.dtype))
        torch.index_select(vectors, 0, rows, out=out)
        yield keys[rows], out


def peer_access(devices: Sequence[torch.device]) -> bool:
    """Whether every pair of distinct CUDA devices among ``devices`` can copy peer to peer
    (True when there is no such pair)."""
    cuda = sorted({d.index for d in devices if d.type == "cuda"})
    return all(torch.cuda.can_device_access_peer(a, b) for a in cuda for b in cuda if a != b)


def views(shards: Sequence[Any], devices: Sequence[Any]) -> list[Any]:
    """One view of ``shards`` (all caches or all static tables, one per shard) per home device
    of ``devices``: `ShardedCache` or `ShardedStaticTable`."""
    kind = ShardedCache if isinstance(shards[0], GpuEmbeddingCache) else ShardedStaticTable
    return [kind(shards, home=d) for d in devices]


class KeyRoute:
    """A batch of flat keys on their home device, grouped by owner shard.

    ``keys``: the keys grouped by owner (stable: keys of one owner keep their input order);
    ``order[j]``: the input position of grouped key ``j``; `parts` the shards' slices.
    """

    def __init__(self, keys: torch.Tensor, n_shards: int) -> None:
        owner = shard_owner(keys, n_shards)
        grouped, self.order = torch.sort(owner, stable=True)
        counts = torch.bincount(owner, minlength=n_shards).tolist()  # the one device wait
        self.keys = keys[self.order]
        self.bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
        #: device memory the route allocated (see ROUTE_BYTES_PER_KEY)
        self.nbytes = sum(t.nbytes for t in (owner, grouped, self.order, self.keys))

    def parts(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(shard, its keys, their input positions)`` for every shard that has keys."""
        for i in range(len(self.bounds) - 1):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            if hi > lo:
                yield i, self.keys[lo:hi], self.order[lo:hi]


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device, non_blocking=True)


class ShardedCache:
    """The dynamic caches of one table split by key, one `GpuEmbeddingCache` per shard, seen
    from ``home``: what `GpuEmbeddingCache` does for keys on ``home``, each key in its owner's
    cache. Keys repeated in a batch go to one shard in input order, so `insert` keeps the last
    row of a repeated key, as a single cache does."""

    def __init__(self, shards: Sequence[GpuEmbeddingCache], *, home: torch.device | str) -> None:
        if not shards:
            raise ValueError("ShardedCache needs at least one shard")
        first = shards[0]
        for s in shards:
            if (s.dim, s.key_dtype, s.policy) != (first.dim, first.key_dtype, first.policy):
                raise ValueError("ShardedCache: shards differ in dim, key dtype or policy")
        self.shards = list(shards)
        self.home = torch.device(home)

    # the properties a single cache has
    @property
    def device(self) -> torch.device:
        return self.home

    @property
    def dim(self) -> int:
        return self.shards[0].dim

    @property
    def key_dtype(self) -> torch.dtype:
        return self.shards[0].key_dtype

    @property
    def policy(self) -> str:
        return self.shards[0].policy

    @property
    def admission(self) -> str:
        return self.shards[0].admission

    @property
    def capacity(self) -> int:
        return sum(s.capacity for s in self.shards)

    @property
    def size(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def rejected(self) -> int:
        return sum(s.rejected for s in self.shards)

    def stats(self) -> dict[str, int]:
        """The shards' counters and occupancy, summed."""
        out: dict[str, int] = {}
        for s in self.shards:
            for k, v in s.stats().items():
                out[k] = out.get(k, 0) + v
        return out

    def reset_counters(self) -> None:
        for s in self.shards:
            s.reset_counters()

    # operations
    def query(self, keys: torch.Tensor, *, touch: bool = True, validate: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [n, dim], hit [n])`` on ``home``, as `GpuEmbeddingCache.query`."""
        keys = _checked_keys(keys, self, validate=validate)
        n = keys.numel()
        out = torch.empty((n, self.dim), dtype=torch.float32, device=self.home)
        hit = torch.empty((n,), dtype=torch.bool, device=self.home)
        if n == 0:
            return out, hit
        for i, part, pos in KeyRoute(keys, len(self.shards)).parts():
            shard = self.shards[i]
            vals, found = shard.query(_to(part, shard.device), touch=touch, validate=False)
            out.index_copy_(0, pos, _to(vals, self.home))
            hit.index_copy_(0, pos, _to(found, self.home))
        return out, hit

    def _each(self, keys: torch.Tensor, values: torch.Tensor | None, validate: bool
              ) -> Iterator[tuple[GpuEmbeddingCache, torch.Tensor, torch.Tensor | None]]:
        """``(shard, its keys, their values)`` on the shard's device, for each shard with keys."""
        keys = _checked_keys(keys, self, validate=validate)
        if values is not None:
            values = _checked_values(values, keys.numel(), self)
        if keys.numel() == 0:
            return
        for i, part, pos in KeyRoute(keys, len(self.shards)).parts():
            shard = self.shards[i]
            yield (shard, _to(part, shard.device),
                   None if values is None else _to(values[pos], shard.device))

    def insert(self, keys: torch.Tensor, values: torch.Tensor, *, validate: bool = True) -> None:
        """Insert rows ``values [n, dim]`` for ``keys``, each in its owner's cache."""
        for shard, k, v in self._each(keys, values, validate):
            shard.insert(k, v, validate=False)

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite the resident rows of ``keys``; absent keys are ignored."""
        for shard, k, v in self._each(keys, values, True):
            shard.update(k, v)

    def invalidate(self, keys: torch.Tensor) -> None:
        """Remove ``keys`` from their owners' caches (absent keys are ignored)."""
        for shard, k, _v in self._each(keys, None, True):
            shard.invalidate(k)

    def clear(self) -> None:
        """Empty every shard (counters are kept)."""
        for s in self.shards:
            s.clear()

    def __repr__(self) -> str:
        return (f"ShardedCache({len(self.shards)} shards on "
                f"{[str(s.device) for s in self.shards]}, home={self.home}, "
                f"capacity={self.capacity}, dim={self.dim})")


class ShardedStaticTable:
    """A whole table split by key, one `GpuStaticTable` per shard holding its keys' rows (on
    the device, or in pinned host memory for ``uvm``), seen from ``home``: what
    `GpuStaticTable` does for keys on ``home``."""

    def __init__(self, shards: Sequence[GpuStaticTable], *, home: torch.device | str) -> None:
        if not shards:
            raise ValueError("ShardedStaticTable needs at least one shard")
        if len({s.dim for s in shards}) != 1:
            raise ValueError("ShardedStaticTable: shards differ in dim")
        self.shards = list(shards)
        self.home = torch.device(home)
        self.dim = shards[0].dim
        self._dtype = shards[0].device_values.dtype

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def _keys(self, keys: torch.Tensor, what: str) -> torch.Tensor:
        keys = flat_int64_keys(keys, what)
        if keys.device != self.home:
            raise ValueError(f"{what}: keys on {keys.device}, this view's home is {self.home}")
        return keys

    def query(self, keys: torch.Tensor, default: torch.Tensor | None = None, *,
              counters: torch.Tensor | None = None, validate: bool = True,
              host_read: str = "kernel") -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors [n, dim], hit [n])`` on ``home``, as `GpuStaticTable.query`."""
        keys = self._keys(keys, "ShardedStaticTable.query") if validate else keys.reshape(-1)
        n = keys.numel()
        out = torch.empty((n, self.dim), dtype=self._dtype, device=self.home)
        hit = torch.empty((n,), dtype=torch.bool, device=self.home)
        if n:
            for i, part, pos in KeyRoute(keys, len(self.shards)).parts():
                shard = self.shards[i]
                dev = shard.index.device
                d = None if default is None else _to(default, dev)
                vals, found = shard.query(_to(part, dev), d, validate=validate,
                                          host_read=host_read)
                out.index_copy_(0, pos, _to(vals, self.home))
                hit.index_copy_(0, pos, _to(found, self.home))
        if counters is not None:  # +hits, +misses, on the device (no wait on the host)
            hits = hit.sum()
            counters[0] += hits
            counters[1] += n - hits
        return out, hit

    def update(self, keys: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Overwrite the rows of the keys the table holds; returns the mask of those keys."""
        keys = self._keys(keys, "ShardedStaticTable.update")
        if vectors.shape != (keys.numel(), self.dim):
            raise ValueError(
                f"ShardedStaticTable.update: vectors must be [{keys.numel()}, {self.dim}], "
                f"got {tuple(vectors.shape)}")
        found = torch.zeros((keys.numel(),), dtype=torch.bool, device=self.home)
        if keys.numel():
            vectors = vectors.to(self.home)
            for i, part, pos in KeyRoute(keys, len(self.shards)).parts():
                shard = self.shards[i]
                dev = shard.index.device
                got = shard.update(_to(part, dev), _to(vectors[pos], dev))
                found.index_copy_(0, pos, _to(got, self.home))
        return found
