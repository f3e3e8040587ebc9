"""Random online updates while clients query, and the check of every answer against the
update guarantee (docs/deployment.md, "Online updates").

Rows encode (key, version): every component of key k's row in version v is `k * 1000 + v`
(version 0: the table file; -1: absent, the default 0.0). So each answer names the version it
came from, and the check needs no copy of the values:

- every answer is a version the key really had: one whose update had started before the
  lookup ended (old or new, never invented, never torn);
- on the server that made the update, a lookup that started after `update` returned
  answers that version or a newer one;
- on another server, a lookup that started `delay` seconds after `update` returned does.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

SCALE = 1000  # versions per key


def encoded_rows(keys: np.ndarray, version: int | np.ndarray, dim: int) -> np.ndarray:
    """Rows of `keys` in `version`: every component `key * 1000 + version`."""
    v = np.asarray(keys, np.float64) * SCALE + version
    return np.repeat(v.astype(np.float32)[:, None], dim, axis=1)


def decode(keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The version each answer row came from (-1: the default; -2: not a row of this key)."""
    ok = (rows == rows[:, :1]).all(axis=1)
    v = np.round(rows[:, 0].astype(np.float64) - keys.astype(np.float64) * SCALE)
    v = np.where(ok & (v >= 0) & (v < SCALE), v, -2).astype(np.int64)
    v[ok & (rows[:, 0] == 0)] = -1
    return v


@dataclass
class History:
    """Each key's updates: (version, start time, return time)."""

    started: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    returned: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    versions: dict[int, int] = field(default_factory=dict)


@dataclass
class Answer:
    server: int
    t0: float
    t1: float
    keys: np.ndarray
    versions: np.ndarray


def query_loop(lookup, server: int, universe: np.ndarray, batch: int, stop: threading.Event,
               out: list[Answer], errors: list[BaseException], seed: int,
               pause_s: float = 0.002) -> None:
    """Look random keys up until `stop` (`pause_s` between lookups, so that a busy client
    leaves the writer some of a small machine), recording each answer's versions."""
    rng = np.random.default_rng(seed)
    try:
        while not stop.wait(pause_s):
            keys = rng.choice(universe, batch)
            t0 = time.monotonic()
            rows = np.asarray(lookup(keys))
            t1 = time.monotonic()
            out.append(Answer(server, t0, t1, keys, decode(keys, rows.reshape(len(keys), -1))))
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


@contextlib.contextmanager
def quick_thread_switches(interval_s: float = 0.0005) -> Iterator[None]:
    """Let threads take turns every `interval_s` (Python's default is 5 ms): a writer that
    waits on the network gets the interpreter back soon after each reply, even while
    clients run interpreted Triton kernels."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def run_updates(update, universe: np.ndarray, table_keys: np.ndarray, n: int, dim: int,
                history: History, seed: int, max_keys: int = 4,
                after_each=None) -> None:
    """`n` random updates of 1..`max_keys` keys each (some keys the table file lacks), the
    times recorded in `history`; `after_each(keys, versions, returned_at)` after each."""
    rng = np.random.default_rng(seed)
    table = set(table_keys.tolist())
    for k in table_keys:
        history.versions.setdefault(int(k), 0)
    for _ in range(n):
        keys = np.unique(rng.choice(universe, int(rng.integers(1, max_keys + 1))))
        versions = np.array([history.versions.get(int(k), 0 if int(k) in table else -1) + 1
                             for k in keys])
        t_start = time.monotonic()
        for k, v in zip(keys.tolist(), versions.tolist(), strict=True):
            history.started.setdefault(k, []).append((v, t_start))
        update(keys, np.concatenate([encoded_rows(keys[i:i + 1], v, dim)
                                     for i, v in enumerate(versions)]))
        t_ret = time.monotonic()
        for k, v in zip(keys.tolist(), versions.tolist(), strict=True):
            history.returned.setdefault(k, []).append((v, t_ret))
            history.versions[k] = v
        if after_each is not None:
            after_each(keys, versions, t_ret)


def check_answers(answers: list[Answer], history: History, table_keys: np.ndarray,
                  delays: dict[int, float]) -> int:
    """Check every answer (see the module docstring); `delays[server]`: how long after an
    update returned that server must answer it (0 for the server that made it). Returns the
    number of (key, answer) pairs checked; raises AssertionError naming the first bad one."""
    table = set(table_keys.tolist())
    checked = 0
    for a in answers:
        for k, got in zip(a.keys.tolist(), a.versions.tolist(), strict=True):
            base = 0 if k in table else -1
            newest = max([v for v, t in history.started.get(k, []) if t <= a.t1], default=base)
            due = max([v for v, t in history.returned.get(k, [])
                       if t + delays[a.server] <= a.t0], default=base)
            assert got != -2, f"server {a.server}: key {k} got a row that is no version of it"
            assert got <= newest, (f"server {a.server}: key {k} answered version {got}, newer "
                                   f"than any update started before the lookup ended ({newest})")
            assert got >= due, (f"server {a.server}: key {k} answered version {got} though "
                                f"version {due} was acknowledged before the lookup started")
            checked += 1
    return checked


def updates_under_load(servers: list, universe: np.ndarray, table_keys: np.ndarray, n: int,
                       dim: int, *, delays: dict[int, float], seed: int, batch: int = 24,
                       max_keys: int = 4, model: str = "m") -> tuple[History, int]:
    """`n` random updates through `servers[0]` while a client per server looks keys up;
    every answer checked (`check_answers` with `delays`). Returns (history, answers
    checked)."""
    history, answers, errors = History(), [], []
    stop = threading.Event()
    readers = [threading.Thread(target=query_loop, args=(
        lambda k, ps=ps: ps.lookup(model, 0, k), i, universe, batch, stop, answers, errors, i))
        for i, ps in enumerate(servers)]
    for r in readers:
        r.start()
    try:
        with quick_thread_switches():
            run_updates(lambda k, v: servers[0].update(model, 0, k, v), universe, table_keys,
                        n, dim, history, seed=seed, max_keys=max_keys)
    finally:
        stop.set()
        for r in readers:
            r.join()
    assert not errors, errors
    return history, check_answers(answers, history, table_keys, delays)


def final_rows(history: History, universe: np.ndarray, dim: int) -> np.ndarray:
    """What every key of `universe` answers after the updates of `history`."""
    final = np.array([history.versions.get(int(k), -1) for k in universe])
    return np.where((final >= 0)[:, None], encoded_rows(universe, final, dim), 0.0)
