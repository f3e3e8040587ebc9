"""Benchmark the Keras lookup layers against their baselines.

cpu: TensorFlow backend, 26 tables (Criteo cardinalities, capped), one batch of keys per
     table per step. Models made only of lookup layers (26 LookupLayers; one
     FusedLookupLayer), of native `keras.layers.Embedding`s, and of two no-op layers that look
     nothing up (the cost of Keras's machinery around any layer), each run as a compiled step
     and by `model.predict`, against direct `ParameterServer.lookup` calls for the same keys
     that produce the same outputs: one step's 26 arrays for a step, 26 `[steps x batch,
     dim]` arrays for `predict`. `--phases` also times predict's phases (data adapter, next
     batch, step function, collecting, concatenating, `.numpy()`).
gpu: torch backend on CUDA, one 1M x 128 table, all hits. `LookupLayer` latency against
     `keras.layers.Embedding` holding the same table in GPU memory, batch 1,024 to 1,048,576.

    python benchmarks/bench_layers.py cpu [--batch 4096 --steps 20 --max-rows 100000 --phases]
    python benchmarks/bench_layers.py gpu [--rows 1000000 --dim 128 --cache-types static,dynamic]

Prints a Markdown table; `--json PATH` also writes the numbers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scratch import scratch_dir  # noqa: E402

CRITEO = [7912889, 33823, 17139, 7339, 20046, 4, 7105, 1382, 63, 5554114, 582469, 245828, 11,
          2209, 10667, 104, 4, 968, 15, 8165896, 2675940, 7156453, 302516, 12022, 97, 35]


def write_table_files(folder: Path, tables: list[np.ndarray]) -> list[str]:
    """Write each `[rows, dim]` table as an HDF5 file with keys 0..rows-1; returns the names."""
    from tqdm import tqdm

    from keras_hps import formats

    files = []
    for i, vectors in enumerate(tqdm(tables, desc="writing tables", unit="table")):
        path = folder / f"table_{i}.h5"
        formats.write_hdf5_table(path, np.arange(len(vectors), dtype=np.int64), vectors)
        files.append(path.name)
    return files


def write_config(folder: Path, model: str, files: list[str], dim: int, max_batch: int,
                 extra: dict) -> Path:
    """An hps.json (named after the model) serving `files` as one model's tables."""
    config = {
        "supportlonglong": True,
        "models": [{
            "model": model,
            "sparse_files": files,
            "embedding_table_names": [f"t{i}" for i in range(len(files))],
            "embedding_vecsize_per_table": [dim] * len(files),
            "maxnum_catfeature_query_per_table_per_sample": [1] * len(files),
            "default_value_for_each_table": [0.0] * len(files),
            "deployed_device_list": [0],
            "max_batch_size": max_batch,
            **extra,
        }],
    }
    path = folder / f"{model}.json"
    path.write_text(json.dumps(config))
    return path


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- CPU, TensorFlow backend -------------------------------------------------------------------


def _noop_layers():
    """Two layers that look nothing up, for the cost of Keras's machinery around any layer:
    `ConstantOutput` returns (a slice of) one preallocated `[batch, dim]` constant, so its
    step allocates nothing; `ZerosOutput` returns fresh zeros of the right shape, so each step
    writes a new output as a lookup does, but reads no table."""
    import keras
    import tensorflow as tf

    class ConstantOutput(keras.layers.Layer):
        def __init__(self, block: np.ndarray, **kwargs) -> None:
            super().__init__(**kwargs)
            self.block = block

        def call(self, ids):
            return tf.constant(self.block)[: tf.shape(ids)[0]]

        def compute_output_shape(self, shape):
            return (*shape, self.block.shape[1])

    class ZerosOutput(keras.layers.Layer):
        def __init__(self, dim: int, **kwargs) -> None:
            super().__init__(**kwargs)
            self.dim = dim

        def call(self, ids):
            return tf.zeros(tf.concat([tf.shape(ids), [self.dim]], 0), tf.float32)

        def compute_output_shape(self, shape):
            return (*shape, self.dim)

    return ConstantOutput, ZerosOutput


PHASES = ("data adapter", "epoch iterator", "next batch", "step function", "collect",
          "concatenate", ".numpy()")


def phased_predict(model, x: list[np.ndarray], batch: int) -> tuple[list[np.ndarray], dict]:
    """`model.predict(x, batch_size=batch, verbose=0)` as Keras 3.15's TensorFlow trainer runs
    it (steps_per_execution=1, no callbacks), with the seconds spent in each phase."""
    import time as _time

    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    spent = dict.fromkeys(PHASES, 0.0)
    clock = _time.perf_counter
    start = clock()
    epochs = tf_trainer.TFEpochIterator(
        x=x, batch_size=batch, steps_per_epoch=None, shuffle=False,
        distribute_strategy=model.distribute_strategy, steps_per_execution=1)
    model.make_predict_function()
    spent["data adapter"] = clock() - start
    loop_start = clock()
    outputs = None
    with epochs.catch_stop_iteration():
        for _, _, iterator in epochs:
            t0 = clock()
            data = [next(iterator)]
            t1 = clock()
            step = model.predict_function(data)
            t2 = clock()
            if outputs is None:
                outputs = tree.map_structure(lambda b: [b], step)
            else:
                tree.map_structure_up_to(step, lambda o, b: o.append(b), outputs, step)
            spent["next batch"] += t1 - t0
            spent["step function"] += t2 - t1
            spent["collect"] += clock() - t2
    t0 = clock()
    # the rest of the loop: making the dataset iterator, the loop's own bookkeeping
    spent["epoch iterator"] = t0 - loop_start - sum(
        spent[k] for k in ("next batch", "step function", "collect"))
    outputs = tree.map_structure_up_to(step, tf_trainer.potentially_ragged_concat, outputs)
    t1 = clock()
    result = tree.map_structure(tf_trainer.convert_to_np_if_not_ragged, outputs)
    spent["concatenate"] = t1 - t0
    spent[".numpy()"] = clock() - t1
    return result, spent


def bench_cpu(args: argparse.Namespace) -> dict:
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras
    import tensorflow as tf

    import keras_hps
    from keras_hps.layers import FusedLookupLayer, LookupLayer

    rng = np.random.default_rng(0)
    rows = [min(c, args.max_rows) for c in CRITEO]
    tables = [rng.standard_normal((r, args.dim), dtype=np.float32) for r in rows]
    folder = scratch_dir("bench_layers_")
    files = write_table_files(folder, tables)
    config = write_config(folder, "dlrm", files, args.dim, args.batch, {"gpucache": False})
    ps = keras_hps.init(str(config))
    n = args.batch * args.steps
    keys = [rng.integers(0, r, size=n) for r in rows]
    batches = [[k[s * args.batch:(s + 1) * args.batch] for k in keys] for s in range(args.steps)]
    tensors = [[tf.constant(k) for k in batch] for batch in batches]

    def functional(make_outputs):
        inputs = [keras.Input((), dtype="int64", name=f"cat{i}") for i in range(len(rows))]
        return keras.Model(inputs, make_outputs(inputs))

    constant_output, zeros_output = _noop_layers()
    block = rng.standard_normal((args.batch, args.dim), dtype=np.float32)
    embeddings = [keras.layers.Embedding(r, args.dim) for r in rows]
    models = {
        # no lookup at all: Keras's cost around any layer with these inputs and outputs
        "no-op (constant output)": functional(
            lambda ins: [constant_output(block)(x) for x in ins]),
        "no-op (fresh zeros)": functional(lambda ins: [zeros_output(args.dim)(x) for x in ins]),
        # the tables in TF memory, looked up by a native gather
        "`keras.layers.Embedding` x 26": functional(
            lambda ins: [e(x) for e, x in zip(embeddings, ins, strict=True)]),
        "`LookupLayer` x 26": functional(
            lambda ins: [LookupLayer("dlrm", i, args.dim)(x) for i, x in enumerate(ins)]),
        "`FusedLookupLayer` (26 tables)": functional(
            lambda ins: FusedLookupLayer("dlrm", list(range(len(rows))), args.dim)(ins)),
    }
    for e, t in zip(embeddings, tables, strict=True):
        e.set_weights([t])
    steps = {name: tf.function(lambda ks, m=m: m(ks)) for name, m in models.items()}

    def per_step(fn, inputs):  # keeps one step's outputs alive at a time, as a model step does
        for batch in inputs:
            outs = fn(batch)
        return outs

    def direct_step(batch):
        return [ps.lookup("dlrm", t, k) for t, k in enumerate(batch)]

    def direct_into_arrays():  # what predict returns: one [steps * batch, dim] array per table
        outs = [np.empty((n, args.dim), np.float32) for _ in rows]
        for s, batch in enumerate(batches):
            for t, k in enumerate(batch):
                outs[t][s * args.batch:(s + 1) * args.batch] = ps.lookup("dlrm", t, k)
        return outs

    step_base = "direct `ps.lookup` x 26 per step"
    predict_base = "direct `ps.lookup` into per-table arrays"
    # name -> (function, the direct baseline it is compared with)
    variants = {step_base: (lambda: per_step(direct_step, batches), None),
                predict_base: (direct_into_arrays, None)}
    for name, model in models.items():
        variants[f"{name}: compiled step"] = (
            functools.partial(per_step, steps[name], tensors), step_base)
        variants[f"{name}: `model.predict`"] = (
            functools.partial(model.predict, keys, batch_size=args.batch, verbose=0),
            predict_base)
        if args.phases:
            variants[f"{name}: `model.predict`, phases timed"] = (
                functools.partial(phased_predict, model, keys, args.batch), predict_base)
        if args.steps_per_execution > 1:  # the same layers in a model compiled for it
            twin = keras.Model(model.inputs, model.outputs)
            twin.compile(steps_per_execution=args.steps_per_execution)
            variants[f"{name}: `model.predict`, "
                     f"steps_per_execution={args.steps_per_execution}"] = (
                functools.partial(twin.predict, keys, batch_size=args.batch, verbose=0),
                predict_base)
    variants["`FusedLookupLayer` (26 tables): `predict_on_batch` per step"] = (
        functools.partial(per_step, models["`FusedLookupLayer` (26 tables)"].predict_on_batch,
                          batches), step_base)
    if args.only:
        keep = [name for name in variants if any(w in name for w in args.only.split(","))]
        variants = {name: variants[name] for name in variants
                    if name in keep or any(variants[k][1] == name for k in keep)}
    for fn, _ in variants.values():  # warm up: host tier resident, functions traced
        fn()
    for name in ("`keras.layers.Embedding` x 26", "`LookupLayer` x 26",
                 "`FusedLookupLayer` (26 tables)"):
        got = models[name].predict_on_batch(batches[0])
        for t in (0, 9, 25):
            np.testing.assert_array_equal(got[t], tables[t][batches[0][t]], err_msg=name)
        got = models[name].predict(keys, batch_size=args.batch, verbose=0)
        for t in (0, 9, 25):
            np.testing.assert_array_equal(got[t], tables[t][keys[t]], err_msg=name)

    times: dict[str, list[float]] = {name: [] for name in variants}
    phases: dict[str, list[dict]] = {}
    for _ in tqdm_range(args.repeats):  # interleaved, so load changes hit every variant alike
        for name, (fn, _) in variants.items():
            start = time.perf_counter()
            out = fn()
            times[name].append(1e3 * (time.perf_counter() - start) / args.steps)
            if name.endswith("phases timed"):
                phases.setdefault(name, []).append(
                    {k: 1e3 * v / args.steps for k, v in out[1].items()})
            del out
    result = {
        "machine": f"{os.cpu_count()} CPU cores, TensorFlow {tf.__version__}, "
                   f"Keras {keras.__version__}, NumPy {np.__version__}",
        "tables": len(rows), "rows": sum(rows), "dim": args.dim, "batch": args.batch,
        "steps": args.steps, "repeats": args.repeats,
        "ms_per_step": {name: statistics.median(t) for name, t in times.items()},
        "ms_per_step_all": times,
        "baseline": {name: base for name, (_, base) in variants.items()},
        "phases_ms_per_step": {name: {k: statistics.median(p[k] for p in runs) for k in PHASES}
                               for name, runs in phases.items()},
        "load_average": os.getloadavg(),
    }
    print(f"\nCPU, TF backend: {len(rows)} tables ({sum(rows):,} rows, dim {args.dim}), "
          f"batch {args.batch}, {args.steps} steps per pass, {args.repeats} passes; "
          f"load average {result['load_average'][0]:.1f}")
    print("| path | median ms/step | vs its direct baseline | min ms/step | vs baseline (min) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, ms in result["ms_per_step"].items():
        base = result["baseline"][name]
        low = min(times[name])
        if base is None:
            print(f"| {name} | {ms:.2f} | - | {low:.2f} | - |")
            continue
        ratio = ms / result["ms_per_step"][base] - 1
        ratio_min = low / min(times[base]) - 1
        print(f"| {name} | {ms:.2f} | {100 * ratio:+.1f}% | {low:.2f} | {100 * ratio_min:+.1f}% |")
    if phases:
        print("\n`model.predict`'s phases, median ms per step:")
        print("| model | " + " | ".join(PHASES) + " | sum |")
        print("| --- |" + " ---: |" * (len(PHASES) + 1))
        for name, spent in result["phases_ms_per_step"].items():
            cells = " | ".join(f"{spent[k]:.2f}" for k in PHASES)
            print(f"| {name.split(':')[0]} | {cells} | {sum(spent.values()):.2f} |")
    return result


def tqdm_range(n: int):
    from tqdm import tqdm

    return tqdm(range(n), desc="timed passes", unit="pass")


# -- GPU, torch backend ------------------------------------------------------------------------


def check_sparse(model: str, table: np.ndarray, dim: int, dev) -> None:
    """SparseLookupLayer on `dev` (Triton combiner on CUDA) against a float64 NumPy reference,
    for every combiner, padded 3-D ids with weights, empty bags and duplicates."""
    import torch

    from keras_hps.layers import SparseLookupLayer

    rng = np.random.default_rng(1)
    ids = rng.integers(0, 200, size=(64, 4, 8))
    ids[rng.random(ids.shape) < 0.3] = -1
    ids[0, 0] = -1
    w = rng.uniform(0.1, 2.0, size=ids.shape).astype(np.float32)
    keep = ids >= 0
    vec = np.where(keep[..., None], table[np.where(keep, ids, 0)], 0.0).astype(np.float64)
    wk = np.where(keep, w, 0.0)
    total = (vec * wk[..., None]).sum(axis=2)
    divisors = {"sum": np.ones(ids.shape[:2]), "mean": wk.sum(axis=2),
                "sqrtn": np.sqrt((wk * wk).sum(axis=2))}
    for combiner, div in divisors.items():
        want = np.divide(total, div[..., None], out=np.zeros_like(total),
                         where=div[..., None] != 0)
        got = SparseLookupLayer(model, 0, dim, combiner=combiner)(
            torch.as_tensor(ids, device=dev), torch.as_tensor(w, device=dev))
        assert got.device.type == dev.type and tuple(got.shape) == want.shape
        err = np.abs(got.cpu().numpy() - want).max()
        assert err < 1e-4, f"SparseLookupLayer {combiner}: max error {err}"
    print(f"SparseLookupLayer on {dev}: sum/mean/sqrtn with weights match NumPy")


def bench_gpu(args: argparse.Namespace) -> dict:
    os.environ["KERAS_BACKEND"] = "torch"
    import keras
    import torch

    import keras_hps
    from keras_hps.layers import LookupLayer

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sizes = [int(s) for s in args.sizes.split(",")]
    gen = torch.Generator(device="cpu").manual_seed(0)
    table = torch.randn(args.rows, args.dim, generator=gen).numpy()
    folder = scratch_dir("bench_layers_gpu_")
    files = write_table_files(folder, [table])

    emb = keras.layers.Embedding(args.rows, args.dim)
    emb.build((None,))
    emb.set_weights([table])
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (Triton interpreter)"
    result = {"machine": name, "torch": torch.__version__,
              "keras": keras.__version__, "rows": args.rows, "dim": args.dim, "runs": []}

    def timed(fn, ids_sets, reps):
        fn(ids_sets[0])
        sync()
        times = []
        for r in range(reps):
            ids = ids_sets[r % len(ids_sets)]
            sync()
            start = time.perf_counter()
            fn(ids)
            sync()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    for cache_type in args.cache_types.split(","):
        extra = {"gpucache": True, "gpucacheper": 1.0, "embedding_cache_type": cache_type,
                 "hit_rate_threshold": 1.0}
        model = f"bench_{cache_type}"
        config = write_config(folder, model, files, args.dim, max(sizes), extra)
        ps = keras_hps.init(str(config))
        layer = LookupLayer(model, 0, args.dim)
        # warm: every row into the GPU tier (a no-op for static tables)
        for start in range(0, args.rows, max(sizes)):
            ps.lookup(model, 0, torch.arange(start, min(start + max(sizes), args.rows),
                                             device=dev))
        check = torch.randint(0, args.rows, (min(4096, max(sizes)),), device=dev)
        out = layer(check)
        assert out.device == emb(check).device, f"lookup answered on {out.device}"
        torch.testing.assert_close(out, emb(check), rtol=0, atol=0)
        check_sparse(model, table, args.dim, dev)
        before = ps.stats(model, 0).get("gpu", {})
        print(f"\nGPU ({result['machine']}), torch backend, {args.rows:,} x {args.dim} table, "
              f"all hits, GPU tier {cache_type!r}; median latency of eager calls")
        print("| batch | Embedding ms | LookupLayer ms | ps.lookup ms | layer / Embedding |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for n in sizes:
            ids_sets = [torch.randint(0, args.rows, (n,), device=dev) for _ in range(4)]
            reps = max(10, min(200, (1 << 22) // n))
            row = {
                "cache_type": cache_type, "batch": n,
                "embedding_ms": timed(emb, ids_sets, reps),
                "layer_ms": timed(layer, ids_sets, reps),
                "ps_lookup_ms": timed(functools.partial(ps.lookup, model, 0), ids_sets, reps),
            }
            row["ratio"] = row["layer_ms"] / row["embedding_ms"]
            result["runs"].append(row)
            print(f"| {n:,} | {row['embedding_ms']:.3f} | {row['layer_ms']:.3f} | "
                  f"{row['ps_lookup_ms']:.3f} | {row['ratio']:.2f} |", flush=True)
        after = ps.stats(model, 0).get("gpu", {})
        timed_counts = {k: after.get(k, 0) - before.get(k, 0) for k in ("hits", "misses")}
        result.setdefault("gpu_tier", {})[cache_type] = {"timed": timed_counts, "after": after}
        print(f"GPU tier during the timed calls: {timed_counts} (unique keys); "
              f"resident {after.get('resident')} of capacity {after.get('capacity')}")
        ps.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["cpu", "gpu"])
    parser.add_argument("--batch", type=int, default=4096, help="cpu: keys per table per step")
    parser.add_argument("--steps", type=int, default=20, help="cpu: steps per timed pass")
    parser.add_argument("--max-rows", type=int, default=100_000, help="cpu: rows cap per table")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="cpu: timed passes (median)")
    parser.add_argument("--only", help="cpu: comma-separated name parts of the variants to run "
                                       "(their baselines run too)")
    parser.add_argument("--phases", action="store_true",
                        help="cpu: also run each model's predict with its phases timed")
    parser.add_argument("--steps-per-execution", type=int, default=1,
                        help="cpu: above 1, also run predict of each model compiled with it")
    parser.add_argument("--rows", type=int, default=1_000_000, help="gpu: table rows")
    parser.add_argument("--sizes", default="1024,4096,16384,65536,262144,1048576",
                        help="gpu: batch sizes")
    parser.add_argument("--cache-types", default="static,dynamic", help="gpu: GPU tier modes")
    parser.add_argument("--device", default="cuda", help="gpu: torch device of the ids")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    result = bench_cpu(args) if args.mode == "cpu" else bench_gpu(args)
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
