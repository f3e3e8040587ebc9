"""HPS table directories: `key` (raw little-endian int64, any order) and `emb_vector` (raw
little-endian float32 rows, `[rows, dim]`, same order).

HPS writes no dim: it is the config's `embedding_vecsize_per_table`, or inferred from the two
file sizes. Readers memory-map both files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from keras_hps.errors import TableFormatError
from keras_hps.formats.io import (
    check_inputs,
    remove_leftovers,
    replace_with,
    row_blocks,
    temp_sibling,
    write_behind,
    write_order,
)
from keras_hps.formats.table import (
    OnDuplicate,
    RowView,
    Table,
    is_strictly_increasing,
    map_array,
    read_all,
    release_pages,
    sort_keys,
)

KEY_FILE = "key"
VECTOR_FILE = "emb_vector"


def hps_files(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(directory, key file, vector file) of the HPS table at `path`, else TableFormatError."""
    d = Path(path)
    if not d.exists():
        raise TableFormatError(f"{d}: HPS table directory not found")
    if not d.is_dir():
        raise TableFormatError(f"{d}: an HPS table must be a directory holding "
                               f"'{KEY_FILE}' and '{VECTOR_FILE}'")
    kf, vf = d / KEY_FILE, d / VECTOR_FILE
    for f in (kf, vf):
        if not f.is_file():
            raise TableFormatError(f"{d}: HPS table is missing its '{f.name}' file")
    return d, kf, vf


def hps_rows(kf: Path) -> int:
    """Rows of an HPS table, from the size of its key file."""
    size = kf.stat().st_size
    if size % 8:
        raise TableFormatError(f"{kf}: size {size} bytes is not a multiple of 8 (int64 keys)")
    return size // 8


def hps_dim_fits(path: str | os.PathLike, dim: int) -> str | None:
    """None when the HPS table at `path` has `dim`-wide rows, else the problem in words."""
    _, kf, vf = hps_files(path)
    rows = hps_rows(kf)
    size = vf.stat().st_size
    if size != rows * dim * 4:
        inferred = f" (dim {size // (rows * 4)})" if rows and size % (rows * 4) == 0 else ""
        return (f"is {dim} but {vf} holds {size} bytes, not {rows} keys x {dim} x 4 = "
                f"{rows * dim * 4}{inferred}")
    return None


def hps_disk_bytes(path: str | os.PathLike) -> int:
    """Bytes of an HPS table's two files."""
    _, kf, vf = hps_files(path)
    return kf.stat().st_size + vf.stat().st_size


def read_hps_table(path: str | os.PathLike, dim: int | None = None, *,
                   on_duplicate: OnDuplicate = "error", check_duplicates: bool = True) -> Table:
    """Open an HPS table directory (memory-mapped).

    `dim` is checked against the file sizes, or inferred from them when None. Duplicate keys
    raise TableFormatError, or keep the last occurrence with `on_duplicate="last"` (then keys
    come in sorted order). `check_duplicates=False` skips the check (it sorts the keys)."""
    d, kf, vf = hps_files(path)
    rows = hps_rows(kf)
    vsize = vf.stat().st_size
    if dim is None:
        if rows == 0:
            if vsize:
                raise TableFormatError(f"{vf}: {vsize} bytes of vectors but no keys")
            raise TableFormatError(f"{d}: empty table; its dim cannot be inferred, pass dim")
        if vsize % (rows * 4):
            raise TableFormatError(f"{vf}: size {vsize} bytes is not {rows} keys x dim x 4 "
                                   "for any whole dim")
        dim = vsize // (rows * 4)
    elif dim < 1:
        raise TableFormatError(f"{d}: dim must be >= 1, got {dim}")
    elif vsize != rows * dim * 4:
        raise TableFormatError(f"{vf}: size {vsize} bytes does not match {rows} keys x dim "
                               f"{dim} x 4 = {rows * dim * 4}")
    keys = map_array(kf, "<i8", (rows,))
    vectors = map_array(vf, "<f4", (rows, dim))
    if on_duplicate not in ("error", "last"):
        raise ValueError(f"on_duplicate must be 'error' or 'last', got {on_duplicate!r}")
    if not check_duplicates or not rows:
        return Table(str(d), "hps", keys, vectors, dim)
    k = read_all(keys)
    if is_strictly_increasing(k):
        return Table(str(d), "hps", keys, vectors, dim, sorted_unique=True,
                     sorted_index=(k, None))
    order, sk, dup = sort_keys(k)
    release_pages(keys)
    if not dup.any():
        return Table(str(d), "hps", keys, vectors, dim, sorted_index=(sk, order))
    if on_duplicate == "error":
        raise TableFormatError(
            f"{kf}: duplicate key {int(sk[1:][dup][0])} ({int(dup.sum())} repeats);"
            " pass on_duplicate='last' to keep the last occurrence")
    last = np.append(~dup, True)  # last occurrence of each run (stable sort)
    sk, order = sk[last], order[last]
    return Table(str(d), "hps", sk, RowView(vectors, order), dim,
                 sorted_unique=True, sorted_index=(sk, None))


def write_hps_table(path: str | os.PathLike, keys: Any, vectors: Any, *,
                    on_duplicate: OnDuplicate = "error", overwrite: bool = True,
                    progress: bool = False) -> Path:
    """Write an HPS table directory (`key`, `emb_vector`) atomically, in the given row order.

    `vectors` may be any `[rows, dim]` array-like (NumPy, memmap, h5py dataset); it is read in
    large blocks. Duplicate keys raise TableFormatError, or keep the last with
    `on_duplicate="last"`. Returns the directory's path."""
    dst = Path(path)
    k, v, dim = check_inputs(dst, keys, vectors)
    order = write_order(k, dst, on_duplicate, want_sorted=False)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dst.parent, dst.name)
    tmp = temp_sibling(dst)
    tmp.mkdir()
    try:
        with open(tmp / KEY_FILE, "wb") as fk, open(tmp / VECTOR_FILE, "wb") as fv:
            def write(_: int, kb: np.ndarray, vb: np.ndarray) -> None:
                fk.write(memoryview(kb).cast("B"))
                fv.write(memoryview(vb).cast("B"))

            write_behind(row_blocks(k, v, order, dim, progress, f"write {dst.name}"), write)
        replace_with(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
