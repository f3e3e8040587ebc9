"""Triton's interpreter (``TRITON_INTERPRET=1``: the kernels run on CPU torch tensors) made safe
for kernel launches from several threads. Applied where it is needed: by the GPU tier in
``KERAS_HPS_GPU_TIER=interpret`` mode, and by the test session (tests/conftest.py); importing
the kernels changes nothing.
"""

from __future__ import annotations

import os
import threading
from typing import Any

__all__ = ["serialize_interpreted_launches"]


def serialize_interpreted_launches() -> None:
    """Under ``TRITON_INTERPRET=1``, make every kernel launch take one process-wide lock.

    Triton's interpreter rebinds ``triton.language`` module-wide for each launch and restores
    it afterwards, so two threads launching at once break each other's kernels ("Did you
    forget to add @triton.jit ?"). The GPU tier launches from a background insert thread and
    from serving threads, so interpreted runs (``KERAS_HPS_GPU_TIER=interpret``, the tests)
    need launches one at a time. Compiled kernels are unaffected. Idempotent.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
        return
    from triton.runtime import interpreter

    executor = interpreter.GridExecutor
    if getattr(executor.__call__, "_serialized", False):
        return
    launch = executor.__call__
    lock = threading.RLock()

    def serialized(self: Any, *args: Any, **kwargs: Any) -> Any:
        with lock:
            return launch(self, *args, **kwargs)

    serialized._serialized = True  # type: ignore[attr-defined]
    executor.__call__ = serialized
