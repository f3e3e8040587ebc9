"""keras-hps: a hierarchical parameter server for Keras 3 embedding inference.

`import keras_hps as hps`, then `hps.init("hps.json")` and `hps.LookupLayer(...)`.
Importing the package is cheap: Keras, TensorFlow, torch and Triton load only when
the names that need them are first used.
"""

from __future__ import annotations

import importlib
from typing import Any

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
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_hps' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
