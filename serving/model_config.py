"""Model server config: TF Serving's `models.config` text proto and on-disk version folders.

A model is a name, a base path holding numeric version folders (`<base_path>/<int>/`), a
version policy (latest N, all, or specific versions) and optional version labels.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from keras_hps.errors import ConfigError

# TF Serving's own rule for labels (serving_config.md); names must be URL path segments.
_LABEL_RE = re.compile(r"^[A-Za-z0-9_]+$")
_NAME_RE = re.compile(r"^[^/:\s]+$")


class ModelConfigError(ConfigError):
    """A `models.config` that cannot be served. `str()` says what is wrong and where;
    `status` is the `CODE: message` TF Serving reports for it (e.g. `INVALID_ARGUMENT:
    Invalid protobuf file: '...'`)."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status or f"INVALID_ARGUMENT: {message}"


@dataclass(frozen=True)
class VersionPolicy:
    """Which of the versions on disk to serve: ("latest", n), ("all",) or ("specific", v...)."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, on_disk: set[int] | list[int]) -> set[int]:
        """The versions of `on_disk` this policy wants served."""
        found = sorted(set(on_disk))
        if self.kind == "all":
            return set(found)
        if self.kind == "specific":
            return set(self.versions) & set(found)
        return set(found[-self.num_versions :]) if self.num_versions > 0 else set()

    def describe(self) -> str:
        """A short text form (for logs and errors)."""
        if self.kind == "all":
            return "all"
        if self.kind == "specific":
            return "specific " + ",".join(map(str, self.versions))
        return f"latest {self.num_versions}"


@dataclass(frozen=True)
class ModelEntry:
    """One model of the server config."""

    name: str
    base_path: str
    platform: str = "tensorflow"
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    labels: dict[str, int] = field(default_factory=dict)


def versions_on_disk(base_path: str) -> dict[int, str]:
    """Numeric child folders of `base_path` -> their paths; other names are ignored.

    Like TF Serving, "007" and "7" are the same version (the first found wins) and a
    temporary folder being written (any non-numeric name) is never picked up.
    """
    out: dict[int, str] = {}
    try:
        names = sorted(os.listdir(base_path))
    except (FileNotFoundError, NotADirectoryError):
        return out
    for child in names:
        if not child.isdigit():
            continue
        path = os.path.join(base_path, child)
        if os.path.isdir(path):
            out.setdefault(int(child), path)
    return out


def _policy_from_proto(proto, where: str) -> VersionPolicy:
    choice = proto.WhichOneof("policy_choice")
    if choice is None or choice == "latest":
        n = proto.latest.num_versions if choice == "latest" else 1
        return VersionPolicy("latest", num_versions=n or 1)
    if choice == "all":
        return VersionPolicy("all")
    versions = tuple(int(v) for v in proto.specific.versions)
    if not versions:
        raise ModelConfigError(f"{where}: model_version_policy 'specific' lists no versions")
    return VersionPolicy("specific", versions=versions)


def entries_from_proto(
    config, source: str = "<config>", root: str | None = None
) -> list[ModelEntry]:
    """Model entries of a `ModelServerConfig` proto.

    Relative base paths resolve against `root` (the config file's folder) when given.
    """
    if config.WhichOneof("config") == "custom_model_config":
        raise ModelConfigError(
            f"{source}: custom_model_config is not supported; use model_config_list",
            "UNIMPLEMENTED: ModelServer does not yet support custom model config.",
        )
    entries: list[ModelEntry] = []
    seen: set[str] = set()
    for cfg in config.model_config_list.config:
        where = f"{source}: model {cfg.name!r}"
        if not cfg.name:
            raise ModelConfigError(f"{source}: a model config has no name")
        if not _NAME_RE.match(cfg.name):
            raise ModelConfigError(f"{where}: a model name cannot contain '/', ':' or spaces")
        if cfg.name in seen:
            raise ModelConfigError(
                f"{source}: model name {cfg.name!r} is used twice",
                f"INVALID_ARGUMENT: Illegal to list model {cfg.name} multiple times in config "
                "list",
            )
        seen.add(cfg.name)
        if not cfg.base_path:
            raise ModelConfigError(f"{where} has no base_path")
        platform = cfg.model_platform or "tensorflow"
        if platform != "tensorflow":
            raise ModelConfigError(f"{where}: model_platform {platform!r} is not supported")
        base = cfg.base_path
        if root is not None and not os.path.isabs(base):
            base = os.path.normpath(os.path.join(root, base))
        labels = {}
        for label, version in cfg.version_labels.items():
            if not _LABEL_RE.match(label):
                raise ModelConfigError(f"{where}: version label {label!r} must match [a-zA-Z0-9_]+")
            labels[label] = int(version)
        policy = _policy_from_proto(cfg.model_version_policy, where)
        entries.append(ModelEntry(cfg.name, base, platform, policy, labels))
    return entries


def parse_model_config_text(
    text: str, source: str = "<text>", root: str | None = None
) -> list[ModelEntry]:
    """Model entries of a `models.config` (ModelServerConfig in protobuf text format)."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ModelConfigError(
            f"{source}: not a valid ModelServerConfig text proto: {exc}",
            f"INVALID_ARGUMENT: Invalid protobuf file: '{source}'",
        ) from exc
    return entries_from_proto(config, source, root)


def load_model_config_file(path: str) -> list[ModelEntry]:
    """Model entries of the `models.config` file at `path` (relative base paths resolve
    against the file's folder)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ModelConfigError(
            f"cannot read model config file {path}: {exc}",
            f"NOT_FOUND: {path}; {exc.strerror or exc}",
        ) from exc
    return parse_model_config_text(text, path, os.path.dirname(os.path.abspath(path)))


def single_model(name: str, base_path: str) -> list[ModelEntry]:
    """The config for `--model_name NAME --model_base_path PATH` (latest version)."""
    if not name or not _NAME_RE.match(name):
        raise ConfigError(f"--model_name {name!r} is not a valid model name")
    if not base_path:
        raise ConfigError("--model_base_path is empty")
    return [ModelEntry(name, os.path.abspath(base_path))]


def to_text(entries: list[ModelEntry]) -> str:
    """The `models.config` text for `entries` (inverse of parse_model_config_text)."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    for e in entries:
        cfg = config.model_config_list.config.add()
        cfg.name, cfg.base_path, cfg.model_platform = e.name, e.base_path, e.platform
        policy = cfg.model_version_policy
        if e.policy.kind == "all":
            policy.all.SetInParent()
        elif e.policy.kind == "specific":
            policy.specific.versions.extend(e.policy.versions)
        else:
            policy.latest.num_versions = e.policy.num_versions
        for label, version in e.labels.items():
            cfg.version_labels[label] = version
    return text_format.MessageToString(config)
