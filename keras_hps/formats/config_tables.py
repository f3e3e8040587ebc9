"""The tables a parameter-server config names, checked against it.

`keras_hps.config` reads and validates `hps.json` without opening a file it names; this is
the one place that opens those table files to compare them with the config, before a
parameter server or `keras-hps plan` uses them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from keras_hps.errors import TableFormatError
from keras_hps.formats.by_path import table_header
from keras_hps.formats.hps_dir import hps_dim_fits

if TYPE_CHECKING:
    from keras_hps.config import PSConfig


def check_config_tables(config: PSConfig) -> dict[tuple[str, int], int]:
    """Rows of every table `config` names, by (model, table id), after checking that each
    file exists, is a readable table, and has the config's `embedding_vecsize_per_table`.

    Reads headers and file sizes only. Raises ConfigError naming the key (e.g.
    `models[0].sparse_files[1]`) and the config file."""
    rows: dict[tuple[str, int], int] = {}
    for i, m in enumerate(config.models):
        for t, path in enumerate(m.sparse_files):
            key = f"models[{i}].sparse_files[{t}]"
            if not os.path.exists(path):
                raise config.error(key, f"table not found: {path}")
            try:
                nrows, fdim = table_header(path)
                want = m.embedding_vecsize_per_table[t]
                if fdim is None:
                    problem = hps_dim_fits(path, want)
                elif fdim != want:
                    problem = f"is {want} but the table {path} has dim {fdim}"
                else:
                    problem = None
            except TableFormatError as e:
                raise config.error(key, str(e)) from e
            if problem:
                raise config.error(f"models[{i}].embedding_vecsize_per_table[{t}]", problem)
            rows[(m.model, t)] = nrows
    return rows
