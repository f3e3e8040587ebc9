"""The layer classes of the Keras backend, picked once at import (keras-rs's pattern): the
public `LookupLayer`, `SparseLookupLayer` and `FusedLookupLayer` subclass these."""

from __future__ import annotations

import keras

if keras.backend.backend() == "tensorflow":
    from keras_hps.layers.tensorflow_backend import (
        TensorflowFusedLookupLayer as BackendFusedLookupLayer,
    )
    from keras_hps.layers.tensorflow_backend import (
        TensorflowLookupLayer as BackendLookupLayer,
    )
    from keras_hps.layers.tensorflow_backend import (
        TensorflowSparseLookupLayer as BackendSparseLookupLayer,
    )
elif keras.backend.backend() == "torch":
    from keras_hps.layers.torch_backend import TorchFusedLookupLayer as BackendFusedLookupLayer
    from keras_hps.layers.torch_backend import TorchLookupLayer as BackendLookupLayer
    from keras_hps.layers.torch_backend import TorchSparseLookupLayer as BackendSparseLookupLayer
else:  # constructing a layer raises an error that names the supported backends
    from keras_hps.layers.base_layer import FusedLookupBase as BackendFusedLookupLayer
    from keras_hps.layers.base_layer import LookupBase as BackendLookupLayer
    from keras_hps.layers.base_layer import SparseLookupBase as BackendSparseLookupLayer

__all__ = ["BackendFusedLookupLayer", "BackendLookupLayer", "BackendSparseLookupLayer"]
