"""`CapturedCall`: a call (a Keras model's, a function's) with keras-hps lookups, captured once
in a CUDA graph and replayed with exact results.

A CUDA graph replays its kernels with no host code between them, so a lookup inside one can
neither read back how many keys missed nor fetch them from host RAM. While a lookup runs in a
`keras_hps.gpu_tier.CaptureScope`, the GPU tier answers it with no host synchronisation: every
key is probed in place, rows the device holds are written, and any key it does not hold (a
cache miss; a key outside the table's key type) raises the scope's miss flag on the device and
gets a zero row. `CapturedCall` reads that one flag after each replay and, when it is set, runs
the call again eagerly, which fetches the missing rows from the tiers below (and fills the
cache, so the next replay hits): the result is always exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keras_hps.gpu_tier import CaptureScope, deferring

__all__ = ["CapturedCall"]


# ---------------------------------------------------------------------------------- structures
def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, list | tuple):
        return [x for item in tree for x in _leaves(item)]
    if isinstance(tree, dict):
        return [x for key in sorted(tree) for x in _leaves(tree[key])]
    return [tree]


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "copy_")


def _clone(tree: Any) -> Any:
    if isinstance(tree, list | tuple):
        return type(tree)(_clone(x) for x in tree)
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    return tree.clone() if _is_tensor(tree) else tree


def _copy_into(dst: Any, src: Any, what: str) -> Any:
    """Copy the tensors of ``src`` into those of ``dst`` (same structure, shapes and dtypes);
    returns ``dst``. ValueError names the first mismatch."""
    d, s = _leaves(dst), _leaves(src)
    if len(d) != len(s):
        raise ValueError(f"CapturedCall: {what} has {len(s)} leaves, the capture had {len(d)}")
    for i, (a, b) in enumerate(zip(d, s, strict=True)):
        if _is_tensor(a):
            if not _is_tensor(b) or a.shape != b.shape or a.dtype != b.dtype:
                got = (tuple(b.shape), b.dtype) if _is_tensor(b) else type(b).__name__
                raise ValueError(f"CapturedCall: {what} {i} is {got}; the graph was captured "
                                 f"for {(tuple(a.shape), a.dtype)}")
            if a is not b:
                a.copy_(b, non_blocking=True)
        elif a is not b and a != b:
            raise ValueError(f"CapturedCall: {what} {i} is {b!r}; the graph was captured with "
                             f"{a!r}")
    return dst


class CapturedCall:
    """``fn(*example_inputs)`` captured once in a CUDA graph; each call copies its inputs into
    the graph's, replays it, and returns its outputs, exact even when a lookup missed.

    Lookups inside ``fn`` (keras-hps layers, ``ParameterServer.lookup`` with CUDA keys) run
    with no host synchronisation in the graph. After each replay the call reads one flag (its
    one wait on the device); when a lookup met a key its GPU tier did not hold, it runs
    ``fn`` again eagerly (which fetches the rows from host RAM or the table file, and fills
    the dynamic cache) and copies that result into the outputs. ``reruns`` counts those calls.

    Inputs must have the example's structure, shapes and dtypes (one graph per shape, as
    with any CUDA graph). The outputs are the graph's own tensors: the next call overwrites
    them, so copy what must outlive it. ``warmup`` eager calls (on a side stream, as
    ``torch.cuda.graph`` asks) come first: they compile the kernels and warm the caches.
    ``pool`` (``torch.cuda.graph_pool_handle()``) shares one memory pool between graphs that
    are replayed one at a time, in the order they were captured.
    Without CUDA (CPU tensors), nothing is captured and each call runs ``fn`` on the same
    capturable path, with the same flag and rerun: the protocol without the graph.
    """

    def __init__(self, fn: Callable[..., Any], *example_inputs: Any, warmup: int = 2,
                 pool: Any = None) -> None:
        import torch

        tensors = [x for x in _leaves(example_inputs) if _is_tensor(x)]
        if not tensors:
            raise ValueError("CapturedCall needs at least one tensor among the example inputs")
        self.fn = fn
        self.device = tensors[0].device
        self.inputs = _clone(example_inputs)
        self.scope = CaptureScope(self.device)
        self.graph = None
        self.outputs: Any = None
        self.replays = 0
        self.reruns = 0
        if self.device.type != "cuda":
            return
        caller = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.fn(*self.inputs)
        caller.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the GPU tier's background insert threads may run during the capture
        with deferring(self.scope), torch.cuda.graph(graph, pool=pool,
                                                     capture_error_mode="thread_local"):
            self.scope.flag.zero_()
            self.outputs = self.fn(*self.inputs)
        self.graph = graph

    def __call__(self, *inputs: Any) -> Any:
        """The outputs of ``fn(*inputs)``."""
        _copy_into(self.inputs, inputs, "input")
        scope = self.scope
        if self.graph is None:
            with deferring(scope):
                scope.flag.zero_()
                out = self.fn(*self.inputs)
        else:
            with scope.replaying():
                self.graph.replay()
            out = self.outputs
        self.replays += 1
        if int(scope.flag.item()):  # the call's one wait on the device
            self.reruns += 1
            fresh = self.fn(*self.inputs)
            out = fresh if self.graph is None else _copy_into(self.outputs, fresh, "output")
        return out
