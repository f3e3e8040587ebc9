"""The durable update log of one table on a single server (no Redis): every update is appended
to a file next to the table and fsynced before it is acknowledged, and replayed at start, so an
update survives a restart or a crash.

File `<table path>.updates`:

- header, 16 bytes: magic `KHPSUPD1`, dim (uint32), reserved (uint32);
- records, each: `UREC`, n (uint32), sequence number (uint64), n int64 keys, n x dim float32
  rows (all little-endian), then a CRC-32 of everything before it in the record.

A record is written with one write and then fsynced; a crash can leave only the last record
torn (short or with a wrong CRC). Replay stops at the first bad record, so it always yields a
prefix of the acknowledged updates, and opening the log for writing cuts the torn tail off
before appending.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from keras_hps.errors import TableFormatError

__all__ = ["UpdateLog", "log_path", "replay_updates"]

_MAGIC = b"KHPSUPD1"
_FILE_HEADER = struct.Struct("<8sII")
_REC_HEADER = struct.Struct("<4sIQ")
_REC_MAGIC = b"UREC"
_CRC = struct.Struct("<I")


def log_path(table_path: str | os.PathLike) -> Path:
    """Where the update log of the table at `table_path` (HPS folder or HDF5 file) lives."""
    p = Path(table_path)
    return p.with_name(p.name + ".updates")


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
        try:
            if created or os.fstat(self._fd).st_size == 0:
                os.write(self._fd, _FILE_HEADER.pack(_MAGIC, self.dim, 0))
                os.fsync(self._fd)
                _fsync_dir(self.path.parent)
                self.next_seq, end = 0, _FILE_HEADER.size
            else:
                self.next_seq, end = self._scan()
            if os.fstat(self._fd).st_size > end:  # cut a torn last record off
                os.ftruncate(self._fd, end)
                os.fsync(self._fd)
            os.lseek(self._fd, end, os.SEEK_SET)
        except BaseException:
            os.close(self._fd)
            raise

    def _scan(self) -> tuple[int, int]:
        """(next sequence number, end of the last intact record)."""
        with open(self.path, "rb") as f:
            dim = _read_header(f, self.path)
            if dim != self.dim:
                raise TableFormatError(f"{self.path}: update log has dim {dim}, the table "
                                       f"has {self.dim}")
            seq, end = -1, _FILE_HEADER.size
            for rec in _records(f, dim):
                end, seq = rec[0], rec[1]
        return seq + 1, end

    def append(self, keys: Any, vectors: Any) -> int:
        """Write one update durably (returns after fsync); returns its sequence number."""
        k = np.ascontiguousarray(keys, dtype="<i8").reshape(-1)
        v = np.ascontiguousarray(vectors, dtype="<f4")
        if v.shape != (len(k), self.dim):
            raise ValueError(f"{self.path}: vectors must be [{len(k)}, {self.dim}], got "
                             f"{list(v.shape)}")
        with self._lock:
            if self._fd < 0:
                raise RuntimeError(f"{self.path}: update log is closed")
            seq = self.next_seq
            head = _REC_HEADER.pack(_REC_MAGIC, len(k), seq)
            body = k.tobytes() + v.tobytes()
            crc = _CRC.pack(zlib.crc32(body, zlib.crc32(head)))
            _write_all(self._fd, head + body + crc)
            os.fsync(self._fd)
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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
