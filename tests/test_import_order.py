"""Users import TensorFlow before keras_hps; Triton must survive that (Triton >= 3.7 segfaults)."""

import subprocess
import sys

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_tensorflow_then_keras_hps_then_triton_imports_cleanly():
    pytest.importorskip("tensorflow")
    pytest.importorskip("triton")
    proc = _run(
        "import tensorflow as tf\n"
        "import keras_hps\n"
        "import keras_hps.triton_kernels\n"
        "import triton, torch\n"
        "print('ok', tf.__version__, triton.__version__)\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok")


def test_import_keras_hps_is_light():
    proc = _run(
        "import sys, keras_hps\n"
        "heavy = [m for m in ('tensorflow', 'torch', 'triton', 'keras') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ""


def test_cli_lists_every_subcommand():
    from keras_hps.cli import COMMANDS

    proc = subprocess.run(
        [sys.executable, "-m", "keras_hps.cli", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    for name in COMMANDS:
        assert name in proc.stdout
