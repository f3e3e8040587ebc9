"""Static embedding table: every row of a table behind an open-addressing hash index.

The index is a power-of-two array of (key, row) int64 pairs, linear probing from
``mix64(key) & (slots - 1)``, load factor at most one half (HPS's static table also keeps
twice as many key slots as rows). It is built once (no eviction, no insert) by a few
vectorised claim rounds in torch on the keys' device; the query kernel probes windows of
four pairs (64 bytes), takes the row, and gathers the vector.

Vectors live in up to two arrays: rows ``[0, n_device)`` in ``device_values`` (device
memory) and rows ``[n_device, n)`` in ``host_values``, a pinned host tensor that the kernel
reads over the bus through its unified-virtual-address pointer (UVM mode). With no host
part this is the static mode. Keys not in the table get the caller's default vector (or
zeros) and ``hit = False``. The empty-slot sentinel is ``INT64_MAX``: a table may not hold
that key, and a query for it is a miss.
"""

from __future__ import annotations

import mmap
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

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
def _static_query_kernel(
    keys_ptr,
    n,
    table_ptr,
    slot_mask,
    n_windows,
    dev_ptr,
    host_ptr,
    n_device,
    default_ptr,
    out_ptr,
    hit_ptr,
    counters_ptr,
    DIM: tl.constexpr,
    EMPTY: tl.constexpr,
    HAS_HOST: tl.constexpr,
    HAS_DEFAULT: tl.constexpr,
    COUNT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs < n
    k = tl.load(keys_ptr + offs, mask=kmask, other=EMPTY).to(tl.int64)
    row = _probe(k, kmask & (k != EMPTY), table_ptr, slot_mask, n_windows, EMPTY, BLOCK_K, W)
    hit = row >= 0
    _copy_table_rows(row, hit, offs, kmask, dev_ptr, host_ptr, n_device, default_ptr, out_ptr,
                     DIM, HAS_HOST, HAS_DEFAULT, BLOCK_D)
    tl.store(hit_ptr + offs, hit, mask=kmask)
    if COUNT:
        tl.atomic_add(counters_ptr, tl.sum(kmask.to(tl.int64), axis=0), sem="relaxed")
        tl.atomic_add(counters_ptr + 1, tl.sum(hit.to(tl.int64), axis=0), sem="relaxed")


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
def _static_find_kernel(
    keys_ptr,
    n,
    table_ptr,
    slot_mask,
    n_windows,
    rows_ptr,
    EMPTY: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs < n
    k = tl.load(keys_ptr + offs, mask=kmask, other=EMPTY).to(tl.int64)
    row = _probe(k, kmask & (k != EMPTY), table_ptr, slot_mask, n_windows, EMPTY, BLOCK_K, W)
    tl.store(rows_ptr + offs, row, mask=kmask)


def _as_int64_keys(keys: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(keys, torch.Tensor):
        raise ValueError(f"{what}: keys must be a torch tensor, got {type(keys).__name__}")
    if keys.dtype not in _KEY_DTYPES:
        raise ValueError(f"{what}: keys must be int32 or int64, got {keys.dtype}")
    return keys.reshape(-1).to(torch.int64).contiguous()


def home_slots(keys: torch.Tensor, slot_mask: int) -> torch.Tensor:
    """Home slot ``mix64(key) & slot_mask`` of each int64 key (the query kernel's hash)."""
    out = torch.empty_like(keys)
    n = keys.numel()
    if n:
        block = 1024
        _home_slot_kernel[(triton.cdiv(n, block),)](keys, out, n, slot_mask, BLOCK=block)
    return out


@dataclass(frozen=True)
class HashIndex:
    """Open-addressing index: ``pairs[s] = (key, row)`` or ``(EMPTY_KEY, -1)``."""

    pairs: torch.Tensor  # int64 [slots, 2]
    slot_mask: int
    n_windows: int  # probe windows that cover the longest displacement
    size: int  # keys held

    @property
    def slots(self) -> int:
        return self.slot_mask + 1

    @property
    def device(self) -> torch.device:
        return self.pairs.device


def build_index(keys: torch.Tensor, *, load_factor: float = 0.5) -> HashIndex:
    """Index unique keys (int32/int64, any device) so that ``row(keys[i]) == i``.

    Raises ValueError for duplicate keys or the sentinel ``INT64_MAX``.
    """
    keys = _as_int64_keys(keys, "build_index")
    if not 0.0 < load_factor <= 0.9:
        raise ValueError(f"build_index: load_factor must be in (0, 0.9], got {load_factor}")
    n = keys.numel()
    slots = max(64, triton.next_power_of_2(int(np.ceil(n / load_factor)) if n else 64))
    mask = slots - 1
    dev = keys.device
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


def static_find(index: HashIndex, keys: torch.Tensor) -> torch.Tensor:
    """Row of each key (flattened) in the index, -1 where absent; int64 on the index's device."""
    keys = _as_int64_keys(keys, "static_find")
    if keys.device != index.device:
        raise ValueError(f"static_find: keys on {keys.device}, index on {index.device}")
    n = keys.numel()
    rows = torch.empty(n, dtype=torch.int64, device=index.device)
    if n:
        block_k = 128
        _static_find_kernel[(triton.cdiv(n, block_k),)](
            keys,
            n,
            index.pairs,
            index.slot_mask,
            index.n_windows,
            rows,
            EMPTY=EMPTY_KEY,
            BLOCK_K=block_k,
            W=WINDOW,
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
    block_k: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Look up keys: ``(vectors [n, dim], hit [n] bool)`` on the index's device.

    Row ``r`` of the table is ``device_values[r]`` for ``r < len(device_values)``, else
    ``host_values[r - len(device_values)]`` (a pinned host tensor on CUDA, read in place).
    Misses get ``default`` ([dim]) or zeros. Keys of any shape are flattened.
    ``block_k`` (keys per program, a power of two) and ``num_warps`` override the launch
    configuration (for tuning).
    """
    keys = _as_int64_keys(keys, "static_query")
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
    return _launch_query(index, keys, device_values, host_values, default, None,
                         block_k=block_k, num_warps=num_warps)


def _launch_query(
    index: HashIndex,
    keys: torch.Tensor,
    device_values: torch.Tensor,
    host_values: torch.Tensor | None,
    default: torch.Tensor | None,
    counters: torch.Tensor | None,
    *,
    block_k: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`static_query` on arguments already checked; ``counters`` (int64 [2] on the
    device) receives +keys at [0] and +hits at [1]."""
    dev = index.device
    dim = device_values.shape[1]
    n = keys.numel()
    out = torch.empty((n, dim), dtype=device_values.dtype, device=dev)
    hit = torch.empty((n,), dtype=torch.bool, device=dev)
    if n == 0 or dim == 0:
        return out, hit.fill_(False)
    block_d = min(triton.next_power_of_2(dim), 128)
    if block_k is None:
        block_k = max(16, min(128, 4096 // block_d))
    # Arrays the kernel never reads still need a valid pointer: an empty tensor may have none.
    dev_arg = device_values if device_values.numel() else out
    _static_query_kernel[(triton.cdiv(n, block_k),)](
        keys,
        n,
        index.pairs,
        index.slot_mask,
        index.n_windows,
        dev_arg,
        host_values if host_values is not None and host_values.numel() else dev_arg,
        device_values.shape[0],
        default if default is not None else dev_arg,
        out,
        hit,
        counters if counters is not None else hit,
        DIM=dim,
        EMPTY=EMPTY_KEY,
        HAS_HOST=host_values is not None,
        HAS_DEFAULT=default is not None,
        COUNT=counters is not None,
        BLOCK_K=block_k,
        W=WINDOW,
        BLOCK_D=block_d,
        num_warps=num_warps or 4,
    )
    return out, hit


def pinned_empty(
    shape: tuple[int, ...], dtype: torch.dtype = torch.float32, *, huge_pages: bool = True
) -> torch.Tensor:
    """An uninitialised page-locked host tensor of exactly ``shape`` (for UVM tables).

    ``torch.empty(..., pin_memory=True)`` rounds the allocation up to a power of two (a
    51 GB table would pin 64 GiB); this registers an anonymous mapping of the exact size with
    CUDA instead, and falls back to torch's allocator where registering fails. With
    ``huge_pages`` the mapping asks the kernel for transparent huge pages (random row reads,
    by host threads or by the GPU, then miss the TLB far less often).
    """
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if nbytes < (1 << 30) or not torch.cuda.is_available():
        return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())
    buf = mmap.mmap(-1, nbytes)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # no transparent huge pages here: ordinary pages
            pass
    arr = np.frombuffer(buf, dtype=np.uint8)
    ptr = arr.ctypes.data
    rc = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
    if int(rc) != 0:
        del arr
        buf.close()
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    weakref.finalize(arr, torch.cuda.cudart().cudaHostUnregister, ptr)
    return torch.from_numpy(arr).view(dtype).view(shape)


class StaticTable:
    """A whole table on the device behind a hash index (static mode), optionally with
    rows from ``n_device`` on in pinned host memory read by the kernel (UVM mode)."""

    STAGING_BUFFERS = 4  # fetch(): pinned chunk buffers in flight

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        *,
        device: torch.device | str,
        n_device: int | None = None,
    ) -> None:
        """keys [n] int32/int64 unique; values [n, dim]; row i of values belongs to keys[i].

        ``n_device`` rows (all when None) go to device memory, the rest to pinned host memory
        when ``device`` is CUDA (a plain device copy otherwise, e.g. under the interpreter).
        """
        device = torch.device(device)
        if values.dim() != 2 or values.shape[0] != keys.numel():
            raise ValueError(
                f"StaticTable: values must be [{keys.numel()}, dim], got {tuple(values.shape)}"
            )
        n = keys.numel()
        n_device = n if n_device is None else max(0, min(int(n_device), n))
        self.index = build_index(keys.to(device))
        self.launch: dict[str, int] = {}  # block_k / num_warps overrides for static_query
        self.dim = int(values.shape[1])
        self.device_values = values[:n_device].to(device).contiguous()
        self.host_values: torch.Tensor | None = None
        self.copy_chunk_bytes = 8 << 20  # fetch(): bytes per host gather + copy step
        # fetch(): share of the keys read by the kernel over the bus while the host gathers
        # the rest (the two paths use different resources; in four whole-hierarchy runs on
        # H200s 0.3 beat 0.2 every time, docs/benchmarks/gpu_hierarchy.md).
        self.zero_copy_share = 0.3
        # fetch(): a ring of pinned chunk buffers (small enough to stay in the CPU's cache
        # between the gather that writes one and the copy that reads it) and, per buffer, the
        # event of the copy that last read it.
        self._staging_ring: list[torch.Tensor] | None = None
        self._staging_done: list[torch.cuda.Event | None] = []
        self._staging_lock = threading.Lock()  # one fetch at a time uses the ring
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if n_device < n:
            rest = values[n_device:]
            if device.type == "cuda":
                rest = rest.to("cpu").contiguous()
                self.host_values = rest if rest.is_pinned() else rest.pin_memory()
            else:
                self.host_values = rest.to(device).contiguous()

    def __len__(self) -> int:
        return self.index.size

    def lookup(
        self, keys: torch.Tensor, default: torch.Tensor, counters: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`query` for the serving fast path: ``keys`` flat int64 on the table's device,
        ``default`` a contiguous ``[dim]`` tensor of the values' dtype there, ``counters`` int64
        ``[2]`` there (+keys, +hits). Only the launch: the caller has checked all of it."""
        return _launch_query(self.index, keys, self.device_values, self.host_values, default,
                             counters, **self.launch)

    def fetch(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors [n, dim], hit [n])`` for flattened keys, as :meth:`query`, with the rows
        that live in host memory moved by the copy engine instead of read by the kernel.

        The rows' positions are found on the device and read back (one synchronisation);
        host threads gather the host rows into a pinned staging buffer chunk by chunk while
        the copy engine moves the chunks already gathered (on its own stream; the current
        stream waits for it). Zero-copy kernel reads of scattered rows run far below the
        copy engine's rate (16 GB/s against 55 GB/s measured on an H200), so this is the
        path for many misses; the rows of the first ``zero_copy_share`` of the keys are still
        read by the kernel, by their known positions, while the host gathers the rest.
        Misses get zeros.
        """
        keys = _as_int64_keys(keys, "StaticTable.fetch").to(self.index.device)
        if self.host_values is None:
            return self.query(keys)
        dev = self.index.device
        n = keys.numel()
        out = torch.zeros((n, self.dim), dtype=self.device_values.dtype, device=dev)
        rows = static_find(self.index, keys)
        hit = rows >= 0
        if n == 0:
            return out, hit
        rows_h = rows.cpu()
        n_dev = self.device_values.shape[0]
        # The rows of the first `k` keys are read by the kernel over the bus while the host
        # gathers the rest: both paths run at once.
        k = int(n * self.zero_copy_share)
        if k:
            self._read_rows(rows[:k], out[:k])
        rest, rows_t, rows_ht = out[k:], rows[k:], rows_h[k:]
        if n_dev:
            pos_dev = torch.nonzero((rows_t >= 0) & (rows_t < n_dev)).reshape(-1)
            rest[pos_dev] = self.device_values[rows_t[pos_dev]]
        on_host = rows_ht >= n_dev
        if bool(on_host.all()):
            self._copy_host_rows(rows_ht - n_dev, rest)
        else:
            pos = torch.nonzero(on_host).reshape(-1)
            if pos.numel():
                buf = torch.empty((pos.numel(), self.dim), dtype=out.dtype, device=dev)
                self._copy_host_rows(rows_ht[pos] - n_dev, buf)
                rest[pos.to(dev, non_blocking=True)] = buf
        return out, hit

    def _read_rows(self, rows: torch.Tensor, dst: torch.Tensor) -> None:
        """``dst[i]`` = table row ``rows[i]`` (zeros where -1), read by the kernel (host rows
        over the bus, zero-copy)."""
        dim = self.dim
        block_d = min(triton.next_power_of_2(dim), 128)
        block_k = max(16, min(128, 4096 // block_d))
        dev_arg = self.device_values if self.device_values.numel() else dst
        _rows_kernel[(triton.cdiv(rows.numel(), block_k),)](
            rows, rows.numel(), dev_arg, self.host_values, self.device_values.shape[0], dst,
            DIM=dim, HAS_HOST=True, BLOCK_K=block_k, BLOCK_D=block_d)

    def _copy_host_rows(self, idx: torch.Tensor, dst: torch.Tensor) -> None:
        """``dst[i] = host_values[idx[i]]`` (idx on the host, dst on the device), chunked:
        host gather of chunk c+1 overlaps the copy of chunk c."""
        hv = self.host_values
        if dst.device.type != "cuda":  # CPU tensors (the interpreter): a plain gather
            torch.index_select(hv, 0, idx.to(hv.device), out=dst)
            return
        with self._staging_lock:
            self._copy_chunks(idx, dst)

    def _copy_chunks(self, idx: torch.Tensor, dst: torch.Tensor) -> None:
        n = idx.numel()
        hv = self.host_values
        row_bytes = self.dim * hv.element_size()
        chunk = max(1, self.copy_chunk_bytes // row_bytes)
        ring = self._staging_ring
        if ring is None or ring[0].shape[0] != chunk:
            for ev in self._staging_done:
                if ev is not None:
                    ev.synchronize()
            ring = [torch.empty((chunk, self.dim), dtype=hv.dtype, pin_memory=True)
                    for _ in range(self.STAGING_BUFFERS)]
            self._staging_ring, self._staging_done = ring, [None] * self.STAGING_BUFFERS
        done = self._staging_done
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream(dst.device))  # dst is allocated
        for c, lo in enumerate(range(0, n, chunk)):
            hi = min(n, lo + chunk)
            b = c % len(ring)
            if done[b] is not None:
                done[b].synchronize()  # the copy that last read this buffer has finished
            part = ring[b][: hi - lo]
            torch.index_select(hv, 0, idx[lo:hi], out=part)
            with torch.cuda.stream(stream):
                dst[lo:hi].copy_(part, non_blocking=True)
            done[b] = torch.cuda.Event()
            done[b].record(stream)
        torch.cuda.current_stream(dst.device).wait_stream(stream)
        dst.record_stream(stream)

    def query(
        self, keys: torch.Tensor, default: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors [n, dim], hit [n])`` for flattened keys; misses get default or zeros."""
        return static_query(
            self.index, keys, self.device_values, self.host_values, default, **self.launch
        )

    def update(self, keys: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Overwrite the rows of the keys the table holds; returns the mask of those keys.

        Keys the table does not hold are left out (a static table never grows).
        """
        keys = _as_int64_keys(keys, "StaticTable.update").to(self.index.device)
        if vectors.shape != (keys.numel(), self.dim):
            raise ValueError(
                f"StaticTable.update: vectors must be [{keys.numel()}, {self.dim}], "
                f"got {tuple(vectors.shape)}"
            )
        rows = static_find(self.index, keys)
        found = rows >= 0
        n_dev = self.device_values.shape[0]
        on_dev = found & (rows < n_dev)
        src = vectors.to(self.device_values.device, self.device_values.dtype)
        self.device_values[rows[on_dev]] = src[on_dev]
        if self.host_values is not None:
            on_host = found & (rows >= n_dev)
            hv = self.host_values
            hv[(rows[on_host] - n_dev).to(hv.device)] = src[on_host].to(hv.device, hv.dtype)
        return found


def static_query_reference(
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
