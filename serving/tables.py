"""The parameter servers of the loaded versions: one per distinct (config, table contents).

A version of an external-placement model reads its own tables (`keras_hps.servable.
version_tables`). Versions whose configs and table contents are equal (a retrain that
changed only dense weights) share one loaded parameter server, so a hot swap does not load
the tables twice; the last version to let go of a parameter server closes it, which frees
its host and GPU memory. Nothing here is process-global: a server holds one registry, and
any number of repositories and `hps.json` files live side by side in it.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from keras_hps.servable import VersionTables

log = logging.getLogger("keras_hps.serving")


class _Entry:
    __slots__ = ("built", "refs", "order")

    def __init__(self, order: int) -> None:
        self.built: Future = Future()  # the parameter server, or the error building it
        self.refs = 0
        self.order = order  # when it was first asked for: the newest answers table stats


class Lease:
    """One version's hold on a parameter server; `release()` lets it go (idempotent)."""

    def __init__(self, registry: ParameterServers, key: str, parameter_server: Any) -> None:
        self._registry = registry
        self._key: str | None = key
        self.parameter_server = parameter_server

    def release(self) -> None:
        """Gives the hold back; the parameter server closes when no version holds it."""
        key, self._key = self._key, None
        if key is not None:
            self._registry._release(key)


class ParameterServers:
    """Reference-counted parameter servers keyed by `VersionTables.key`."""

    def __init__(self, factory: Callable[[str], Any] | None = None) -> None:
        if factory is None:
            from keras_hps.parameter_server import ParameterServer

            factory = ParameterServer
        self._factory = factory
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._counter = 0

    def acquire(self, tables: VersionTables) -> Lease:
        """A hold on the parameter server for `tables`, built now unless one with the same
        key is loaded (or being loaded: then this waits for it)."""
        with self._lock:
            entry = self._entries.get(tables.key)
            builder = entry is None
            if builder:
                self._counter += 1
                entry = self._entries[tables.key] = _Entry(self._counter)
            entry.refs += 1
        if builder:
            try:
                entry.built.set_result(self._factory(tables.path))
                log.info("Loaded the tables of %s", tables.path)
            except BaseException as exc:
                entry.built.set_exception(exc)
        else:
            log.info("Sharing loaded tables with identical content for %s", tables.path)
        try:
            return Lease(self, tables.key, entry.built.result())
        except BaseException:
            self._release(tables.key)
            raise

    def _release(self, key: str) -> None:
        with self._lock:
            entry = self._entries[key]
            entry.refs -= 1
            if entry.refs > 0:
                return
            del self._entries[key]
        if entry.built.exception() is None:
            entry.built.result().close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def loaded(self) -> list[Any]:
        """The loaded parameter servers, newest first."""
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: -e.order)
        return [
            e.built.result() for e in entries if e.built.done() and e.built.exception() is None
        ]

    def table_stats(self) -> Iterator[tuple[str, int, dict[str, Any]]]:
        """(model, table id, stats) of every table served, once per (model, table): from the
        newest parameter server that has it (during a hot swap, the new version's)."""
        seen: set[tuple[str, int]] = set()
        for ps in self.loaded():
            for model in ps.config.models:
                for table in range(len(model.sparse_files)):
                    if (model.model, table) not in seen:
                        seen.add((model.model, table))
                        yield model.model, table, ps.stats(model.model, table)


def free_memory() -> None:
    """Returns what an unloaded version held to the system: Python's garbage, the C heap's
    free pages (glibc's malloc_trim), and torch's cached GPU blocks (only if torch is
    already in use; it is never imported for this)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
