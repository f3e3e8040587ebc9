"""Lookup output buffers: 64-byte aligned, reused only once no array, view, torch tensor or
TensorFlow tensor uses them, and lookup results stay intact while buffers are recycled."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from keras_hps import output_buffers
from keras_hps.output_buffers import POOL_MIN_BYTES, OutputPool

BIG = (POOL_MIN_BYTES // 4 // 16 + 3, 16)  # float32 rows above the pooling threshold


@pytest.mark.parametrize("shape", [(0,), (0, 8), (1,), (3, 5), (7, 3, 2), BIG, (1000, 128)])
@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.uint8])
def test_arrays_are_aligned_contiguous_and_writeable(shape, dtype):
    pool = OutputPool(1 << 30)
    for _ in range(3):  # fresh and reused buffers alike
        a = pool.empty(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and type(a) is np.ndarray
        assert a.flags.c_contiguous and a.flags.writeable
        assert a.size == 0 or a.ctypes.data % 64 == 0
        a[...] = 1
        del a


def test_buffer_is_reused_only_after_every_view_is_gone():
    pool = OutputPool(1 << 30)
    a = pool.empty(BIG)
    address = a.ctypes.data
    view = a.reshape(-1)[5:]
    view[:] = 7.0
    del a
    gc.collect()
    b = pool.empty(BIG)  # the view still uses the first buffer: b must be another one
    assert pool.reused == 0 and pool.allocated == 2
    b[...] = -1.0
    assert (view == 7.0).all()
    del view
    c = pool.empty(BIG)
    assert pool.reused == 1 and c.ctypes.data == address


def test_torch_and_tensorflow_tensors_keep_their_buffer():
    import tensorflow as tf
    import torch

    pool = OutputPool(1 << 30)
    a = pool.empty(BIG)
    a[...] = 3.0
    t = torch.from_numpy(a)
    del a
    b = pool.empty(BIG)
    b[...] = 0.0
    assert pool.reused == 0 and bool((t == 3.0).all())
    del t, b
    assert pool.idle_bytes > 0

    @tf.function
    def adopt(x):
        return tf.numpy_function(lambda _: make(5.0), [x], tf.float32, stateful=True)

    def make(value):
        out = pool.empty(BIG)
        out[...] = value
        return out

    kept = adopt(tf.constant(0))
    for _ in range(4):  # later lookups recycle buffers, never the one `kept` holds
        other = adopt(tf.constant(0))
        make(-2.0)
        assert bool(tf.reduce_all(kept == 5.0)) and bool(tf.reduce_all(other == 5.0))


def test_idle_memory_is_capped_and_zero_turns_pooling_off():
    size = output_buffers._size_class(BIG[0] * BIG[1] * 4 + output_buffers.ALIGN)
    pool = OutputPool(2 * size)
    arrays = [pool.empty(BIG) for _ in range(5)]
    del arrays
    assert pool.idle_bytes == 2 * size
    pool.clear()
    assert pool.idle_bytes == 0
    off = OutputPool(0)
    for _ in range(3):
        a = off.empty(BIG)
        assert a.ctypes.data % 64 == 0
        del a
    assert off.idle_bytes == 0 and off.reused == 0


def test_size_classes_round_up_by_at_most_one_sixteenth():
    rng = np.random.default_rng(5)
    sizes = [POOL_MIN_BYTES, 65600, 2 * 4096 * 128 * 4 + 64, (1 << 20) + 1,
             *rng.integers(POOL_MIN_BYTES, 1 << 31, 50)]
    for n in sizes:
        c = output_buffers._size_class(int(n))
        assert n <= c <= n * 17 // 16 and c % 4096 == 0


def test_lookup_results_stay_intact_while_buffers_recycle(tmp_path):
    import keras_hps
    from keras_hps.formats import write_hdf5_table

    rng = np.random.default_rng(8)
    vectors = rng.standard_normal((5000, 64)).astype(np.float32)
    write_hdf5_table(tmp_path / "t.h5", np.arange(5000, dtype=np.int64), vectors)
    ps = keras_hps.ParameterServer({
        "supportlonglong": True,
        "models": [{"model": "m", "sparse_files": [str(tmp_path / "t.h5")],
                    "embedding_vecsize_per_table": [64], "default_value_for_each_table": [0.5],
                    "maxnum_catfeature_query_per_table_per_sample": [1],
                    "max_batch_size": 4096}],
    })
    try:
        kept = []
        for i in range(40):
            keys = rng.integers(-5, 5100, size=int(rng.integers(1, 4096)))
            out = ps.lookup("m", 0, keys)
            want = np.where(((keys >= 0) & (keys < 5000))[:, None],
                            vectors[np.clip(keys, 0, 4999)], np.float32(0.5))
            np.testing.assert_array_equal(out, want)
            if i % 4 == 0:
                kept.append((out, want))
        for out, want in kept:
            np.testing.assert_array_equal(out, want)
    finally:
        ps.close()
