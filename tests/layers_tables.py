"""Helpers for the layer tests: random tables written to real files, and an hps.json for them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def random_table(
    rng: np.random.Generator, vocab: int, dim: int, drop: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A dense `[vocab, dim]` table, plus the stored (keys, vectors) with `drop` rows left out."""
    dense = rng.normal(size=(vocab, dim)).astype(np.float32)
    absent = rng.choice(vocab, size=drop, replace=False)
    keys = np.setdiff1d(np.arange(vocab, dtype=np.int64), absent)
    keys = rng.permutation(keys)  # files need not be sorted
    return dense, keys, dense[keys]


def write_config(
    folder: Path,
    model: str,
    tables: list[tuple[np.ndarray, np.ndarray]],
    defaults: list[float],
    queries: list[int],
    max_batch_size: int = 256,
    gpucache: bool = False,
) -> Path:
    """Write each (keys, vectors) table (even ids as HPS directories, odd ids as HDF5) and an
    hps.json naming them; returns the config path. `gpucache` turns the GPU tier on where
    CUDA is available."""
    from keras_hps import formats

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (keys, vectors) in enumerate(tables):
        if i % 2 == 0:
            path = folder / f"{model}_table{i}"
            formats.write_hps_table(path, keys, vectors)
        else:
            path = folder / f"{model}_table{i}.h5"
            formats.write_hdf5_table(path, keys, vectors)
        files.append(path.name)
    config = {
        "supportlonglong": True,
        "models": [
            {
                "model": model,
                "sparse_files": files,
                "embedding_table_names": [f"{model}_t{i}" for i in range(len(tables))],
                "embedding_vecsize_per_table": [int(v.shape[1]) for _, v in tables],
                "maxnum_catfeature_query_per_table_per_sample": queries,
                "default_value_for_each_table": defaults,
                "deployed_device_list": [0],
                "max_batch_size": max_batch_size,
                "gpucache": gpucache,
            }
        ],
    }
    path = folder / "hps.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def with_defaults(dense: np.ndarray, keys: np.ndarray, default: float) -> np.ndarray:
    """The table as the parameter server answers it: rows not in `keys` hold `default`."""
    out = np.full_like(dense, default)
    out[keys] = dense[keys]
    return out
