"""Dissect trained Keras models and write TF Serving model repositories.

Installed as `keras_hps.export`. `export_for_serving(model, repo_dir, model_name, ...)` is the
one-call path; `dissect` and `build_inference_model` are its first two steps on their own.
Names load lazily so `import keras_hps.export` stays cheap.
"""

from __future__ import annotations

from keras_hps._lazy import lazy_exports

_LAZY = {
    "EmbeddingTable": "keras_hps.export.dissection",
    "dissect": "keras_hps.export.dissection",
    "build_inference_model": "keras_hps.export.inference",
    "export_for_serving": "keras_hps.export.exporter",
    "ExportResult": "keras_hps.export.exporter",
}

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
