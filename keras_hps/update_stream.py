"""Online-update announcements on a Redis Stream per model, shared by every server.

The writer of an update first writes the rows to the shared tier (`RedisClusterTier.update`),
then announces them with `UpdatePublisher.publish`; every server runs an `UpdateSubscriber`
that reads the stream in a background thread and calls `on_update(table_id, keys, vectors)`
for each message, where the server updates or invalidates its GPU cache and host tier.

Stream `khps:{updates/<model>}:stream` (the hash tag puts it and its counter
`khps:{updates/<model>}:seq` on one node). Each message (XADD with `MAXLEN ~`, so the
stream keeps about `maxlen` recent messages) has the fields:

- `s`: sequence number (decimal), one more than the previous message's: a small Lua script
  increments the counter and adds the message atomically;
- `ns`: the table's namespace (model/table/version, `redis_tier.table_namespace`);
- `t`: the table id within the model (decimal); `d`: the row width (decimal);
- `k`: the keys, int64 little-endian bytes;
- `v`: the rows, float32 little-endian bytes `[n, d]`, only when they fit `max_inline_bytes`;
  without `v` the message is a reference: the rows are already in the shared tier, and
  `on_update` gets `None` (invalidate the keys, or read them back from the shared tier).

A subscriber checks that sequence numbers follow each other: a jump (the stream was trimmed
past it while it was disconnected or slow) or a step back (the stream's node lost its data)
calls `on_gap(reason)`, where the server must drop every cached row of the model, because
updates may have been missed. Start positions: `"$"` (default) is the end of the stream when
the subscriber is made: make it before loading from the shared tier and start it after, so
an update that lands during the load is applied too (applying an update twice is harmless).
`"0"` is the oldest retained message; a `StreamPosition` resumes where another left off.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from keras_hps.errors import UnavailableError
from keras_hps.redis_tier import redis_errors

__all__ = ["StreamPosition", "UpdatePublisher", "UpdateSubscriber", "stream_keys"]

_PUBLISH = """
local s = redis.call('INCR', KEYS[2])
local args = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 's', s}
for i = 2, #ARGV do args[#args + 1] = ARGV[i] end
return {redis.call(unpack(args)), s}
"""
_POSITION = """
local e = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local s = redis.call('GET', KEYS[2])
if e[1] then return {e[1][1], s or '0'} end
return {'0-0', s or '0'}
"""


@dataclass(frozen=True)
class StreamPosition:
    """A place in a model's update stream: the last message id read and its sequence number
    (`seq` None: unknown, the next message read sets it)."""

    id: str
    seq: int | None


def stream_keys(model: str) -> tuple[str, str]:
    """(stream key, sequence counter key) of `model`'s update stream."""
    tag = "updates/" + urllib.parse.quote(model, safe="-_.~")
    return f"khps:{{{tag}}}:stream", f"khps:{{{tag}}}:seq"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class UpdatePublisher:
    """Announces updates of one model's tables on its stream (see the module docstring)."""

    def __init__(self, client: Any, model: str, *, maxlen: int = 10000,
                 max_inline_bytes: int = 256 << 10, max_keys_per_message: int = 65536) -> None:
        self._client = client
        self.model = model
        self.key, self.seq_key = stream_keys(model)
        self.maxlen = int(maxlen)
        self.max_inline_bytes = int(max_inline_bytes)
        self.max_keys_per_message = int(max_keys_per_message)

    def publish(self, table_id: int, namespace: str, keys: Any,
                vectors: Any = None) -> StreamPosition:
        """Announce that the rows of `keys` changed (write them to the shared tier first).
        Rows go in the message when given and small enough, else it is a reference. Returns
        the position of the last message written; UnavailableError when Redis cannot take it.
        """
        k = np.ascontiguousarray(keys, dtype="<i8").reshape(-1)
        v = None if vectors is None else np.ascontiguousarray(vectors, dtype="<f4")
        if v is not None and (v.ndim != 2 or len(v) != len(k)):
            raise ValueError(f"vectors must be [{len(k)}, dim], got {list(v.shape)}")
        if len(k) == 0:
            return self.position()
        dim = 0 if v is None else v.shape[1]
        pos = StreamPosition("0-0", None)
        step = self.max_keys_per_message
        for s in range(0, len(k), step):
            kk = k[s:s + step]
            fields: list[Any] = [b"ns", namespace.encode(), b"t", str(int(table_id)),
                                 b"d", str(dim), b"k", kk.tobytes()]
            if v is not None and len(kk) * dim * 4 <= self.max_inline_bytes:
                fields += [b"v", v[s:s + step].tobytes()]
            try:
                mid, seq = self._client.eval(_PUBLISH, 2, self.key, self.seq_key, self.maxlen,
                                             *fields)
            except redis_errors() as e:
                raise UnavailableError(f"update stream of model {self.model!r}: "
                                       f"{type(e).__name__}: {e}") from None
            pos = StreamPosition(_s(mid), int(seq))
        return pos

    def position(self) -> StreamPosition:
        """The end of the stream now (where a subscriber started with "$" begins)."""
        try:
            mid, seq = self._client.eval(_POSITION, 2, self.key, self.seq_key)
        except redis_errors() as e:
            raise UnavailableError(f"update stream of model {self.model!r}: "
                                   f"{type(e).__name__}: {e}") from None
        return StreamPosition(_s(mid), int(seq))


class UpdateSubscriber:
    """Reads one model's update stream in a background thread and calls
    `on_update(table_id, keys, vectors_or_None)` for each message of a known table.

    `tables` maps namespaces to table ids: messages of other namespaces (another version of
    the model) are skipped; None passes every message's own table id. Redis errors are retried
    with backoff until the node is back (`connected` tells the state); `stop()` ends the
    thread within about `block_ms`. A malformed message or an `on_update` that raises goes to
    `on_error` and reading goes on: the server should then drop the model's cached rows, as
    after a gap. `on_batch()` runs after the messages of one read (up to `count`) were passed
    to `on_update`: a server may collect their keys there and apply them at once."""

    def __init__(self, client: Any, model: str,
                 on_update: Callable[[int, np.ndarray, np.ndarray | None], None], *,
                 tables: Mapping[str, int] | None = None,
                 start: str | StreamPosition = "$",
                 on_gap: Callable[[str], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 on_batch: Callable[[], None] | None = None,
                 block_ms: int = 250, count: int = 256) -> None:
        self._client = client
        self.model = model
        self.key, self.seq_key = stream_keys(model)
        self.on_update = on_update
        self.on_gap = on_gap
        self.on_error = on_error
        self.on_batch = on_batch
        self.tables = None if tables is None else dict(tables)
        self.block_ms = int(block_ms)
        self.count = int(count)
        if isinstance(start, StreamPosition):
            pos = start
        elif start == "$":
            pos = UpdatePublisher(client, model).position()
        elif start in ("0", "0-0"):
            pos = StreamPosition("0-0", None)
        else:
            raise ValueError(f"start must be '$', '0' or a StreamPosition, got {start!r}")
        self._last_id = pos.id
        self._last_seq = pos.seq
        self._applied_seq = pos.seq  # after on_batch: what wait_for waits for
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.applied = self.skipped = self.gaps = self.errors = 0
        self.connected = True
        self.last_error: BaseException | None = None

    @property
    def position(self) -> StreamPosition:
        """The last message read."""
        with self._cond:
            return StreamPosition(self._last_id, self._last_seq)

    def start(self) -> UpdateSubscriber:
        """Start the reading thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"khps-updates-{self.model}")
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop reading and wait for the thread to end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_for(self, seq: int, timeout: float = 10.0) -> bool:
        """Wait until the message with sequence number `seq` was applied; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._applied_seq is None or self._applied_seq < seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                reply = self._client.xread({self.key: self._last_id}, count=self.count,
                                           block=self.block_ms)
            except redis_errors() as e:
                self.connected = False
                self._failed(e)
                self._stop.wait(backoff)
                backoff = min(1.0, backoff * 2)
                continue
            backoff = 0.05
            self.connected = True
            if not reply:
                continue
            streams = reply.items() if isinstance(reply, dict) else reply
            for _, entries in streams:
                for mid, fields in entries:
                    try:
                        self._handle(fields)
                    except Exception as e:  # a malformed message, or a callback that failed
                        self._failed(e)
                    with self._cond:
                        self._last_id = _s(mid)
                        if b"s" in fields and fields[b"s"].isdigit():
                            self._last_seq = int(fields[b"s"])
            if self.on_batch is not None:
                try:
                    self.on_batch()
                except Exception as e:
                    self._failed(e)
            with self._cond:
                self._applied_seq = self._last_seq
                self._cond.notify_all()

    def _failed(self, e: BaseException) -> None:
        self.errors += 1
        self.last_error = e
        if self.on_error is not None:
            self.on_error(e)

    def _handle(self, fields: Mapping[bytes, bytes]) -> None:
        """Check the sequence number, then apply one message (the caller records it read)."""
        seq = int(fields[b"s"])
        last = self._last_seq
        if last is not None and seq != last + 1:
            self.gaps += 1
            reason = (f"messages {last + 1}..{seq - 1} of model {self.model!r} were trimmed "
                      "before they were read" if seq > last + 1 else
                      f"the update stream of model {self.model!r} was reset (sequence "
                      f"{seq} after {last}): its node lost its data")
            if self.on_gap is not None:
                self.on_gap(reason)
        ns = _s(fields[b"ns"])
        table_id = int(fields[b"t"]) if self.tables is None else self.tables.get(ns)
        if table_id is None:
            self.skipped += 1
        else:
            keys = np.frombuffer(fields[b"k"], "<i8").astype(np.int64)
            rows = None
            if b"v" in fields:
                dim = int(fields[b"d"])
                rows = np.frombuffer(fields[b"v"], "<f4").reshape(len(keys), dim).copy()
            self.on_update(table_id, keys, rows)
            self.applied += 1
