"""Which shard owns each key when one table is split by key over several devices, and its
NumPy reference.

A key's owner is ``(hi32(hash_key(key)) * n_shards) >> 32``: the high half of the 64-bit
finalizer the cache hashes with (`cache_layout.hash_key`), spread over the shards by a
multiply-shift. The cache picks a key's set from the low half, and the static table's index
hashes with splitmix64, so within one shard the keys still spread over every set and slot.
Any key, the empty-slot sentinel included, has exactly one owner.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .cache_layout import hash_key, np_hash
from .launch import launch_config, on_device

_KEY_DTYPES = (torch.int64, torch.int32)


@triton.jit
def _shard_owner_kernel(keys_ptr, n, out_ptr, n_shards, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    k = tl.load(keys_ptr + offs, mask=m, other=0)
    hi = hash_key(k) >> 32
    owner = (hi * n_shards.to(tl.uint64)) >> 32
    tl.store(out_ptr + offs, owner.to(tl.int32), mask=m)


def shard_owner(keys: torch.Tensor, n_shards: int) -> torch.Tensor:
    """The owner shard (int32 in ``[0, n_shards)``) of each key of ``keys`` (int32/int64, any
    shape, flattened), on the keys' device."""
    if not isinstance(keys, torch.Tensor) or keys.dtype not in _KEY_DTYPES:
        got = keys.dtype if isinstance(keys, torch.Tensor) else type(keys).__name__
        raise ValueError(f"shard_owner: keys must be an int32 or int64 tensor, got {got}")
    if int(n_shards) < 1 or int(n_shards) >= 2**31:
        raise ValueError(f"shard_owner: n_shards must be in [1, 2**31), got {n_shards}")
    keys = keys.reshape(-1).contiguous()
    n = keys.numel()
    if n_shards == 1:
        return torch.zeros(n, dtype=torch.int32, device=keys.device)
    out = torch.empty(n, dtype=torch.int32, device=keys.device)
    if n:
        cfg = launch_config("shard_owner")
        with on_device(keys.device):
            _shard_owner_kernel[(triton.cdiv(n, cfg.block_k),)](
                keys, n, out, int(n_shards), BLOCK=cfg.block_k, num_warps=cfg.num_warps)
    return out


def np_shard_owner(keys: np.ndarray, n_shards: int) -> np.ndarray:
    """NumPy reference of :func:`shard_owner` (int32)."""
    hi = np_hash(np.asarray(keys).reshape(-1)) >> np.uint64(32)
    with np.errstate(over="ignore"):
        owner = (hi * np.uint64(n_shards)) >> np.uint64(32)
    return owner.astype(np.int32)
