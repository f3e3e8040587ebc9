"""The cold tier (HPS's `persistent_db`): a table file on local disk, read in batches.

The tier keeps the table's keys sorted in memory (8 bytes per row, plus 8 for a row map when
the file is not already in key order) and reads vectors straight from the file's memory map
(an HPS `emb_vector` file or the /vectors data of a keras-hps HDF5 table) in ascending row
order, so each batch is one sorted sweep over the file.
"""

from __future__ import annotations

import numpy as np

from keras_hps.formats import Table, open_table, release_pages

__all__ = ["ColdTier"]


class ColdTier:
    """Batched, sorted reads of one table file. `lookup` takes unique int64 keys."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.dim = table.dim
        self._keys, self._rows = table.sorted_index()
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
        return self._keys.nbytes + (0 if self._rows is None else self._rows.nbytes)

    def find_rows(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key in the file, -1 where the table has no such key."""
        n = len(self._keys)
        if n == 0 or len(keys) == 0:
            return np.full(len(keys), -1, np.int64)
        pos = np.searchsorted(self._keys, keys)
        np.minimum(pos, n - 1, out=pos)
        found = self._keys[pos] == keys
        rows = pos if self._rows is None else self._rows[pos]
        return np.where(found, rows, -1)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, float32 vectors of the found keys in key order) for unique `keys`."""
        rows = self.find_rows(keys)
        found = rows >= 0
        r = rows[found]
        if len(r) > 1 and not np.all(r[1:] >= r[:-1]):
            order = np.argsort(r)
            out = np.empty((len(r), self.dim), np.float32)
            out[order] = self.table.read_rows(r[order])
        else:
            out = self.table.read_rows(r)
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
