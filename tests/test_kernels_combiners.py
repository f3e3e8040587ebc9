"""combine_bags (sum / mean / sqrtn, optional weights, CSR offsets) against its NumPy reference."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from keras_hps.triton_kernels.combiners import combine_bags, np_combine_bags  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _bags(rng, batch, max_len, dim, empty_frac=0.25):
    lengths = rng.integers(1, max_len + 1, size=batch)
    lengths[rng.random(batch) < empty_frac] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    vectors = rng.standard_normal((int(offsets[-1]), dim)).astype(np.float32)
    return vectors, offsets


def _run(vectors, offsets, weights, combiner):
    t = lambda a: None if a is None else torch.from_numpy(a).to(DEVICE)  # noqa: E731
    return combine_bags(t(vectors), t(offsets), t(weights), combiner).cpu().numpy()


def _rel(out, ref):
    return np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dim", [1, 16, 100])
def test_matches_reference(combiner, weighted, dim):
    rng = np.random.default_rng()
    # max_len 45 > one BLOCK_N step, so long bags take several loop iterations.
    vectors, offsets = _bags(rng, batch=23, max_len=45, dim=dim)
    weights = rng.uniform(0.1, 2.0, size=vectors.shape[0]).astype(np.float32) if weighted else None
    out = _run(vectors, offsets, weights, combiner)
    ref = np_combine_bags(vectors, offsets, weights, combiner)
    assert out.shape == (23, dim) and out.dtype == np.float32
    assert _rel(out, ref) < 1e-5
    empty = offsets[1:] == offsets[:-1]
    assert empty.any() and (out[empty] == 0).all()


def test_zero_weight_sum_gives_zeros_not_nan():
    rng = np.random.default_rng()
    vectors = rng.standard_normal((5, 8)).astype(np.float32)
    offsets = np.array([0, 2, 5], dtype=np.int64)
    weights = np.array([0, 0, 1, -1, 0.5], dtype=np.float32)  # bag 0 sums to 0
    for combiner in ("mean", "sqrtn"):
        out = _run(vectors, offsets, weights, combiner)
        ref = np_combine_bags(vectors, offsets, weights, combiner)
        assert np.isfinite(out).all() and (out[0] == 0).all()
        assert _rel(out, ref) < 1e-5
    # mean with weights: sum(w*v) / sum(w), by hand for bag 1
    out = _run(vectors, offsets, weights, "mean")
    by_hand = (vectors[2] - vectors[3] + 0.5 * vectors[4]) / 0.5
    np.testing.assert_allclose(out[1], by_hand, rtol=1e-5, atol=1e-6)


def test_empty_batch_and_all_empty_bags():
    out = _run(np.zeros((0, 4), np.float32), np.zeros(1, np.int64), None, "mean")
    assert out.shape == (0, 4)
    out = _run(np.zeros((0, 4), np.float32), np.zeros(4, np.int64), None, "sqrtn")
    assert out.shape == (3, 4) and (out == 0).all()


def test_int32_offsets_and_half_vectors():
    rng = np.random.default_rng()
    vectors, offsets = _bags(rng, batch=9, max_len=7, dim=16)
    v = torch.from_numpy(vectors).to(DEVICE).half()
    out = combine_bags(v, torch.from_numpy(offsets.astype(np.int32)).to(DEVICE), None, "mean")
    assert out.dtype == torch.float16
    ref = np_combine_bags(v.float().cpu().numpy(), offsets, None, "mean")
    assert _rel(out.float().cpu().numpy(), ref) < 2e-3


def test_bad_input_is_rejected():
    v = torch.zeros((4, 3), device=DEVICE)
    good = torch.tensor([0, 1, 4], device=DEVICE)
    with pytest.raises(ValueError, match="combiner"):
        combine_bags(v, good, None, "max")
    with pytest.raises(ValueError, match="end at nnz=4"):
        combine_bags(v, torch.tensor([0, 1, 3], device=DEVICE), None, "sum")
    with pytest.raises(ValueError, match="non-decreasing"):
        combine_bags(v, torch.tensor([0, 3, 1, 4], device=DEVICE), None, "sum")
    with pytest.raises(ValueError, match="weights must have shape"):
        combine_bags(v, good, torch.ones(3, device=DEVICE), "sum")
    with pytest.raises(ValueError, match="int64"):
        combine_bags(v, good.float(), None, "sum")
    with pytest.raises(ValueError, match="2-D"):
        combine_bags(v[0], good, None, "sum")
