"""Users import TensorFlow before keras_hps; Triton must survive that (Triton >= 3.7 segfaults)."""

import subprocess
import sys
from pathlib import Path

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


# -- the import graph, read statically ------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
# folder -> package it installs as
PACKAGES = {"keras_hps": "keras_hps", "triton_kernels": "keras_hps.triton_kernels"}
# Bottom first: a module may import from its own layer (without a circle) and the layers below,
# never from one above. Patterns (fnmatch) over module names; every module must match one.
LAYERS = [
    ("kernels", ["keras_hps.triton_kernels", "keras_hps.triton_kernels.*"]),
    ("errors", ["keras_hps.errors", "keras_hps._lazy", "keras_hps.triton_interpreter"]),
    ("formats and buffers", ["keras_hps.formats*", "keras_hps.output_buffers",
                             "keras_hps.host_tier", "keras_hps.schema",
                             "keras_hps.update_log"]),
    ("config, tiers, device owners", ["keras_hps.config*", "keras_hps.cold_tier",
                                      "keras_hps.gpu_cache", "keras_hps.gpu_static_table",
                                      "keras_hps.gpu_shards",
                                      "keras_hps.combiner", "keras_hps.convert",
                                      "keras_hps.redis_tier", "keras_hps.update_stream",
                                      "keras_hps.external"]),
    ("GPU tier", ["keras_hps.gpu_tier"]),
    ("parameter server", ["keras_hps.parameter_server", "keras_hps.online_updates",
                          "keras_hps.plan", "keras_hps.update"]),
    ("layers and servables", ["keras_hps.layers", "keras_hps.layers.*", "keras_hps.servable",
                              "keras_hps.capture"]),
    ("entry points", ["keras_hps", "keras_hps.cli"]),
]
KERNEL_THIRD_PARTY = {"triton", "torch", "numpy"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(REPO / folder).with_suffix("").parts
                     if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports, anywhere in the file (functions too), absolute; imports
    for type checkers only (`if TYPE_CHECKING:`) do not run and are left out."""
    import ast

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> keras-hps modules it imports, module -> third-party top-level names)."""
    modules = _modules()
    internal, external = {}, {}
    for name, path in modules.items():
        deps, other = set(), set()
        for imp in _imports(name, path):
            target = imp
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target:
                if target != name:
                    deps.add(target)
            elif not imp.startswith("keras_hps"):
                other.add(imp.split(".")[0])
        internal[name], external[name] = deps, other
    return internal, external


def _layer(name: str) -> int:
    from fnmatch import fnmatchcase

    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatchcase(name, p) for p in patterns):
            return i
    raise AssertionError(f"{name} is in no layer of LAYERS: place it there (what may it "
                         "import, and who imports it?)")


def test_no_module_imports_from_a_layer_above_it():
    internal, _ = _graph()
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
              for m, deps in sorted(internal.items()) for d in sorted(deps)
              if _layer(d) > _layer(m) and not d.startswith(m + ".")]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    internal, _ = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(internal[m]):
            if state.get(d) == 1:
                return [*stack[stack.index(d):], d]
            if d not in state and (circle := visit(d)):
                return circle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(internal):
        if m not in state and (circle := visit(m)):
            raise AssertionError(" -> ".join(circle))


def test_kernels_import_only_triton_torch_numpy():
    internal, external = _graph()
    for name in internal:
        if _layer(name) == 0:
            assert all(_layer(d) == 0 for d in internal[name]), (name, internal[name])
            extra = external[name] - KERNEL_THIRD_PARTY - set(sys.stdlib_module_names)
            assert not extra, f"{name} imports {sorted(extra)}"
