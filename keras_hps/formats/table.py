"""An opened table (`Table`) and row access shared by both formats.

A table is `keys` (int64, `[rows]`) and `vectors` (float32, `[rows, dim]`), each an array-like:
a NumPy memory map where the file's storage allows, else an h5py dataset, or a `RowView` (rows
of another array in another order). Key order and duplicates are found here, once, for every
reader and writer.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from keras_hps.errors import TableFormatError

#: Bytes per block that readers, writers and converters move at once.
BLOCK_BYTES = 64 * 1024 * 1024

#: What readers and writers do with a key that appears twice: fail, or keep its last row.
OnDuplicate = Literal["error", "last"]


class Table:
    """An opened table: `keys` (int64, `[rows]`) and `vectors` (float32, `[rows, dim]`) are
    array-likes (memory-mapped where possible); `dim`, `num_rows`, `path`, `kind`
    ("hps" or "hdf5"). Close it (or use `with`) to release the file."""

    def __init__(self, path: str, kind: str, keys: Any, vectors: Any, dim: int,
                 *, sorted_unique: bool = False, closer: Callable[[], None] | None = None,
                 sorted_index: tuple[np.ndarray, np.ndarray | None] | None = None) -> None:
        self.path = path
        self.kind = kind
        self.keys = keys
        self.vectors = vectors
        self.dim = int(dim)
        self.num_rows = int(keys.shape[0])
        self._sorted_unique = sorted_unique
        self._closer = closer
        self._sorted_index = sorted_index

    def __repr__(self) -> str:
        return f"Table({self.path!r}, kind={self.kind!r}, rows={self.num_rows}, dim={self.dim})"

    def __enter__(self) -> Table:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the underlying file (array-likes obtained earlier may stop working)."""
        if self._closer is not None:
            self._closer()
            self._closer = None

    @property
    def nbytes(self) -> int:
        """Bytes of keys and vectors."""
        return self.num_rows * (8 + 4 * self.dim)

    def sorted_index(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(sorted keys, row of each) in memory; rows is None when the file is already sorted."""
        if self._sorted_index is None:
            keys = read_all(self.keys)
            if self._sorted_unique or is_strictly_increasing(keys):
                self._sorted_index = (keys, None)
            else:
                order, skeys, dup = sort_keys(keys)
                if dup.any():
                    raise TableFormatError(
                        f"{self.path}: duplicate key {int(skeys[1:][dup][0])}")
                self._sorted_index = (skeys, order)
        return self._sorted_index

    def in_key_order(self) -> tuple[np.ndarray, Any]:
        """(sorted keys, vectors in the same order): a lazy view, rows are read on access."""
        keys, rows = self.sorted_index()
        return keys, (self.vectors if rows is None else RowView(self.vectors, rows))

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 `[len(rows), dim]`: the vectors at row indices `rows` (any order)."""
        return gather_rows(self.vectors, rows, self.dim)

    def iter_blocks(self, block_rows: int | None = None, order: np.ndarray | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys, vectors) in blocks of `block_rows`, in file order or in `order` (row indices)."""
        block_rows = block_rows or rows_per_block(self.dim)
        keys_all = None if order is None else read_all(self.keys)
        n = self.num_rows
        for start in range(0, n, block_rows):
            stop = min(n, start + block_rows)
            if order is None:
                k = np.asarray(self.keys[start:stop], dtype=np.int64)
                v = np.asarray(self.vectors[start:stop], dtype=np.float32)
            else:
                idx = order[start:stop]
                k = keys_all[idx]
                v = gather_rows(self.vectors, idx, self.dim)
            release_pages(self.vectors)
            yield k, v


class RowView:
    """Rows `rows` of `base`: a read-only array-like used for de-duplicated tables."""

    def __init__(self, base: Any, rows: np.ndarray) -> None:
        self.base = base
        self.rows = rows
        self.shape = (len(rows), *base.shape[1:])
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item: Any) -> np.ndarray:
        return gather_rows(self.base, self.rows[item], self.shape[1])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def rows_per_block(dim: int) -> int:
    """Rows of a `dim`-wide table in one BLOCK_BYTES block (keys and vectors)."""
    return max(1, BLOCK_BYTES // (4 * max(1, dim) + 8))


def read_all(keys: Any) -> np.ndarray:
    """Every key of an array-like, as one contiguous int64 array in memory."""
    return np.ascontiguousarray(np.asarray(keys[:] if not isinstance(keys, np.ndarray) else keys,
                                           dtype=np.int64))


def sort_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, keys[order], repeat mask of keys[order][1:]). Among equal keys the order is the
    file order (a stable sort, done only when keys repeat: the default sort is faster)."""
    order = np.argsort(keys)
    sk = keys[order]
    dup = sk[1:] == sk[:-1]
    if dup.any():
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        dup = sk[1:] == sk[:-1]
    return order, sk, dup


def is_strictly_increasing(keys: np.ndarray) -> bool:
    """Whether `keys` are sorted and unique (checked in slices, so memory stays flat)."""
    step = 1 << 22
    for s in range(0, max(0, len(keys) - 1), step):
        a = keys[s:s + step + 1]
        if not np.all(a[1:] > a[:-1]):
            return False
    return True


def map_array(path: Path, dtype: str, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
    """A read-only memory map of raw array bytes in a file (an empty array for no elements)."""
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset)


def release_pages(arr: Any) -> None:
    """Let the kernel drop a memory-mapped array's resident pages (they stay in the page
    cache); keeps the resident memory of a pass over a large table flat."""
    if isinstance(arr, RowView):
        arr = arr.base
    mm = getattr(arr, "_mmap", None)
    if isinstance(mm, mmap.mmap) and hasattr(mm, "madvise"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def gather_rows(vectors: Any, rows: np.ndarray, dim: int) -> np.ndarray:
    """float32 `[len(rows), dim]` gathered from any supported array-like."""
    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(vectors, np.ndarray):  # includes np.memmap
        out = np.take(vectors, rows, axis=0)
        return out if out.dtype == np.float32 else out.astype(np.float32)
    if isinstance(vectors, RowView):
        return gather_rows(vectors.base, vectors.rows[rows], dim)
    # h5py dataset (filtered or irregular storage): increasing unique reads, then reorder
    if len(rows) == 0:
        return np.empty((0, dim), np.float32)
    uniq, inv = np.unique(rows, return_inverse=True)
    block = np.asarray(vectors[uniq], dtype=np.float32)
    return block[inv]
