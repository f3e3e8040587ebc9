"""The miss flag of a lookup captured in a CUDA graph.

A graph replays the same kernels with no host code between them, so a query kernel cannot
hand its misses back to the host. Instead it raises a flag in device memory (an int32 that the
caller zeroes before the replay and reads once after it): any key that missed sets it to 1,
and the caller then resolves the lookup outside the graph.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def raise_flag(flag_ptr, miss):
    """Set the int32 at ``flag_ptr`` to 1 when any lane of ``miss`` is set (every writer
    writes 1, so the race between programs is benign)."""
    any_miss = tl.max(miss.to(tl.int32), axis=0)
    tl.store(flag_ptr, any_miss, mask=any_miss > 0)
