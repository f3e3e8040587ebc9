"""The single-server durable update log: appends survive a kill, replay gives a prefix."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from keras_hps.errors import TableFormatError
from keras_hps.update_log import UpdateLog, log_path, replay_updates

DIM = 5


def _update(seq: int) -> tuple[np.ndarray, np.ndarray]:
    """The deterministic update number `seq` (1 to 40 keys, some repeated across updates)."""
    rng = np.random.default_rng(seq)
    n = int(rng.integers(1, 41))
    return rng.integers(-50, 50, n).astype(np.int64), rng.standard_normal((n, DIM)).astype(
        np.float32)


def _check_prefix(path, at_least: int = 0) -> int:
    got = list(replay_updates(path, DIM))
    for i, (seq, keys, rows) in enumerate(got):
        assert seq == i
        want_k, want_v = _update(i)
        np.testing.assert_array_equal(keys, want_k)
        np.testing.assert_array_equal(rows, want_v)
    assert len(got) >= at_least
    return len(got)


def test_append_replay_reopen(tmp_path):
    table = tmp_path / "table.h5"
    path = log_path(table)
    assert path.name == "table.h5.updates"
    assert list(replay_updates(path)) == []
    with UpdateLog(path, DIM) as log:
        for i in range(20):
            assert log.append(*_update(i)) == i
        with pytest.raises(ValueError, match=r"\[3, 5\]"):
            log.append(np.arange(3), np.zeros((3, 4)))
    assert _check_prefix(path) == 20
    with UpdateLog(path, DIM) as log:  # reopened: numbering goes on
        assert log.next_seq == 20
        log.append(*_update(20))
    assert _check_prefix(path) == 21
    # the last row of a key over all updates is the table's new state
    state: dict[int, np.ndarray] = {}
    for _, keys, rows in replay_updates(path, DIM):
        state.update(zip(keys.tolist(), rows, strict=True))
    ref: dict[int, np.ndarray] = {}
    for i in range(21):
        k, v = _update(i)
        ref.update(zip(k.tolist(), v, strict=True))
    assert state.keys() == ref.keys()
    assert all(np.array_equal(state[k], ref[k]) for k in ref)
    with pytest.raises(TableFormatError, match="dim 5"):
        UpdateLog(path, DIM + 1)
    with pytest.raises(TableFormatError, match="dim 5"):
        list(replay_updates(path, 3))
    (tmp_path / "junk.updates").write_bytes(b"not a log at all")
    with pytest.raises(TableFormatError, match="not a keras-hps update log"):
        UpdateLog(tmp_path / "junk.updates", DIM)


def test_truncated_or_corrupt_file_replays_a_prefix(tmp_path):
    path = tmp_path / "t.updates"
    ends = []
    with UpdateLog(path, DIM) as log:
        for i in range(30):
            log.append(*_update(i))
            ends.append(path.stat().st_size)
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    for cut in rng.integers(0, len(data), 40).tolist() + [0, 15, 16, len(data) - 1]:
        p = tmp_path / "cut.updates"
        p.write_bytes(data[:cut])
        if cut < 16:
            with pytest.raises(TableFormatError, match="truncated"):
                list(replay_updates(p, DIM))
            continue
        complete = sum(e <= cut for e in ends)
        assert _check_prefix(p) == complete
        # reopening cuts the torn tail; a new append then replays after the prefix
        with UpdateLog(p, DIM) as log:
            assert log.next_seq == complete
            log.append(*_update(complete))
        assert _check_prefix(p) == complete + 1
    # one flipped byte in the middle: replay stops before the damaged record
    bad = bytearray(data)
    bad[ends[11] + 30] ^= 0xFF
    (tmp_path / "bad.updates").write_bytes(bytes(bad))
    assert _check_prefix(tmp_path / "bad.updates") == 12


_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from keras_hps.update_log import UpdateLog
    sys.path.insert(0, sys.argv[2])
    from test_update_log import _update, DIM
    log = UpdateLog(sys.argv[1], DIM)
    i = 0
    while True:
        log.append(*_update(i))
        print(i, flush=True)   # acknowledged: on disk
        i += 1
""")


def test_killed_writer_loses_no_acknowledged_update(tmp_path):
    path = tmp_path / "killed.updates"
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), tests_dir],
                            stdout=subprocess.PIPE, text=True)
    acked = -1
    assert proc.stdout is not None
    for line in proc.stdout:
        acked = int(line)
        if acked >= 60:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    copy = tmp_path / "copy.updates"
    shutil.copy(path, copy)
    assert _check_prefix(copy, at_least=acked + 1) >= acked + 1
    with UpdateLog(copy, DIM) as log:  # reopens after the kill and keeps appending
        n = log.next_seq
        log.append(*_update(n))
    assert _check_prefix(copy) == n + 1


_APPENDER = textwrap.dedent("""
    import sys
    import numpy as np
    from keras_hps.update_log import UpdateLog
    tag, n = int(sys.argv[2]), int(sys.argv[3])
    with UpdateLog(sys.argv[1], 5) as log:
        for i in range(n):
            log.append(np.array([tag, i], np.int64), np.full((2, 5), tag * 1000 + i, np.float32))
""")


def test_processes_append_to_one_log_and_a_reader_tails_it(tmp_path):
    """Three processes append at once (a torn record left by a crash in between): every
    record lands whole, numbered without gaps, and a reader polling meanwhile sees each
    record once, in order."""
    from keras_hps.update_log import UpdateLogReader

    path = tmp_path / "t.h5.updates"
    reader = UpdateLogReader(path, DIM)
    assert reader.read() == []  # no log yet
    with UpdateLog(path, DIM) as log:
        log.append(np.array([7], np.int64), np.ones((1, DIM), np.float32))
    with open(path, "ab") as f:  # a crash mid-append: a torn record at the end
        f.write(b"UREC\x05\x00\x00\x00" + b"\x00" * 11)
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), str(tag), "40"])
             for tag in (1, 2, 3)]
    seen = []
    while any(p.poll() is None for p in procs):
        seen += reader.read()
    assert all(p.wait() == 0 for p in procs)
    seen += reader.read()
    assert [s for s, _, _ in seen] == list(range(121))
    assert [(s, k.tolist()) for s, k, _ in seen] == \
        [(s, k.tolist()) for s, k, _ in replay_updates(path, DIM)]
    per_tag: dict[int, list[int]] = {}
    for _, keys, rows in seen[1:]:
        tag, i = int(keys[0]), int(keys[1])
        np.testing.assert_array_equal(rows, np.full((2, DIM), tag * 1000 + i, np.float32))
        per_tag.setdefault(tag, []).append(i)
    assert per_tag == {t: list(range(40)) for t in (1, 2, 3)}
    assert reader.read() == []


def test_updated_rows_match_a_dict():
    from keras_hps.update_log import UpdatedRows

    rng = np.random.default_rng(3)
    rows = UpdatedRows(DIM)
    ref: dict[int, np.ndarray] = {}
    assert not rows.fetch(np.arange(5))[0].any() and len(rows) == 0
    for _ in range(30):
        k = np.unique(np.concatenate([rng.integers(-(2**62), 2**62, 20),
                                      rng.integers(0, 100, 30)]))
        v = rng.standard_normal((len(k), DIM)).astype(np.float32)
        rows.put(k, v)
        ref.update({int(a): b for a, b in zip(k, v, strict=True)})
        q = np.unique(np.concatenate([k[:5], rng.integers(0, 120, 50),
                                      [np.iinfo(np.int64).max]]))
        found, got = rows.fetch(q)
        np.testing.assert_array_equal(found, [int(x) in ref for x in q])
        np.testing.assert_array_equal(got, np.array([ref[int(x)] for x in q[found]]))
    assert len(rows) == len(ref) and sorted(rows.keys().tolist()) == sorted(ref)
