"""keras-hps: a hierarchical parameter server for Keras 3 embedding inference.

`import keras_hps as hps`, then `hps.init("hps.json")` and `hps.LookupLayer(...)`.
Importing the package is cheap: Keras, TensorFlow, torch and Triton load only when
the names that need them are first used.
"""

from __future__ import annotations

from keras_hps._lazy import lazy_exports

__version__ = "0.1.0"

# Public name -> module that defines it. Resolved on first attribute access (PEP 562),
# so `import keras_hps` never imports TensorFlow or Triton by itself.
_LAZY = {
    "init": "keras_hps.parameter_server",
    "Init": "keras_hps.parameter_server",
    "get_parameter_server": "keras_hps.parameter_server",
    "ParameterServer": "keras_hps.parameter_server",
    "load_config": "keras_hps.config",
    "ConfigError": "keras_hps.config",
    "LookupLayer": "keras_hps.layers",
    "SparseLookupLayer": "keras_hps.layers",
    "FusedLookupLayer": "keras_hps.layers",
    "CapturedCall": "keras_hps.capture",
}

__all__ = ["__version__", *_LAZY]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, also=["__version__"])
