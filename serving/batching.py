"""Server-side batching with TF Serving's `BatchingParameters` (text format) semantics.

Concurrent predict requests for the same model version, signature and outputs are merged
along dimension 0 into one call of up to `max_batch_size` rows, after waiting at most
`batch_timeout_micros` for more to arrive; `num_batch_threads` batches run at once,
`allowed_batch_sizes` pads a batch (repeating its first row) to the next allowed size, and
more than `max_enqueued_batches` waiting batches is UNAVAILABLE, as in TF Serving.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from keras_hps.errors import ConfigError

from .status import ServingError, invalid_argument

_FIELDS = (  # (name, number, wrapper type or scalar, repeated)
    ("max_batch_size", 1, "Int64Value", False),
    ("batch_timeout_micros", 2, "Int64Value", False),
    ("max_enqueued_batches", 3, "Int64Value", False),
    ("num_batch_threads", 4, "Int64Value", False),
    ("thread_pool_name", 5, "StringValue", False),
    ("allowed_batch_sizes", 6, "int64", True),
    ("pad_variable_length_inputs", 7, "bool", False),
    ("enable_large_batch_splitting", 8, "BoolValue", False),
    ("max_execution_batch_size", 9, "Int64Value", False),
)


def batching_parameters_class() -> Any:
    """The `tensorflow.serving.BatchingParameters` message class (built from its fields,
    since the tensorflow-serving-api package does not ship session_bundle_config_pb2)."""
    from .protos import message_class

    return message_class("tensorflow.serving.BatchingParameters", _FIELDS)


@dataclass(frozen=True)
class BatchingOptions:
    """The batching parameters in effect (TF Serving's defaults where a field is unset)."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 100
    num_batch_threads: int = os.cpu_count() or 1
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False


def parse_batching_parameters(text: str, source: str = "<text>") -> BatchingOptions:
    """Options from a batching parameters file (BatchingParameters text proto)."""
    from google.protobuf import text_format

    proto = batching_parameters_class()()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as exc:
        raise ConfigError(f"{source}: not a valid BatchingParameters text proto: {exc}") from exc
    defaults = BatchingOptions()

    def get(name: str) -> Any:
        return getattr(proto, name).value if proto.HasField(name) else getattr(defaults, name)

    opts = BatchingOptions(
        max_batch_size=int(get("max_batch_size")),
        batch_timeout_micros=int(get("batch_timeout_micros")),
        max_enqueued_batches=int(get("max_enqueued_batches")),
        num_batch_threads=int(get("num_batch_threads")),
        allowed_batch_sizes=tuple(int(v) for v in proto.allowed_batch_sizes),
        pad_variable_length_inputs=bool(proto.pad_variable_length_inputs),
    )
    if opts.max_batch_size < 1:
        raise ConfigError(f"{source}: max_batch_size must be >= 1, got {opts.max_batch_size}")
    if opts.num_batch_threads < 1:
        raise ConfigError(f"{source}: num_batch_threads must be >= 1")
    if opts.batch_timeout_micros < 0 or opts.max_enqueued_batches < 1:
        raise ConfigError(f"{source}: batch_timeout_micros must be >= 0, max_enqueued_batches >= 1")
    sizes = opts.allowed_batch_sizes
    if sizes:
        if list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
            raise ConfigError(f"{source}: allowed_batch_sizes must increase: {list(sizes)}")
        if sizes[-1] != opts.max_batch_size:
            raise ConfigError(
                f"{source}: the last entry of allowed_batch_sizes ({sizes[-1]}) must equal "
                f"max_batch_size ({opts.max_batch_size})"
            )
    if opts.pad_variable_length_inputs:
        raise ConfigError(f"{source}: pad_variable_length_inputs is not supported")
    return opts


def load_batching_parameters(path: str | None) -> BatchingOptions:
    """Options from `--batching_parameters_file` (defaults when no file is given)."""
    if not path:
        return BatchingOptions()
    try:
        with open(path, encoding="utf-8") as f:
            return parse_batching_parameters(f.read(), path)
    except OSError as exc:
        raise ConfigError(f"cannot read batching parameters file {path}: {exc}") from exc


class _Task:
    __slots__ = ("inputs", "rows", "future", "enqueued")

    def __init__(self, inputs: dict[str, np.ndarray], rows: int) -> None:
        self.inputs = inputs
        self.rows = rows
        self.future: Future = Future()
        self.enqueued = time.monotonic()


Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class Batcher:
    """Merges concurrent requests with the same key into batched runs."""

    def __init__(self, options: BatchingOptions) -> None:
        self.options = options
        self._cond = threading.Condition()
        self._queues: dict[Any, tuple[Runner, list[_Task]]] = {}
        self._stopped = False
        self._threads = [
            threading.Thread(target=self._work, name=f"keras-hps-batch-{i}", daemon=True)
            for i in range(options.num_batch_threads)
        ]
        for t in self._threads:
            t.start()

    def run(self, key: Any, runner: Runner, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs `inputs` through `runner` as part of a batch; blocks until its rows are back.

        `key` identifies what may share a batch (model version, signature, outputs); inputs
        whose shapes beyond dimension 0 differ never share one.
        """
        if not inputs or any(np.ndim(v) == 0 for v in inputs.values()):
            return runner(inputs)
        rows = {int(v.shape[0]) for v in inputs.values()}
        if len(rows) != 1:
            raise invalid_argument(
                "Batching session Run() input tensors must have equal 0th-dimension size"
            )
        n = rows.pop()
        limit = self.options.max_batch_size
        if n > limit:
            raise invalid_argument(f"Task size {n} is larger than maximum input batch size {limit}")
        if n == 0:
            return runner(inputs)
        full_key = (key, tuple(sorted((k, v.shape[1:], v.dtype.str) for k, v in inputs.items())))
        task = _Task(inputs, n)
        with self._cond:
            if self._stopped:
                raise ServingError("UNAVAILABLE", "the server is shutting down")
            _, tasks = self._queues.setdefault(full_key, (runner, []))
            pending = sum(t.rows for t in tasks) + n
            if math.ceil(pending / limit) > self.options.max_enqueued_batches:
                raise ServingError(
                    "UNAVAILABLE",
                    "The batch scheduling queue to which this task was submitted is full",
                )
            tasks.append(task)
            self._cond.notify_all()
        return task.future.result()

    def _take_ready(self) -> tuple[Runner, list[_Task]] | float | None:
        """A batch to run now, else the seconds until the next one is due (None: idle)."""
        limit = self.options.max_batch_size
        timeout = self.options.batch_timeout_micros / 1e6
        now = time.monotonic()
        wait: float | None = None
        for key, (runner, tasks) in list(self._queues.items()):
            if not tasks:
                del self._queues[key]
                continue
            due = tasks[0].enqueued + timeout
            if sum(t.rows for t in tasks) >= limit or due <= now or self._stopped:
                batch, rows = [], 0
                while tasks and rows + tasks[0].rows <= limit:
                    rows += tasks[0].rows
                    batch.append(tasks.pop(0))
                return runner, batch
            wait = due - now if wait is None else min(wait, due - now)
        return wait

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    ready = self._take_ready()
                    if isinstance(ready, tuple):
                        break
                    if self._stopped and ready is None:
                        return
                    self._cond.wait(ready)
            self._run_batch(*ready)

    def _run_batch(self, runner: Runner, tasks: list[_Task]) -> None:
        try:
            names = list(tasks[0].inputs)
            merged = {k: np.concatenate([t.inputs[k] for t in tasks]) for k in names}
            rows = sum(t.rows for t in tasks)
            target = next((s for s in self.options.allowed_batch_sizes if s >= rows), rows)
            if target > rows:  # pad with copies of the first row; the extra outputs are dropped
                merged = {
                    k: np.concatenate([v, np.repeat(v[:1], target - rows, axis=0)])
                    for k, v in merged.items()
                }
            outputs = runner(merged)
            start = 0
            for task in tasks:
                part = {}
                for name, value in outputs.items():
                    if np.ndim(value) == 0 or value.shape[0] != target:
                        raise ServingError(
                            "INTERNAL",
                            f"batched output {name!r} has shape {list(np.shape(value))}; "
                            f"its dimension 0 must be the batch size {target}",
                        )
                    part[name] = value[start : start + task.rows]
                start += task.rows
                task.future.set_result(part)
        except BaseException as exc:  # every waiting request gets the batch's error
            for task in tasks:
                if not task.future.done():
                    task.future.set_exception(exc)

    def close(self) -> None:
        """Runs what is queued, then stops the batch threads."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=30)
