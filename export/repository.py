"""The on-disk TF Serving model repository: names, versions, models.config, hps.json, and
all-or-nothing writes: an export publishes with one rename, and the next export finishes or
undoes one that was killed (`publish`, `recover`).

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
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from keras_hps.errors import ConfigError
from keras_hps.formats.io import remove_leftovers, temp_sibling

MODELS_CONFIG = "models.config"
LOCK_FILE = ".keras-hps-export.lock"
JOURNAL = ".keras-hps-export.journal"  # what an export is publishing (see `publish`)
HPS_JSON = "hps.json"
TABLES_DIR = "tables"
log = logging.getLogger("keras_hps.export")
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
    gets (0666 less the umask, 0644 usually): a model server running as another user (in a
    container, say) must read it. The temporary file names its writer, so a kill leaves
    nothing the next export does not remove (`recover`).
    """
    tmp = temp_sibling(Path(path))
    mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else _new_file_mode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # not less the umask
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_file_mode() -> int:
    """0666 less the process's umask: the mode `open(path, "w")` gives a new file."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


class Transaction:
    """Undo log for one export: if it fails, what it wrote is undone, newest first (files
    replaced are restored, paths created removed, renames reversed), so the repository is
    left as it was."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def created(self, path: str) -> str:
        """Remember `path` as new (removed on rollback)."""
        self._undo.append(lambda: _remove_path(path))
        return path

    def replace_file(self, path: str, text: str) -> None:
        """Write `text` to `path` atomically, remembering the old content."""
        old = None
        if os.path.exists(path):
            with open(path, "rb") as f:
                old = f.read()

        def restore() -> None:
            if old is None:
                _remove_path(path)
            else:
                write_text_atomically(path, old.decode("utf-8"))

        self._undo.append(restore)
        write_text_atomically(path, text)

    def rename(self, src: str, dst: str) -> None:
        """Rename `src` to `dst` (renamed back on rollback)."""
        os.rename(src, dst)
        self._undo.append(lambda: os.rename(dst, src) if os.path.lexists(dst) else None)

    def rollback(self) -> None:
        """Undo everything, newest first (a second call does nothing)."""
        undo, self._undo = self._undo, []
        for step in reversed(undo):
            try:
                step()
            except OSError as e:  # undo the rest; the next export cleans up (`recover`)
                log.warning("rolling back an export: %s", e)


@contextlib.contextmanager
def locked(repo_dir: str) -> Iterator[None]:
    """Hold the repository's export lock: exports that update models.config / hps.json and
    publish versions take turns, so none overwrites another's entries. The lock file stays."""
    with open(os.path.join(repo_dir, LOCK_FILE), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@dataclass(frozen=True)
class Publication:
    """What one export publishes: a staged version folder (and tables folder), then the
    entries that name them in models.config and hps.json."""

    model: str
    version: int
    base_path: str  # models.config's base_path of the model
    staged_version: str
    staged_tables: str | None = None  # external placement: the version's tables
    hps_entry: dict[str, Any] | None = None  # external placement: hps.json's model entry

    def version_dir(self, repo_dir: str) -> str:
        """Where the version is published."""
        return os.path.join(repo_dir, self.model, str(self.version))

    def tables_dir(self, repo_dir: str) -> str:
        """Where the version's tables are published."""
        return os.path.join(repo_dir, TABLES_DIR, self.model, str(self.version))


def publish(repo_dir: str, txn: Transaction, pub: Publication) -> None:
    """Publish a staged export (hold `locked(repo_dir)`): ONE rename makes the version
    appear; nothing names it before. In order: the journal (`JOURNAL`, what this export is
    about to publish); the tables folder to its place (named by nothing yet but the staged
    version); the version folder to its place (the publishing rename); models.config and
    hps.json to name them; the journal removed. An export killed on the way is finished
    (published: the config files are completed) or undone (not published: its tables are
    removed) by the next export, from the journal (`recover`)."""
    recover(repo_dir)
    version_dir = pub.version_dir(repo_dir)
    if os.path.exists(version_dir):
        raise ConfigError(
            f"version {pub.version} of model {pub.model!r} was written meanwhile by another "
            "export; export again to take the next version"
        )
    journal = os.path.join(repo_dir, JOURNAL)
    write_text_atomically(journal, json.dumps(asdict(pub), indent=2) + "\n")
    txn.created(journal)
    if pub.staged_tables is not None:
        txn.rename(pub.staged_tables, pub.tables_dir(repo_dir))
    txn.rename(pub.staged_version, version_dir)  # published
    _name_published(repo_dir, pub, txn.replace_file)
    os.unlink(journal)


def _name_published(repo_dir: str, pub: Publication, write: Callable[[str, str], None]) -> None:
    """hps.json's entry (external placement) and models.config's entry of a published
    version, written with `write(path, text)`."""
    if pub.hps_entry is not None:
        hps_path = os.path.join(repo_dir, HPS_JSON)
        write(hps_path, hps_json_with(hps_path, pub.hps_entry))
    config_path = os.path.join(repo_dir, MODELS_CONFIG)
    write(config_path, models_config_with(config_path, pub.model, pub.base_path))


def recover(repo_dir: str) -> list[str]:
    """Finish or undo an export that was killed while publishing (hold `locked(repo_dir)`),
    and remove the temporary files and folders of killed exports. Each action is logged (a
    warning) and returned as a message."""
    messages = []
    journal = os.path.join(repo_dir, JOURNAL)
    if os.path.exists(journal):
        try:
            with open(journal, encoding="utf-8") as f:
                pub = Publication(**json.load(f))
        except (OSError, ValueError, TypeError) as e:
            pub = None
            messages.append(f"{journal}: unreadable ({e}); removed")
        if pub is not None and os.path.isdir(pub.version_dir(repo_dir)):
            _name_published(repo_dir, pub, write_text_atomically)
            messages.append(
                f"{repo_dir}: an export killed after publishing {pub.model} version "
                f"{pub.version} had not listed it yet; models.config and hps.json list it now")
        elif pub is not None:
            tables = pub.tables_dir(repo_dir)
            if os.path.isdir(tables):
                shutil.rmtree(tables)
            messages.append(
                f"{repo_dir}: an export of {pub.model} version {pub.version} was killed before "
                "it published the version; removed what it had written")
        os.unlink(journal)
    for message in messages:
        log.warning("%s", message)
    tables_root = os.path.join(repo_dir, TABLES_DIR)
    folders = [repo_dir] + [os.path.join(root, name) for root in (repo_dir, tables_root)
                            if os.path.isdir(root) for name in sorted(os.listdir(root))]
    for folder in folders:
        if os.path.isdir(folder) and not os.path.islink(folder):
            messages += remove_leftovers(Path(folder))
    return messages
