"""`keras-hps export MODEL.keras --repo DIR --name NAME [--version N] [--tables ...]`."""

from __future__ import annotations

import argparse
import sys

from keras_hps.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `export` subcommand's arguments."""
    parser.add_argument("model", help="trained Keras 3 model (.keras file)")
    parser.add_argument("--repo", required=True, help="model repository folder (created if "
                        "missing; its parent must exist)")
    parser.add_argument("--name", required=True, help="served model name ([A-Za-z0-9_-])")
    parser.add_argument("--version", type=int, default=None,
                        help="version number (default: the next free one)")
    parser.add_argument("--tables", choices=("external", "embedded"), default="external",
                        help="external: tables in HDF5/HPS files read through the keras-hps "
                        "parameter server; embedded: tables inside the SavedModel (stock TF "
                        "Serving serves it)")
    parser.add_argument("--embedding-layers", default=None,
                        help="comma-separated names of the layers holding tables "
                        "(default: every keras.layers.Embedding)")
    parser.add_argument("--keys", action="append", default=[], metavar="LAYER=FILE.npy",
                        help="key array of one table (row i serves key k_i); repeatable")
    parser.add_argument("--default-value", type=float, default=0.0,
                        help="vector value for unknown keys")
    parser.add_argument("--max-batch-size", type=int, default=1024,
                        help="hps.json max_batch_size of the model (external): rows per "
                        "lookup through the hierarchy, not a request limit (larger requests "
                        "are looked up in pieces)")
    parser.add_argument("--max-keys-per-sample", action="append", default=[],
                        metavar="LAYER=N", help="keys per sample of a table whose input has a "
                        "variable length (external); repeatable")
    parser.add_argument("--serving-repo-path", default=None,
                        help="where the model server sees the repository (e.g. /models in a "
                        "container); models.config base paths start with it")
    parser.add_argument("--custom-module", action="append", default=[], metavar="MODULE",
                        help="import this module (a dotted name, or a .py file) before loading "
                        "the model, so that its @keras.saving.register_keras_serializable "
                        "classes are known; repeatable")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _keys_arg(items: list[str]) -> dict:
    import numpy as np

    keys = {}
    for item in items:
        layer, sep, path = item.partition("=")
        if not sep or not layer or not path:
            raise ConfigError(f"--keys takes LAYER=FILE.npy, got {item!r}")
        try:
            keys[layer] = np.load(path)
        except OSError as e:
            raise ConfigError(f"--keys {item}: cannot read {path}: {e}") from e
    return keys


def _counts_arg(items: list[str]) -> dict | None:
    counts = {}
    for item in items:
        layer, sep, n = item.partition("=")
        if not sep or not layer or not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--max-keys-per-sample takes LAYER=N (N >= 1), got {item!r}")
        counts[layer] = int(n)
    return counts or None


def import_custom_modules(names: list[str]) -> None:
    """Import each module (a dotted name, found from the working directory too, or the path
    of a .py file), as the Keras way of registering serializable classes expects;
    ConfigError names one that fails."""
    import importlib
    import importlib.util
    import os

    for name in names:
        try:
            if name.endswith(".py") or os.sep in name:
                if not os.path.isfile(name):
                    raise ConfigError(f"--custom-module {name}: no such file")
                module_name = os.path.splitext(os.path.basename(name))[0]
                spec = importlib.util.spec_from_file_location(module_name, name)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                spec.loader.exec_module(module)
            else:
                if os.getcwd() not in sys.path:  # as `python -m` does
                    sys.path.insert(0, os.getcwd())
                importlib.import_module(name)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any import failure becomes one line
            first = str(e).splitlines()[0] if str(e) else ""
            raise ConfigError(f"--custom-module {name}: cannot import it: "
                              f"{type(e).__name__}: {first}") from e


def run(args: argparse.Namespace) -> int:
    """Export; prints what was written and returns 0 (errors raise)."""
    from keras_hps.export.exporter import export_for_serving

    import_custom_modules(args.custom_module)
    layers = None if args.embedding_layers is None else [
        n.strip() for n in args.embedding_layers.split(",") if n.strip()
    ]
    result = export_for_serving(
        args.model, args.repo, args.name, version=args.version, tables=args.tables,
        embedding_layers=layers, keys=_keys_arg(args.keys),
        default_value=args.default_value, max_batch_size=args.max_batch_size,
        max_keys_per_sample=_counts_arg(args.max_keys_per_sample),
        serving_repo_path=args.serving_repo_path, progress=not args.quiet,
    )
    print(f"exported {result.model_name} version {result.version} ({result.placement}) "
          f"to {result.version_dir}")
    print(f"models.config: {result.models_config}")
    if result.hps_json:
        print(f"hps.json: {result.hps_json}")
    for path in result.table_files:
        print(f"table: {path}")
    return 0
