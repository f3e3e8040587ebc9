"""Triton GPU kernels for the embedding cache, with their NumPy references.

Imports only triton, torch and numpy. Installed as `keras_hps.triton_kernels`.
"""

from __future__ import annotations

import os
import threading


def serialize_interpreted_launches() -> None:
    """Under ``TRITON_INTERPRET=1``, make every kernel launch take one process-wide lock.

    Triton's interpreter rebinds ``triton.language`` module-wide for each launch and restores
    it afterwards, so two threads launching at once break each other's kernels ("Did you
    forget to add @triton.jit ?"). The GPU tier launches from a background insert thread and
    from serving threads, so interpreted runs (tests, CI) need launches one at a time.
    Compiled kernels are unaffected. Idempotent.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
        return
    from triton.runtime import interpreter

    executor = interpreter.GridExecutor
    if getattr(executor.__call__, "_serialized", False):
        return
    launch = executor.__call__
    lock = threading.RLock()

    def serialized(self, *args, **kwargs):
        with lock:
            return launch(self, *args, **kwargs)

    serialized._serialized = True
    executor.__call__ = serialized


serialize_interpreted_launches()
