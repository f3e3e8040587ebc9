"""Export speed: a model with one 1M x 128 table, exported embedded and external, against
numpy.save of the same table bytes in the same run.

    .venv/bin/python benchmarks/bench_export.py [--rows 1000000] [--dim 128] [--repeats 7]
        [--dir /tmp] [--sync] [--pages warm|cold]

Prints one line per repeat and a Markdown table (median and best of the repeats). The target
(issue 5): each export takes at most 3x the numpy.save time.

Every step starts from the same state: the previous step's files deleted, `os.sync()` done,
and the page allocator in the state `--pages` names (see docs/benchmarks/export.md: on this
Firecracker VM, memory freed more than ~2 s earlier is handed back to the host, and touching
it again costs 7-10x the time of writing to hot pages, whichever step happens to do it):
- warm: right before the timing, a buffer of three times the table's bytes is touched and freed, so
  the step's page-cache pages are backed by the host (as on a machine without that behaviour);
- cold: 3 s of sleep, so every page the step allocates is a fresh one from the host.
The steps' order rotates from repeat to repeat, so none always follows the same other step.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scratch import scratch_dir  # noqa: E402

BASELINE = "numpy.save"


def _model(rows: int, dim: int):
    import keras

    ids = keras.Input(shape=(2,), dtype="int64", name="ids")
    dense = keras.Input(shape=(4,), name="dense")
    emb = keras.layers.Embedding(rows, dim, name="big_table")
    emb.build((None, 2))
    # Fill the table without keras' random initializer (not what is measured).
    emb.embeddings.assign(
        __import__("numpy").random.default_rng(0).standard_normal((rows, dim), "float32"))
    x = keras.layers.Concatenate()([keras.layers.Flatten()(emb(ids)), dense])
    return keras.Model({"ids": ids, "dense": dense}, keras.layers.Dense(1, name="score")(x))


def _clear(folder: str) -> None:
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _prepare_pages(mode: str, nbytes: int) -> None:
    import numpy as np

    if mode == "cold":
        time.sleep(3.0)
    else:
        warm = np.ones(nbytes, np.uint8)  # touched, then freed just before the timing
        del warm


def _timed(fn: Callable[[], object], scratch: str, sync: bool, pages: str, nbytes: int) -> float:
    # Each side starts with the previous step's files gone and no dirty page pending; with
    # `sync` it also waits inside the timing until its own bytes are on the disk (baseline
    # included); without, it is timed until its bytes are in the page cache.
    _clear(scratch)
    os.sync()
    _prepare_pages(pages, 3 * nbytes)
    t0 = time.perf_counter()
    fn()
    if sync:
        os.sync()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--sync", action="store_true",
                        help="time each write until its bytes are on disk (os.sync inside)")
    parser.add_argument("--pages", choices=("warm", "cold"), default="warm",
                        help="page allocator state at the start of each step (see the doc)")
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    from keras_hps.export import export_for_serving
    from keras_hps.export.tensor_bundle import write_tensor_bundle
    from keras_hps.formats import write_hdf5_table_over_hps, write_hps_table

    model = _model(args.rows, args.dim)
    table = model.get_layer("big_table").get_weights()[0]
    keys = np.arange(args.rows, dtype=np.int64)
    unsorted_keys = keys[::-1].copy()
    nbytes = table.nbytes + keys.nbytes
    tensor = tf.constant(table)
    scratch = str(scratch_dir("bench_export_", args.dir))

    def save() -> None:
        np.save(os.path.join(scratch, "keys.npy"), keys)
        np.save(os.path.join(scratch, "table.npy"), table)

    def save_v2() -> None:
        tf.raw_ops.SaveV2(prefix=os.path.join(scratch, "ckpt"), tensor_names=["t"],
                          shape_and_slices=[""], tensors=[tensor])

    def bundle() -> None:
        write_tensor_bundle(os.path.join(scratch, "ckpt"), [("keys", keys), ("t", table)])

    def tables() -> None:
        hps = write_hps_table(os.path.join(scratch, "t"), keys, table)
        write_hdf5_table_over_hps(os.path.join(scratch, "t.h5"), hps)

    def export(placement: str, **kw: object) -> Callable[[], object]:
        return lambda: export_for_serving(model, os.path.join(scratch, "repo"), "big",
                                          tables=placement, **kw)

    steps: dict[str, Callable[[], object]] = {
        BASELINE: save,
        "tf SaveV2 of the table (the old embedded floor)": save_v2,
        "keras-hps bundle writer, table + keys (floor, embedded)": bundle,
        "HPS files + HDF5 header (floor, external)": tables,
        "embedded export": export("embedded"),
        "external export": export("external"),
        "external export, keys not sorted (two copies)": export(
            "external", keys={"big_table": unsorted_keys}),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    load = [os.getloadavg()]
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            times[name].append(_timed(steps[name], scratch, args.sync, args.pages, nbytes))
        print(f"repeat {rep}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()),
              flush=True)
    load.append(os.getloadavg())

    base, best = statistics.median(times[BASELINE]), min(times[BASELINE])
    print(f"\nmachine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; table {args.rows} x {args.dim} float32 + int64 keys "
          f"= {nbytes / 2**20:.0f} MiB; {args.repeats} repeats; "
          f"{'until on disk (sync)' if args.sync else 'until in the page cache'}; "
          f"pages {args.pages}; load average at start {load[0][0]:.2f}, at end {load[1][0]:.2f}")
    print("| what | median s | x numpy.save (median) | min s | x numpy.save (min) |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        t, m = statistics.median(values), min(values)
        print(f"| {name} | {t:.3f} | {t / base:.2f} | {m:.3f} | {m / best:.2f} |")


if __name__ == "__main__":
    main()
