"""Scratch folders for the benchmarks: removed when the benchmark ends, unless the user named one.

A benchmark writes tables and repositories of several GiB; left behind, a few runs fill a disk
(or, under /dev/shm, the machine's memory).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)  # runs the atexit hooks, which a plain SIGTERM would skip


def scratch_dir(prefix: str, parent: str | None = None, keep: str | None = None) -> Path:
    """A new folder for one run: ``keep`` itself when given (kept), else a temporary folder
    under ``parent`` that is removed when the process exits, on SIGTERM and Ctrl-C too."""
    if keep:
        os.makedirs(keep, exist_ok=True)
        return Path(keep)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return path
