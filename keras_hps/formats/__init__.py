"""Embedding-table files: HPS table directories and keras-hps HDF5 tables.

- HPS table (`hps_dir`): a directory holding `key` (raw little-endian int64, any order) and
  `emb_vector` (raw little-endian float32 rows, `[rows, dim]`, same order).
- keras-hps HDF5 table (`hdf5`): `/keys` int64 sorted unique, `/vectors` float32
  `[rows, dim]`, attrs `format="keras-hps-table"`, `format_version`, `dim`; optionally a
  header over an HPS directory's files (HDF5 external storage, `hdf5_storage`).

Readers memory-map and return a `Table` (`table`); writers stream in large blocks on a writer
thread (`io`, with `progress` bars) and write to a temporary name that is renamed into place,
so a crash never leaves half a table. `by_path` opens either kind by its path;
`config_tables` checks the tables a parameter-server config names. Every problem is a
`TableFormatError` naming the file and what is wrong. docs/table_formats.md has the details.
"""

from __future__ import annotations

from keras_hps.errors import TableFormatError
from keras_hps.formats.by_path import open_table, table_disk_bytes, table_header
from keras_hps.formats.config_tables import check_config_tables
from keras_hps.formats.hdf5 import (
    FORMAT_NAME,
    FORMAT_VERSION,
    is_hdf5_path,
    read_hdf5_table,
    write_hdf5_table,
    write_hdf5_table_over_hps,
)
from keras_hps.formats.hps_dir import (
    KEY_FILE,
    VECTOR_FILE,
    hps_dim_fits,
    read_hps_table,
    write_hps_table,
)
from keras_hps.formats.table import OnDuplicate, Table, gather_rows, release_pages

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KEY_FILE",
    "OnDuplicate",
    "VECTOR_FILE",
    "Table",
    "TableFormatError",
    "check_config_tables",
    "gather_rows",
    "hps_dim_fits",
    "is_hdf5_path",
    "open_table",
    "read_hdf5_table",
    "read_hps_table",
    "release_pages",
    "table_disk_bytes",
    "table_header",
    "write_hdf5_table",
    "write_hdf5_table_over_hps",
    "write_hps_table",
]
