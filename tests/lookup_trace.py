"""Follow one call through keras-hps's modules (sys.setprofile), to check the lookup path that
docs/architecture.md draws: which modules it crosses, and whether it ever calls back into a
module it has left (a call up the stack, not a return)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# folder -> module prefix; frames of other files (Keras, TF, torch, NumPy, tests) are foreign
ROOTS = {REPO / "keras_hps": "keras_hps", REPO / "triton_kernels": "keras_hps.triton_kernels"}
KERNELS = "keras_hps.triton_kernels"
# The interpreter's launch lock wraps Triton's own launcher: it runs only under
# TRITON_INTERPRET and belongs to Triton's frames, not to the lookup path.
FOREIGN = {"keras_hps.triton_interpreter"}


def _module(filename: str) -> str | None:
    path = Path(filename)
    for root, prefix in ROOTS.items():
        if path.is_relative_to(root):
            parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            return None if name in FOREIGN else name
    return None


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
        module = _module(frame.f_code.co_filename)
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
