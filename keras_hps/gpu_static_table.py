"""GpuStaticTable: a whole table for the GPU behind a hash index (static and UVM modes), or
behind none when its keys are its row numbers (an identity index: a plain gather).

Owns the device memory, the pinned host memory (registered with CUDA at its exact size), the
copy stream and the ring of pinned staging buffers, and runs the kernels of
``keras_hps.triton_kernels.static_table`` on them. Rows ``[0, n_device)`` live in device
memory, the rest in pinned host memory that the kernel reads over the bus (UVM mode) or that
host threads gather and the copy engine moves (``host_read="copy"``).
"""

from __future__ import annotations

import mmap
import threading
import weakref

import numpy as np
import torch

from keras_hps.triton_kernels.static_table import (
    build_index,
    flat_int64_keys,
    key_order_if_permutation,
    static_find,
    static_query,
    static_rows,
)

__all__ = ["GpuStaticTable", "HOST_READS", "pinned_empty"]

#: How rows in pinned host memory reach the device: "kernel" (zero-copy reads over the bus
#: by the query kernel) or "copy" (host threads gather, the copy engine moves).
HOST_READS = ("kernel", "copy")


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


class GpuStaticTable:
    """A whole table on the device behind a hash index (static mode), optionally with
    rows from ``n_device`` on in pinned host memory read by the kernel (UVM mode)."""

    STAGING_BUFFERS = 4  # host_read="copy": pinned chunk buffers in flight

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
        Keys ``0..n-1`` (in any order; rows are then put in key order) need no hash index:
        key ``k`` is row ``k`` (``self.index.identity``).
        """
        device = torch.device(device)
        if values.dim() != 2 or values.shape[0] != keys.numel():
            raise ValueError(
                f"GpuStaticTable: values must be [{keys.numel()}, dim], got "
                f"{tuple(values.shape)}"
            )
        n = keys.numel()
        n_device = n if n_device is None else max(0, min(int(n_device), n))
        order = key_order_if_permutation(keys)
        if order is not None:  # keys 0..n-1 out of order: rows in key order, no hash index
            keys, values = keys.reshape(-1)[order], values[order.to(values.device)]
        self.index = build_index(keys.to(device))
        self.launch: dict[str, int] = {}  # block_k / num_warps overrides for static_query
        self.dim = int(values.shape[1])
        self.device_values = values[:n_device].to(device).contiguous()
        self.host_values: torch.Tensor | None = None
        self.copy_chunk_bytes = 8 << 20  # host_read="copy": bytes per host gather + copy step
        # host_read="copy": share of the keys read by the kernel over the bus while the host
        # gathers the rest (the two paths use different resources; in four whole-hierarchy
        # runs on H200s 0.3 beat 0.2 every time, docs/benchmarks/gpu_hierarchy.md).
        self.zero_copy_share = 0.3
        # host_read="copy": a ring of pinned chunk buffers (small enough to stay in the CPU's
        # cache between the gather that writes one and the copy that reads it) and, per
        # buffer, the event of the copy that last read it.
        self._staging_ring: list[torch.Tensor] | None = None
        self._staging_done: list[torch.cuda.Event | None] = []
        self._staging_lock = threading.Lock()  # one copying query at a time uses the ring
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

    def query(
        self,
        keys: torch.Tensor,
        default: torch.Tensor | None = None,
        *,
        counters: torch.Tensor | None = None,
        miss_flag: torch.Tensor | None = None,
        validate: bool = True,
        host_read: str = "kernel",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors [n, dim], hit [n])`` for flattened keys; misses get ``default`` or zeros.

        ``counters`` (int64 ``[2]`` on the device) receives +hits and +misses; ``miss_flag``
        (int32 ``[1]`` on the device) is set to 1 when a key misses (no host synchronisation).
        ``validate=False`` skips the checks (keys flat int64 on the device, ``default`` a
        contiguous ``[dim]`` tensor of the values' dtype there). ``host_read="copy"`` moves
        the rows that live in host memory by the copy engine (see :meth:`_query_copying`;
        misses then get zeros, and nothing is counted).
        """
        if host_read == "copy" and self.host_values is not None:
            if default is not None or counters is not None or miss_flag is not None:
                raise ValueError("GpuStaticTable.query: host_read='copy' takes no default, "
                                 "counters or miss flag")
            return self._query_copying(keys)
        if host_read not in HOST_READS:
            raise ValueError(f"host_read must be one of {HOST_READS}, got {host_read!r}")
        return static_query(self.index, keys, self.device_values, self.host_values, default,
                            counters=counters, miss_flag=miss_flag, validate=validate,
                            **self.launch)

    def _query_copying(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`query` with the rows that live in host memory moved by the copy engine
        instead of read by the kernel.

        The rows' positions are found on the device and read back (one synchronisation);
        host threads gather the host rows into a pinned staging buffer chunk by chunk while
        the copy engine moves the chunks already gathered (on its own stream; the current
        stream waits for it). Zero-copy kernel reads of scattered rows run far below the
        copy engine's rate (16 GB/s against 55 GB/s measured on an H200), so this is the
        path for many misses; the rows of the first ``zero_copy_share`` of the keys are still
        read by the kernel, by their known positions, while the host gathers the rest.
        """
        keys = flat_int64_keys(keys, "GpuStaticTable.query").to(self.index.device)
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
            static_rows(rows[:k], self.device_values, self.host_values, out[:k])
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

    def update(self, keys: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Overwrite the rows of the keys the table holds; returns the mask of those keys.

        Keys the table does not hold are left out (a static table never grows).
        """
        keys = flat_int64_keys(keys, "GpuStaticTable.update").to(self.index.device)
        if vectors.shape != (keys.numel(), self.dim):
            raise ValueError(
                f"GpuStaticTable.update: vectors must be [{keys.numel()}, {self.dim}], "
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
