"""Where an HDF5 dataset's bytes lie: memory maps over the file's storage.

Shared by the keras-hps HDF5 reader (memory-mapped `/keys` and `/vectors`), its writer (which
writes rows straight into the file when the chunks are one run of bytes) and the disk-size
count of tables kept in HDF5 external storage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from keras_hps.errors import TableFormatError
from keras_hps.formats.table import map_array


def dataset_view(dset: Any, path: str) -> np.ndarray | None:
    """A read-only memory map of an unfiltered dataset's data, or None if it cannot be had
    (filters, missing chunks, chunks not laid out in order)."""
    import h5py

    shape = tuple(dset.shape)
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dset.dtype)
    if dset.external:
        return external_view(dset, path)
    dcpl = dset.id.get_create_plist()
    if dcpl.get_nfilters() > 0:
        return None
    layout = dcpl.get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        off = dset.id.get_offset()
        return None if off is None else np.memmap(path, dtype=dset.dtype, mode="r",
                                                  shape=shape, offset=off)
    if layout != h5py.h5d.CHUNKED:
        return None
    off = linear_chunks_offset(dset)
    if off is None:
        return None
    rows = -(-shape[0] // dset.chunks[0]) * dset.chunks[0]
    full = np.memmap(path, dtype=dset.dtype, mode="r", offset=off, shape=(rows, *shape[1:]))
    return full[: shape[0]]


def external_file(name: str | bytes, h5_path: str) -> Path:
    """An external storage file name resolved as HDF5 does with efile prefix "${ORIGIN}":
    relative names against the folder of the .h5 file (not the current directory)."""
    name = os.fsdecode(name)
    return Path(name) if os.path.isabs(name) else Path(h5_path).parent / name


def external_view(dset: Any, path: str) -> np.ndarray:
    """A read-only memory map of a dataset kept in one external raw file."""
    segments = dset.external
    shape = tuple(dset.shape)
    nbytes = int(np.prod(shape)) * dset.dtype.itemsize
    if len(segments) != 1:
        raise TableFormatError(f"{path}: /{dset.name.lstrip('/')} is stored in "
                               f"{len(segments)} external files; keras-hps reads one")
    name, offset, _ = segments[0]
    raw = external_file(name, path)
    if not raw.is_file():
        raise TableFormatError(f"{path}: /{dset.name.lstrip('/')} is stored in {raw}, which "
                               "does not exist (keep the .h5 file next to its data files)")
    size = raw.stat().st_size
    if size < offset + nbytes:
        raise TableFormatError(f"{path}: /{dset.name.lstrip('/')} needs {nbytes} bytes at "
                               f"offset {offset} of {raw}, which holds {size}")
    return map_array(raw, dset.dtype.str, shape, offset)


def linear_chunks_offset(dset: Any) -> int | None:
    """File offset of a chunked dataset's data when its chunks span whole rows, are all
    allocated, unfiltered and laid out back to back in row order (then the data is one run
    of bytes, like a contiguous dataset); else None."""
    shape, chunks = tuple(dset.shape), dset.chunks
    if chunks is None or any(c != s for c, s in zip(chunks[1:], shape[1:], strict=True)):
        return None
    chunk_bytes = int(np.prod(chunks)) * dset.dtype.itemsize
    infos: list[tuple[int, int, int]] = []
    dset.id.chunk_iter(lambda i: infos.append((i.chunk_offset[0], i.byte_offset, i.size)))
    nchunks = -(-shape[0] // chunks[0])
    if len(infos) != nchunks or nchunks == 0:
        return None
    infos.sort()
    rows0 = np.array([i[0] for i in infos])
    offs = np.array([i[1] for i in infos])
    sizes = np.array([i[2] for i in infos])
    if (not np.array_equal(rows0, np.arange(nchunks) * chunks[0]) or np.any(sizes != chunk_bytes)
            or not np.array_equal(offs - offs[0], np.arange(nchunks) * chunk_bytes)):
        return None
    return int(offs[0])


def external_bytes(path: str | os.PathLike) -> int:
    """Bytes of the external data files that the /keys and /vectors datasets of the HDF5
    file at `path` are stored in (0 for self-contained files)."""
    import h5py

    total = 0
    with h5py.File(path, "r") as f:
        for name in ("keys", "vectors"):
            dset = f.get(name)
            for _, _, size in (dset.external or []) if isinstance(dset, h5py.Dataset) else []:
                total += int(size)
    return total
