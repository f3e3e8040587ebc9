"""The `keras-hps` entry point's conventions, through the installed executable: quiet
TensorFlow start-up, one-line errors with exit status 1 (2 for usage), defaults in every help,
both spellings of multi-word flags, `--version`."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import keras_hps
from keras_hps import cli
from keras_hps.formats import write_hps_table

KERAS_HPS = Path(sys.executable).with_name("keras-hps")  # the console script pip installed


def run_cli(*args: str, debug: bool = False, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    """Run the real executable with the user's defaults (no logging or debug settings)."""
    assert KERAS_HPS.is_file(), f"{KERAS_HPS} is missing: pip install -e ."
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", cli.DEBUG_ENV)}
    if debug:
        env[cli.DEBUG_ENV] = "1"
    return subprocess.run([str(KERAS_HPS), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    """The message of a one-line error report, after checking that it is one."""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"keras-hps {command}: error: "), proc.stderr
    return lines[0].removeprefix(f"keras-hps {command}: error: ")


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout == f"keras-hps {keras_hps.__version__}\n"


def test_no_or_unknown_command_is_a_usage_error():
    proc = run_cli()
    assert proc.returncode == 2 and "required: COMMAND" in proc.stderr
    proc = run_cli("nope")
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr


def _option_help(help_text: str) -> dict[str, str]:
    """Each option's block of `--help` output, by its first option string."""
    blocks: dict[str, str] = {}
    name = None
    for line in help_text.splitlines():
        m = re.match(r"^  (-[-\w]+)", line)
        if m:
            name = m.group(1)
            blocks[name] = line
        elif name and line.startswith("   "):
            blocks[name] += " " + line.strip()
        else:
            name = None
    return blocks


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_help_shows_defaults_and_no_tensorflow_logs(command):
    proc = run_cli(command, "--help")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    blocks = _option_help(proc.stdout)
    parser = cli.command_parser(command)
    checked = 0
    for action in parser._actions:
        if (not action.option_strings or action.nargs == 0
                or action.default in (None, [], argparse.SUPPRESS)):
            continue
        block = blocks[action.option_strings[0]]
        assert "default" in block.lower(), (command, block)
        checked += 1
    assert checked >= 1 or command in ("inspect", "plan")


def test_documented_flag_spellings():
    serve = run_cli("serve", "--help").stdout
    assert "--rest_api_port" in serve and "--model_base_path" in serve  # TF Serving's
    assert "--rest-api-port" not in serve
    bench = run_cli("bench", "--help").stdout
    assert "--model-base-path" in bench and "--batch-sizes" in bench  # hyphens elsewhere
    assert "--model_base_path" not in bench and "--batch_sizes" not in bench
    for command in ("convert", "export", "bench", "demo", "plan", "inspect"):
        text = run_cli(command, "--help").stdout if command != "bench" else bench
        assert not re.search(r"--\w+_\w+", text), (command, text)


def test_both_spellings_parse_to_the_same_flag():
    def parse(command, argv):
        parser = cli.command_parser(command)
        return parser.parse_args(cli.normalize_flags(parser, argv))

    for argv in (["--rest_api_port=0", "--model_base_path", "m", "--enable_batching"],
                 ["--rest-api-port=0", "--model-base-path", "m", "--enable-batching"]):
        args = parse("serve", argv)
        assert (args.rest_api_port, args.model_base_path, args.enable_batching) == (0, "m", True)
    for argv in (["--batch-sizes", "1,2", "--model-base-path", "v", "--key-range=5"],
                 ["--batch_sizes", "1,2", "--model_base_path", "v", "--key_range=5"]):
        args = parse("bench", argv)
        assert (args.batch_sizes, args.model_base_path, args.key_range) == ([1, 2], "v", 5)
    args = parse("export", ["m.keras", "--repo=r", "--name", "n", "--max_batch_size", "7",
                            "--serving_repo_path", "/models"])
    assert (args.max_batch_size, args.serving_repo_path) == (7, "/models")
    # after `--` nothing is rewritten; an unknown flag stays an error in either spelling
    parser = cli.command_parser("convert")
    assert cli.normalize_flags(parser, ["--chunk_rows", "3", "--", "--on_duplicate"]) == [
        "--chunk-rows", "3", "--", "--on_duplicate"]
    with pytest.raises(SystemExit) as e:
        parser.parse_args(cli.normalize_flags(parser, ["a", "b", "--no_such_flag"]))
    assert e.value.code == 2


@pytest.fixture
def hps_table(tmp_path):
    """An HPS table directory: 4 rows of dim 6, keys out of order."""
    rng = np.random.default_rng(5)
    write_hps_table(tmp_path / "src", np.array([5, 3, 9, 1]),
                    rng.standard_normal((4, 6)).astype(np.float32))
    return tmp_path / "src"


def test_underscore_flags_work_from_the_command_line(hps_table, tmp_path):
    src = hps_table
    proc = run_cli("convert", src, tmp_path / "t.h5", "--chunk_rows=2", "--on_duplicate", "last",
                   "--quiet")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    import h5py

    with h5py.File(tmp_path / "t.h5") as f:
        assert f["vectors"].chunks == (2, 6)


def test_errors_are_one_line_unless_debugging(hps_table, tmp_path):
    proc = run_cli("convert", tmp_path / "nowhere", tmp_path / "n.h5")
    assert proc.returncode == 1
    assert one_error_line(proc, "convert") == (
        f"{tmp_path / 'nowhere'}: HPS table directory not found")
    # an error keras-hps did not anticipate (the destination's folder is a file) is one line too
    src = hps_table
    (tmp_path / "file").write_text("x")
    proc = run_cli("convert", src, tmp_path / "file" / "t.h5", "--quiet")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert str(tmp_path / "file") in one_error_line(proc, "convert")
    for debug_env, flag in ((True, []), (False, ["--debug"]), (False, ["--debug", "first"])):
        argv = ["convert", tmp_path / "nowhere", tmp_path / "n.h5"]
        if flag == ["--debug", "first"]:
            argv = ["--debug", *argv]
        else:
            argv += flag
        proc = run_cli(*argv, debug=debug_env)
        assert proc.returncode == 1
        assert "Traceback (most recent call last)" in proc.stderr
        assert proc.stderr.rstrip().endswith("HPS table directory not found")
    # a command line that cannot work: exit status 2
    proc = run_cli("convert")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == (
        "keras-hps convert: error: the following arguments are required: src, dst")


def test_plan_reports_a_table_that_disagrees_with_the_config(hps_table, tmp_path):
    src = hps_table
    cfg = {"models": [{"model": "m", "sparse_files": [str(src)],
                       "embedding_vecsize_per_table": [8],
                       "maxnum_catfeature_query_per_table_per_sample": [1]}]}
    (tmp_path / "hps.json").write_text(json.dumps(cfg))
    proc = run_cli("plan", tmp_path / "hps.json")
    assert proc.returncode == 1
    assert one_error_line(proc, "plan").startswith(
        f"{tmp_path / 'hps.json'}: models[0].embedding_vecsize_per_table[0]: is 8 but ")


def test_usage_errors_raised_by_a_subcommand_exit_2(capsys):
    assert cli.main(["bench", "--protocol", "inprocess"]) == 2
    assert capsys.readouterr().err == (
        "keras-hps bench: error: --protocol inprocess needs --model-base-path\n")
    assert cli.main(["bench", "--ensemble", "only_one"]) == 2
    assert "--ensemble takes LOOKUP,DENSE" in capsys.readouterr().err


def test_tensorflow_start_up_is_silent(tmp_path):
    """export and inspect import TensorFlow; neither prints its start-up lines (TensorFlow
    2.21 writes about eight to stderr at import, whatever TF_CPP_MIN_LOG_LEVEL says)."""
    pytest.importorskip("tensorflow")
    import keras

    ids = keras.Input((2,), dtype="int64", name="ids")
    x = keras.layers.Flatten()(keras.layers.Embedding(20, 4, name="emb")(ids))
    keras.Model(ids, keras.layers.Dense(1, name="out")(x)).save(tmp_path / "m.keras")
    proc = run_cli("export", tmp_path / "m.keras", "--repo", tmp_path / "repo", "--name", "m",
                   "--quiet", "--max_batch_size", "16")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    hps = json.loads((tmp_path / "repo" / "hps.json").read_text())
    assert hps["models"][0]["max_batch_size"] == 16  # the underscore spelling took effect
    proc = run_cli("inspect", tmp_path / "repo")
    assert proc.returncode == 0 and "model m" in proc.stdout
    assert proc.stderr == ""



def test_a_reader_that_stops_early_gets_no_error(hps_table, tmp_path):
    """`keras-hps plan --json | head -1`: the pipe closes while the command still writes;
    it stops quietly (exit 0, nothing on stderr), as Unix tools do."""
    dim = 6  # hps_table's
    cfg = {"models": [{"model": f"m{j}", "sparse_files": [str(hps_table)] * 40,
                       "embedding_vecsize_per_table": [dim] * 40,
                       "maxnum_catfeature_query_per_table_per_sample": [1] * 40}
                      for j in range(40)]}
    (tmp_path / "hps.json").write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if k not in (cli.DEBUG_ENV,)}
    proc = subprocess.Popen([str(KERAS_HPS), "plan", str(tmp_path / "hps.json"), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes away, as `head -1` does
    _, err = proc.communicate(timeout=120)
    assert first.strip() == b"["
    assert proc.returncode == 0 and err == b"", err.decode()
