"""LookupLayer and SparseLookupLayer under Keras's torch backend.

Keras fixes its backend at import, so the TF-backend test session runs this file again in a
fresh process with KERAS_BACKEND=torch (the launcher test below). Tests marked `gpu` also run
the CUDA path where torch sees a GPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from layers_tables import random_table, with_defaults, write_config

TORCH = keras.backend.backend() == "torch"
torch_only = pytest.mark.skipif(not TORCH, reason="runs in the KERAS_BACKEND=torch subprocess")

VOCAB, DIM, DEFAULT, SLOTS, MAX_NNZ = 80, 8, -0.25, 3, 4


@pytest.mark.skipif(TORCH, reason="this is the launcher")
def test_torch_backend_in_fresh_process():
    env = dict(os.environ, KERAS_BACKEND="torch")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 10 and "failed" not in summary, summary


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    rng = np.random.default_rng(21)
    dense, keys, vectors = random_table(rng, VOCAB, DIM, drop=15)
    folder = tmp_path_factory.mktemp("layers_torch")
    config = write_config(folder, "tt", [(keys, vectors)], [DEFAULT], [SLOTS * MAX_NNZ], 64,
                          gpucache=True)  # the GPU tier serves CUDA ids where there is one
    return {"config": config, "dense": dense, "served": with_defaults(dense, keys, DEFAULT)}


@pytest.fixture
def ps(table):
    import keras_hps

    return keras_hps.init(str(table["config"]))


def devices():
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        out.append(pytest.param("cuda", marks=pytest.mark.gpu))
    return out


def build_model(embedding: keras.layers.Layer) -> keras.Model:
    ids = keras.Input((SLOTS,), dtype="int64")
    x = keras.layers.Flatten()(embedding(ids))
    return keras.Model(ids, keras.layers.Dense(1, name="head")(x))


@torch_only
def test_predictions_match_embedding_model(table, ps):
    import torch

    from keras_hps.layers import LookupLayer

    ref = build_model(keras.layers.Embedding(VOCAB, DIM, name="emb"))
    ref.get_layer("emb").set_weights([table["served"]])
    model = build_model(LookupLayer("tt", 0, DIM, name="emb"))
    model.get_layer("head").set_weights(ref.get_layer("head").get_weights())
    ids = np.random.default_rng(4).integers(0, VOCAB, size=(40, SLOTS))
    want = ref.predict(ids, verbose=0)
    np.testing.assert_allclose(model.predict(ids, verbose=0, batch_size=16), want, atol=1e-6)
    out = model(torch.as_tensor(ids))
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.detach().cpu().numpy(), want, atol=1e-6)


@torch_only
@pytest.mark.parametrize("device", devices())
def test_lookup_layer_on_device(table, ps, device):
    import torch

    from keras_hps.layers import LookupLayer

    ids = np.random.default_rng(5).integers(-3, VOCAB + 20, size=(6, 2, 3))
    want = np.full(ids.shape + (DIM,), DEFAULT, np.float32)
    inside = (ids >= 0) & (ids < VOCAB)
    want[inside] = table["served"][ids[inside]]
    out = LookupLayer("tt", 0, DIM)(torch.as_tensor(ids, device=device))
    assert out.device.type == device and out.shape == ids.shape + (DIM,)
    np.testing.assert_array_equal(out.cpu().numpy(), want)


def reference_bags(served, ids, weights, combiner):
    """float64 NumPy reference: combine each row of padded ids (negative = padding)."""
    flat_ids = ids.reshape(-1, ids.shape[-1])
    flat_w = None if weights is None else weights.reshape(-1, ids.shape[-1])
    out = np.zeros((len(flat_ids), served.shape[1]))
    for r, row in enumerate(flat_ids):
        keep = row >= 0
        v = served[row[keep]].astype(np.float64)
        w = np.ones(keep.sum()) if flat_w is None else flat_w[r][keep].astype(np.float64)
        s = (v * w[:, None]).sum(0)
        div = {"sum": 1.0, "mean": w.sum(), "sqrtn": np.sqrt((w * w).sum())}[combiner]
        out[r] = s / div if div else 0.0
    return out.reshape(ids.shape[:-1] + (served.shape[1],))


def padded_bags(seed, shape):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=shape)
    ids[rng.random(shape) < 0.4] = -1
    ids.reshape(-1, shape[-1])[0] = -1  # one empty bag
    return ids, rng.uniform(0.1, 2.0, size=shape).astype(np.float32)


@torch_only
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("triton", [True, False])
def test_sparse_layer_padded_and_offsets(table, ps, device, combiner, triton, monkeypatch):
    import torch

    from keras_hps.layers import SparseLookupLayer

    if device == "cpu":  # CPU tensors reach the Triton kernel only through its interpreter
        if triton and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton kernels are compiled here; CPU tensors use keras.ops segment sums")
        monkeypatch.setenv("TRITON_INTERPRET", "1" if triton else "0")
    elif not triton:
        pytest.skip("CUDA tensors always use the Triton kernel")
    layer = SparseLookupLayer("tt", 0, DIM, combiner=combiner)
    for shape in [(7, MAX_NNZ), (5, SLOTS, MAX_NNZ)]:
        ids, w = padded_bags(len(shape), shape)
        for weights in (None, w):
            want = reference_bags(table["served"], ids, weights, combiner)
            got = layer(torch.as_tensor(ids, device=device),
                        None if weights is None else torch.as_tensor(weights, device=device))
            assert got.device.type == device and tuple(got.shape) == want.shape
            np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=1e-6)
    # offsets + values (EmbeddingBag's include_last_offset=True) gives the same bags
    ids, w = padded_bags(9, (6, MAX_NNZ))
    keep = ids >= 0
    offsets = np.concatenate([[0], np.cumsum(keep.sum(1))])
    got = layer(torch.as_tensor(ids[keep], device=device), torch.as_tensor(w[keep], device=device),
                offsets=torch.as_tensor(offsets, device=device))
    want = reference_bags(table["served"], ids, w, combiner)
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=1e-6)


@torch_only
def test_sparse_layer_in_functional_model(table, ps):
    from keras_hps.layers import SparseLookupLayer

    ids_in = keras.Input((SLOTS, MAX_NNZ), dtype="int64")
    model = keras.Model(ids_in, SparseLookupLayer("tt", 0, DIM, combiner="sum")(ids_in))
    assert model.output.shape == (None, SLOTS, DIM)
    ids, _ = padded_bags(3, (10, SLOTS, MAX_NNZ))
    want = reference_bags(table["served"], ids, None, "sum")
    np.testing.assert_allclose(model.predict(ids, verbose=0), want, rtol=1e-5, atol=1e-6)


@torch_only
def test_errors_under_torch(table, ps):
    import torch

    from keras_hps.errors import ConfigError, InvalidInputError, NotFoundError
    from keras_hps.layers import LookupLayer, SparseLookupLayer

    with pytest.raises(InvalidInputError, match="int32 or int64"):
        LookupLayer("tt", 0, DIM)(torch.zeros(2, 3))
    with pytest.raises(ConfigError, match="emb_vec_size"):
        LookupLayer("tt", 0, DIM + 1)(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(NotFoundError):
        LookupLayer("tt", 1, DIM)(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(InvalidInputError, match="exceed"):
        LookupLayer("tt", 0, DIM)(torch.zeros(64 * SLOTS * MAX_NNZ + 1, dtype=torch.int64))
    with pytest.raises(InvalidInputError, match="got rank 1"):
        SparseLookupLayer("tt", 0, DIM)(torch.zeros(4, dtype=torch.int64))


@torch_only
def test_fused_layer_equals_lookup_layers(table, ps):
    import torch

    from keras_hps.layers import FusedLookupLayer, LookupLayer

    rng = np.random.default_rng(23)
    ids = [torch.as_tensor(rng.integers(-2, VOCAB + 4, size=(16, SLOTS))),
           torch.as_tensor(rng.integers(0, VOCAB, size=(9,)), dtype=torch.int32)]
    got = FusedLookupLayer("tt", [0, 0], DIM)(ids)
    for g, i in zip(got, ids, strict=True):
        want = LookupLayer("tt", 0, DIM)(i)
        assert g.device == i.device and tuple(g.shape) == (*i.shape, DIM)
        np.testing.assert_array_equal(g.cpu().numpy(), want.cpu().numpy())
        known = (i >= 0) & (i < VOCAB)
        ref = np.where(known.numpy()[..., None], table["served"][i.clamp(0, VOCAB - 1).numpy()],
                       np.float32(DEFAULT))
        np.testing.assert_array_equal(g.cpu().numpy(), ref)


@torch_only
@pytest.mark.parametrize("device", devices())
def test_combiner_paths_equal_the_reference(device):
    """`keras_hps.combiner` under torch: its keras.ops segment sums (no offsets) and the
    Triton kernel (CSR offsets; CUDA, or the interpreter) against the NumPy reference."""
    import torch

    from keras_hps.combiner import COMBINERS, combine
    from keras_hps.triton_kernels.combiners import np_combine_bags

    rng = np.random.default_rng()
    lengths = rng.integers(0, 5, 11)
    lengths[3] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    vectors = rng.standard_normal((offsets[-1], 5)).astype(np.float32)
    weights = rng.random(offsets[-1]).astype(np.float32)
    segments = np.repeat(np.arange(11), lengths)
    t = {k: torch.from_numpy(v).to(device) for k, v in
         (("v", vectors), ("s", segments), ("o", offsets), ("w", weights))}
    for combiner in COMBINERS:
        for w in (None, weights):
            want = np_combine_bags(vectors, offsets, w, combiner)
            tw = None if w is None else t["w"]
            for got in (combine(t["v"], t["s"], 11, combiner, tw),
                        combine(t["v"], t["s"], 11, combiner, tw, t["o"])):
                assert got.device.type == torch.device(device).type
                np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=1e-6)


@torch_only
@pytest.mark.parametrize("device", devices())
def test_one_gpu_lookup_crosses_seven_modules_at_most(table, device, monkeypatch):
    """docs/architecture.md's GPU lookup, followed through the code: from LookupLayer.call to
    the Triton kernels and back, at most 7 modules, never a call back up into one it left.
    Without CUDA the GPU tier runs through the interpreter (and gathers back to input order
    with torch indexing, not the Triton gather)."""
    import torch
    from lookup_trace import Trace

    import keras_hps
    from keras_hps.layers import LookupLayer

    cuda = torch.cuda.is_available()
    if not cuda:
        monkeypatch.setenv("KERAS_HPS_GPU_TIER", "interpret")
    ps = keras_hps.init(str(table["config"]))
    layer = LookupLayer("tt", 0, DIM)
    ids = torch.as_tensor(np.random.default_rng().choice(VOCAB, 6, replace=False).reshape(2, 3),
                          device=device)
    layer(ids)  # binds the table; the six keys enter the GPU cache (8-slot sets: all fit)
    before = ps.stats("tt", 0)["gpu"]
    trace = Trace()
    out = trace.run(layer, ids)
    after = ps.stats("tt", 0)["gpu"]
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (6, 0)
    np.testing.assert_array_equal(out.cpu().numpy(), table["served"][ids.cpu().numpy()])
    want = ["keras_hps.layers.base_layer", "keras_hps.layers.torch_backend",
            "keras_hps.parameter_server", "keras_hps.gpu_tier", "keras_hps.gpu_cache",
            "keras_hps.triton_kernels.cache_query"]
    if cuda:
        want.append("keras_hps.triton_kernels.gather")
    assert trace.modules == want and len(want) <= 7
    assert not trace.callbacks


@torch_only
@pytest.mark.parametrize("device", devices())
def test_captured_model_equals_eager_model(table, device, monkeypatch):
    """A Keras model with LookupLayers captured whole (keras_hps.CapturedCall: a CUDA graph on
    CUDA, the same protocol without a graph on CPU) answers exactly as the eager model, misses
    included; on CUDA the captured path runs with no host synchronisation."""
    import torch

    import keras_hps
    from keras_hps.capture import CapturedCall
    from keras_hps.gpu_tier import CaptureScope, deferring
    from keras_hps.layers import FusedLookupLayer, LookupLayer

    if device == "cpu":
        monkeypatch.setenv("KERAS_HPS_GPU_TIER", "interpret")
    keras_hps.init(str(table["config"]))
    ids_in = keras.Input((SLOTS,), dtype="int64")
    vecs = [LookupLayer("tt", 0, DIM)(ids_in[:, 0])]  # one table, and two in one launch:
    vecs += FusedLookupLayer("tt", [0, 0], DIM)([ids_in[:, i] for i in range(1, SLOTS)])
    x = keras.layers.Concatenate()(vecs)
    model = keras.Model(ids_in, keras.layers.Dense(2, name="head")(x))
    rng = np.random.default_rng()

    def ids(n=16):
        return torch.as_tensor(rng.integers(-2, VOCAB + 3, (n, SLOTS)), device=device)

    call = CapturedCall(lambda t: model(t), ids())
    assert (call.graph is not None) == (device == "cuda")
    for _ in range(4):
        x_ids = ids()
        got = call(x_ids).detach().clone()
        want = model(x_ids)
        np.testing.assert_array_equal(got.cpu().numpy(), want.detach().cpu().numpy())
    assert call.replays == 4 and call.reruns >= 1  # new ids missed the 64-slot cache
    if device == "cuda":
        x_ids = ids()
        model(x_ids)  # the keys are in the cache now
        scope = CaptureScope(device)
        with deferring(scope):
            model(x_ids)
            torch.cuda.set_sync_debug_mode("error")
            try:
                model(x_ids)  # what the graph replays, eagerly: no host synchronisation
            finally:
                torch.cuda.set_sync_debug_mode(0)
