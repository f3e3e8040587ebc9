"""Pick the op module (`tf_ops` or `torch_ops`) for the current Keras backend."""

from __future__ import annotations

from types import ModuleType

import keras


def backend_ops() -> ModuleType:
    """The lookup/combine op module of the active Keras backend."""
    if keras.backend.backend() == "torch":
        from keras_hps.layers import torch_ops

        return torch_ops
    from keras_hps.layers import tf_ops

    return tf_ops
