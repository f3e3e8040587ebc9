"""Test-wide settings: TensorFlow backend by default, Triton kernels interpreted on CPU."""

import os
from collections.abc import Iterator

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# No GPU on CI: run the Triton kernels through the interpreter on CPU torch tensors.
# Must be set before triton is first imported.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _interpreted_launches_one_at_a_time():
    """Tests launch kernels from several threads (the GPU tier's insert thread, servers):
    under the interpreter those launches must take turns. Applied once the test modules are
    imported, so they import TensorFlow and Triton in their own order."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            import triton  # noqa: F401
        except ImportError:
            return
        from keras_hps.triton_interpreter import serialize_interpreted_launches

        serialize_interpreted_launches()


# -- the GPU-tier tests' fixtures: `gpu_tier` switches the tier on (on the GPU when there is
# one, else through the interpreter on CPU); `table` writes a table of the requesting module's
# `ROWS` random keys and `DIM` floats to an HDF5 file (a module may define its own `table`).
@pytest.fixture(scope="module")
def gpu_tier() -> Iterator[None]:
    import torch

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_HPS_GPU_TIER", "auto" if torch.cuda.is_available() else "interpret")
        yield


@pytest.fixture(scope="module")
def table(request, tmp_path_factory) -> tuple[str, np.ndarray, np.ndarray]:
    """(path, keys, vectors): keys in random order."""
    from keras_hps.formats import write_hdf5_table

    rows, dim = request.module.ROWS, request.module.DIM
    rng = np.random.default_rng()
    keys = np.unique(rng.integers(-(2**40), 2**40, rows + 50))[:rows]
    rng.shuffle(keys)
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    path = tmp_path_factory.mktemp("gpu_tier") / "t.h5"
    write_hdf5_table(path, keys, vectors)
    return str(path), keys, vectors
