"""keras-hps HDF5 tables: `/keys` int64 sorted unique, `/vectors` float32 `[rows, dim]`,
attrs `format="keras-hps-table"`, `format_version`, `dim`.

`/vectors` is chunked in row blocks with storage allocated up front, so the rows lie in file
order and readers memory-map them. A variant written by `write_hdf5_table_over_hps` keeps
/keys and /vectors contiguous in an HPS directory's `key` and `emb_vector` files (HDF5 external
storage, paths relative to the .h5 file's folder), so one copy of the bytes serves both
formats.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from keras_hps.errors import TableFormatError
from keras_hps.formats import hdf5_storage
from keras_hps.formats.hps_dir import KEY_FILE, VECTOR_FILE, read_hps_table
from keras_hps.formats.io import (
    check_inputs,
    pwrite_all,
    remove_leftovers,
    replace_with,
    row_blocks,
    temp_sibling,
    write_behind,
    write_order,
)
from keras_hps.formats.table import OnDuplicate, Table, is_strictly_increasing, read_all

FORMAT_NAME = "keras-hps-table"
FORMAT_VERSION = 1
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
#: Bytes per HDF5 chunk of /vectors (a row read through h5py reads one chunk).
CHUNK_BYTES = 64 * 1024


def is_hdf5_path(path: str | os.PathLike) -> bool:
    """True when `path` names an HDF5 table (by suffix, or an existing HDF5 file)."""
    p = Path(path)
    if p.suffix.lower() in HDF5_SUFFIXES:
        return True
    if p.is_file():
        with open(p, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    return False


def read_hdf5_table(path: str | os.PathLike, *, verify: bool = True) -> Table:
    """Open a keras-hps HDF5 table. Its arrays are memory maps when the file's storage allows
    (tables written by keras-hps always do), else h5py datasets. `verify` checks that the
    keys are sorted and unique (one pass over them)."""
    import h5py

    p = Path(path)
    if not p.is_file():
        raise TableFormatError(f"{p}: HDF5 table not found")
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise TableFormatError(f"{p}: not an HDF5 file ({e})") from e
    try:
        fmt = f.attrs.get("format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode()
        if fmt != FORMAT_NAME:
            raise TableFormatError(f"{p}: not a keras-hps table (attribute format={fmt!r}, "
                                   f"expected {FORMAT_NAME!r})")
        version = int(f.attrs.get("format_version", -1))
        if not 1 <= version <= FORMAT_VERSION:
            raise TableFormatError(f"{p}: format_version {version} is not supported "
                                   f"(this keras-hps reads 1..{FORMAT_VERSION})")
        for name in ("keys", "vectors"):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise TableFormatError(f"{p}: keras-hps table has no /{name} dataset")
        kd, vd = f["keys"], f["vectors"]
        if kd.ndim != 1 or kd.dtype.kind != "i" or kd.dtype.itemsize != 8:
            raise TableFormatError(f"{p}: /keys must be 1-D int64, got {kd.dtype} {kd.shape}")
        if vd.ndim != 2 or vd.dtype.kind != "f" or vd.dtype.itemsize != 4:
            raise TableFormatError(f"{p}: /vectors must be 2-D float32, got {vd.dtype} {vd.shape}")
        dim = int(f.attrs.get("dim", -1))
        if dim != vd.shape[1]:
            raise TableFormatError(f"{p}: attribute dim={dim} but /vectors is {vd.shape}")
        if kd.shape[0] != vd.shape[0]:
            raise TableFormatError(f"{p}: {kd.shape[0]} keys but {vd.shape[0]} vector rows")
        keys = hdf5_storage.dataset_view(kd, str(p))
        vectors = hdf5_storage.dataset_view(vd, str(p))
        keys = kd if keys is None else keys
        vectors = vd if vectors is None else vectors
        index = None
        if verify and keys.shape[0]:
            k = read_all(keys)
            if not is_strictly_increasing(k):
                dup = np.flatnonzero(k[1:] == k[:-1])
                what = (f"duplicate key {int(k[dup[0]])}" if len(dup)
                        else "keys are not sorted")
                raise TableFormatError(f"{p}: /keys must be sorted and unique: {what}")
            index = (k, None)
        return Table(str(p), "hdf5", keys, vectors, dim, closer=f.close, sorted_unique=True,
                     sorted_index=index)
    except BaseException:
        f.close()
        raise


def _write_header(f: Any, dim: int) -> None:
    f.attrs["format"] = FORMAT_NAME
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["dim"] = dim


def write_hdf5_table(path: str | os.PathLike, keys: Any, vectors: Any, *,
                     on_duplicate: OnDuplicate = "error", overwrite: bool = True,
                     progress: bool = False, chunk_rows: int | None = None) -> Path:
    """Write a keras-hps HDF5 table atomically: rows sorted by key, streamed in large blocks.

    Duplicate keys raise TableFormatError, or keep the last with `on_duplicate="last"`.
    `chunk_rows` sets the HDF5 chunk height of /vectors (default: 64 KiB chunks)."""
    import h5py

    dst = Path(path)
    k, v, dim = check_inputs(dst, keys, vectors)
    order = write_order(k, dst, on_duplicate, want_sorted=True)
    n = len(k) if order is None else len(order)
    crow = chunk_rows or max(1, CHUNK_BYTES // (4 * dim))
    crow = max(1, min(crow, max(n, 1)))
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dst.parent, dst.name)
    tmp = temp_sibling(dst)
    blocks = row_blocks(k, v, order, dim, progress, f"write {dst.name}")
    try:
        with h5py.File(tmp, "w", libver=("v110", "v110")) as f:
            _write_header(f, dim)
            f.create_dataset("keys", data=k if order is None else k[order], dtype="<i8")
            if n:
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # chunks in file order
                vd = f.create_dataset("vectors", shape=(n, dim), dtype="<f4",
                                      chunks=(crow, dim), fill_time="never", dcpl=dcpl)
                offset = hdf5_storage.linear_chunks_offset(vd)
                if offset is None:  # unusual storage: let HDF5 place every chunk
                    for start, _, vb in blocks:
                        vd.write_direct(vb, dest_sel=np.s_[start:start + len(vb)])
                        del vb  # before the next block is gathered
            else:  # HDF5 has no chunks for an empty dataset
                f.create_dataset("vectors", shape=(0, dim), dtype="<f4")
                offset = None
        if offset is not None:
            # The chunks are one run of bytes in row order (allocated up front, unfiltered):
            # write the rows straight into it, at the speed of a plain file write.
            fd = os.open(tmp, os.O_WRONLY)
            try:
                write_behind(blocks, lambda start, _, vb: pwrite_all(
                    fd, memoryview(vb).cast("B"), offset + start * dim * 4))
            finally:
                os.close(fd)
        replace_with(tmp, dst, overwrite)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        blocks.close()
    return dst


def write_hdf5_table_over_hps(path: str | os.PathLike, hps_dir: str | os.PathLike, *,
                              dim: int | None = None, overwrite: bool = True) -> Path:
    """Write a keras-hps HDF5 table whose data is an existing HPS table's files, atomically.

    /keys and /vectors are contiguous datasets in HDF5 external storage: the `key` and
    `emb_vector` files of `hps_dir`, named relative to the .h5 file's folder (HDF5's efile
    prefix "${ORIGIN}"; keras-hps readers resolve them so, plain h5py needs
    `HDF5_EXTFILE_PREFIX='${ORIGIN}'`). Only the header is written: the table's bytes exist
    once, and the .h5 file is valid only next to that directory. The HPS keys must be sorted
    and unique (the HDF5 table's order); otherwise TableFormatError (use `write_hdf5_table`).
    `dim` is checked, or inferred from the file sizes (pass it for an empty table)."""
    import h5py

    dst = Path(path)
    with read_hps_table(hps_dir, dim, check_duplicates=False) as hps:
        rows, dim = hps.num_rows, hps.dim
        if rows and not is_strictly_increasing(read_all(hps.keys)):
            raise TableFormatError(
                f"{hps.path}: keys are not sorted and unique, so its files cannot hold the HDF5 "
                f"table {dst} (which stores rows in key order); write it with write_hdf5_table")
    kf, vf = Path(hps_dir) / KEY_FILE, Path(hps_dir) / VECTOR_FILE
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dst.parent, dst.name)
    tmp = temp_sibling(dst)
    try:
        with h5py.File(tmp, "w", libver=("v110", "v110")) as f:
            _write_header(f, dim)
            for name, raw, shape, dtype in (("keys", kf, (rows,), "<i8"),
                                            ("vectors", vf, (rows, dim), "<f4")):
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                if nbytes == 0:  # HDF5 has no external storage of zero bytes
                    f.create_dataset(name, shape=shape, dtype=dtype)
                    continue
                rel = os.path.relpath(os.path.abspath(raw), os.path.abspath(dst.parent))
                f.create_dataset(name, shape=shape, dtype=dtype, fill_time="never",
                                 external=[(rel, 0, nbytes)])
        replace_with(tmp, dst, overwrite)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


def hdf5_disk_bytes(path: str | os.PathLike) -> int:
    """Bytes an HDF5 table occupies on disk: the file plus the external data files its
    datasets are stored in."""
    return os.path.getsize(path) + hdf5_storage.external_bytes(path)
