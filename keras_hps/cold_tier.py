"""The cold tier (HPS's `persistent_db`): a table file on local disk, read in batches.

The tier keeps the table's keys sorted in memory (8 bytes per row, plus 8 for a row map when
the file is not already in key order) and reads vectors straight from the file's memory map
(an HPS `emb_vector` file or the /vectors data of a keras-hps HDF5 table) in ascending row
order, so each batch is one sorted sweep over the file.
"""

from __future__ import annotations

import numpy as np

from keras_hps.formats import Table, open_table, release_pages
from keras_hps.output_buffers import gather_rows

__all__ = ["ColdTier"]

_STRIDE = 64
_TWO_LEVEL_MIN = 1 << 16


def index_nbytes(rows: int, in_key_order: bool) -> int:
    """Bytes of the in-memory key index a ColdTier over a table of `rows` rows holds."""
    coarse = 8 * -(-rows // _STRIDE) if rows >= _TWO_LEVEL_MIN else 0
    return rows * (8 if in_key_order else 16) + coarse


class ColdTier:
    """Batched, sorted reads of one table file. `fetch` takes unique int64 keys."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.dim = table.dim
        self._keys, self._rows = table.sorted_index()
        # every STRIDE-th key: a small array that stays in CPU cache and narrows each binary
        # search to STRIDE keys (for large tables about twice as fast as np.searchsorted)
        big = len(self._keys) >= _TWO_LEVEL_MIN
        self._coarse = self._keys[::_STRIDE].copy() if big else None
        self.hits = 0
        self.misses = 0

    @classmethod
    def open(cls, path: str, dim: int | None = None) -> ColdTier:
        """A cold tier over the table at `path` (HPS directory or HDF5 file)."""
        return cls(open_table(path, dim))

    @property
    def num_rows(self) -> int:
        """Rows in the table."""
        return len(self._keys)

    @property
    def key_range(self) -> tuple[int, int, int]:
        """(smallest key, largest key, rows); (0, -1, 0) for an empty table."""
        if not len(self._keys):
            return 0, -1, 0
        return int(self._keys[0]), int(self._keys[-1]), len(self._keys)

    @property
    def index_nbytes(self) -> int:
        """Host memory of the in-memory key index."""
        return (self._keys.nbytes + (0 if self._rows is None else self._rows.nbytes)
                + (0 if self._coarse is None else self._coarse.nbytes))

    def find_rows(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key in the file, -1 where the table has no such key."""
        n = len(self._keys)
        if n == 0 or len(keys) == 0:
            return np.full(len(keys), -1, np.int64)
        pos = self._lower_bound(keys)
        np.minimum(pos, n - 1, out=pos)
        found = self._keys[pos] == keys
        rows = pos if self._rows is None else self._rows[pos]
        return np.where(found, rows, -1)

    def _lower_bound(self, keys: np.ndarray) -> np.ndarray:
        """np.searchsorted(self._keys, keys), through the coarse index for large tables."""
        if self._coarse is None:
            return np.searchsorted(self._keys, keys)
        sk = self._keys
        last = len(sk) - 1
        base = np.searchsorted(self._coarse, keys, side="right") - 1
        np.maximum(base, 0, out=base)
        base *= _STRIDE  # the answer lies in [base, base + STRIDE]
        length = _STRIDE + 1
        while length > 1:  # branch-free binary search, all keys at once
            half = length // 2
            mid = base + half
            below = np.take(sk, np.minimum(mid, last)) < keys
            below &= mid <= last
            base = np.where(below, mid, base)
            length -= half
        return base + (np.take(sk, np.minimum(base, last)) < keys)

    def fetch(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, float32 vectors of the found keys in key order) for unique `keys`."""
        rows = self.find_rows(keys)
        found = rows >= 0
        r = rows[found]
        if len(r) > 1 and not np.all(r[1:] >= r[:-1]):
            order = np.argsort(r)
            out = np.empty((len(r), self.dim), np.float32)
            out[order] = gather_rows(self.table.vectors, r[order])
        else:
            out = gather_rows(self.table.vectors, r)
        self.hits += len(r)
        self.misses += len(keys) - len(r)
        return found, out

    def read_block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, vectors) of file rows [start, stop), for loading upper tiers."""
        keys = np.asarray(self.table.keys[start:stop], dtype=np.int64)
        return keys, np.asarray(self.table.vectors[start:stop], dtype=np.float32)

    def release_pages(self) -> None:
        """Drop this process's resident pages of the table file (after a long sequential pass)."""
        release_pages(self.table.vectors)

    def stats(self) -> dict[str, int]:
        """Counters: hits, misses, rows."""
        return {"hits": self.hits, "misses": self.misses, "rows": self.num_rows}

    def close(self) -> None:
        """Release the table file."""
        self.table.close()
