"""Kernels launched from two threads at once, as the GPU tier's background insert thread and
serving threads do. Under the Triton interpreter (CI) a launch rebinds ``triton.language`` for
its duration, so unserialised launches broke each other; on a GPU this is plain concurrency."""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from keras_hps.triton_kernels.gather import gather  # noqa: E402
from keras_hps.triton_kernels.static_table import build_index, static_find  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_kernels_launched_from_two_threads_at_once():
    if DEVICE == "cpu":  # interpreted: conftest serialises launches, as the GPU tier does
        from triton.runtime.interpreter import GridExecutor

        assert getattr(GridExecutor.__call__, "_serialized", False)
    seed = np.random.SeedSequence()
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, 2**40, 400))
    index = build_index(torch.tensor(keys, device=DEVICE))
    table = torch.randn(300, 8, device=DEVICE)
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def finder(r: np.random.Generator) -> None:
        try:
            start.wait()
            for _ in range(30):
                q = np.concatenate([r.choice(keys, 40), r.integers(2**41, 2**42, 8)])
                rows = static_find(index, torch.tensor(q, device=DEVICE)).cpu().numpy()
                want = np.full(q.size, -1)
                want[:40] = np.searchsorted(keys, q[:40])
                np.testing.assert_array_equal(rows, want)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    def gatherer(r: np.random.Generator) -> None:
        try:
            start.wait()
            for _ in range(30):
                idx = torch.tensor(r.integers(0, 300, 48), device=DEVICE)
                assert torch.equal(gather(table, idx), table[idx])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    a, b = (np.random.default_rng(s) for s in seed.spawn(2))
    threads = [threading.Thread(target=finder, args=(a,)),
               threading.Thread(target=gatherer, args=(b,))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
