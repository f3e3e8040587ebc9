"""`keras-hps convert SRC DST`: convert tables between HPS directories and keras-hps HDF5.

The kind of each side follows its path: a `.h5` / `.hdf5` name (or an existing HDF5 file) is
an HDF5 table, anything else an HPS table directory (`key` + `emb_vector`). Rows stream through
in large blocks, so memory stays flat whatever the table's size. The new table is written
under a hidden name and published with one rename (`--force` swaps it with the old one).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

from keras_hps.errors import TableFormatError
from keras_hps.formats import is_hdf5_path, open_table, write_hdf5_table, write_hps_table
from keras_hps.formats.io import remove_leftovers

__all__ = ["ConvertSummary", "add_arguments", "convert", "run"]


@dataclass(frozen=True)
class ConvertSummary:
    """What one conversion did."""

    src: str
    dst: str
    src_kind: str
    dst_kind: str
    rows: int
    dim: int
    bytes: int
    seconds: float

    def __str__(self) -> str:
        rate = self.bytes / self.seconds / 1e6 if self.seconds > 0 else float("inf")
        return (f"converted {self.src} ({self.src_kind}) -> {self.dst} ({self.dst_kind}): "
                f"{self.rows:,} rows, dim {self.dim}, {self.bytes / 1e6:,.1f} MB in "
                f"{self.seconds:.2f} s ({rate:,.0f} MB/s)")


def _dst_kind(dst: str | os.PathLike) -> str:
    return "hdf5" if is_hdf5_path(dst) else "hps"


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dim: int | None = None,
            on_duplicate: str = "error", overwrite: bool = False, progress: bool = False,
            chunk_rows: int | None = None) -> ConvertSummary:
    """Convert the table at `src` into `dst` (kinds from the paths); returns a summary.

    `dim` is checked against an HPS source (inferred from its sizes when None). Duplicate keys
    in an HPS source are an error, or keep the last occurrence with `on_duplicate="last"`.
    An existing `dst` is replaced only with `overwrite=True`, in one step: a reader (or a
    kill at any moment) sees the old table or the new one under `dst`, never neither.
    What a killed conversion to `dst` left behind is removed first, with a warning."""
    src_p, dst_p = Path(src), Path(dst)
    if src_p.resolve() == dst_p.resolve():
        raise TableFormatError(f"{dst}: source and destination are the same path")
    remove_leftovers(dst_p.parent, dst_p.name)  # of a killed conversion, before dst is judged
    if (dst_p.exists() or dst_p.is_symlink()) and not overwrite:
        raise FileExistsError(f"{dst} exists (use --force to replace it)")
    kind = _dst_kind(dst_p)
    start = time.perf_counter()
    with open_table(src_p, dim, on_duplicate=on_duplicate) as table:
        if kind == "hdf5":
            keys, vectors = table.in_key_order()  # the writer then streams in key order
            write_hdf5_table(dst_p, keys, vectors, overwrite=True, progress=progress,
                             chunk_rows=chunk_rows)
        else:
            write_hps_table(dst_p, table.keys, table.vectors, overwrite=True, progress=progress)
        summary = ConvertSummary(str(src_p), str(dst_p), table.kind, kind, table.num_rows,
                                 table.dim, table.nbytes, time.perf_counter() - start)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `keras-hps convert` arguments."""
    parser.add_argument("src", help="table to read: an HPS directory or a .h5 file")
    parser.add_argument("dst", help="table to write: a .h5/.hdf5 file, else an HPS directory")
    parser.add_argument("--dim", type=int, default=None,
                        help="vector size of an HPS source (checked; inferred when omitted)")
    parser.add_argument("--on-duplicate", choices=("error", "last"), default="error",
                        help="duplicate keys in the source: fail or keep the last")
    parser.add_argument("--chunk-rows", type=int, default=None,
                        help="HDF5 chunk height in rows (default: 64 KiB chunks)")
    parser.add_argument("--force", action="store_true", help="replace an existing DST")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run `keras-hps convert`: prints a summary, returns 0 (errors raise)."""
    print(convert(args.src, args.dst, dim=args.dim, on_duplicate=args.on_duplicate,
                  overwrite=args.force, progress=not args.quiet, chunk_rows=args.chunk_rows))
    return 0
