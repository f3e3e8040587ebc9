"""The one bag combiner (`keras_hps.combiner`) against the Triton kernel's NumPy reference, on
fresh random bags with weights, empty bags and zero weights. Under the TensorFlow backend here;
tests/test_layers_torch.py checks it under torch (its keras.ops path and the Triton kernel)."""

import keras
import numpy as np
import pytest

pytest.importorskip("triton")

from keras_hps.combiner import COMBINERS, combine  # noqa: E402
from keras_hps.triton_kernels.combiners import np_combine_bags  # noqa: E402


def random_bags(rng, batch=13, dim=6):
    lengths = rng.integers(0, 5, batch)
    lengths[[0, batch // 2]] = 0  # empty bags give zeros
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    vectors = rng.standard_normal((offsets[-1], dim)).astype(np.float32)
    weights = rng.random(offsets[-1]).astype(np.float32)
    weights[:2] = 0.0  # a bag whose weights may sum to zero
    segments = np.repeat(np.arange(batch), lengths)
    return vectors, segments, offsets, weights


@pytest.mark.parametrize("combiner", COMBINERS)
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_reference(combiner, weighted):
    rng = np.random.default_rng()
    vectors, segments, offsets, weights = random_bags(rng)
    w = weights if weighted else None
    want = np_combine_bags(vectors, offsets, w, combiner)
    got = combine(vectors, segments, len(offsets) - 1, combiner, w)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got), want, rtol=1e-5, atol=1e-6)


def test_unknown_combiner():
    with pytest.raises(ValueError, match="combiner"):
        combine(np.zeros((1, 2), np.float32), np.zeros(1, np.int64), 1, "max")
