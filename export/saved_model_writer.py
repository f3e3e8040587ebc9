"""`save_saved_model`: `tf.saved_model.save` with the variables written by our bundle writer.

TensorFlow writes the SavedModel's variables with `SaveV2`, which copies every byte through
an 8 MiB buffer and runs a software CRC32C over it (2-3x the time of `numpy.save` for a
0.5 GB table). Here `tf.saved_model.save` runs as usual (graph, signatures, object graph,
assets) with a checkpoint sharding callback (`SaveOptions.experimental_sharding_callback`,
TensorFlow's hook for choosing checkpoint shards) that hands us every tensor it would save
and leaves only the string tensors (the object graph) for `SaveV2`. After the save, the
whole checkpoint `variables/variables` is rewritten by `tensor_bundle.write_tensor_bundle`,
byte for byte what `SaveV2` would have written, and `fingerprint.pb` is recomputed for the
new index. The result is a plain SavedModel.

This is the one module that leans on TensorFlow internals: that the callback sees every
tensor as an eager tensor and may leave tensors out (TensorFlow 2.21 does not check; its
`validate_shards` would), and `fingerprinting_utils.write_fingerprint`. Anything unexpected
(a sliced or non-eager tensor, a dtype the writer lacks, TensorFlow refusing the shards,
google-crc32c without its compiled code) falls back to `SaveV2` for the whole checkpoint: the
same files, the old speed.
tests/test_export_bundle.py checks that a standard model takes the fast path.
"""

from __future__ import annotations

import os
import shutil
import warnings
from typing import Any

import numpy as np

from keras_hps.export import tensor_bundle

BUNDLE = "bundle"  # variables written by tensor_bundle.write_tensor_bundle
SAVEV2 = "savev2"  # variables written by TensorFlow's SaveV2


class _Unsupported(Exception):
    """A tensor our writer cannot take, seen after other tensors were already left out."""


def _callback_class() -> type:
    import tensorflow as tf

    class CaptureTensors(tf.train.experimental.ShardingCallback):
        """Records every tensor of the checkpoint; keeps only strings for SaveV2 unless some
        tensor is one the bundle writer cannot write (then SaveV2 keeps everything)."""

        def __init__(self) -> None:
            self.tensors: list[tuple[str, Any]] = []
            self.calls = 0
            self.usable = True

        @property
        def description(self) -> str:
            return "keras-hps: numeric tensors written by keras_hps.export.tensor_bundle"

        def __call__(self, shardable_tensors: Any) -> list[dict[str, Any]]:
            self.calls += 1
            usable = all(_writable(t) for t in shardable_tensors)
            if not usable and self.tensors and self.usable:
                raise _Unsupported("a later checkpoint shard has tensors the writer lacks")
            self.usable = self.usable and usable
            shard: dict[str, Any] = {}
            for t in shardable_tensors:
                self.tensors.append((t.checkpoint_key, t.tensor))
                if not self.usable or t.tensor.dtype == tf.string:
                    shard.setdefault(t.checkpoint_key, {})[t.slice_spec] = t.tensor
            return [shard]

    return CaptureTensors


def _writable(shardable: Any) -> bool:
    import tensorflow as tf

    tensor = shardable.tensor
    if str(shardable.slice_spec).strip() or not hasattr(tensor, "numpy"):
        return False
    if tensor.dtype == tf.string:
        return True
    try:
        return tensor_bundle.supports(tensor.dtype.as_numpy_dtype)
    except TypeError:
        return False


def save_saved_model(module: Any, path: str, signatures: Any, *, progress: bool = False,
                     bundle_writer: bool = True) -> str:
    """Write `module` with `signatures` as a SavedModel in the new folder `path`.

    With `bundle_writer` (default) the variables are written by `tensor_bundle` where
    possible; otherwise, or as the fallback, by `SaveV2`. Both give the same files.
    Returns which wrote the variables: `BUNDLE` or `SAVEV2`.
    """
    import tensorflow as tf

    if not (bundle_writer and tensor_bundle.hardware_crc_available()):
        tf.saved_model.save(module, path, signatures=signatures)
        return SAVEV2
    capture = _callback_class()()
    options = tf.saved_model.SaveOptions(experimental_sharding_callback=capture)
    try:
        tf.saved_model.save(module, path, signatures=signatures, options=options)
    except (_Unsupported, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "sharding callback" not in str(e):
            raise
        warnings.warn(f"TensorFlow refused the checkpoint callback ({e}); writing the "
                      "variables with SaveV2", RuntimeWarning, stacklevel=2)
        shutil.rmtree(path, ignore_errors=True)
        tf.saved_model.save(module, path, signatures=signatures)
        return SAVEV2
    if capture.calls == 0 or not capture.usable:
        # The callback was not consulted (TensorFlow moved) or kept every tensor: SaveV2
        # wrote the whole checkpoint.
        return SAVEV2
    # np.asarray shares the tensor's memory; .numpy() would copy every table first.
    tensors = [(key, tensor.numpy() if tensor.dtype == tf.string else np.asarray(tensor))
               for key, tensor in capture.tensors]
    prefix = f"{path}/variables/variables"
    # Remove SaveV2's files first: renaming a new file over an existing one makes ext4
    # (auto_da_alloc) start writing the new file back at once, 0.2 s for 0.5 GB.
    for name in (tensor_bundle.data_filename(prefix), tensor_bundle.index_filename(prefix)):
        os.remove(name)
    tensor_bundle.write_tensor_bundle(prefix, tensors, progress=progress)
    from tensorflow.python.saved_model import fingerprinting_utils

    # fingerprint.pb holds a hash of variables.index: recompute it for the new index.
    fingerprinting_utils.write_fingerprint(path)
    return BUNDLE
