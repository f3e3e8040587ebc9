"""`keras-hps inspect DIR`: the models, versions, signatures, placements and tables of a
model repository."""

from __future__ import annotations

import argparse
import os
from typing import Any

from keras_hps.errors import HPSError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `inspect` subcommand's arguments."""
    parser.add_argument("repo", help="model repository folder (with models.config)")


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, f))
                   for root, _, files in os.walk(path) for f in files)
    return os.path.getsize(path) if os.path.exists(path) else 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _models(repo_dir: str) -> list[tuple[str, str]]:
    """(name, base_path) of each model: models.config's list, else numbered subfolders."""
    from keras_hps.export import repository as repo

    path = os.path.join(repo_dir, repo.MODELS_CONFIG)
    if os.path.exists(path):
        config = repo.read_models_config(path)
        out = []
        for entry in config.model_config_list.config:
            base = entry.base_path
            if not os.path.isabs(base):
                base = os.path.join(repo_dir, base)
            local = os.path.join(repo_dir, entry.name)
            if not os.path.isdir(base) and os.path.isdir(local):
                # Written for a server that mounts the repository elsewhere (a container).
                base = local
            out.append((entry.name, base))
        return out
    return [(name, os.path.join(repo_dir, name)) for name in sorted(os.listdir(repo_dir))
            if repo.versions(os.path.join(repo_dir, name))]


def _export_info(version_dir: str) -> dict[str, Any]:
    import json

    from keras_hps.export.exporter import EXPORT_INFO

    path = os.path.join(version_dir, EXPORT_INFO)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def describe(repo_dir: str) -> str:
    """The repository as text (what `keras-hps inspect` prints)."""
    from keras_hps import servable
    from keras_hps.export import repository as repo

    repo_dir = os.path.abspath(repo_dir)
    if not os.path.isdir(repo_dir):
        raise FileNotFoundError(f"repository {repo_dir} does not exist")
    lines = [f"repository {repo_dir}"]
    hps_path = os.path.join(repo_dir, repo.HPS_JSON)
    hps = repo.read_hps_json(hps_path) if os.path.exists(hps_path) else {"models": []}
    hps_models = {m.get("model"): m for m in hps["models"]}
    models = _models(repo_dir)
    if not models:
        lines.append("  (no models)")
    for name, base in models:
        found = repo.versions(base)
        lines.append(f"model {name}  base_path {base}  versions {found or 'none'}")
        for version in found:
            vdir = os.path.join(base, str(version))
            try:
                placement, signatures = servable.describe_version(vdir)
            except (HPSError, OSError) as e:
                lines.append(f"  version {version}: unreadable: {e}")
                continue
            lines.append(f"  version {version}  placement {placement}  size {_human(_size(vdir))}")
            for sig_name, sig in sorted(signatures.items()):
                ins = ", ".join(f"{k}: {v.dtype.name}{v.describe()}"
                                for k, v in sorted(sig.inputs.items()))
                outs = ", ".join(f"{k}: {v.dtype.name}{v.describe()}"
                                 for k, v in sorted(sig.outputs.items()))
                lines.append(f"    signature {sig_name}: ({ins}) -> ({outs})")
            if placement == "embedded":
                for t in _export_info(vdir).get("tables", []):
                    lines.append(f"    table {t['table_id']} {t['name']}: {t['rows']} rows x "
                                 f"{t['dim']} (in the SavedModel's variables)")
        entry = hps_models.get(name)
        if entry is not None:
            lines.append("  tables (hps.json, used by external versions):")
            for i, rel in enumerate(entry.get("sparse_files", [])):
                path = rel if os.path.isabs(rel) else os.path.join(repo_dir, rel)
                lines.append(f"    {i} {_table_line(path, entry, i)}")
    return "\n".join(lines)


def _table_line(path: str, entry: dict[str, Any], i: int) -> str:
    from keras_hps.formats import table_disk_bytes, table_header

    names = entry.get("embedding_table_names") or []
    name = names[i] if i < len(names) else f"sparse_embedding{i}"
    dims = entry.get("embedding_vecsize_per_table") or []
    dim = dims[i] if i < len(dims) else "?"
    try:
        rows, _ = table_header(path)
        size = table_disk_bytes(path)
    except (HPSError, OSError) as e:
        return f"{name}: {path}: unreadable: {e}"
    return f"{name}: {rows} rows x {dim}, {_human(size)}, {path}"


def run(args: argparse.Namespace) -> int:
    """Print the repository and return 0 (errors raise)."""
    print(describe(args.repo))
    return 0
