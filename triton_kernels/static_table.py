"""Kernels of the static table (every row of a table behind an open-addressing hash index),
and their NumPy reference. The owner of the device and pinned host memory is
`keras_hps.gpu_static_table.GpuStaticTable`.

The index is a power-of-two array of (key, row) int64 pairs, linear probing from
``mix64(key) & (slots - 1)``, load factor at most one half (HPS's static table also keeps
twice as many key slots as rows). It is built once (no eviction, no insert) by a few
vectorised claim rounds in torch on the keys' device; the query kernel probes windows of
four pairs (64 bytes), takes the row, and gathers the vector.

A table whose keys are its row numbers, ``keys[i] == i`` (every table trained as a
``keras.layers.Embedding``), gets an identity index instead: no pairs at all, and the
kernels take ``row = key`` for ``0 <= key < rows`` (a plain gather), a miss otherwise.

Vectors live in up to two arrays: rows ``[0, n_device)`` in ``device_values`` (device
memory) and rows ``[n_device, n)`` in ``host_values``, a pinned host tensor that the kernel
reads over the bus through its unified-virtual-address pointer (UVM mode). With no host
part this is the static mode. Keys not in the table get the caller's default vector (or
zeros) and ``hit = False``. The empty-slot sentinel is ``INT64_MAX``: a table may not hold
that key, and a query for it is a miss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from .launch import launch_config, on_device
from .miss_flag import raise_flag

EMPTY_KEY = int(np.iinfo(np.int64).max)
WINDOW = 4  # pairs per probe window: 4 x 16 bytes
_KEY_DTYPES = (torch.int64, torch.int32)
_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _mix64(k):
    """splitmix64 finalizer of an int64 key, as uint64."""
    x = k.to(tl.uint64, bitcast=True)
    x = x ^ (x >> 30)
    x = x * 0xBF58476D1CE4E5B9
    x = x ^ (x >> 27)
    x = x * 0x94D049BB133111EB
    x = x ^ (x >> 31)
    return x


@triton.jit
def _home_slot_kernel(keys_ptr, out_ptr, n, slot_mask, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    k = tl.load(keys_ptr + offs, mask=ok, other=0)
    h = (_mix64(k) & slot_mask.to(tl.uint64)).to(tl.int64, bitcast=True)
    tl.store(out_ptr + offs, h, mask=ok)


@triton.jit
def _probe(
    k,
    active,
    table_ptr,
    slot_mask,
    n_windows,
    EMPTY: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W: tl.constexpr,
):
    """Row of each key in the index, -1 when absent (lanes with active False stay -1)."""
    home = (_mix64(k) & slot_mask.to(tl.uint64)).to(tl.int64, bitcast=True)
    row = tl.full([BLOCK_K], -1, tl.int64)
    j = tl.arange(0, W)
    w = 0
    # Probe window after window until every key is found or met an empty slot
    # (linear probing leaves no empty slot between a key's home and the key).
    while (w < n_windows) & (tl.max(active.to(tl.int32), axis=0) > 0):
        slots = (home[:, None] + (w * W + j)[None, :]) & slot_mask
        tk = tl.load(table_ptr + slots * 2, mask=active[:, None], other=EMPTY)
        match = (tk == k[:, None]) & active[:, None]
        tr = tl.load(table_ptr + slots * 2 + 1, mask=match, other=0)
        found = tl.max(match.to(tl.int32), axis=1) > 0
        row = tl.where(found, tl.sum(tr, axis=1), row)
        seen_empty = tl.max((tk == EMPTY).to(tl.int32), axis=1) > 0
        active = active & (~found) & (~seen_empty)
        w += 1
    return row


@triton.jit
def _find_rows(keys_ptr, n, table_ptr, slot_mask, n_windows, n_rows, EMPTY: tl.constexpr,
               IDENTITY: tl.constexpr, BLOCK_K: tl.constexpr, W: tl.constexpr):
    """This program's ``BLOCK_K`` keys: (positions, lane mask, row of each key or -1).
    ``IDENTITY``: the key is the row (``0 <= key < n_rows``), no probe."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs < n
    k = tl.load(keys_ptr + offs, mask=kmask, other=EMPTY).to(tl.int64)
    if IDENTITY:
        row = tl.where(kmask & (k >= 0) & (k < n_rows), k, -1)
    else:
        row = _probe(k, kmask & (k != EMPTY), table_ptr, slot_mask, n_windows, EMPTY, BLOCK_K, W)
    return offs, kmask, row


@triton.jit
def _static_query_kernel(
    keys_ptr,
    n,
    table_ptr,
    slot_mask,
    n_windows,
    n_rows,
    dev_ptr,
    host_ptr,
    n_device,
    default_ptr,
    out_ptr,
    hit_ptr,
    counters_ptr,
    flag_ptr,
    DIM: tl.constexpr,
    EMPTY: tl.constexpr,
    IDENTITY: tl.constexpr,
    HAS_HOST: tl.constexpr,
    HAS_DEFAULT: tl.constexpr,
    COUNT: tl.constexpr,
    MISS_FLAG: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs, kmask, row = _find_rows(keys_ptr, n, table_ptr, slot_mask, n_windows, n_rows, EMPTY,
                                  IDENTITY, BLOCK_K, W)
    hit = row >= 0
    _copy_table_rows(row, hit, offs, kmask, dev_ptr, host_ptr, n_device, default_ptr, out_ptr,
                     DIM, HAS_HOST, HAS_DEFAULT, BLOCK_D)
    tl.store(hit_ptr + offs, hit, mask=kmask)
    if COUNT:
        tl.atomic_add(counters_ptr, tl.sum(hit.to(tl.int64), axis=0), sem="relaxed")
        tl.atomic_add(counters_ptr + 1, tl.sum((kmask & ~hit).to(tl.int64), axis=0),
                      sem="relaxed")
    if MISS_FLAG:
        raise_flag(flag_ptr, kmask & ~hit)


@triton.jit
def _rows_kernel(rows_ptr, n, dev_ptr, host_ptr, n_device, out_ptr, DIM: tl.constexpr,
                 HAS_HOST: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[i]`` = row ``rows[i]`` of the table (device rows, then host rows), zeros where
    ``rows[i] < 0``: the rows of keys already found, read without a second probe."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs < n
    row = tl.load(rows_ptr + offs, mask=kmask, other=-1)
    _copy_table_rows(row, row >= 0, offs, kmask, dev_ptr, host_ptr, n_device, out_ptr, out_ptr,
                     DIM, HAS_HOST, False, BLOCK_D)


@triton.jit
def _copy_table_rows(row, hit, offs, kmask, dev_ptr, host_ptr, n_device, default_ptr, out_ptr,
                     DIM: tl.constexpr, HAS_HOST: tl.constexpr, HAS_DEFAULT: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """``out[offs]`` = table row ``row`` where ``hit`` (device rows below ``n_device``, host
    rows from there), the default row or zeros elsewhere (lanes ``kmask``)."""
    on_dev = hit & (row < n_device)
    for d0 in tl.static_range(0, DIM, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cm = cols < DIM
        v = tl.load(
            dev_ptr + row[:, None] * DIM + cols[None, :], mask=on_dev[:, None] & cm[None, :]
        )
        if HAS_HOST:
            on_host = hit & (row >= n_device)
            hv = tl.load(
                host_ptr + (row - n_device)[:, None] * DIM + cols[None, :],
                mask=on_host[:, None] & cm[None, :],
            )
            v = tl.where(on_host[:, None], hv, v)
        if HAS_DEFAULT:
            dv = tl.load(default_ptr + cols, mask=cm, other=0.0).to(v.dtype)
            v = tl.where(hit[:, None], v, dv[None, :])
        else:
            v = tl.where(hit[:, None], v, 0.0)
        tl.store(
            out_ptr + offs[:, None] * DIM + cols[None, :], v, mask=kmask[:, None] & cm[None, :]
        )


@triton.jit
def _static_tables_kernel(keys_ptr, n, params_ptr, out_ptr, DIM: tl.constexpr,
                          EMPTY: tl.constexpr, NPARAM: tl.constexpr, BLOCK_K: tl.constexpr,
                          W: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (i, t): keys ``i * BLOCK_K ...`` of table ``t`` (row ``t`` of ``keys``), whose
    arrays and settings are row ``t`` of ``params`` (see `static_table_params`)."""
    t = tl.program_id(1)
    p = params_ptr + t * NPARAM
    values = tl.load(p).to(tl.pointer_type(tl.float32))
    pairs = tl.load(p + 1).to(tl.pointer_type(tl.int64))
    slot_mask = tl.load(p + 2)
    n_windows = tl.load(p + 3)
    n_rows = tl.load(p + 4)
    identity = tl.load(p + 5) != 0
    default = tl.load(p + 6).to(tl.pointer_type(tl.float32))
    counters = tl.load(p + 7).to(tl.pointer_type(tl.int64))
    offs = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs < n
    k = tl.load(keys_ptr + t.to(tl.int64) * n + offs, mask=kmask, other=EMPTY)
    # An identity table probes nothing (no lane active); a hashed one ignores the range test.
    probed = _probe(k, kmask & (k != EMPTY) & ~identity, pairs, slot_mask, n_windows, EMPTY,
                    BLOCK_K, W)
    row = tl.where(identity, tl.where(kmask & (k >= 0) & (k < n_rows), k, -1), probed)
    hit = row >= 0
    _copy_table_rows(row, hit, offs, kmask, values, values, n_rows, default,
                     out_ptr + t.to(tl.int64) * n * DIM, DIM, False, True, BLOCK_D)
    tl.atomic_add(counters, tl.sum(hit.to(tl.int64), axis=0), sem="relaxed")
    tl.atomic_add(counters + 1, tl.sum((kmask & ~hit).to(tl.int64), axis=0), sem="relaxed")


@triton.jit
def _static_find_kernel(
    keys_ptr,
    n,
    table_ptr,
    slot_mask,
    n_windows,
    n_rows,
    rows_ptr,
    EMPTY: tl.constexpr,
    IDENTITY: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W: tl.constexpr,
):
    offs, kmask, row = _find_rows(keys_ptr, n, table_ptr, slot_mask, n_windows, n_rows, EMPTY,
                                  IDENTITY, BLOCK_K, W)
    tl.store(rows_ptr + offs, row, mask=kmask)


def flat_int64_keys(keys: torch.Tensor, what: str) -> torch.Tensor:
    """``keys`` (int32/int64, any shape) as a flat contiguous int64 tensor; ValueError else."""
    if not isinstance(keys, torch.Tensor):
        raise ValueError(f"{what}: keys must be a torch tensor, got {type(keys).__name__}")
    if keys.dtype not in _KEY_DTYPES:
        raise ValueError(f"{what}: keys must be int32 or int64, got {keys.dtype}")
    return keys.reshape(-1).to(torch.int64).contiguous()


def home_slots(keys: torch.Tensor, slot_mask: int) -> torch.Tensor:
    """Home slot ``mix64(key) & slot_mask`` of each int64 key (the query kernel's hash)."""
    keys = keys.reshape(-1).contiguous()
    out = torch.empty_like(keys)
    n = keys.numel()
    if n:
        cfg = launch_config("static_home_slot")
        with on_device(keys.device):
            _home_slot_kernel[(triton.cdiv(n, cfg.block_k),)](keys, out, n, slot_mask,
                                                              BLOCK=cfg.block_k,
                                                              num_warps=cfg.num_warps)
    return out


@dataclass(frozen=True)
class HashIndex:
    """Open-addressing index: ``pairs[s] = (key, row)`` or ``(EMPTY_KEY, -1)``; or, with
    ``identity``, no pairs (``[0, 2]``): the keys are ``0..size-1`` and key ``k`` is row ``k``."""

    pairs: torch.Tensor  # int64 [slots, 2]
    slot_mask: int
    n_windows: int  # probe windows that cover the longest displacement
    size: int  # keys held
    identity: bool = False

    @property
    def slots(self) -> int:
        return 0 if self.identity else self.slot_mask + 1

    @property
    def nbytes(self) -> int:
        """Device memory of the index."""
        return self.pairs.numel() * self.pairs.element_size()

    @property
    def device(self) -> torch.device:
        return self.pairs.device

    def kernel_args(self, dummy: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
        """(pairs, slot mask, windows, rows) as the kernels take them; ``dummy`` stands in
        for the pairs of an identity index (a kernel argument needs a valid pointer)."""
        return (dummy if self.identity else self.pairs, self.slot_mask, self.n_windows,
                self.size)


def build_index(keys: torch.Tensor, *, load_factor: float = 0.5) -> HashIndex:
    """Index unique keys (int32/int64, any device) so that ``row(keys[i]) == i``: an
    identity index (no pairs, no probe) when ``keys[i] == i`` for every ``i``.

    Raises ValueError for duplicate keys or the sentinel ``INT64_MAX``.
    """
    keys = flat_int64_keys(keys, "build_index")
    if not 0.0 < load_factor <= 0.9:
        raise ValueError(f"build_index: load_factor must be in (0, 0.9], got {load_factor}")
    n = keys.numel()
    dev = keys.device
    if is_identity(keys):
        return HashIndex(torch.empty((0, 2), dtype=torch.int64, device=dev), 0, 0, n,
                         identity=True)
    slots = max(64, triton.next_power_of_2(int(np.ceil(n / load_factor)) if n else 64))
    mask = slots - 1
    pairs = torch.full((slots, 2), -1, dtype=torch.int64, device=dev)
    pairs[:, 0] = EMPTY_KEY
    if n == 0:
        return HashIndex(pairs, mask, 1, 0)
    if bool((keys == EMPTY_KEY).any()):
        raise ValueError(f"build_index: key {EMPTY_KEY} (INT64_MAX) is reserved as the empty slot")
    sorted_keys = torch.sort(keys).values
    dup = sorted_keys[1:] == sorted_keys[:-1]
    if bool(dup.any()):
        first = int(sorted_keys[1:][dup][0])
        raise ValueError(f"build_index: duplicate key {first}; table keys must be unique")
    home = home_slots(keys, mask)
    pos = home.clone()
    owner = torch.full((slots,), -1, dtype=torch.int64, device=dev)
    claim = torch.full((slots,), n, dtype=torch.int64, device=dev)
    pending = torch.arange(n, dtype=torch.int64, device=dev)
    # Claim rounds: every pending key bids for its current slot; a free slot goes to the
    # lowest bidder, the rest move one slot on. Filled slots never empty again.
    while pending.numel():
        p = pos[pending]
        free = owner[p] < 0
        cand, cp = pending[free], p[free]
        claim.scatter_reduce_(0, cp, cand, reduce="amin", include_self=True)
        won = claim[cp] == cand
        owner[cp[won]] = cand[won]
        claim[cp] = n
        losers = torch.cat([pending[~free], cand[~won]])
        pos[losers] = (pos[losers] + 1) & mask
        pending = losers
    filled = owner >= 0
    pairs[filled, 0] = keys[owner[filled]]
    pairs[filled, 1] = owner[filled]
    max_disp = int(((pos - home) & mask).max())
    return HashIndex(pairs, mask, max_disp // WINDOW + 1, n)


def is_identity(keys: torch.Tensor) -> bool:
    """Whether ``keys[i] == i`` for every ``i`` (one device read)."""
    n = keys.numel()
    return n > 0 and torch.equal(keys.reshape(-1).to(torch.int64),
                                 torch.arange(n, dtype=torch.int64, device=keys.device))


def key_order_if_permutation(keys: torch.Tensor) -> torch.Tensor | None:
    """The order that sorts ``keys`` when they are ``0..n-1`` in another order (a table that
    becomes an identity index once its rows are put in key order), else None."""
    n = keys.numel()
    if n == 0 or int(keys.min()) != 0 or int(keys.max()) != n - 1 or is_identity(keys):
        return None
    order = torch.argsort(keys.reshape(-1))
    if not is_identity(keys.reshape(-1)[order]):
        return None  # duplicates: build_index names one
    return order


def static_find(index: HashIndex, keys: torch.Tensor) -> torch.Tensor:
    """Row of each key (flattened) in the index, -1 where absent; int64 on the index's device."""
    keys = flat_int64_keys(keys, "static_find")
    if keys.device != index.device:
        raise ValueError(f"static_find: keys on {keys.device}, index on {index.device}")
    n = keys.numel()
    rows = torch.empty(n, dtype=torch.int64, device=index.device)
    if n:
        cfg = launch_config("static_find")
        with on_device(index.device):
            _static_find_kernel[(triton.cdiv(n, cfg.block_k),)](
                keys,
                n,
                *index.kernel_args(keys),
                rows,
                EMPTY=EMPTY_KEY,
                IDENTITY=index.identity,
                BLOCK_K=cfg.block_k,
                W=WINDOW,
                num_warps=cfg.num_warps,
            )
    return rows


def _check_values(values: torch.Tensor | None, what: str) -> None:
    if values is None:
        return
    if not isinstance(values, torch.Tensor) or values.dim() != 2:
        raise ValueError(f"static_query: {what} must be a 2-D tensor [rows, dim]")
    if values.dtype not in _VALUE_DTYPES:
        raise ValueError(
            f"static_query: {what} must be float32/float16/bfloat16, got {values.dtype}"
        )
    if not values.is_contiguous():
        raise ValueError(f"static_query: {what} must be contiguous")


def static_query(
    index: HashIndex,
    keys: torch.Tensor,
    device_values: torch.Tensor,
    host_values: torch.Tensor | None = None,
    default: torch.Tensor | None = None,
    *,
    counters: torch.Tensor | None = None,
    miss_flag: torch.Tensor | None = None,
    validate: bool = True,
    block_k: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Look up keys: ``(vectors [n, dim], hit [n] bool)`` on the index's device.

    Row ``r`` of the table is ``device_values[r]`` for ``r < len(device_values)``, else
    ``host_values[r - len(device_values)]`` (a pinned host tensor on CUDA, read in place). Misses
    get ``default`` ([dim]) or zeros. Keys of any shape are flattened. ``counters`` (int64 [2] on
    the device) receives +hits at [0] and +misses at [1]; ``miss_flag`` (int32 [1] on the device)
    is set to 1 when any key misses (a CUDA graph's test, read after replay). ``validate=False``
    skips every check: keys flat int64 on the device, ``default`` contiguous ``[dim]`` of the
    values' dtype there (the serving fast path; keys of any strides are copied to a contiguous
    tensor, the only work done for them). ``block_k`` (keys per program, a power of two) and
    ``num_warps`` override the launch configuration (for tuning).
    """
    if validate:
        keys, default = _checked_query(index, keys, device_values, host_values, default)
    else:  # the kernel reads element i at ptr + i
        keys = keys.reshape(-1).contiguous()
        default = None if default is None else default.contiguous()
    dev = index.device
    dim = device_values.shape[1]
    n = keys.numel()
    out = torch.empty((n, dim), dtype=device_values.dtype, device=dev)
    hit = torch.empty((n,), dtype=torch.bool, device=dev)
    if n == 0 or dim == 0:
        return out, hit.fill_(False)
    cfg = launch_config("static_query", dim, block_k=block_k, num_warps=num_warps)
    # Arrays the kernel never reads still need a valid pointer: an empty tensor may have none.
    dev_arg = device_values if device_values.numel() else out
    with on_device(dev):
        _static_query_kernel[(triton.cdiv(n, cfg.block_k),)](
            keys,
            n,
            *index.kernel_args(keys),
            dev_arg,
            host_values if host_values is not None and host_values.numel() else dev_arg,
            device_values.shape[0],
            default if default is not None else dev_arg,
            out,
            hit,
            counters if counters is not None else hit,
            miss_flag if miss_flag is not None else hit,
            DIM=dim,
            EMPTY=EMPTY_KEY,
            IDENTITY=index.identity,
            HAS_HOST=host_values is not None,
            HAS_DEFAULT=default is not None,
            COUNT=counters is not None,
            MISS_FLAG=miss_flag is not None,
            BLOCK_K=cfg.block_k,
            W=WINDOW,
            BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps,
        )
    return out, hit


def _checked_query(
    index: HashIndex,
    keys: torch.Tensor,
    device_values: torch.Tensor,
    host_values: torch.Tensor | None,
    default: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(flat int64 keys, default on the device) for :func:`static_query`; ValueError for
    anything the kernel cannot take."""
    keys = flat_int64_keys(keys, "static_query")
    _check_values(device_values, "device_values")
    _check_values(host_values, "host_values")
    dim = device_values.shape[1]
    if host_values is not None and host_values.shape[1] != dim:
        raise ValueError(
            f"static_query: host_values dim {host_values.shape[1]} != device_values dim {dim}"
        )
    dev = index.device
    if keys.device != dev or device_values.device != dev:
        raise ValueError(
            f"static_query: keys on {keys.device}, device_values on {device_values.device}, "
            f"index on {dev}; all must be on one device"
        )
    if host_values is not None and dev.type == "cuda" and not host_values.is_pinned():
        if host_values.device != dev:
            raise ValueError("static_query: host_values must be pinned host memory or on device")
    if default is not None:
        if default.shape != (dim,):
            raise ValueError(f"static_query: default must have shape ({dim},), got {default.shape}")
        default = default.to(device=dev, dtype=device_values.dtype).contiguous()
    return keys, default


def static_rows(rows: torch.Tensor, device_values: torch.Tensor, host_values: torch.Tensor,
                out: torch.Tensor) -> None:
    """``out[i]`` = table row ``rows[i]`` (device rows, then host rows), zeros where
    ``rows[i] < 0``: rows of keys already found, read by the kernel without a second probe
    (host rows over the bus, zero-copy). ``rows`` may have any strides; ``out`` must be a
    contiguous ``[len(rows), dim]`` tensor. Other arguments are not checked."""
    if not out.is_contiguous():
        raise ValueError("static_rows: out must be contiguous")
    rows = rows.reshape(-1).contiguous()
    n, dim = rows.numel(), device_values.shape[1]
    if n == 0:
        return
    cfg = launch_config("static_rows", dim)
    dev_arg = device_values if device_values.numel() else out
    with on_device(out.device):
        _rows_kernel[(triton.cdiv(n, cfg.block_k),)](
            rows, n, dev_arg, host_values, device_values.shape[0], out,
            DIM=dim, HAS_HOST=True, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps)


# ------------------------------------------------------------------ several tables, one launch
STATIC_PARAMS = 8  # int64s per table in a `static_query_tables` parameter row


def static_table_params(index: HashIndex, values: torch.Tensor, default: torch.Tensor,
                        counters: torch.Tensor) -> torch.Tensor:
    """One table's row of `static_query_tables` parameters (int64 ``[STATIC_PARAMS]`` on the
    index's device): the addresses of its float32 ``values`` ``[rows, dim]`` (all in device
    memory), its index pairs, the contiguous float32 ``default`` ``[dim]`` and the int64
    ``counters`` ``[2]`` (+hits, +misses), and its index's shape. The row holds raw addresses:
    the tensors must outlive every query that reads it."""
    for t, what in ((values, "values"), (default, "default"), (counters, "counters")):
        if t.device != index.device or not t.is_contiguous():
            raise ValueError(f"static_table_params: {what} must be contiguous on {index.device}")
    if values.dtype != torch.float32 or default.dtype != torch.float32:
        raise ValueError("static_table_params: values and default must be float32")
    if default.shape != (values.shape[1],) or counters.dtype != torch.int64:
        raise ValueError("static_table_params: default must be [dim], counters int64 [2]")
    pairs = values if index.identity else index.pairs
    row = [values.data_ptr(), pairs.data_ptr(), index.slot_mask, index.n_windows, index.size,
           int(index.identity), default.data_ptr(), counters.data_ptr()]
    return torch.tensor(row, dtype=torch.int64).to(index.device)


def static_query_tables(params: torch.Tensor, keys: torch.Tensor, dim: int) -> torch.Tensor:
    """Look up ``keys[t]`` in table ``t`` for every table at once (one launch): float32
    ``[tables, n, dim]``, misses getting each table's default row, hits and misses added to
    each table's counters. ``params``: the tables' `static_table_params` rows stacked
    (``[tables, STATIC_PARAMS]``); ``keys``: int64 ``[tables, n]`` on the same device (any
    strides), every table's rows ``dim`` floats wide. No host synchronisation."""
    if params.dim() != 2 or params.shape[1] != STATIC_PARAMS or params.dtype != torch.int64:
        raise ValueError(f"static_query_tables: params must be int64 [tables, {STATIC_PARAMS}]")
    if keys.dim() != 2 or keys.shape[0] != params.shape[0] or keys.dtype != torch.int64:
        raise ValueError(f"static_query_tables: keys must be int64 [{params.shape[0]}, n], got "
                         f"{keys.dtype} {tuple(keys.shape)}")
    if keys.device != params.device:
        raise ValueError(f"static_query_tables: keys on {keys.device}, params on {params.device}")
    keys = keys.contiguous()
    tables, n = keys.shape
    out = torch.empty((tables, n, dim), dtype=torch.float32, device=keys.device)
    if n and tables:
        cfg = launch_config("static_query", dim)
        _static_tables_kernel[(triton.cdiv(n, cfg.block_k), tables)](
            keys, n, params, out, DIM=dim, EMPTY=EMPTY_KEY, NPARAM=STATIC_PARAMS,
            BLOCK_K=cfg.block_k, W=WINDOW, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps)
    return out


def np_static_query(
    table_keys: np.ndarray, table_values: np.ndarray, keys: np.ndarray, default: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """NumPy reference of a static-table lookup: ``(vectors, hit)``."""
    table_keys = np.asarray(table_keys, dtype=np.int64)
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    order = np.argsort(table_keys, kind="stable")
    sk = table_keys[order]
    pos = np.searchsorted(sk, keys).clip(0, max(len(sk) - 1, 0))
    hit = (sk[pos] == keys) if len(sk) else np.zeros(keys.shape, bool)
    dim = table_values.shape[1]
    fill = np.zeros(dim, table_values.dtype) if default is None else default
    out = np.where(hit[:, None], table_values[order[pos]] if len(sk) else fill, fill[None, :])
    return out.astype(table_values.dtype), hit
