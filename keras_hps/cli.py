"""The `keras-hps` command line: one entry point, one subcommand per job.

Conventions shared by every subcommand, applied here once:

- TensorFlow's start-up logging is silenced (`TF_CPP_MIN_LOG_LEVEL=3` unless set; the lines
  TensorFlow prints while it is imported, before its logging reads that variable, are
  filtered out whichever code imports it);
- an error is one line, `keras-hps <command>: error: <message>`, with exit status 1 (2 for a
  command line that cannot work); `--debug` or `KERAS_HPS_DEBUG=1` shows the traceback and
  keeps TensorFlow's logging;
- help shows every option's default;
- a multi-word flag takes either spelling, `--foo_bar` or `--foo-bar` (help shows the
  documented one: TF Serving's underscores for `serve`, hyphens elsewhere);
- `keras-hps --version` prints the version.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

from keras_hps import __version__
from keras_hps.errors import HPSError, UsageError

__all__ = ["COMMANDS", "build_parser", "command_parser", "main", "normalize_flags", "one_line"]

# Subcommand -> (module, one-line help). Each module defines
#   add_arguments(parser: argparse.ArgumentParser) -> None
#   run(args: argparse.Namespace) -> int   (raises on errors; main reports them)
# and is imported only when its subcommand runs, so `keras-hps --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("keras_hps.convert", "convert tables between HPS directories and HDF5"),
    "plan": ("keras_hps.plan", "memory each tier needs for a config, before deploying"),
    "export": ("keras_hps.export.cli", "write a TF Serving model repository from a Keras model"),
    "inspect": ("keras_hps.export.inspect", "print what a model repository holds"),
    "serve": ("keras_hps.serving.cli", "serve a model repository over TF Serving's REST and gRPC"),
    "update": ("keras_hps.update", "apply new rows to a deployed table (all its servers)"),
    "bench": ("keras_hps.serving.bench", "load-test a running server (throughput, latency)"),
    "demo": ("keras_hps.serving.demo", "end to end: train, export, serve, query"),
}

DEBUG_ENV = "KERAS_HPS_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: `--version`, `--debug` and the list of subcommands."""
    parser = argparse.ArgumentParser(prog="keras-hps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"keras-hps {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show tracebacks and TensorFlow's logging (or {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of subcommand `name`: its module's arguments and `--debug`, with every
    option's default in its help."""
    module_name, help_text = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"keras-hps {name}", description=help_text)
    importlib.import_module(module_name).add_arguments(parser)
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error (or {DEBUG_ENV}=1)")
    for action in parser._actions:
        action.help = _with_default(action)
    return parser


def _with_default(action: argparse.Action) -> str | None:
    """An option's help with `(default: ...)` appended, unless the help already names its
    default or there is none to show (None, an empty list, an on/off switch)."""
    text, default = action.help, action.default
    if (text is argparse.SUPPRESS or "default" in (text or "").lower() or not action.option_strings
            or action.nargs == 0 or default in (None, [], ()) or default is argparse.SUPPRESS):
        return text
    shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
    shown = shown.replace("%", "%%") if shown else '""'  # help strings are %-formatted
    return f"{text or ''} (default: {shown})".lstrip()


def normalize_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """`argv` with every long flag spelled as `parser` knows it: `--foo-bar` and `--foo_bar`
    (also in `--foo-bar=value`) are the same flag. Arguments after `--` stay as given."""
    known = {_flag_key(s): s for a in parser._actions for s in a.option_strings
             if s.startswith("--")}
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + list(argv[i:])
        if arg.startswith("--"):
            flag, eq, value = arg.partition("=")
            arg = known.get(_flag_key(flag), flag) + eq + value
        out.append(arg)
    return out


def _flag_key(flag: str) -> str:
    return flag.replace("-", "_")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `keras-hps` subcommand; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options = argv[: argv.index("--")] if "--" in argv else argv
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in options
    while argv and argv[0] == "--debug":
        argv.pop(0)
    if not argv or argv[0] not in COMMANDS:
        return _exit_code(build_parser().parse_args, argv)  # help, --version or usage
    name, rest = argv[0], argv[1:]
    quiet = None if debug else _QuietTensorFlowImport()
    if quiet is not None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before anything imports TF
        sys.meta_path.insert(0, quiet)
    try:
        parser = command_parser(name)
        try:
            args = parser.parse_args(normalize_flags(parser, rest))
        except SystemExit as e:  # --help, or argparse's usage error (already printed)
            return _code(e)
        try:
            return int(importlib.import_module(COMMANDS[name][0]).run(args) or 0)
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:  # the reader went away (`keras-hps plan --json | head`)
            _silence_stdout()
            return 0
        except Exception as e:
            if debug:
                raise
            print(f"keras-hps {name}: error: {one_line(e)}", file=sys.stderr, flush=True)
            return 2 if isinstance(e, UsageError) else 1
    finally:
        if quiet in sys.meta_path:
            sys.meta_path.remove(quiet)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of a closed pipe does not
    print a second error (what Python's docs advise for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def one_line(error: BaseException) -> str:
    """An exception as one line: its message (with its type unless keras-hps raised it on
    purpose, or it is an OS error, whose message says what it is)."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (HPSError, OSError)):
        return text
    return f"{type(error).__name__}: {text}"


def _exit_code(parse: Any, argv: list[str]) -> int:
    try:
        parse(argv)
    except SystemExit as e:
        return _code(e)
    return 2


def _code(e: SystemExit) -> int:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


# ----------------------------------------------------------------------------------------------
# TensorFlow's start-up logging

# A line of absl's C++ log format: severity letter, date, time, thread, file:line].
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ \S+:\d+\] ")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
_BANNERS = ("WARNING: All log messages before absl::InitializeLog() is called",
            "To enable the following instructions:")


def _dropped(line: str, min_level: int) -> bool:
    m = _ABSL_LINE.match(line)
    if m:
        return _SEVERITY[m.group(1)] < min(min_level, 3)
    return min_level >= 1 and line.startswith(_BANNERS)


@contextlib.contextmanager
def _tensorflow_log_filter() -> Iterator[None]:
    """Drop the log lines TensorFlow writes to file descriptor 2 while the block runs (at
    import, before its logging reads TF_CPP_MIN_LOG_LEVEL) that this level would hide; every
    other line written meanwhile is passed on."""
    try:
        min_level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        min_level = 0
    if min_level <= 0:
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to filter
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not _dropped(ln, min_level)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Makes the first import of `tensorflow`, by whatever code, run with its start-up lines
    filtered, and quiets TensorFlow's and absl's Python loggers to errors after it."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # one import; the other finders locate the package
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _FilteredLoader(spec.loader)
        return spec


class _FilteredLoader(importlib.abc.Loader):
    """A loader that runs another's `exec_module` inside `_tensorflow_log_filter`."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        with _tensorflow_log_filter():
            self.loader.exec_module(module)
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
        absl_logging = sys.modules.get("absl.logging")
        if absl_logging is not None:
            absl_logging.set_verbosity(absl_logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
