"""Output buffers of host lookups: 64-byte aligned, and recycled instead of freed.

- **Aligned.** TensorFlow adopts a NumPy array returned by `tf.numpy_function` without a copy
  only when its data starts on Eigen's 64-byte boundary; NumPy's own large allocations are
  often only 16- or 32-byte aligned, and TF then copies every lookup result.
- **Recycled.** A lookup result is a fresh multi-megabyte array. When such arrays are freed
  in bulk (a model step's outputs all go at once), the C allocator hands the pages back to
  the kernel, and the next step faults every page in again; on a virtual machine that costs
  about as much as the lookup itself. Buffers of at least `POOL_MIN_BYTES` are therefore
  kept in a pool when the last array using them goes, up to `max_idle_bytes` of idle memory
  (environment variable `KERAS_HPS_OUTPUT_POOL_MB`, default 256; 0 turns the pool off).

An array from `aligned_empty` is an ordinary `np.ndarray`; its memory returns to the pool
only when it and every view of it (a reshape, a torch tensor from `torch.from_numpy`, a
TensorFlow tensor that adopted it) are gone.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

import numpy as np

__all__ = ["ALIGN", "OutputPool", "aligned_empty", "gather_rows", "output_pool"]

#: Byte alignment of every lookup result.
ALIGN = 64
#: Smaller buffers go straight to NumPy's allocator.
POOL_MIN_BYTES = 64 * 1024


def _size_class(nbytes: int) -> int:
    """`nbytes` rounded up to a multiple of 4 KiB and of 1/16 of its power of two (so at
    most 6.25% more, for the sizes that are pooled)."""
    step = 1 << max(12, nbytes.bit_length() - 5)
    return -(-nbytes // step) * step


class _Lease:
    """Owns one pooled buffer while arrays use it (NumPy keeps it as their `base`);
    hands the buffer back to its pool when the last of them is gone."""

    __slots__ = ("__array_interface__", "_pool", "_raw")

    def __init__(self, pool: OutputPool, raw: np.ndarray, offset: int,
                 shape: tuple[int, ...], dtype: np.dtype) -> None:
        self._pool = pool
        self._raw = raw
        self.__array_interface__ = {"data": (raw.ctypes.data + offset, False), "shape": shape,
                                    "typestr": dtype.str, "version": 3}

    def __del__(self) -> None:
        self._pool.give_back(self._raw)


class OutputPool:
    """Aligned arrays whose buffers are reused once every array using them is gone."""

    def __init__(self, max_idle_bytes: int) -> None:
        self.max_idle_bytes = int(max_idle_bytes)
        self._idle: dict[int, list[np.ndarray]] = {}
        self._idle_bytes = 0
        self._lock = threading.RLock()  # re-entrant: a `_Lease.__del__` may run anywhere
        self.reused = 0
        self.allocated = 0

    @property
    def idle_bytes(self) -> int:
        """Bytes held in the pool now, waiting for reuse."""
        return self._idle_bytes

    def empty(self, shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> np.ndarray:
        """An uninitialised C-contiguous array whose data starts on an `ALIGN`-byte boundary."""
        dtype = np.dtype(dtype)
        shape = tuple(int(d) for d in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < POOL_MIN_BYTES or self.max_idle_bytes <= 0:
            raw = np.empty(nbytes + ALIGN, np.uint8)
            start = -raw.ctypes.data % ALIGN
            return raw[start:start + nbytes].view(dtype).reshape(shape)
        size = _size_class(nbytes + ALIGN)
        raw = None
        with self._lock:
            idle = self._idle.get(size)
            if idle:
                raw = idle.pop()
                self._idle_bytes -= size
                self.reused += 1
        if raw is None:
            raw = np.empty(size, np.uint8)
            self.allocated += 1
        return np.asarray(_Lease(self, raw, -raw.ctypes.data % ALIGN, shape, dtype))

    def give_back(self, raw: np.ndarray) -> None:
        """Keep a buffer no array uses any more, unless the pool is full (then it is freed)."""
        with self._lock:
            if self._idle_bytes + raw.nbytes <= self.max_idle_bytes:
                self._idle.setdefault(raw.nbytes, []).append(raw)
                self._idle_bytes += raw.nbytes

    def clear(self) -> None:
        """Free every idle buffer."""
        with self._lock:
            self._idle.clear()
            self._idle_bytes = 0


def _max_idle_from_env() -> int:
    value = os.environ.get("KERAS_HPS_OUTPUT_POOL_MB", "256")
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(
            f"KERAS_HPS_OUTPUT_POOL_MB must be a number of megabytes, got {value!r}") from None
    return int(megabytes * (1 << 20))


#: The process's pool for host lookup results.
output_pool = OutputPool(_max_idle_from_env())


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> np.ndarray:
    """An uninitialised, `ALIGN`-byte-aligned C-contiguous array from the process's pool."""
    return output_pool.empty(shape, dtype)


def gather_rows(vectors: Any, rows: np.ndarray) -> np.ndarray:
    """float32 `vectors[rows]` in a new aligned array from the pool: the CPU's row gather.

    `vectors` is a `[n, dim]` NumPy array (a memory map too) or an array-like read by a list
    of increasing rows (an h5py dataset); `rows` are valid row indices, in any order, repeats
    allowed (they are not checked)."""
    out = aligned_empty((len(rows), vectors.shape[1]), np.float32)
    if isinstance(vectors, np.ndarray):
        if vectors.dtype == np.float32:
            # mode="clip": NumPy buffers `out` for the default mode="raise" (a second copy).
            return np.take(vectors, rows, axis=0, out=out, mode="clip")
        out[...] = np.take(vectors, rows, axis=0)
    elif len(rows):
        uniq, inv = np.unique(rows, return_inverse=True)
        out[...] = np.asarray(vectors[uniq], dtype=np.float32)[inv.reshape(-1)]
    return out
