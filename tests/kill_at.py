"""`python kill_at.py POINT ARGS...`: runs `keras-hps ARGS` and SIGKILLs itself at POINT.

For the tests of killed writers: each point is a step of an export or a conversion at which
a kill is the hardest to survive. POINT "window" kills nothing itself: it prints
`KILL-WINDOW` when the writing begins, for the test to send SIGKILL at a random moment.

Export points: `table-file` (a table file written in the staged tables folder), `journal`
(the journal written), `tables-renamed`, `version-renamed` (the version published),
`hps-json`, `models-config` (the config files written, the journal not yet removed).
Conversion points: `staged` (the new table written, not published), `swapped` (the new table
published, the old one not yet removed), `aside` (no RENAME_EXCHANGE: the old table moved
aside, the new one not yet in place).
"""

from __future__ import annotations

import functools
import os
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _patch(owners: list, name: str, nth: int, before: bool = False, when=None) -> None:
    """Die before or after the `nth` call (counted over all `owners`) of `owner.name` for
    which `when(*args)` holds."""
    calls = [0]
    for owner in owners:
        original = getattr(owner, name)

        def wrapper(*args, _original=original, **kwargs):
            hit = when is None or when(*args)
            if hit:
                calls[0] += 1
            if hit and before and calls[0] == nth:
                _die()
            result = _original(*args, **kwargs)
            if hit and not before and calls[0] == nth:
                _die()
            return result

        setattr(owner, name, functools.wraps(original)(wrapper))


def _announce(owner: object, name: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        print("KILL-WINDOW", flush=True)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def main() -> int:
    point, args = sys.argv[1], sys.argv[2:]
    from keras_hps.formats import hdf5, hps_dir, io

    writers = [hdf5, hps_dir]  # where the table writers call replace_with
    if args[0] == "export":  # (imports TensorFlow: a conversion does not)
        from keras_hps.export import exporter, repository
    if point == "window":
        if args[0] == "export":
            _announce(exporter, "_write_saved_model")
        for writer in writers:
            _announce(writer, "row_blocks")
    elif point == "table-file":
        _patch(writers, "replace_with", 1)
    elif point in ("journal", "hps-json", "models-config"):
        _patch([repository], "write_text_atomically",
               {"journal": 1, "hps-json": 2, "models-config": 3}[point])
    elif point in ("tables-renamed", "version-renamed"):
        _patch([repository.Transaction], "rename", 1 if point == "tables-renamed" else 2)
    elif point == "staged":
        _patch(writers, "replace_with", 1, before=True)
    elif point == "swapped":
        _patch([io], "_remove", 1, before=True)
    elif point == "aside":
        io._exchange = lambda a, b: False
        _patch([os], "replace", 1, when=lambda src, dst: ".old-" in os.fspath(dst))
    else:
        raise SystemExit(f"unknown kill point {point!r}")
    from keras_hps.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
