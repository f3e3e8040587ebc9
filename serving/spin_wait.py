"""Spin-wait on the request threads' CPUs while requests run and for a short window after.

On VMs an idle vCPU halts, and waking a thread on a halted vCPU waits for the hypervisor to
run it again. A served request hands work between several threads (gRPC's poll thread, a
handler thread, the model's pools), and a hand-off to a halted vCPU pays that wake-up.
`SpinWait` keeps the frontend CPUs running between those hand-offs, as the kernel's haltpoll
cpuidle governor or TensorFlow's own thread pools do: one thread, restricted to the frontend
CPUs and scheduled `SCHED_IDLE` so that any other runnable thread preempts it at once, spins
while a request is in flight and for `window_s` after the last one ends, then blocks, so an
idle server uses no CPU.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterable

from keras_hps.errors import ConfigError

log = logging.getLogger("keras_hps.serving")

# One spin step: hashing 64 KiB keeps the CPU busy for ~40 us with the GIL released (hashlib
# drops it for inputs over 2 KiB), so the spinner holds the GIL about 1 us in 40 and does not
# hold up the request threads' Python. A Python loop around time.sleep(0) or os.sched_yield()
# would take the GIL back every microsecond or so.
_SPIN_BLOCK = bytes(64 * 1024)


def _spin_step() -> None:
    hashlib.sha1(_SPIN_BLOCK)


class SpinWait:
    """A spinner thread on `cpus`, active while requests run and for `window_s` after.

    `begin()` / `end()` bracket every request. Linux only (`SCHED_IDLE`); elsewhere, with no
    CPUs or with a zero window, nothing spins.
    """

    def __init__(self, cpus: Iterable[int], window_s: float) -> None:
        if window_s < 0:
            raise ConfigError(f"--spin_wait_ms must be >= 0, got {window_s * 1e3:g}")
        self.cpus = frozenset(cpus)
        self.window_s = window_s
        self._busy = 0
        self._deadline = 0.0
        self._lock = threading.Lock()
        self._active = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.spinning = False  # the spinner is inside its spin loop now

    def start(self) -> SpinWait:
        """Starts the spinner thread, where there is one to start. Returns self."""
        if self.window_s <= 0 or not self.cpus:
            return self
        if not hasattr(os, "SCHED_IDLE") or not hasattr(os, "sched_setaffinity"):
            log.info("--spin_wait_ms: no SCHED_IDLE on this platform; not spinning")
            return self
        self._thread = threading.Thread(target=self._loop, name="keras-hps-spin", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """True while the spinner thread exists (it may be blocked, not spinning)."""
        return self._thread is not None and self._thread.is_alive()

    def begin(self) -> None:
        """A request started: spin until it ends (and the window after)."""
        if self._thread is None:
            return
        with self._lock:
            self._busy += 1
        if not self._active.is_set():
            self._active.set()

    def end(self) -> None:
        """A request ended: keep spinning for the window after the last running one."""
        if self._thread is None:
            return
        with self._lock:
            self._busy -= 1
            self._deadline = time.monotonic() + self.window_s

    def close(self) -> None:
        """Stops the spinner thread."""
        self._closed = True
        self._active.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _wanted(self) -> bool:
        return not self._closed and (self._busy > 0 or time.monotonic() < self._deadline)

    def _loop(self) -> None:
        os.sched_setaffinity(0, self.cpus)  # this thread only
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        while not self._closed:
            self._active.wait()
            self.spinning = True
            while self._wanted():
                _spin_step()
            self.spinning = False
            self._active.clear()
            if self._wanted():  # a request began between the last check and clear()
                self._active.set()
