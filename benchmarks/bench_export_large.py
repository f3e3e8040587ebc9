"""Embedded export of a table larger than 2 GB: time, peak memory, and that it serves.

    .venv/bin/python benchmarks/bench_export_large.py [--rows 4400000] [--dim 128] [--dir /tmp]

A GraphDef is a protobuf and cannot exceed 2 GB, so a table captured as a graph constant
breaks `saved_model.pb`; the embedded placement stores tables as SavedModel variables. Here a
4.4M x 128 float32 table (2.25 GB, past the 2^31-byte mark) is exported embedded and then
served in a fresh process (`keras_hps.servable.load_servable`, as `keras-hps serve` loads
it), answering rows from the start and the end of the table (offsets past 2^31 bytes) as
the trained model does. Beside it, in the same run: `numpy.save` of the same bytes.

Peak memory is the process's resident high-water mark (`VmHWM`) over each step, reset
before the step (`/proc/self/clear_refs`); the table itself (2.25 GB) is resident before the
export starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scratch import scratch_dir  # noqa: E402

SERVE = r"""
import json, os, sys, time
import numpy as np
t0 = time.perf_counter()
from keras_hps.servable import load_servable
servable = load_servable(sys.argv[1])
t1 = time.perf_counter()
data = np.load(sys.argv[2])
out = servable.run({"ids": data["ids"], "dense": data["dense"]})["score"]
t2 = time.perf_counter()
np.save(sys.argv[3], out)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"load_s": t1 - t0, "first_request_s": t2 - t1, "peak_rss_gb": int(hwm) / 2**20}))
"""


def _peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rss(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(field))
    return int(line.split()[1]) / 2**20


def _model(rows: int, dim: int):
    import keras
    import numpy as np

    ids = keras.Input(shape=(2,), dtype="int64", name="ids")
    dense = keras.Input(shape=(4,), name="dense")
    emb = keras.layers.Embedding(rows, dim, name="big_table", embeddings_initializer="zeros")
    emb.build((None, 2))
    rng = np.random.default_rng(0)
    block = 1 << 20
    table = emb.embeddings.value  # the tf.Variable: sliced assignment in place
    for start in range(0, rows, block):  # filled in blocks: no second full-size copy
        stop = min(rows, start + block)
        table[start:stop].assign(rng.standard_normal((stop - start, dim), "float32"))
    x = keras.layers.Concatenate()([keras.layers.Flatten()(emb(ids)), dense])
    return keras.Model({"ids": ids, "dense": dense}, keras.layers.Dense(1, name="score")(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4_400_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    import numpy as np

    from keras_hps.export import export_for_serving

    nbytes = args.rows * args.dim * 4
    print(f"{platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, table {args.rows} x {args.dim} float32 = "
          f"{nbytes / 1e9:.2f} GB ({nbytes / 2**31:.2f} x 2^31 bytes)", flush=True)
    scratch = str(scratch_dir("bench-export-large-", args.dir))
    model = _model(args.rows, args.dim)
    table = np.asarray(model.get_layer("big_table").embeddings.value)
    print(f"model built: resident {_rss('VmRSS'):.2f} GB", flush=True)

    _peak_reset()
    t0 = time.perf_counter()
    np.save(os.path.join(scratch, "table.npy"), table)
    save_s = time.perf_counter() - t0
    save_peak = _rss("VmHWM")
    os.remove(os.path.join(scratch, "table.npy"))
    os.sync()

    _peak_reset()
    t0 = time.perf_counter()
    result = export_for_serving(model, os.path.join(scratch, "repo"), "big",
                                tables="embedded", progress=False)
    export_s = time.perf_counter() - t0
    export_peak = _rss("VmHWM")
    vdir = result.version_dir
    pb = os.path.getsize(os.path.join(vdir, "saved_model.pb"))
    data = os.path.getsize(os.path.join(vdir, "variables", "variables.data-00000-of-00001"))
    print(f"numpy.save: {save_s:.2f} s, peak {save_peak:.2f} GB", flush=True)
    print(f"embedded export: {export_s:.2f} s ({export_s / save_s:.2f}x numpy.save), peak "
          f"{export_peak:.2f} GB, writer {result.checkpoint_writer}; saved_model.pb "
          f"{pb / 1024:.0f} KiB, variables {data / 1e9:.2f} GB", flush=True)

    rng = np.random.default_rng(1)
    last = args.rows - 1
    ids = np.array([[0, 1], [last, last - 1], [args.rows // 2, last - 7],
                    [min(last, 2**31 // (4 * args.dim) + 3), 5]], np.int64)
    ids = np.concatenate([ids, rng.integers(0, args.rows, (60, 2))]).astype(np.int64)
    dense = rng.standard_normal((len(ids), 4)).astype(np.float32)
    want = model.predict({"ids": ids, "dense": dense}, verbose=0)
    del model, table
    inputs = os.path.join(scratch, "in.npz")
    np.savez(inputs, ids=ids, dense=dense)
    out = os.path.join(scratch, "out.npy")
    proc = subprocess.run([sys.executable, "-c", SERVE, vdir, inputs, out],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    serve = json.loads(proc.stdout.strip().splitlines()[-1])
    got = np.load(out)
    err = float(np.abs(got - want).max())
    print(f"served in a fresh process: load {serve['load_s']:.2f} s, first request "
          f"({len(ids)} rows, rows up to {last}) {serve['first_request_s'] * 1e3:.0f} ms, "
          f"peak {serve['peak_rss_gb']:.2f} GB; max |served - trained| = {err:.2e}",
          flush=True)
    if err > 1e-5:
        raise SystemExit("served predictions differ from the trained model's")


if __name__ == "__main__":
    main()
