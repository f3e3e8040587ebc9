"""Export speed: a model with one 1M x 128 table, exported embedded and external, against
numpy.save of the same table bytes in the same run.

    .venv/bin/python benchmarks/bench_export.py [--rows 1000000] [--dim 128] [--repeats 3] [--sync]

Prints one line per measurement and a Markdown table (median of the repeats). The target
(issue 5): each export takes at most 3x the numpy.save time.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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


def _timed(fn, sync: bool) -> float:
    # Start each measurement with no dirty pages pending, so earlier writes' writeback
    # throttling does not land on the next one. With `sync`, every side (baseline included)
    # also waits inside the timing until its bytes are on the disk; without it, each side
    # is timed until its bytes are in the page cache.
    os.sync()
    t0 = time.perf_counter()
    fn()
    if sync:
        os.sync()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--sync", action="store_true",
                        help="time each write until its bytes are on disk (os.sync inside)")
    args = parser.parse_args()

    import numpy as np

    from keras_hps.export import export_for_serving

    model = _model(args.rows, args.dim)
    table = model.get_layer("big_table").get_weights()[0]
    keys = np.arange(args.rows, dtype=np.int64)
    nbytes = table.nbytes + keys.nbytes
    scratch = tempfile.mkdtemp(prefix="bench_export_", dir=args.dir)
    times: dict[str, list[float]] = {
        "numpy.save": [], "tf SaveV2 (floor, embedded)": [],
        "HDF5 + HPS table writes (floor, external)": [], "embedded": [], "external": [],
    }
    import tensorflow as tf

    from keras_hps.formats import write_hdf5_table, write_hps_table

    tensor = tf.constant(table)
    try:
        for rep in range(args.repeats):
            def save() -> None:
                np.save(os.path.join(scratch, "keys.npy"), keys)
                np.save(os.path.join(scratch, "table.npy"), table)

            def save_v2() -> None:
                tf.raw_ops.SaveV2(prefix=os.path.join(scratch, "ckpt"), tensor_names=["t"],
                                  shape_and_slices=[""], tensors=[tensor])

            def tables() -> None:
                write_hdf5_table(os.path.join(scratch, "t.h5"), keys, table)
                write_hps_table(os.path.join(scratch, "t_hps"), keys, table)

            for name, fn in (("numpy.save", save), ("tf SaveV2 (floor, embedded)", save_v2),
                             ("HDF5 + HPS table writes (floor, external)", tables)):
                times[name].append(_timed(fn, args.sync))
            for placement in ("embedded", "external"):
                repo = os.path.join(scratch, f"repo_{placement}_{rep}")
                times[placement].append(_timed(lambda p=placement, r=repo: export_for_serving(
                    model, r, "big", tables=p), args.sync))
                shutil.rmtree(repo)
            for entry in os.listdir(scratch):
                path = os.path.join(scratch, entry)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            print(f"repeat {rep}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()),
                  flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    base = statistics.median(times["numpy.save"])
    print(f"\nmachine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; table {args.rows} x {args.dim} float32 + int64 keys "
          f"= {nbytes / 2**20:.0f} MiB; median of {args.repeats}; "
          f"{'until on disk (sync)' if args.sync else 'until in the page cache'}")
    best = min(times["numpy.save"])
    print("| what | median s | x numpy.save (median) | min s | x numpy.save (min) |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        t, m = statistics.median(values), min(values)
        print(f"| {name} | {t:.3f} | {t / base:.2f} | {m:.3f} | {m / best:.2f} |")


if __name__ == "__main__":
    main()
