"""GPU memory after the serving registry lets go of a parameter server (no TensorFlow needed).

Builds two tables, a parameter-server config with the GPU cache on, and acquires its
parameter server twice through `keras_hps.serving.tables.ParameterServers` (two versions
with equal tables: one build), looks keys up, releases both, and prints torch's allocated
and reserved CUDA memory at each step. After the last release both return to what they
were before the first build.

    source benchmarks/device_env.sh && python benchmarks/check_unload_gpu.py --rows 2000000
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scratch import scratch_dir  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    from keras_hps.formats import write_hdf5_table
    from keras_hps.servable import config_tables
    from keras_hps.serving.tables import ParameterServers

    folder = str(scratch_dir("keras-hps-unload-"))
    rng = np.random.default_rng(0)
    files = []
    for t in range(2):
        path = os.path.join(folder, f"t{t}.h5")
        write_hdf5_table(path, np.arange(args.rows, dtype=np.int64),
                         rng.standard_normal((args.rows, args.dim), dtype=np.float32))
        files.append(path)
    config = os.path.join(folder, "hps.json")
    with open(config, "w") as f:
        json.dump({"models": [{
            "model": "m", "sparse_files": files, "embedding_vecsize_per_table": [args.dim] * 2,
            "maxnum_catfeature_query_per_table_per_sample": [1, 1], "max_batch_size": 65536,
            "gpucache": True, "gpucacheper": 0.5, "deployed_device_list": [0]}]}, f)

    def show(step: str) -> tuple[int, int]:
        torch.cuda.synchronize()
        mem = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved())
        print(f"{step:32s} allocated {mem[0] / 2**20:9.1f} MiB  reserved {mem[1] / 2**20:9.1f} MiB")
        return mem

    before = show("before")
    registry = ParameterServers()
    tables = config_tables(config)
    leases = [registry.acquire(tables), registry.acquire(tables)]
    assert leases[0].parameter_server is leases[1].parameter_server
    keys = torch.randint(0, args.rows, (65536,), device="cuda")
    for t in range(2):
        leases[0].parameter_server.lookup("m", t, keys)
    show("two versions hold it, looked up")
    leases[0].release()
    show("one released")
    leases[1].release()
    after = show("both released")
    ok = after[0] <= before[0] and after[1] <= before[1]
    print("returned to the baseline" if ok else "NOT returned to the baseline")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
