"""Either kind of table, chosen by its path: a `.h5`/`.hdf5`/`.hdf` name (or an existing
HDF5 file) is a keras-hps HDF5 table, anything else an HPS table directory."""

from __future__ import annotations

import os

from keras_hps.errors import TableFormatError
from keras_hps.formats.hdf5 import hdf5_disk_bytes, is_hdf5_path, read_hdf5_table
from keras_hps.formats.hps_dir import hps_disk_bytes, hps_files, hps_rows, read_hps_table
from keras_hps.formats.table import OnDuplicate, Table


def open_table(path: str | os.PathLike, dim: int | None = None, *,
               on_duplicate: OnDuplicate = "error") -> Table:
    """Open either kind of table: an HDF5 file or an HPS directory (`dim` checked/inferred)."""
    if is_hdf5_path(path):
        t = read_hdf5_table(path)
        if dim is not None and dim != t.dim:
            t.close()
            raise TableFormatError(f"{path}: table has dim {t.dim}, expected {dim}")
        return t
    return read_hps_table(path, dim, on_duplicate=on_duplicate)


def table_header(path: str | os.PathLike) -> tuple[int, int | None]:
    """(rows, dim) from a table's header without reading it; dim is None for HPS tables."""
    if is_hdf5_path(path):
        with read_hdf5_table(path, verify=False) as t:
            return t.num_rows, t.dim
    _, kf, _ = hps_files(path)
    return hps_rows(kf), None


def table_disk_bytes(path: str | os.PathLike) -> int:
    """Bytes a table occupies on disk: an HPS directory's two files, or an HDF5 file plus the
    external data files its datasets are stored in."""
    return hdf5_disk_bytes(path) if is_hdf5_path(path) else hps_disk_bytes(path)
