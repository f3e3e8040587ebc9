"""The on-disk TF Serving model repository: names, versions, models.config, hps.json, and
all-or-nothing writes.

Layout written by `export_for_serving`::

    DIR/models.config                     ModelServerConfig text proto, one entry per model
    DIR/hps.json                          parameter-server config of the external models
    DIR/NAME/<version>/                   SavedModel (+ keras_hps_manifest.json when external)
    DIR/tables/NAME/<version>/<table>.h5  keras-hps HDF5 table (what hps.json names)
    DIR/tables/NAME/<version>/<table>/    the same table in HPS's key / emb_vector layout
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from keras_hps.errors import ConfigError

MODELS_CONFIG = "models.config"
LOCK_FILE = ".keras-hps-export.lock"
HPS_JSON = "hps.json"
TABLES_DIR = "tables"
# hps.json's rule for a model name; also safe in TF Serving URLs (no '/' or ':') and as a
# directory name.
MODEL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,120}$")


def check_model_name(name: str) -> str:
    """`name` if it is a valid model name, else ConfigError saying which characters are allowed."""
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        raise ConfigError(
            f"model name {name!r} is not allowed: use 1-120 characters from [A-Za-z0-9_-] "
            "(TF Serving puts the name in URLs and paths; hps.json has the same rule)"
        )
    return name


def versions(model_dir: str) -> list[int]:
    """The numeric version directories under a model's base path, ascending."""
    if not os.path.isdir(model_dir):
        return []
    found = []
    for entry in os.listdir(model_dir):
        if entry.isdigit() and os.path.isdir(os.path.join(model_dir, entry)):
            found.append(int(entry))
    return sorted(found)


def choose_version(model_dir: str, version: int | None) -> int:
    """`version`, or the next free one; ConfigError if it exists already or is not positive."""
    existing = versions(model_dir)
    if version is None:
        return (existing[-1] + 1) if existing else 1
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(f"version must be a positive int, got {version!r}")
    if version in existing:
        raise ConfigError(
            f"version {version} of model {os.path.basename(model_dir)!r} exists already at "
            f"{os.path.join(model_dir, str(version))}; versions are immutable once written "
            f"(next free: {existing[-1] + 1})"
        )
    return version


def read_models_config(path: str) -> Any:
    """`models.config` as a ModelServerConfig proto (empty if the file does not exist)."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            try:
                text_format.Parse(f.read(), config)
            except text_format.ParseError as e:
                raise ConfigError(f"{path}: not a ModelServerConfig text proto: {e}") from e
    return config


def models_config_with(path: str, name: str, base_path: str) -> str:
    """The text of `models.config` at `path` with model `name` listed (others kept)."""
    from google.protobuf import text_format

    config = read_models_config(path)
    if config.WhichOneof("config") == "custom_model_config":
        raise ConfigError(f"{path} holds a custom_model_config; keras-hps writes model_config_list")
    entries = config.model_config_list.config
    for entry in entries:
        if entry.name == name:
            entry.base_path = base_path
            entry.model_platform = entry.model_platform or "tensorflow"
            break
    else:
        entry = entries.add()
        entry.name = name
        entry.base_path = base_path
        entry.model_platform = "tensorflow"
    return text_format.MessageToString(config)


def read_hps_json(path: str) -> dict[str, Any]:
    """The repository's hps.json as a dict (a fresh skeleton if it does not exist)."""
    if not os.path.exists(path):
        return {"supportlonglong": True, "models": []}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("models", []), list):
        raise ConfigError(f"{path}: expected an object with a 'models' list")
    data.setdefault("models", [])
    return data


def hps_json_with(path: str, entry: dict[str, Any]) -> str:
    """The text of hps.json at `path` with `entry` replacing the model of the same name."""
    data = read_hps_json(path)
    models = [m for m in data["models"] if m.get("model") != entry["model"]]
    models.append(entry)
    data["models"] = models
    return json.dumps(data, indent=2) + "\n"


def write_text_atomically(path: str, text: str) -> None:
    """Replace `path` with `text` in one rename (readers see the old or the new file).

    The file keeps the mode of the file it replaces; a new one gets the mode any new file
    gets (0666 less the umask, 0644 usually), not mkstemp's 0600: a model server running as
    another user (in a container, say) must read it.
    """
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    try:
        os.fchmod(fd, os.stat(path).st_mode & 0o7777 if os.path.exists(path) else _new_file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _new_file_mode() -> int:
    """0666 less the process's umask: the mode `open(path, "w")` gives a new file."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


class Transaction:
    """Undo log for one export: files replaced are restored and paths created are removed
    if the export fails, so the repository is left as it was."""

    def __init__(self) -> None:
        self._created: list[str] = []
        self._saved: list[tuple[str, bytes | None]] = []

    def created(self, path: str) -> str:
        """Remember `path` as new (removed on rollback)."""
        self._created.append(path)
        return path

    def replace_file(self, path: str, text: str) -> None:
        """Write `text` to `path` atomically, remembering the old content."""
        old = None
        if os.path.exists(path):
            with open(path, "rb") as f:
                old = f.read()
        self._saved.append((path, old))
        write_text_atomically(path, text)

    def rollback(self) -> None:
        """Undo everything, newest first (a second call does nothing)."""
        saved, created = self._saved, self._created
        self._saved, self._created = [], []
        for path, old in reversed(saved):
            if old is None:
                if os.path.exists(path):
                    os.unlink(path)
            else:
                write_text_atomically(path, old.decode("utf-8"))
        for path in reversed(created):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.unlink(path)


@contextlib.contextmanager
def locked(repo_dir: str) -> Iterator[None]:
    """Hold the repository's export lock: exports that update models.config / hps.json and
    publish versions take turns, so none overwrites another's entries."""
    with open(os.path.join(repo_dir, LOCK_FILE), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
