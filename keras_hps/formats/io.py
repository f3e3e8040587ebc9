"""Streaming table writes, shared by both formats.

Writers check their inputs, pick the row order (as given, or sorted by key and/or without
repeated keys), gather the rows in large blocks on one thread while a second thread writes the
previous block, and write to a temporary name that is renamed into place, so a crash never
leaves half a table. Temporary names record their writer, so the next writer of a table finds
and removes what a killed one left (`remove_leftovers`).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import mmap
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from keras_hps.errors import TableFormatError
from keras_hps.formats.progress import progress_bar
from keras_hps.formats.table import (
    RowView,
    gather_rows,
    is_strictly_increasing,
    release_pages,
    rows_per_block,
    sort_keys,
)

log = logging.getLogger("keras_hps.formats")

#: Bytes per block when rows are gathered out of file order (each block is one sweep over the
#: source file), and bytes of the source file mapped at once during such a sweep.
PERMUTED_BLOCK_BYTES = 512 * 1024 * 1024
SWEEP_BYTES = 128 * 1024 * 1024

#: One block of rows to write: (first row, keys, vectors).
Block = tuple[int, np.ndarray, np.ndarray]


def check_inputs(path: Any, keys: Any, vectors: Any) -> tuple[np.ndarray, Any, int]:
    """(int64 keys, `[rows, dim]` array-like, dim) of a table to write, else TableFormatError."""
    k = np.asarray(keys)
    if k.dtype.kind not in "iu" or k.ndim != 1:
        raise TableFormatError(f"{path}: keys must be a 1-D integer array, got "
                               f"{k.dtype} with shape {k.shape}")
    if k.dtype == np.uint64 and len(k) and int(k.max()) > np.iinfo(np.int64).max:
        raise TableFormatError(f"{path}: key {int(k.max())} does not fit int64")
    k = np.ascontiguousarray(k, dtype=np.int64)
    v = vectors if hasattr(vectors, "shape") and hasattr(vectors, "__getitem__") \
        else np.asarray(vectors, dtype=np.float32)
    if len(v.shape) != 2 or v.shape[1] < 1:
        raise TableFormatError(f"{path}: vectors must be [rows, dim] with dim >= 1, got "
                               f"shape {tuple(v.shape)}")
    if v.shape[0] != len(k):
        raise TableFormatError(f"{path}: {len(k)} keys but {v.shape[0]} vector rows")
    return k, v, int(v.shape[1])


def write_order(keys: np.ndarray, path: Any, on_duplicate: str,
                want_sorted: bool) -> np.ndarray | None:
    """Row order to write: None (as given) or indices that sort and/or drop duplicates."""
    if on_duplicate not in ("error", "last"):
        raise ValueError(f"on_duplicate must be 'error' or 'last', got {on_duplicate!r}")
    if len(keys) == 0 or is_strictly_increasing(keys):
        return None
    order, sk, dup = sort_keys(keys)
    if dup.any():
        if on_duplicate == "error":
            raise TableFormatError(f"{path}: duplicate key {int(sk[1:][dup][0])} "
                                   f"({int(dup.sum())} repeats); pass on_duplicate='last'")
        order = order[np.append(~dup, True)]
        if not want_sorted:
            order = np.sort(order)
    elif not want_sorted:
        return None
    return order


def _mapped_base(v: Any, order: np.ndarray | None) -> tuple[Any, np.ndarray | None]:
    """(memory map, row order into it) when blocks of `v` gather rows of a memory map out of
    order, else (None, None)."""
    if isinstance(v, RowView):
        base = v.base
        rows = v.rows if order is None else v.rows[order]
    else:
        base, rows = v, order
    if rows is None or not isinstance(getattr(base, "_mmap", None), mmap.mmap):
        return None, None
    return base, rows


def _gather_sweeping(base: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`base[rows]` for a memory map, read in ascending row order one SWEEP_BYTES range of the
    file at a time, releasing each range's mapped pages after use (a random gather would map
    the whole file: the kernel maps whole page-cache folios around each row touched)."""
    order = np.argsort(rows)
    srows = rows[order]
    out = np.empty((len(rows), base.shape[1]), np.float32)
    row_bytes = base.shape[1] * base.dtype.itemsize
    span = max(1, SWEEP_BYTES // row_bytes)
    edges = np.searchsorted(srows, np.arange(0, base.shape[0] + span, span))
    ranges = [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True) if hi > lo]
    mm = base._mmap  # type: ignore[attr-defined]
    first = base.ctypes.data - np.frombuffer(mm, np.uint8).ctypes.data  # row 0 in the mapping
    page = mmap.PAGESIZE
    for lo, hi in ranges:
        out[order[lo:hi]] = np.take(base, srows[lo:hi], axis=0)
        start = (first + int(srows[lo]) * row_bytes) // page * page
        stop = min(len(mm), first + (int(srows[hi - 1]) + 1) * row_bytes)
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
        except (OSError, ValueError):
            pass
    return out


def row_blocks(k: np.ndarray, v: Any, order: np.ndarray | None, dim: int, progress: Any,
               desc: str) -> Iterator[Block]:
    """(start, keys, vectors) blocks of the rows to write, in `order` when given. Resident
    memory stays near one block whatever the table's size."""
    n = len(k) if order is None else len(order)
    base, rows = _mapped_base(v, order)
    step = rows_per_block(dim) if base is None else max(1, PERMUTED_BLOCK_BYTES // (4 * dim + 8))
    bar = progress_bar(progress, n, desc)
    try:
        for start in range(0, n, step):
            stop = min(n, start + step)
            kb = k[start:stop] if order is None else k[order[start:stop]]
            if base is not None:
                vb = _gather_sweeping(base, rows[start:stop])
            elif order is None:
                vb = v[start:stop]
            else:
                vb = gather_rows(v, order[start:stop], dim)
            vb = np.ascontiguousarray(vb, dtype="<f4")
            if vb.shape != (stop - start, dim):
                raise TableFormatError(f"vectors block has shape {vb.shape}")
            yield start, np.ascontiguousarray(kb, dtype="<i8"), vb
            del vb
            release_pages(v)
            if bar is not None:
                bar.update(stop - start)
    finally:
        if bar is not None:
            bar.close()


def write_behind(blocks: Iterator[Block], write: Callable[[int, np.ndarray, np.ndarray], None]
                 ) -> None:
    """Call `write(start, keys, vectors)` for each block on a second thread, so the next block
    is gathered while the previous one is written (at most two blocks alive)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="keras-hps-write") as pool:
        pending = None
        for item in blocks:
            if pending is not None:
                pending.result()
            pending = pool.submit(write, *item)
            del item
        if pending is not None:
            pending.result()


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` of the open file `fd`."""
    while len(data):
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def _host() -> str:
    """This host's name as temporary names record it (characters other than [A-Za-z0-9_.-]
    replaced)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "host"


# `.NAME.tmp-HOST~PID-XXXXXXXX`: a writer's work in progress; `.NAME.old-...`: the copy it
# replaces, held for one step where the file system cannot swap two names (see replace_with)
_TEMP_NAME = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9_.-]+)~(?P<pid>\d+)-[0-9a-f]{8}$"
)


def temp_sibling(path: Path, kind: str = "tmp") -> Path:
    """A fresh hidden name next to `path`, to write to before `replace_with`. It names this
    host and process, so that `remove_leftovers` can tell the work of a writer that was
    killed from that of one still running."""
    return path.parent / f".{path.name}.{kind}-{_host()}~{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _writer_gone(host: str, pid: int) -> bool:
    """Whether the writer a temporary name records has ended: it ran on this host and no
    process has its id now (a name from another host is never taken for a leftover)."""
    if host != _host() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, as another user's process
        return False
    return False


def remove_leftovers(folder: Path, name: str | None = None) -> list[str]:
    """Cleans up after writers killed while writing into `folder` (only those of `name`,
    if given): their temporary files and folders are removed, and a copy that a kill left
    under its hidden `old` name while the published name was missing is put back. Each
    action is logged (a warning) and returned as a message."""
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if (match and (name is None or match["name"] == name)
                and _writer_gone(match["host"], int(match["pid"]))):
            found.append((match["kind"], entry.name, match["name"]))
    messages = []
    for kind, entry, published in sorted(found):  # "old" copies before "tmp" work
        target = folder / published
        if kind == "old" and not (target.exists() or target.is_symlink()):
            os.replace(folder / entry, target)
            messages.append(f"{target}: put back from {entry}, where a writer killed while "
                            "replacing it had left it")
        else:
            _remove(folder / entry)
            messages.append(f"{folder}: removed {entry}, left by a writer that was killed")
    for message in messages:
        log.warning("%s", message)
    return messages


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing names in one step (Linux's renameat2 RENAME_EXCHANGE); False where
    the platform or the file system cannot."""
    libc = _libc()
    renameat2 = getattr(libc, "renameat2", None) if libc is not None else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def replace_with(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Publish `tmp` as `dst` in one rename, so a reader sees the old `dst` or the new one.

    An existing `dst` (file or directory) is replaced only with `overwrite`. A directory
    cannot be renamed over a non-empty one: the two names are swapped in one step where the
    file system can (Linux), and the old copy removed after. Elsewhere the old copy is moved
    to a hidden `old` name first; a kill between the two renames leaves it there, and the
    next writer of `dst` puts it back (`remove_leftovers`)."""
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{dst} exists (pass overwrite=True)")
        if (dst.is_dir() and not dst.is_symlink()) or tmp.is_dir():
            if _exchange(tmp, dst):
                _remove(tmp)  # now the old copy
                return
            old = temp_sibling(dst, "old")
            os.replace(dst, old)
            os.replace(tmp, dst)
            _remove(old)
            return
    os.replace(tmp, dst)
