"""Online updates of one parameter server's tables: how an update is made durable and shared,
and how this server hears of updates made elsewhere. Each `ParameterServer` owns one of these
(no process-global state); it stops with the server.

- `SharedUpdates` (`volatile_db.type: redis_cluster`): one cluster client for the server's
  Redis Cluster tiers and a Redis Stream per model (`keras_hps.update_stream`). `update`
  writes the rows to the shared tier, announces them on the model's stream and applies them
  to this server's own tiers before it returns; a subscriber thread per model (with its own
  connection, made before the tables fill, started after) drops the announced keys from this
  server's host and GPU tiers (the keys of one read of the stream together), so their next
  lookup reads the shared tier. Dropping, not writing the announced rows, is what keeps a
  server right whatever order announcements of one key arrive in: the shared tier always
  holds the newest row. A gap in the stream, or a message that cannot be applied, drops
  every cached row of the model.
- `LogUpdates` (no Redis): `update` appends to the table's durable update log (fsynced, under
  a file lock) and then applies every record of the log not applied yet, in log order. A
  thread polls each table's log every `poll_s` seconds for records other processes appended
  (`keras-hps update`, another server on the machine) and applies them the same way. At
  start the log is replayed, so an update survives a restart.

Acknowledged means: the stream took the announcement (Redis), or the log append returned.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from keras_hps.redis_tier import (
    RedisClusterSettings,
    RedisClusterTier,
    connect_cluster,
    redis_errors,
)
from keras_hps.update_log import UpdateLog, UpdateLogReader, last_rows, log_path
from keras_hps.update_stream import UpdatePublisher, UpdateSubscriber

if TYPE_CHECKING:
    from keras_hps.parameter_server import TableSpec, TieredTable

__all__ = ["UPDATE_POLL_S", "LogUpdates", "SharedUpdates"]

log = logging.getLogger("keras_hps.updates")

#: Seconds between two reads of a table's update log by a running server (without Redis).
UPDATE_POLL_S = 0.1


class SharedUpdates:
    """Updates through a Redis Cluster shared by every server (see the module docstring)."""

    def __init__(self, settings: RedisClusterSettings, models: Sequence[str]) -> None:
        self.settings = settings
        self.client: Any = None
        self._subscribers: dict[str, UpdateSubscriber] = {}
        self._readers: list[Any] = []  # the subscribers' clients
        self._tables: dict[tuple[str, int], TieredTable] = {}
        self._news: dict[tuple[str, int], list[np.ndarray]] = {}  # keys announced, not applied
        self.gaps = self.drops = 0
        try:
            self.client = connect_cluster(settings)
            self._publishers = {m: UpdatePublisher(self.client, m) for m in models}
            for m in models:  # each with its own connection: XREAD blocks it
                reader = connect_cluster(settings, f"update stream of model {m!r}")
                self._readers.append(reader)
                self._subscribers[m] = UpdateSubscriber(
                    reader, m, partial(self._on_update, m), tables={}, start="$",
                    on_gap=partial(self._on_gap, m), on_error=partial(self._on_error, m),
                    on_batch=partial(self._apply_news, m))
        except BaseException:
            self.close()
            raise

    def tier(self, spec: TableSpec, version: str) -> RedisClusterTier:
        """The Redis Cluster tier of table `spec` in version `version` (its content id)."""
        return RedisClusterTier(self.settings, model=spec.model, table=spec.name,
                                version=version, dim=spec.dim, client=self.client)

    def add(self, table: TieredTable) -> None:
        """Serve updates of `table` (its Redis tier made by `tier`); before `start`."""
        spec = table.spec
        self._tables[(spec.model, spec.table_id)] = table
        sub = self._subscribers[spec.model]
        sub.tables[table.redis.namespace] = spec.table_id  # other versions' news: skipped
        table.updates_seen = lambda: sub.connected

    def start(self) -> None:
        """Start reading the update streams."""
        for sub in self._subscribers.values():
            sub.start()

    def update(self, table: TieredTable, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Write unique `keys`' rows to the shared tier, announce them, apply them here."""
        spec = table.spec
        with table.update_lock:  # this server's updates of a table apply in the stream's order
            table.redis.update(keys, vectors)
            self._publishers[spec.model].publish(spec.table_id, table.redis.namespace, keys,
                                                 vectors)
            table.apply_update(keys, vectors)

    def _on_update(self, model: str, table_id: int, keys: np.ndarray,
                   rows: np.ndarray | None) -> None:
        if (model, table_id) in self._tables:
            self._news.setdefault((model, table_id), []).append(keys)

    def _apply_news(self, model: str) -> None:
        """After one read of `model`'s stream: drop every announced key from this server's
        tiers, once per table (their next lookup reads the shared tier)."""
        for where in [w for w in self._news if w[0] == model]:
            table = self._tables[where]
            keys = np.unique(np.concatenate(self._news.pop(where)))
            table.redis.note_update()
            table.apply_update(keys, None)

    def _on_gap(self, model: str, reason: str) -> None:
        self.gaps += 1
        log.warning("%s; dropping every cached row of model %r", reason, model)
        self._drop(model)

    def _on_error(self, model: str, exc: BaseException) -> None:
        if isinstance(exc, redis_errors()):  # reading resumes where it stopped: nothing lost
            return
        log.warning("an update of model %r could not be applied (%s: %s); dropping every "
                    "cached row of the model", model, type(exc).__name__, exc)
        self._drop(model)

    def _drop(self, model: str) -> None:
        self.drops += 1
        for (m, _), table in self._tables.items():
            if m == model:
                table.redis.note_update()
                table.drop_cached()

    def stats(self) -> dict[str, Any]:
        """Per model: the subscriber's counters and connection state."""
        return {m: {"applied": s.applied, "skipped": s.skipped, "gaps": s.gaps,
                    "errors": s.errors, "connected": s.connected}
                for m, s in self._subscribers.items()}

    def close_readers(self) -> None:
        """Stop reading the update streams."""
        for sub in self._subscribers.values():
            sub.stop()

    def close(self) -> None:
        """Stop reading and close every connection."""
        self.close_readers()
        for reader in self._readers:
            reader.close()
        self._readers.clear()
        if self.client is not None:
            self.client.close()
            self.client = None


@dataclass
class _Tail:
    """One table's update log, as this server reads and writes it."""

    table: TieredTable
    reader: UpdateLogReader
    lock: threading.Lock = field(default_factory=threading.Lock)
    writer: UpdateLog | None = None


class LogUpdates:
    """Updates through each table's durable update log (see the module docstring)."""

    def __init__(self, poll_s: float = UPDATE_POLL_S) -> None:
        self.poll_s = float(poll_s)
        self._tails: dict[tuple[str, int], _Tail] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.applied = 0
        self.last_error: BaseException | None = None

    def add(self, table: TieredTable) -> None:
        """Serve updates of `table`: its log is replayed now."""
        spec = table.spec
        tail = _Tail(table, UpdateLogReader(log_path(spec.path), spec.dim))
        self._tails[(spec.model, spec.table_id)] = tail
        self._catch_up(tail)

    def start(self) -> None:
        """Start polling the logs for records other processes append (the thread holds this
        object weakly: a server dropped without `close` is still freed, and its thread ends)."""
        if self._thread is None and self._tails:
            self._thread = threading.Thread(target=_poll_logs,
                                            args=(weakref.ref(self), self._stop, self.poll_s),
                                            daemon=True, name="khps-update-logs")
            self._thread.start()

    def update(self, table: TieredTable, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Append unique `keys`' rows to the table's log (durable when this returns), then
        apply the log up to and including them."""
        spec = table.spec
        tail = self._tails[(spec.model, spec.table_id)]
        with tail.lock:
            if tail.writer is None:
                tail.writer = UpdateLog(log_path(spec.path), spec.dim)
            writer = tail.writer
        writer.append(keys, vectors)
        self._catch_up(tail)

    def _catch_up(self, tail: _Tail) -> int:
        """Apply the records appended to `tail`'s log since the last call, merged (the last
        row of a key wins); returns how many."""
        with tail.lock:
            records = tail.reader.read()
            if records:
                keys = np.concatenate([k for _, k, _ in records])
                rows = np.concatenate([r for _, _, r in records])
                tail.table.apply_update(*last_rows(keys, rows))
                self.applied += len(records)
        return len(records)

    def _poll_once(self) -> None:
        for tail in list(self._tails.values()):
            try:
                self._catch_up(tail)
            except Exception as e:  # a bad log: say so once, keep serving the rest
                if repr(e) != repr(self.last_error):
                    log.error("update log of %s/%s: %s", tail.table.spec.model,
                              tail.table.spec.name, e)
                self.last_error = e

    def stats(self) -> dict[str, Any]:
        """Records applied, and the last error reading a log."""
        return {"applied": self.applied,
                "last_error": None if self.last_error is None else str(self.last_error)}

    def close_readers(self) -> None:
        """Stop polling the logs."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def close(self) -> None:
        """Stop polling and close the logs this server wrote."""
        self.close_readers()
        for tail in self._tails.values():
            if tail.writer is not None:
                tail.writer.close()


def _poll_logs(ref: weakref.ReferenceType[LogUpdates], stop: threading.Event,
               poll_s: float) -> None:
    while not stop.wait(poll_s):
        updates = ref()
        if updates is None:
            return
        updates._poll_once()
        del updates
