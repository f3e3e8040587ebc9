"""Keras 3 layers that read embedding tables from the keras-hps parameter server."""

from keras_hps.layers.fused_lookup import FusedLookupLayer
from keras_hps.layers.lookup import LookupLayer
from keras_hps.layers.sparse_lookup import SparseLookupLayer

__all__ = ["FusedLookupLayer", "LookupLayer", "SparseLookupLayer"]
