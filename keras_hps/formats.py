"""Embedding-table files: HPS table directories and keras-hps HDF5 tables.

- HPS table: a directory holding `key` (raw little-endian int64, any order) and `emb_vector`
  (raw little-endian float32 rows, `[rows, dim]`, same order). HPS writes no dim; it is the
  config's `embedding_vecsize_per_table`, or inferred from the two file sizes.
- keras-hps HDF5 table: `/keys` int64 sorted unique, `/vectors` float32 `[rows, dim]` (chunked
  in row blocks, storage allocated up front so the rows lie in file order), attrs
  `format="keras-hps-table"`, `format_version`, `dim`. A variant written by
  `write_hdf5_table_over_hps` keeps /keys and /vectors contiguous in an HPS directory's `key`
  and `emb_vector` files (HDF5 external storage, paths relative to the .h5 file's folder), so
  one copy of the bytes serves both formats.

Readers memory-map; writers stream in large blocks and write to a temporary name that is
renamed into place, so a crash never leaves half a table. Every problem is a
`TableFormatError` naming the file and what is wrong. docs/table_formats.md has the details.
"""

from __future__ import annotations

import mmap
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from keras_hps.errors import TableFormatError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Table",
    "TableFormatError",
    "hps_dim_fits",
    "is_hdf5_path",
    "open_table",
    "read_hdf5_table",
    "read_hps_table",
    "table_header",
    "table_disk_bytes",
    "write_hdf5_table",
    "write_hdf5_table_over_hps",
    "write_hps_table",
]

FORMAT_NAME = "keras-hps-table"
FORMAT_VERSION = 1
KEY_FILE = "key"
VECTOR_FILE = "emb_vector"
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
#: Bytes per block that writers and converters move at once.
BLOCK_BYTES = 64 * 1024 * 1024
#: Bytes per block when rows are gathered out of file order (each block is one sweep over the
#: source file), and bytes of the source file mapped at once during such a sweep.
PERMUTED_BLOCK_BYTES = 512 * 1024 * 1024
SWEEP_BYTES = 128 * 1024 * 1024
#: Bytes per HDF5 chunk of /vectors (a row read through h5py reads one chunk).
CHUNK_BYTES = 64 * 1024

OnDuplicate = Literal["error", "last"]


def is_hdf5_path(path: str | os.PathLike) -> bool:
    """True when `path` names an HDF5 table (by suffix, or an existing HDF5 file)."""
    p = Path(path)
    if p.suffix.lower() in HDF5_SUFFIXES:
        return True
    if p.is_file():
        with open(p, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    return False


# ----------------------------------------------------------------------------------------------
# the Table type


class Table:
    """An opened table: `keys` (int64, `[rows]`) and `vectors` (float32, `[rows, dim]`) are
    array-likes (memory-mapped where possible); `dim`, `num_rows`, `path`, `kind`
    ("hps" or "hdf5"). Close it (or use `with`) to release the file."""

    def __init__(self, path: str, kind: str, keys: Any, vectors: Any, dim: int,
                 *, sorted_unique: bool = False, closer: Callable[[], None] | None = None,
                 sorted_index: tuple[np.ndarray, np.ndarray | None] | None = None) -> None:
        self.path = path
        self.kind = kind
        self.keys = keys
        self.vectors = vectors
        self.dim = int(dim)
        self.num_rows = int(keys.shape[0])
        self._sorted_unique = sorted_unique
        self._closer = closer
        self._sorted_index = sorted_index

    def __repr__(self) -> str:
        return f"Table({self.path!r}, kind={self.kind!r}, rows={self.num_rows}, dim={self.dim})"

    def __enter__(self) -> Table:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the underlying file (array-likes obtained earlier may stop working)."""
        if self._closer is not None:
            self._closer()
            self._closer = None

    @property
    def nbytes(self) -> int:
        """Bytes of keys and vectors."""
        return self.num_rows * (8 + 4 * self.dim)

    def sorted_index(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(sorted keys, row of each) in memory; rows is None when the file is already sorted."""
        if self._sorted_index is None:
            keys = _read_all(self.keys)
            if self._sorted_unique or _is_strictly_increasing(keys):
                self._sorted_index = (keys, None)
            else:
                order, skeys, dup = _sort_keys(keys)
                if dup.any():
                    raise TableFormatError(
                        f"{self.path}: duplicate key {int(skeys[1:][dup][0])}")
                self._sorted_index = (skeys, order)
        return self._sorted_index

    def in_key_order(self) -> tuple[np.ndarray, Any]:
        """(sorted keys, vectors in the same order): a lazy view, rows are read on access."""
        keys, rows = self.sorted_index()
        return keys, (self.vectors if rows is None else _RowView(self.vectors, rows))

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 `[len(rows), dim]`: the vectors at row indices `rows` (any order)."""
        return gather_rows(self.vectors, rows, self.dim)

    def iter_blocks(self, block_rows: int | None = None, order: np.ndarray | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys, vectors) in blocks of `block_rows`, in file order or in `order` (row indices)."""
        block_rows = block_rows or _block_rows(self.dim)
        keys_all = None if order is None else _read_all(self.keys)
        n = self.num_rows
        for start in range(0, n, block_rows):
            stop = min(n, start + block_rows)
            if order is None:
                k = np.asarray(self.keys[start:stop], dtype=np.int64)
                v = np.asarray(self.vectors[start:stop], dtype=np.float32)
            else:
                idx = order[start:stop]
                k = keys_all[idx]
                v = gather_rows(self.vectors, idx, self.dim)
            release_pages(self.vectors)
            yield k, v


class _RowView:
    """Rows `rows` of `base`: a read-only array-like used for de-duplicated tables."""

    def __init__(self, base: Any, rows: np.ndarray) -> None:
        self.base = base
        self.rows = rows
        self.shape = (len(rows), *base.shape[1:])
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item: Any) -> np.ndarray:
        return gather_rows(self.base, self.rows[item], self.shape[1])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def _block_rows(dim: int) -> int:
    return max(1, BLOCK_BYTES // (4 * max(1, dim) + 8))


def _read_all(keys: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(keys[:] if not isinstance(keys, np.ndarray) else keys,
                                           dtype=np.int64))


def _sort_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, keys[order], repeat mask of keys[order][1:]). Among equal keys the order is the
    file order (a stable sort, done only when keys repeat: the default sort is faster)."""
    order = np.argsort(keys)
    sk = keys[order]
    dup = sk[1:] == sk[:-1]
    if dup.any():
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        dup = sk[1:] == sk[:-1]
    return order, sk, dup


def _is_strictly_increasing(keys: np.ndarray) -> bool:
    step = 1 << 22
    for s in range(0, max(0, len(keys) - 1), step):
        a = keys[s:s + step + 1]
        if not np.all(a[1:] > a[:-1]):
            return False
    return True


def release_pages(arr: Any) -> None:
    """Let the kernel drop a memory-mapped array's resident pages (they stay in the page
    cache); keeps the resident memory of a pass over a large table flat."""
    if isinstance(arr, _RowView):
        arr = arr.base
    mm = getattr(arr, "_mmap", None)
    if isinstance(mm, mmap.mmap) and hasattr(mm, "madvise"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def gather_rows(vectors: Any, rows: np.ndarray, dim: int) -> np.ndarray:
    """float32 `[len(rows), dim]` gathered from any supported array-like."""
    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(vectors, np.ndarray):  # includes np.memmap
        out = np.take(vectors, rows, axis=0)
        return out if out.dtype == np.float32 else out.astype(np.float32)
    if isinstance(vectors, _RowView):
        return gather_rows(vectors.base, vectors.rows[rows], dim)
    # h5py dataset (filtered or irregular storage): increasing unique reads, then reorder
    if len(rows) == 0:
        return np.empty((0, dim), np.float32)
    uniq, inv = np.unique(rows, return_inverse=True)
    block = np.asarray(vectors[uniq], dtype=np.float32)
    return block[inv]


# ----------------------------------------------------------------------------------------------
# HPS table directories


def _hps_files(path: str | os.PathLike) -> tuple[Path, Path, Path]:
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


def _hps_rows(kf: Path) -> int:
    size = kf.stat().st_size
    if size % 8:
        raise TableFormatError(f"{kf}: size {size} bytes is not a multiple of 8 (int64 keys)")
    return size // 8


def hps_dim_fits(path: str | os.PathLike, dim: int) -> str | None:
    """None when the HPS table at `path` has `dim`-wide rows, else the problem in words."""
    _, kf, vf = _hps_files(path)
    rows = _hps_rows(kf)
    size = vf.stat().st_size
    if size != rows * dim * 4:
        inferred = f" (dim {size // (rows * 4)})" if rows and size % (rows * 4) == 0 else ""
        return (f"is {dim} but {vf} holds {size} bytes, not {rows} keys x {dim} x 4 = "
                f"{rows * dim * 4}{inferred}")
    return None


def table_header(path: str | os.PathLike) -> tuple[int, int | None]:
    """(rows, dim) from a table's header without reading it; dim is None for HPS tables."""
    if is_hdf5_path(path):
        with read_hdf5_table(path, verify=False) as t:
            return t.num_rows, t.dim
    _, kf, _ = _hps_files(path)
    return _hps_rows(kf), None


def _memmap(path: Path, dtype: str, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset)


def read_hps_table(path: str | os.PathLike, dim: int | None = None, *,
                   on_duplicate: OnDuplicate = "error", check_duplicates: bool = True) -> Table:
    """Open an HPS table directory (memory-mapped).

    `dim` is checked against the file sizes, or inferred from them when None. Duplicate keys
    raise TableFormatError, or keep the last occurrence with `on_duplicate="last"` (then keys
    come in sorted order). `check_duplicates=False` skips the check (it sorts the keys)."""
    d, kf, vf = _hps_files(path)
    rows = _hps_rows(kf)
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
    keys = _memmap(kf, "<i8", (rows,))
    vectors = _memmap(vf, "<f4", (rows, dim))
    table = Table(str(d), "hps", keys, vectors, dim)
    if on_duplicate not in ("error", "last"):
        raise ValueError(f"on_duplicate must be 'error' or 'last', got {on_duplicate!r}")
    if check_duplicates and rows:
        k = _read_all(keys)
        if _is_strictly_increasing(k):
            table._sorted_unique = True
            table._sorted_index = (k, None)
        else:
            order, sk, dup = _sort_keys(k)
            release_pages(keys)
            if dup.any():
                if on_duplicate == "error":
                    raise TableFormatError(
                        f"{kf}: duplicate key {int(sk[1:][dup][0])} ({int(dup.sum())} repeats);"
                        " pass on_duplicate='last' to keep the last occurrence")
                last = np.append(~dup, True)  # last occurrence of each run (stable sort)
                sk, order = sk[last], order[last]
                table = Table(str(d), "hps", sk, _RowView(vectors, order), dim,
                              sorted_unique=True, sorted_index=(sk, None))
            else:
                table._sorted_index = (sk, order)
    return table


def _unique_last(keys: np.ndarray, path: Any, on_duplicate: str,
                 want_sorted: bool) -> np.ndarray | None:
    """Row order to write: None (as given) or indices that sort and/or drop duplicates."""
    if on_duplicate not in ("error", "last"):
        raise ValueError(f"on_duplicate must be 'error' or 'last', got {on_duplicate!r}")
    if len(keys) == 0 or _is_strictly_increasing(keys):
        return None
    order, sk, dup = _sort_keys(keys)
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


def _check_inputs(path: Any, keys: Any, vectors: Any) -> tuple[np.ndarray, Any, int]:
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


def _mapped_base(v: Any, order: np.ndarray | None) -> tuple[Any, np.ndarray | None]:
    """(memory map, row order into it) when blocks of `v` gather rows of a memory map out of
    order, else (None, None)."""
    if isinstance(v, _RowView):
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

    def work(part: list[tuple[int, int]]) -> None:
        for lo, hi in part:
            out[order[lo:hi]] = np.take(base, srows[lo:hi], axis=0)
            start = (first + int(srows[lo]) * row_bytes) // page * page
            stop = min(len(mm), first + (int(srows[hi - 1]) + 1) * row_bytes)
            try:
                mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
            except (OSError, ValueError):
                pass

    work(ranges)
    return out


def _blocks(k: np.ndarray, v: Any, order: np.ndarray | None, dim: int, progress: Any,
            desc: str) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(start, keys, vectors) blocks of the rows to write, in `order` when given. Resident
    memory stays near one block whatever the table's size."""
    n = len(k) if order is None else len(order)
    base, rows = _mapped_base(v, order)
    step = _block_rows(dim) if base is None else max(1, PERMUTED_BLOCK_BYTES // (4 * dim + 8))
    bar = _progress(progress, n, desc)
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


def _write_behind(blocks: Iterator[tuple[int, np.ndarray, np.ndarray]],
                  write: Callable[[int, np.ndarray, np.ndarray], None]) -> None:
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


def _progress(progress: Any, total: int, desc: str) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", unit_scale=True, dynamic_ncols=True)


def _tmp_sibling(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _replace(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Move `tmp` to `dst`; an existing `dst` (file or directory) is replaced."""
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{dst} exists (pass overwrite=True)")
        if dst.is_dir() and not dst.is_symlink():
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
            return
    os.replace(tmp, dst)


def write_hps_table(path: str | os.PathLike, keys: Any, vectors: Any, *,
                    on_duplicate: OnDuplicate = "error", overwrite: bool = True,
                    progress: bool = False) -> Path:
    """Write an HPS table directory (`key`, `emb_vector`) atomically, in the given row order.

    `vectors` may be any `[rows, dim]` array-like (NumPy, memmap, h5py dataset); it is read in
    large blocks. Duplicate keys raise TableFormatError, or keep the last with
    `on_duplicate="last"`. Returns the directory's path."""
    dst = Path(path)
    k, v, dim = _check_inputs(dst, keys, vectors)
    order = _unique_last(k, dst, on_duplicate, want_sorted=False)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(dst)
    tmp.mkdir()
    try:
        with open(tmp / KEY_FILE, "wb") as fk, open(tmp / VECTOR_FILE, "wb") as fv:
            def write(_: int, kb: np.ndarray, vb: np.ndarray) -> None:
                fk.write(memoryview(kb).cast("B"))
                fv.write(memoryview(vb).cast("B"))

            _write_behind(_blocks(k, v, order, dim, progress, f"write {dst.name}"), write)
        _replace(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# ----------------------------------------------------------------------------------------------
# keras-hps HDF5 tables


def _dataset_view(dset: Any, path: str) -> np.ndarray | None:
    """A read-only memory map of an unfiltered dataset's data, or None if it cannot be had
    (filters, missing chunks, chunks not laid out in order)."""
    import h5py

    shape = tuple(dset.shape)
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dset.dtype)
    if dset.external:
        return _external_view(dset, path)
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
    off = _linear_chunks_offset(dset)
    if off is None:
        return None
    rows = -(-shape[0] // dset.chunks[0]) * dset.chunks[0]
    full = np.memmap(path, dtype=dset.dtype, mode="r", offset=off, shape=(rows, *shape[1:]))
    return full[: shape[0]]


def _external_file(name: str | bytes, h5_path: str) -> Path:
    """An external storage file name resolved as HDF5 does with efile prefix "${ORIGIN}":
    relative names against the folder of the .h5 file (not the current directory)."""
    name = os.fsdecode(name)
    return Path(name) if os.path.isabs(name) else Path(h5_path).parent / name


def _external_view(dset: Any, path: str) -> np.ndarray:
    """A read-only memory map of a dataset kept in one external raw file."""
    segments = dset.external
    shape = tuple(dset.shape)
    nbytes = int(np.prod(shape)) * dset.dtype.itemsize
    if len(segments) != 1:
        raise TableFormatError(f"{path}: /{dset.name.lstrip('/')} is stored in "
                               f"{len(segments)} external files; keras-hps reads one")
    name, offset, _ = segments[0]
    raw = _external_file(name, path)
    if not raw.is_file():
        raise TableFormatError(f"{path}: /{dset.name.lstrip('/')} is stored in {raw}, which "
                               "does not exist (keep the .h5 file next to its data files)")
    size = raw.stat().st_size
    if size < offset + nbytes:
        raise TableFormatError(f"{path}: /{dset.name.lstrip('/')} needs {nbytes} bytes at "
                               f"offset {offset} of {raw}, which holds {size}")
    return _memmap(raw, dset.dtype.str, shape, offset)


def _linear_chunks_offset(dset: Any) -> int | None:
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
        keys = _dataset_view(kd, str(p))
        vectors = _dataset_view(vd, str(p))
        keys = kd if keys is None else keys
        vectors = vd if vectors is None else vectors
        table = Table(str(p), "hdf5", keys, vectors, dim, closer=f.close)
        if verify and table.num_rows:
            k = _read_all(keys)
            if not _is_strictly_increasing(k):
                dup = np.flatnonzero(k[1:] == k[:-1])
                what = (f"duplicate key {int(k[dup[0]])}" if len(dup)
                        else "keys are not sorted")
                raise TableFormatError(f"{p}: /keys must be sorted and unique: {what}")
            table._sorted_index = (k, None)
        table._sorted_unique = True
        return table
    except BaseException:
        f.close()
        raise


def write_hdf5_table(path: str | os.PathLike, keys: Any, vectors: Any, *,
                     on_duplicate: OnDuplicate = "error", overwrite: bool = True,
                     progress: bool = False, chunk_rows: int | None = None) -> Path:
    """Write a keras-hps HDF5 table atomically: rows sorted by key, streamed in large blocks.

    Duplicate keys raise TableFormatError, or keep the last with `on_duplicate="last"`.
    `chunk_rows` sets the HDF5 chunk height of /vectors (default: 64 KiB chunks)."""
    import h5py

    dst = Path(path)
    k, v, dim = _check_inputs(dst, keys, vectors)
    order = _unique_last(k, dst, on_duplicate, want_sorted=True)
    n = len(k) if order is None else len(order)
    crow = chunk_rows or max(1, CHUNK_BYTES // (4 * dim))
    crow = max(1, min(crow, max(n, 1)))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(dst)
    blocks = _blocks(k, v, order, dim, progress, f"write {dst.name}")
    try:
        with h5py.File(tmp, "w", libver=("v110", "v110")) as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["dim"] = dim
            f.create_dataset("keys", data=k if order is None else k[order], dtype="<i8")
            if n:
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # chunks in file order
                vd = f.create_dataset("vectors", shape=(n, dim), dtype="<f4",
                                      chunks=(crow, dim), fill_time="never", dcpl=dcpl)
                offset = _linear_chunks_offset(vd)
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
                _write_behind(blocks, lambda start, _, vb: _pwrite_all(
                    fd, memoryview(vb).cast("B"), offset + start * dim * 4))
            finally:
                os.close(fd)
        _replace(tmp, dst, overwrite)
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
        if rows and not _is_strictly_increasing(_read_all(hps.keys)):
            raise TableFormatError(
                f"{hps.path}: keys are not sorted and unique, so its files cannot hold the HDF5 "
                f"table {dst} (which stores rows in key order); write it with write_hdf5_table")
    kf, vf = Path(hps_dir) / KEY_FILE, Path(hps_dir) / VECTOR_FILE
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(dst)
    try:
        with h5py.File(tmp, "w", libver=("v110", "v110")) as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["dim"] = dim
            for name, raw, shape, dtype in (("keys", kf, (rows,), "<i8"),
                                            ("vectors", vf, (rows, dim), "<f4")):
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                if nbytes == 0:  # HDF5 has no external storage of zero bytes
                    f.create_dataset(name, shape=shape, dtype=dtype)
                    continue
                rel = os.path.relpath(os.path.abspath(raw), os.path.abspath(dst.parent))
                f.create_dataset(name, shape=shape, dtype=dtype, fill_time="never",
                                 external=[(rel, 0, nbytes)])
        _replace(tmp, dst, overwrite)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


def table_disk_bytes(path: str | os.PathLike) -> int:
    """Bytes a table occupies on disk: an HPS directory's two files, or an HDF5 file plus the
    external data files its datasets are stored in."""
    if not is_hdf5_path(path):
        _, kf, vf = _hps_files(path)
        return kf.stat().st_size + vf.stat().st_size
    import h5py

    total = os.path.getsize(path)
    with h5py.File(path, "r") as f:
        for name in ("keys", "vectors"):
            dset = f.get(name)
            for _, _, size in (dset.external or []) if isinstance(dset, h5py.Dataset) else []:
                total += int(size)
    return total


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


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
