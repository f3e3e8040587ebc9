"""CPU tiers of the parameter server, each beside its baseline measured in the same run.

- host:    HostTier.fetch / ParameterServer.lookup of random keys in a table held in host
           RAM, against a plain NumPy gather of the same rows by known index.
- cold:    ColdTier.fetch of random keys in an HDF5 table (page cache warm), against a NumPy
           memmap gather of the same rows.
- write:   write_hps_table / write_hdf5_table of NumPy arrays, against numpy.save of the
           same bytes.
- convert: `keras-hps convert` of an HPS directory to HDF5, against a plain sequential copy
           (`cp`) of the same bytes; peak resident memory of each.

    .venv/bin/python benchmarks/bench_tiers.py                      # all, default sizes
    .venv/bin/python benchmarks/bench_tiers.py --only host --host-rows 1000000

Results: docs/benchmarks/cpu_tiers.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from keras_hps.cold_tier import ColdTier
from keras_hps.formats import open_table, write_hps_table
from keras_hps.host_tier import HostTier
from keras_hps.parameter_server import ParameterServer


def timed(fn, reps: int) -> float:
    """Median seconds of `reps` calls (after one warm-up call)."""
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def interleaved(fns: dict, reps: int, before=None) -> dict[str, float]:
    """Median seconds per function, calls interleaved so machine noise hits all alike;
    `before()` runs untimed ahead of each call."""
    for f in fns.values():
        f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            if before is not None:
                before()
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in ts.items()}


def row(name: str, seconds: float, keys: int, base: float | None) -> str:
    rate = keys / seconds / 1e6
    rel = f"{base / seconds:6.0%}" if base else "   -  "
    return f"| {name:<48} | {seconds * 1e3:9.2f} | {rate:8.2f} | {rel} |"


HEADER = ("| what | ms / batch | M keys/s | vs baseline |\n"
          "|---|---:|---:|---:|")


def bench_host(rows: int, dim: int, batch: int, reps: int, workdir: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((rows, dim), dtype=np.float32)
    print(f"\n### host tier: {rows:,} rows x dim {dim}, batches of {batch:,} random keys\n")
    print(HEADER)
    for kind in ("compact keys (dense index)", "random int64 keys (hash index)"):
        keys = np.arange(rows) if kind.startswith("compact") else \
            rng.permutation(np.unique(rng.integers(-(2**62), 2**62, rows + rows // 50)))[:rows]
        kr = (int(keys.min()), int(keys.max()), rows) if kind.startswith("compact") else None
        tier = HostTier(dim, rows, key_range=kr)
        for s in range(0, rows, 1 << 18):
            tier.insert(keys[s:s + (1 << 18)], vectors[s:s + (1 << 18)])
        idx = rng.integers(0, rows, batch)
        uidx = np.unique(idx)
        ukeys = np.unique(keys[idx])
        q = keys[idx]
        slots = tier.find(ukeys)  # rows were inserted in order: slot == row
        res = interleaved({
            "gather": lambda uidx=uidx: np.take(vectors, uidx, axis=0),
            "host": lambda tier=tier, ukeys=ukeys: tier.fetch(ukeys),
            "find": lambda tier=tier, ukeys=ukeys: tier.find(ukeys),
        }, reps)
        n = len(uidx)
        print(row(f"NumPy gather by known index ({n:,} unique rows)", res["gather"], n, None))
        print(row(f"HostTier.fetch, {kind}", res["host"], n, res["gather"]))
        print(row("  of which key -> row (find)", res["find"], n, None))
        np.testing.assert_array_equal(tier.fetch(ukeys)[1], vectors[slots])
        # the whole ParameterServer path: validate, unique, fetch, scatter to input order
        write_hps_table(workdir / "host_table", keys, vectors)
        cfg = {"models": [{"model": "m", "sparse_files": [str(workdir / "host_table")],
                           "embedding_vecsize_per_table": [dim], "gpucache": False,
                           "maxnum_catfeature_query_per_table_per_sample": [batch],
                           "max_batch_size": 1}]}
        with ParameterServer(cfg) as ps:
            res2 = interleaved({
                "gather": lambda idx=idx: np.take(vectors, idx, axis=0),
                "ps": lambda ps=ps, q=q: ps.lookup("m", 0, q),
            }, reps)
            out = ps.lookup("m", 0, q)
            np.testing.assert_array_equal(out, vectors[idx])
        print(row(f"NumPy gather by known index ({batch:,} rows, repeats)", res2["gather"], batch,
                  None))
        print(row(f"ParameterServer.lookup, {kind}", res2["ps"], batch, res2["gather"]))
        del tier
        shutil.rmtree(workdir / "host_table")


def bench_write(rows: int, dim: int, reps: int, workdir: Path) -> None:
    """Table writers against numpy.save of the same bytes (keys + vectors), page cache only."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((rows, dim), dtype=np.float32)
    sorted_keys = np.arange(rows, dtype=np.int64)
    random_keys = rng.permutation(rows).astype(np.int64)
    out = workdir / "write"
    out.mkdir(exist_ok=True)

    def npsave() -> None:
        np.save(out / "k.npy", sorted_keys)
        np.save(out / "v.npy", vectors)

    from keras_hps.formats import write_hdf5_table

    res = interleaved({
        "np.save": npsave,
        "hps sorted": lambda: write_hps_table(out / "hps", sorted_keys, vectors),
        "hdf5 sorted": lambda: write_hdf5_table(out / "t.h5", sorted_keys, vectors),
        "hdf5 random": lambda: write_hdf5_table(out / "r.h5", random_keys, vectors),
    }, reps, before=os.sync)  # each write starts with no dirty pages left by the one before
    nbytes = rows * (8 + 4 * dim)
    print(f"\n### writers: {rows:,} x {dim} table ({nbytes / 1e6:,.0f} MB) from NumPy arrays\n")
    print("| what | seconds | MB/s | time vs np.save |\n|---|---:|---:|---:|")
    for name, label in (("np.save", "numpy.save of keys + vectors (baseline)"),
                        ("hps sorted", "write_hps_table"),
                        ("hdf5 sorted", "write_hdf5_table, keys already sorted"),
                        ("hdf5 random", "write_hdf5_table, keys in random order")):
        t = res[name]
        print(f"| {label} | {t:.3f} | {nbytes / t / 1e6:,.0f} | {t / res['np.save']:.2f}x |")
    shutil.rmtree(out)


def make_big_hps(path: Path, rows: int, dim: int, key_order: str = "random") -> None:
    """An HPS table of `rows` x `dim` with keys 3i+11, in random or ascending file order."""
    if (path / "emb_vector").exists() and (path / "emb_vector").stat().st_size == rows * dim * 4:
        return
    print(f"(writing {rows:,} x {dim} HPS table to {path}, keys in {key_order} order)")
    ids = np.arange(rows) if key_order == "sorted" else np.random.default_rng(1).permutation(rows)
    keys = ids.astype(np.int64) * 3 + 11

    class Rows:  # generated on the fly, block by block, so the table never sits in RAM
        shape = (rows, dim)
        dtype = np.dtype(np.float32)

        def __getitem__(self, item):
            start = item.start or 0
            stop = min(rows, item.stop)
            return np.random.default_rng(start).random((stop - start, dim), dtype=np.float32)

    write_hps_table(path, keys, Rows(), progress=True)


def peak_rss_of(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of a command, measured by GNU time (a fork of this big
    process would inherit its RSS high-water mark)."""
    t = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], check=True,
                         stderr=subprocess.PIPE, text=True).stderr
    return time.perf_counter() - t, int(out.strip().splitlines()[-1]) * 1024


def bench_convert(rows: int, dim: int, workdir: Path, key_order: str) -> Path:
    src = workdir / f"hps_{rows}x{dim}_{key_order}"
    make_big_hps(src, rows, dim, key_order)
    dst = workdir / f"table_{rows}x{dim}.h5"
    copy = workdir / "copy"
    nbytes = rows * (8 + 4 * dim)
    subprocess.run(["cat", str(src / "key"), str(src / "emb_vector")], stdout=subprocess.DEVNULL,
                   check=True)  # page cache warm for both
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    os.sync()
    t_cp, rss_cp = peak_rss_of(["sh", "-c", f"cp {src}/key {src}/emb_vector {copy}/ && sync"])
    shutil.rmtree(copy)
    if dst.exists():
        dst.unlink()
    os.sync()
    code = (f"from keras_hps.convert import convert; "
            f"print(convert({str(src)!r}, {str(dst)!r}, overwrite=True))")
    t_cv, rss_cv = peak_rss_of([sys.executable, "-c", code + "; import os; os.sync()"])
    print(f"\n### convert: {rows:,} x {dim} HPS directory (keys in {key_order} file order) -> "
          f"HDF5, {nbytes / 1e9:.2f} GB\n")
    print("| what | seconds | MB/s | peak RSS MB | vs baseline |\n|---|---:|---:|---:|---:|")
    print(f"| cp key + emb_vector, then sync (baseline) | {t_cp:.2f} | {nbytes / t_cp / 1e6:,.0f} |"
          f" {rss_cp / 1e6:,.0f} | - |")
    print(f"| keras-hps convert, then sync | {t_cv:.2f} | {nbytes / t_cv / 1e6:,.0f} |"
          f" {rss_cv / 1e6:,.0f} | {t_cp / t_cv:.0%} |")
    return dst


def bench_cold(h5: Path, batch: int, reps: int) -> None:
    rng = np.random.default_rng(2)
    with open_table(h5) as table:
        cold = ColdTier(table)
        rows, dim = cold.num_rows, cold.dim
        base = table.vectors  # a plain np.memmap of the file's /vectors bytes
        assert isinstance(base, np.memmap)
        subprocess.run(["cat", str(h5)], stdout=subprocess.DEVNULL, check=True)  # warm
        keys_sorted = table.sorted_index()[0]
        idx = np.unique(rng.integers(0, rows, batch))
        q = keys_sorted[idx]
        perm_idx = rng.permutation(idx)
        res = interleaved({
            "memmap sorted": lambda: np.take(base, idx, axis=0),
            "memmap random": lambda: np.take(base, perm_idx, axis=0),
            "cold": lambda: cold.fetch(q),
        }, reps)
        found, got = cold.fetch(q)
        assert found.all() and np.array_equal(got, np.asarray(base[idx]))
        n = len(idx)
        print(f"\n### cold tier: {rows:,} x {dim} HDF5 table, page cache warm, "
              f"{n:,} unique random keys per batch\n")
        print(HEADER)
        print(row("NumPy memmap gather, rows in random order", res["memmap random"], n, None))
        print(row("NumPy memmap gather, rows sorted", res["memmap sorted"], n, None))
        print(row("ColdTier.fetch (vs random-order gather)", res["cold"], n,
                  res["memmap random"]))
        print(row("ColdTier.fetch (vs sorted gather)", res["cold"], n, res["memmap sorted"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="host,write,cold,convert")
    p.add_argument("--host-rows", type=int, default=1_000_000)
    p.add_argument("--cold-rows", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--workdir", default="/tmp/keras-hps-bench")
    p.add_argument("--key-order", default="sorted,random",
                   help="file orders of the HPS sources converted (sorted, random)")
    p.add_argument("--keep", action="store_true", help="keep the big tables for the next run")
    a = p.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    only = set(a.only.split(","))
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; "
          f"numpy {np.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    if "host" in only:
        bench_host(a.host_rows, a.dim, a.batch, a.reps, work)
    if "write" in only:
        bench_write(a.host_rows, a.dim, max(3, a.reps // 3), work)
    h5 = work / f"table_{a.cold_rows}x{a.dim}.h5"
    if "convert" in only:
        for order in a.key_order.split(","):
            h5 = bench_convert(a.cold_rows, a.dim, work, order)
    if "cold" in only:
        if not h5.exists():
            from keras_hps.convert import convert

            src = work / f"hps_{a.cold_rows}x{a.dim}_random"
            make_big_hps(src, a.cold_rows, a.dim)
            convert(src, h5, progress=True)
        bench_cold(h5, a.batch, a.reps)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\npeak RSS of this process: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:,.0f} MB")


if __name__ == "__main__":
    main()
