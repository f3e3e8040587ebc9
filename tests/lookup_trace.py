"""Follow one call through keras-hps's modules (sys.setprofile), to check the lookup path that
docs/architecture.md draws: which modules it crosses, and whether it ever calls back into a
module it has left (a call up the stack, not a return)."""

from __future__ import annotations

import sys
import threading
from typing import Any

KERNELS = "keras_hps.triton_kernels"
# The interpreter's launch lock wraps Triton's own launcher: it runs only under
# TRITON_INTERPRET and belongs to Triton's frames, not to the lookup path.
FOREIGN = {"keras_hps.triton_interpreter"}


def _module(frame: Any) -> str | None:
    """The keras-hps module a frame runs in, by its module name (not its file: the GPU machine
    imports keras_hps from a copied site folder); frames of Keras, TF, torch, NumPy and the
    tests are foreign (None)."""
    name = frame.f_globals.get("__name__", "")
    if name != "keras_hps" and not name.startswith("keras_hps."):
        return None
    return None if name in FOREIGN else name


class Trace:
    """``modules``: keras-hps modules in the order the call first entered them (a Triton
    kernel's helpers count as the kernel module the call entered: under the interpreter the
    kernel's inlined helpers run as Python); ``callbacks``: "caller -> callee" for every call
    into a module that is already on the stack below the caller's module."""

    def __init__(self) -> None:
        self.modules: list[str] = []
        self.callbacks: list[str] = []
        self._stacks: dict[int, list[str | None]] = {}

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        stack = self._stacks.setdefault(threading.get_ident(), [])
        if event == "return":
            if stack:
                stack.pop()
            return
        if event != "call":
            return
        module = _module(frame)
        ours = [m for m in stack if m is not None]
        if module is not None and module.startswith(KERNELS):
            module = next((m for m in ours if m.startswith(KERNELS)), module)
        stack.append(module)
        if module is None:
            return
        if module not in self.modules:
            self.modules.append(module)
        caller = ours[-1] if ours else None
        if caller is not None and module != caller and module in ours:
            self.callbacks.append(f"{caller} -> {module}")

    def run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` traced (this thread, and threads started meanwhile)."""
        threading.setprofile(self._profile)
        sys.setprofile(self._profile)
        try:
            return fn(*args)
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
