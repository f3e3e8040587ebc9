"""The durable update log of a table without Redis: every update is appended to a file next to
the table and fsynced before it is acknowledged, and replayed at start, so an update survives a
restart or a crash. Several processes may append to one log (`keras-hps update` and running
servers): appends take an exclusive `flock` on the file. Every parameter server serving the
table reads the records appended since its last read (`UpdateLogReader`) and applies them.

File `<table path>.updates`:

- header, 16 bytes: magic `KHPSUPD1`, dim (uint32), reserved (uint32);
- records, each: `UREC`, n (uint32), sequence number (uint64), n int64 keys, n x dim float32
  rows (all little-endian), then a CRC-32 of everything before it in the record.

A record is written with one write and then fsynced; a crash can leave only the last record
torn (short or with a wrong CRC). Replay stops at the first bad record, so it always yields a
prefix of the acknowledged updates, and the next append cuts the torn tail off first.
`UpdatedRows` holds the rows a log changed, in RAM, for the parameter server.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from keras_hps.errors import TableFormatError
from keras_hps.host_tier import HashIndex

__all__ = ["UpdateLog", "UpdateLogReader", "UpdatedRows", "last_rows", "log_path",
           "replay_updates"]

_MAGIC = b"KHPSUPD1"
_FILE_HEADER = struct.Struct("<8sII")
_REC_HEADER = struct.Struct("<4sIQ")
_REC_MAGIC = b"UREC"
_CRC = struct.Struct("<I")


def log_path(table_path: str | os.PathLike) -> Path:
    """Where the update log of the table at `table_path` (HPS folder or HDF5 file) lives."""
    p = Path(table_path)
    return p.with_name(p.name + ".updates")


def last_rows(keys: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique keys, their rows): where a key repeats, its last row wins (as when the rows are
    applied in order)."""
    if len(keys) < 2:
        return keys, vectors
    _, last = np.unique(keys[::-1], return_index=True)
    if len(last) == len(keys):
        return keys, vectors
    idx = len(keys) - 1 - last
    return keys[idx], vectors[idx]


def _read_header(f: Any, path: Path) -> int:
    raw = f.read(_FILE_HEADER.size)
    if len(raw) < _FILE_HEADER.size:
        raise TableFormatError(f"{path}: update log header is truncated")
    magic, dim, _ = _FILE_HEADER.unpack(raw)
    if magic != _MAGIC:
        raise TableFormatError(f"{path}: not a keras-hps update log (magic {magic!r})")
    return dim


def _records(f: Any, dim: int) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """(end offset, seq, keys, rows) of each intact record from the current position."""
    while True:
        head = f.read(_REC_HEADER.size)
        if len(head) < _REC_HEADER.size:
            return
        magic, n, seq = _REC_HEADER.unpack(head)
        if magic != _REC_MAGIC:
            return
        body_len = n * 8 + n * dim * 4
        body = f.read(body_len + _CRC.size)
        if len(body) < body_len + _CRC.size:
            return
        (crc,) = _CRC.unpack_from(body, body_len)
        if zlib.crc32(body[:body_len], zlib.crc32(head)) != crc:
            return
        keys = np.frombuffer(body, "<i8", n).astype(np.int64)
        rows = np.frombuffer(body, "<f4", n * dim, offset=n * 8).reshape(n, dim)
        yield f.tell(), seq, keys, rows.astype(np.float32)


def replay_updates(path: str | os.PathLike, dim: int | None = None
                   ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(seq, int64 keys, float32 `[n, dim]` rows) of each intact update in `path`, in order,
    stopping at the first torn or corrupt record. Nothing when the file does not exist."""
    p = Path(path)
    if not p.exists():
        return
    with open(p, "rb") as f:
        file_dim = _read_header(f, p)
        if dim is not None and file_dim != dim:
            raise TableFormatError(f"{p}: update log has dim {file_dim}, the table has {dim}")
        for _, seq, keys, rows in _records(f, file_dim):
            yield seq, keys, rows


class UpdateLog:
    """Append-only, fsynced update log of one `dim`-wide table (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, dim: int) -> None:
        self.path = Path(path)
        self.dim = int(dim)
        self._lock = threading.Lock()
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.next_seq, self._end = 0, 0
        try:
            with self._file_lock():
                if created:
                    _fsync_dir(self.path.parent)
        except BaseException:
            os.close(self._fd)
            raise

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Hold the thread lock and the exclusive flock, with the intact end found again."""
        with self._lock:
            if self._fd < 0:
                raise RuntimeError(f"{self.path}: update log is closed")
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                self._sync_end()
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _sync_end(self) -> None:
        """Under the file lock: find where the intact records end (another process may have
        appended, or died leaving a torn record), cut a torn tail off."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            os.write(self._fd, _FILE_HEADER.pack(_MAGIC, self.dim, 0))
            os.fsync(self._fd)
            self.next_seq, self._end = 0, _FILE_HEADER.size
            return
        if size == self._end:
            return
        if self._end == 0:
            self.next_seq, self._end = self._scan(0, 0)
        else:
            self.next_seq, self._end = self._scan(self._end, self.next_seq)
        if size > self._end:
            os.ftruncate(self._fd, self._end)
            os.fsync(self._fd)

    def _scan(self, start: int, next_seq: int) -> tuple[int, int]:
        """(next sequence number, end of the last intact record) reading from `start` (0: the
        header)."""
        with open(self.path, "rb") as f:
            if start == 0:
                dim = _read_header(f, self.path)
                if dim != self.dim:
                    raise TableFormatError(f"{self.path}: update log has dim {dim}, the table "
                                           f"has {self.dim}")
                start = _FILE_HEADER.size
            f.seek(start)
            seq, end = next_seq - 1, start
            for rec in _records(f, self.dim):
                end, seq = rec[0], rec[1]
        return seq + 1, end

    def append(self, keys: Any, vectors: Any) -> int:
        """Write one update durably (returns after fsync); returns its sequence number."""
        k = np.ascontiguousarray(keys, dtype="<i8").reshape(-1)
        v = np.ascontiguousarray(vectors, dtype="<f4")
        if v.shape != (len(k), self.dim):
            raise ValueError(f"{self.path}: vectors must be [{len(k)}, {self.dim}], got "
                             f"{list(v.shape)}")
        with self._file_lock():
            seq = self.next_seq
            head = _REC_HEADER.pack(_REC_MAGIC, len(k), seq)
            body = k.tobytes() + v.tobytes()
            crc = _CRC.pack(zlib.crc32(body, zlib.crc32(head)))
            record = head + body + crc
            _write_all(self._fd, record, self._end)
            os.fsync(self._fd)
            self._end += len(record)
            self.next_seq += 1
        return seq

    def replay(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """The updates written so far (see `replay_updates`)."""
        return replay_updates(self.path, self.dim)

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> UpdateLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UpdateLogReader:
    """The records appended to a log since the last `read`, by any process. Never locks the
    file: a record still being written reads as torn and is returned by a later call."""

    def __init__(self, path: str | os.PathLike, dim: int) -> None:
        self.path = Path(path)
        self.dim = int(dim)
        self.offset = 0  # end of the last record read (0: nothing read yet)

    def read(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(seq, keys, rows) of each intact record after the last one read, in order."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            return []
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < self.offset:  # the log was replaced: read it again from the start
                self.offset = 0
            if size == self.offset:
                return []
            if self.offset == 0:
                if size < _FILE_HEADER.size:
                    return []
                dim = _read_header(f, self.path)
                if dim != self.dim:
                    raise TableFormatError(f"{self.path}: update log has dim {dim}, the table "
                                           f"has {self.dim}")
                self.offset = _FILE_HEADER.size
            f.seek(self.offset)
            out = []
            for end, seq, keys, rows in _records(f, self.dim):
                out.append((seq, keys, rows))
                self.offset = end
        return out


class UpdatedRows:
    """The rows updates gave a table, by key, in RAM: never evicted (the table file holds the
    old rows). `fetch` takes unique int64 keys."""

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self._index = HashIndex(16)
        self._vectors = np.empty((16, self.dim), np.float32)
        self._n = 0
        self.hits = 0

    def __len__(self) -> int:
        return self._n

    def put(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Set the rows of unique `keys`."""
        slots = self._index.find(keys)
        old = slots >= 0
        self._vectors[slots[old]] = vectors[old]
        new = ~old
        m = int(new.sum())
        if m:
            if self._n + m > len(self._vectors):
                grown = np.empty((max(2 * len(self._vectors), self._n + m), self.dim),
                                 np.float32)
                grown[:self._n] = self._vectors[:self._n]
                self._vectors = grown
            fresh = np.arange(self._n, self._n + m, dtype=np.int64)
            self._vectors[fresh] = vectors[new]
            self._index.insert(keys[new], fresh)
            self._n += m

    def fetch(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, float32 rows of the found keys in key order) for unique `keys`."""
        if self._n == 0:
            return np.zeros(len(keys), bool), np.empty((0, self.dim), np.float32)
        slots = self._index.find(keys)
        found = slots >= 0
        self.hits += int(found.sum())
        return found, self._vectors[slots[found]]

    def keys(self) -> np.ndarray:
        """Every updated key (unordered)."""
        kv = self._index.kv
        return kv[kv[:, 1] >= 0, 0].copy()


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
