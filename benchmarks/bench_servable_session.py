"""`Servable.run` of this tree beside an older `keras_hps/servable.py`, in one process.

Loads the external-placement DLRM of `bench_serving.py` (26 tables x `--rows` x dim 128)
with both modules over one parameter server, checks that they answer the same, and times
`run` at batch 32 and 4,096 in alternating rounds (median per round, in ms).

    git show bd7285d:keras_hps/servable.py > /tmp/old_servable.py
    python benchmarks/bench_servable_session.py --old /tmp/old_servable.py
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="path of the older servable.py")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repo", default="/tmp/keras-hps-servable-bench")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_serving

    from keras_hps.parameter_server import ParameterServer
    from keras_hps.servable import load_servable
    from keras_hps.serving.bench import synthesize

    spec = importlib.util.spec_from_file_location("old_servable", args.old)
    old = importlib.util.module_from_spec(spec)
    sys.modules["old_servable"] = old
    spec.loader.exec_module(old)
    if not os.path.exists(args.repo):
        bench_serving.build_repository(args.repo, args.rows)
    vdir = os.path.join(args.repo, "dlrm", "1")
    ps = ParameterServer(os.path.join(vdir, "hps.json"))
    servables = {"old": old.load_servable(vdir, parameter_server=ps),
                 "new": load_servable(vdir, ps)}
    sig = servables["new"].signatures["serving_default"]
    specs = {k: (v.dtype, v.shape) for k, v in sig.inputs.items()}
    print("| batch | old p50 ms (per round) | new p50 ms (per round) |")
    print("|---|---|---|")
    for batch in (32, 4096):
        inputs = [synthesize(specs, batch, args.rows, s) for s in range(4)]
        a, b = (servables[k].run(inputs[0])["click"] for k in ("old", "new"))
        np.testing.assert_allclose(a, b, atol=1e-6)
        calls = 300 if batch == 32 else 20
        res: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.rounds):
            for name, servable in servables.items():
                for i in range(5):
                    servable.run(inputs[i % 4])
                times = []
                for i in range(calls):
                    start = time.perf_counter()
                    servable.run(inputs[i % 4])
                    times.append(time.perf_counter() - start)
                res[name].append(float(np.median(times)) * 1e3)
        print(f"| {batch:,} | " + " | ".join(
            ", ".join(f"{x:.2f}" for x in res[k]) for k in ("old", "new")) + " |")
    for servable in servables.values():
        servable.close()
    ps.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
