"""The parameter-server config (`hps.json`): HPS's JSON schema as frozen dataclasses.

`load_config(path_or_dict)` validates a config and returns a `PSConfig`. Field names are
HPS's JSON keys, so a config written for NVIDIA HPS loads unchanged. Every problem is a
`ConfigError` that names the key (as a path such as `models[0].sparse_files[1]`) and the
config file. docs/configuration.md describes every key.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keras_hps.errors import ConfigError, NotFoundError

__all__ = [
    "ConfigError",
    "ModelConfig",
    "PSConfig",
    "PersistentDBConfig",
    "UpdateSourceConfig",
    "VolatileDBConfig",
    "config_error",
    "load_config",
    "NO_OVERFLOW_LIMIT",
]

#: HPS's default `overflow_margin` (2**64 - 1): no limit on host-tier rows.
NO_OVERFLOW_LIMIT = 2**64 - 1

_MODEL_NAME = re.compile(r"^[a-zA-Z0-9_\-]{1,120}$")

# volatile_db `type` values: HPS's names and aliases -> what keras-hps does.
_VOLATILE_TYPES = {
    "hash_map": "hash_map",
    "hashmap": "hash_map",
    "parallel_hash_map": "hash_map",
    "parallel_hashmap": "hash_map",
    "multi_process_hash_map": "hash_map",
    "mp_hash_map": "hash_map",
    "redis_cluster": "hash_map",
    "redis": "hash_map",
    "redis_cluster_backend": "hash_map",
    "disabled": "disabled",
    "disable": "disabled",
    "none": "disabled",
}
_NOT_IN_PROCESS = {"multi_process_hash_map", "mp_hash_map", "redis_cluster", "redis",
                   "redis_cluster_backend"}

# persistent_db `type` values -> what keras-hps does ("table_files": the cold tier reads
# the files named in sparse_files; "disabled": no persistent tier configured).
_PERSISTENT_TYPES = {
    "disabled": "disabled",
    "disable": "disabled",
    "none": "disabled",
    "hdf5": "table_files",
    "table_files": "table_files",
    "rocks_db": "table_files",
    "rocksdb": "table_files",
}

_OVERFLOW_POLICIES = ("evict_random", "evict_least_used", "evict_oldest")
_CACHE_TYPES = ("dynamic", "static", "uvm")


@dataclass(frozen=True)
class VolatileDBConfig:
    """`volatile_db`: the host RAM tier.

    `type` is normalised to "hash_map" (host tier on) or "disabled". Redis and shared-memory
    types are served by the in-process host tier (with a warning); their connection keys are
    accepted and ignored.
    """

    type: str = "hash_map"
    initial_cache_rate: float = 1.0
    overflow_margin: int = NO_OVERFLOW_LIMIT
    overflow_policy: str = "evict_random"
    overflow_resolution_target: float = 0.8
    cache_missed_embeddings: bool = False
    max_batch_size: int = 65536
    num_partitions: int = 16
    allocation_rate: int = 256 * 1024 * 1024
    address: str = "127.0.0.1:7000"
    user_name: str = "default"
    password: str = ""
    num_node_connections: int = 5
    shared_memory_size: int = 16 * 1024**3
    shared_memory_name: str = "hctr_mp_hash_map_database"
    shared_memory_auto_remove: bool = True
    enable_tls: bool = False
    tls_ca_certificate: str = "cacertbundle.crt"
    tls_client_certificate: str = "client_cert.pem"
    tls_client_key: str = "client_key.pem"
    tls_server_name_identification: str = "redis.localhost"
    refresh_time_after_fetch: bool = False
    initialize_after_startup: bool = True
    update_filters: tuple[str, ...] = ("^hps_.+$",)

    @property
    def enabled(self) -> bool:
        """Whether the host RAM tier exists."""
        return self.type != "disabled"

    @property
    def max_rows(self) -> int | None:
        """Host-tier row limit per table (`overflow_margin`), or None for no limit."""
        return None if self.overflow_margin >= NO_OVERFLOW_LIMIT else int(self.overflow_margin)


@dataclass(frozen=True)
class PersistentDBConfig:
    """`persistent_db`: HPS's RocksDB block. keras-hps's cold tier reads the table files in
    `sparse_files` directly; `type` is normalised to "table_files" or "disabled" (see
    docs/configuration.md for what each means)."""

    type: str = "disabled"
    path: str = ""
    num_threads: int = 16
    read_only: bool = False
    max_batch_size: int = 65536
    update_filters: tuple[str, ...] = ("^hps_.+$",)

    @property
    def enabled(self) -> bool:
        """Whether a persistent tier was configured (the cold tier is used either way
        when the host tier does not hold every row)."""
        return self.type != "disabled"


@dataclass(frozen=True)
class UpdateSourceConfig:
    """`update_source`: HPS's Kafka block. Accepted so HPS configs load; keras-hps has no
    online-update source and ignores it."""

    type: str = "null"
    brokers: str = "127.0.0.1:9092"
    metadata_refresh_interval_ms: int = 30000
    receive_buffer_size: int = 262144
    poll_timeout_ms: int = 500
    max_batch_size: int = 8192
    failure_backoff_ms: int = 50
    max_commit_interval: int = 32


@dataclass(frozen=True)
class ModelConfig:
    """One entry of `models[]`, with HPS's per-model keys and defaults."""

    model: str
    sparse_files: tuple[str, ...]
    embedding_vecsize_per_table: tuple[int, ...]
    maxnum_catfeature_query_per_table_per_sample: tuple[int, ...]
    embedding_table_names: tuple[str, ...] = ()
    default_value_for_each_table: tuple[float, ...] = ()
    deployed_device_list: tuple[int, ...] = (0,)
    max_batch_size: int = 64
    gpucache: bool = True
    gpucacheper: float = 0.2
    hit_rate_threshold: float = 0.9
    embedding_cache_type: str = "dynamic"
    gpu_cache_admission: str = "none"  # keras-hps: "tinylfu" admits by lookup frequency
    use_static_table: bool = False
    num_of_worker_buffer_in_pool: int = 1
    num_of_refresher_buffer_in_pool: int = 1
    cache_refresh_percentage_per_iteration: float = 0.0
    init_ec: bool = True
    use_hctr_cache_implementation: bool = True
    use_context_stream: bool = True
    thread_pool_size: int = 16
    enable_pagelock: bool = False
    fp8_quant: bool = False
    maxnum_des_feature_per_sample: int = 26
    refresh_delay: float = 0.0
    refresh_interval: float = 0.0
    fuse_embedding_table: bool = False
    dense_file: str = ""
    network_file: str = ""
    label_dim: int = 1
    slot_num: int = 0

    @property
    def num_tables(self) -> int:
        """Number of embedding tables of this model."""
        return len(self.sparse_files)

    @property
    def cache_type(self) -> str:
        """The effective GPU cache type: `use_static_table` forces "static"."""
        return "static" if self.use_static_table else self.embedding_cache_type

    def check_table_id(self, table_id: int) -> int:
        """`table_id` if this model has it, else NotFoundError."""
        if isinstance(table_id, bool) or not isinstance(table_id, (int, np.integer)):
            raise NotFoundError(f"model {self.model!r}: table id must be an int, got {table_id!r}")
        if not 0 <= int(table_id) < self.num_tables:
            raise NotFoundError(
                f"model {self.model!r} has {self.num_tables} table(s) "
                f"(ids 0..{self.num_tables - 1}); no table {table_id}"
            )
        return int(table_id)

    def max_keys_per_lookup(self, table_id: int) -> int:
        """Most keys one lookup may carry: max_batch_size x
        maxnum_catfeature_query_per_table_per_sample[table_id]."""
        t = self.check_table_id(table_id)
        return self.max_batch_size * self.maxnum_catfeature_query_per_table_per_sample[t]

    def dim(self, table_id: int) -> int:
        """Vector size of one table."""
        return self.embedding_vecsize_per_table[self.check_table_id(table_id)]

    def default_value(self, table_id: int) -> float:
        """The value filling vectors of keys found nowhere."""
        return self.default_value_for_each_table[self.check_table_id(table_id)]

    def table_name(self, table_id: int) -> str:
        """The table's name (`embedding_table_names`, default sparse_embedding<i>)."""
        return self.embedding_table_names[self.check_table_id(table_id)]


@dataclass(frozen=True)
class PSConfig:
    """A whole `hps.json`."""

    models: tuple[ModelConfig, ...]
    supportlonglong: bool = True
    volatile_db: VolatileDBConfig = field(default_factory=VolatileDBConfig)
    persistent_db: PersistentDBConfig = field(default_factory=PersistentDBConfig)
    update_source: UpdateSourceConfig = field(default_factory=UpdateSourceConfig)
    fuse_embedding_table: bool = False
    source: str | None = None

    @property
    def key_dtype(self) -> np.dtype:
        """int64 when `supportlonglong`, else uint32."""
        return np.dtype(np.int64) if self.supportlonglong else np.dtype(np.uint32)

    @property
    def model_names(self) -> tuple[str, ...]:
        """Names of the configured models, in file order."""
        return tuple(m.model for m in self.models)

    def error(self, key: str, problem: str) -> ConfigError:
        """A ConfigError about `key` of this config, naming its file."""
        return config_error(self.source, key, problem)

    def model(self, name: str) -> ModelConfig:
        """The model called `name`, else NotFoundError."""
        for m in self.models:
            if m.model == name:
                return m
        raise NotFoundError(
            f"no model {name!r} in the parameter-server config"
            f"{' ' + self.source if self.source else ''}; models: {list(self.model_names)}"
        )


# ----------------------------------------------------------------------------------------------
# loading


class _Ctx:
    """Where we are: the config file (for messages) and its folder (for relative paths)."""

    def __init__(self, source: str | None, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir

    def error(self, key: str, problem: str) -> ConfigError:
        return config_error(self.source, key, problem)


def config_error(source: str | None, key: str, problem: str) -> ConfigError:
    """The ConfigError for `problem` with `key` (a path like `models[0].sparse_files[1]`) of
    the config file `source` (None: a dict)."""
    return ConfigError(f"{source if source else '<dict config>'}: {key}: {problem}")


def _type_name(value: Any) -> str:
    return type(value).__name__


def _get_bool(ctx: _Ctx, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ctx.error(key, f"expected true/false, got {_type_name(value)} {value!r}")


def _get_int(ctx: _Ctx, key: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)
        else:
            raise ctx.error(key, f"expected an integer, got {_type_name(value)} {value!r}")
    if minimum is not None and value < minimum:
        raise ctx.error(key, f"must be >= {minimum}, got {value}")
    return value


def _get_float(ctx: _Ctx, key: str, value: Any, lo: float | None = None,
               hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ctx.error(key, f"expected a number, got {_type_name(value)} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ctx.error(key, f"must be finite, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ctx.error(key, f"must be in [{lo}, {hi}], got {value}")
    return value


def _get_str(ctx: _Ctx, key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ctx.error(key, f"expected a string, got {_type_name(value)} {value!r}")


def _get_list(ctx: _Ctx, key: str, value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ctx.error(key, f"expected a list, got {_type_name(value)} {value!r}")


def _get_str_list(ctx: _Ctx, key: str, value: Any) -> tuple[str, ...]:
    return tuple(_get_str(ctx, f"{key}[{i}]", v) for i, v in enumerate(_get_list(ctx, key, value)))


def _check_keys(ctx: _Ctx, where: str, block: Mapping, known: set[str]) -> None:
    for k in block:
        if k not in known:
            near = [c for c in sorted(known) if c.lower() == str(k).lower()]
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ctx.error(f"{where}{k}" if where else str(k), f"unknown key{hint}")


_VDB_INT = {"overflow_margin", "max_batch_size", "num_partitions", "allocation_rate",
            "num_node_connections", "shared_memory_size"}
_VDB_BOOL = {"cache_missed_embeddings", "shared_memory_auto_remove", "enable_tls",
             "refresh_time_after_fetch", "initialize_after_startup"}
_VDB_STR = {"address", "user_name", "password", "shared_memory_name", "tls_ca_certificate",
            "tls_client_certificate", "tls_client_key", "tls_server_name_identification"}


def _load_volatile(ctx: _Ctx, raw: Any) -> VolatileDBConfig:
    if raw is None:
        return VolatileDBConfig()
    if not isinstance(raw, Mapping):
        raise ctx.error("volatile_db", f"expected an object, got {_type_name(raw)}")
    known = set(VolatileDBConfig.__dataclass_fields__)
    _check_keys(ctx, "volatile_db.", raw, known)
    kw: dict[str, Any] = {}
    for k, v in raw.items():
        key = f"volatile_db.{k}"
        if k == "type":
            t = _get_str(ctx, key, v).lower()
            if t not in _VOLATILE_TYPES:
                raise ctx.error(key, f"unknown type {v!r}; one of {sorted(_VOLATILE_TYPES)}")
            if t in _NOT_IN_PROCESS:
                warnings.warn(
                    f"{ctx.source or '<dict config>'}: volatile_db.type {v!r}: keras-hps serves "
                    "the host tier from this process's RAM; connection settings are ignored",
                    stacklevel=4,
                )
            kw["type"] = _VOLATILE_TYPES[t]
        elif k == "initial_cache_rate":
            kw[k] = _get_float(ctx, key, v, 0.0, 1.0)
        elif k == "overflow_resolution_target":
            kw[k] = _get_float(ctx, key, v, 0.0, 1.0)
        elif k == "overflow_policy":
            p = _get_str(ctx, key, v)
            if p not in _OVERFLOW_POLICIES:
                raise ctx.error(key, f"unknown policy {p!r}; one of {list(_OVERFLOW_POLICIES)}")
            kw[k] = p
        elif k == "update_filters":
            kw[k] = _get_str_list(ctx, key, v)
        elif k in _VDB_INT:
            kw[k] = _get_int(ctx, key, v, minimum=1 if k == "overflow_margin" else 0)
        elif k in _VDB_BOOL:
            kw[k] = _get_bool(ctx, key, v)
        elif k in _VDB_STR:
            kw[k] = _get_str(ctx, key, v)
    # HPS: a block without `type` disables the volatile DB. keras-hps keeps the host tier on
    # (a block with settings means the user wants it); write "type": "disabled" to turn it off.
    return VolatileDBConfig(**kw)


def _load_persistent(ctx: _Ctx, raw: Any) -> PersistentDBConfig:
    if raw is None:
        return PersistentDBConfig()
    if not isinstance(raw, Mapping):
        raise ctx.error("persistent_db", f"expected an object, got {_type_name(raw)}")
    _check_keys(ctx, "persistent_db.", raw, set(PersistentDBConfig.__dataclass_fields__))
    kw: dict[str, Any] = {}
    for k, v in raw.items():
        key = f"persistent_db.{k}"
        if k == "type":
            t = _get_str(ctx, key, v).lower()
            if t not in _PERSISTENT_TYPES:
                raise ctx.error(key, f"unknown type {v!r}; one of {sorted(_PERSISTENT_TYPES)}")
            kw[k] = _PERSISTENT_TYPES[t]
        elif k == "path":
            kw[k] = _get_str(ctx, key, v)
        elif k in ("num_threads", "max_batch_size"):
            kw[k] = _get_int(ctx, key, v, minimum=0)
        elif k == "read_only":
            kw[k] = _get_bool(ctx, key, v)
        elif k == "update_filters":
            kw[k] = _get_str_list(ctx, key, v)
    return PersistentDBConfig(**kw)


def _load_update_source(ctx: _Ctx, raw: Any) -> UpdateSourceConfig:
    if raw is None:
        return UpdateSourceConfig()
    if not isinstance(raw, Mapping):
        raise ctx.error("update_source", f"expected an object, got {_type_name(raw)}")
    _check_keys(ctx, "update_source.", raw, set(UpdateSourceConfig.__dataclass_fields__))
    kw: dict[str, Any] = {}
    for k, v in raw.items():
        key = f"update_source.{k}"
        if k == "type":
            t = "null" if v is None else _get_str(ctx, key, v)
            if t not in ("null", "kafka_message_queue"):
                raise ctx.error(key, f"unknown type {v!r}; one of ['null', 'kafka_message_queue']")
            if t != "null":
                warnings.warn(
                    f"{ctx.source or '<dict config>'}: update_source {t!r} is not supported by "
                    "keras-hps and is ignored (tables are read from sparse_files)",
                    stacklevel=4,
                )
            kw[k] = t
        elif k == "brokers":
            kw[k] = _get_str(ctx, key, v)
        else:
            kw[k] = _get_int(ctx, key, v, minimum=0)
    return UpdateSourceConfig(**kw)


_ADMISSIONS = ("none", "tinylfu")
_MODEL_INT = {"max_batch_size": 1, "num_of_worker_buffer_in_pool": 1,
              "num_of_refresher_buffer_in_pool": 0, "thread_pool_size": 1,
              "maxnum_des_feature_per_sample": 0, "label_dim": 0, "slot_num": 0}
_MODEL_BOOL = {"gpucache", "use_static_table", "init_ec", "use_hctr_cache_implementation",
               "use_context_stream", "enable_pagelock", "fp8_quant", "fuse_embedding_table"}
_MODEL_REQUIRED = ("sparse_files", "embedding_vecsize_per_table",
                   "maxnum_catfeature_query_per_table_per_sample")


def _resolve_path(ctx: _Ctx, key: str, value: Any) -> str:
    text = _get_str(ctx, key, value)
    if not text:
        raise ctx.error(key, "empty path")
    if "://" in text:
        raise ctx.error(key, f"remote paths are not supported, got {text!r}; "
                             "copy the table to local disk")
    p = Path(os.path.expanduser(text))
    if not p.is_absolute():
        p = ctx.base_dir / p
    return str(p)


def _load_model(ctx: _Ctx, i: int, raw: Any) -> ModelConfig:
    where = f"models[{i}]"
    if not isinstance(raw, Mapping):
        raise ctx.error(where, f"expected an object, got {_type_name(raw)}")
    _check_keys(ctx, f"{where}.", raw, set(ModelConfig.__dataclass_fields__))
    for k in _MODEL_REQUIRED:
        if k not in raw:
            raise ctx.error(f"{where}.{k}", "required key is missing")
    name = _get_str(ctx, f"{where}.model", raw.get("model", ""))
    if not _MODEL_NAME.match(name):
        raise ctx.error(f"{where}.model", f"must match [a-zA-Z0-9_-]{{1,120}}, got {name!r}")

    files_raw = _get_list(ctx, f"{where}.sparse_files", raw["sparse_files"])
    if not files_raw:
        raise ctx.error(f"{where}.sparse_files", "must name at least one table")
    n = len(files_raw)
    files = tuple(_resolve_path(ctx, f"{where}.sparse_files[{t}]", v)
                  for t, v in enumerate(files_raw))

    def per_table(key: str, conv, *, pad: Any = None, raw_values: Any = None) -> tuple:
        values = _get_list(ctx, f"{where}.{key}", raw[key] if raw_values is None else raw_values)
        if pad is not None and len(values) < n:
            values = values + [pad] * (n - len(values))  # HPS pads this list with 0.0
        if len(values) != n:
            raise ctx.error(f"{where}.{key}",
                            f"has {len(values)} entries but sparse_files names {n} table(s)")
        return tuple(conv(f"{where}.{key}[{t}]", v) for t, v in enumerate(values))

    kw: dict[str, Any] = {"model": name, "sparse_files": files}
    kw["embedding_vecsize_per_table"] = per_table(
        "embedding_vecsize_per_table", lambda k, v: _get_int(ctx, k, v, minimum=1))
    kw["maxnum_catfeature_query_per_table_per_sample"] = per_table(
        "maxnum_catfeature_query_per_table_per_sample", lambda k, v: _get_int(ctx, k, v, minimum=1))
    if "embedding_table_names" in raw:
        names = per_table("embedding_table_names", lambda k, v: _get_str(ctx, k, v))
        if len(set(names)) != len(names):
            raise ctx.error(f"{where}.embedding_table_names", f"names repeat: {list(names)}")
        kw["embedding_table_names"] = names
    else:
        kw["embedding_table_names"] = tuple(f"sparse_embedding{t}" for t in range(n))
    if "default_value_for_each_table" in raw:
        dv = raw["default_value_for_each_table"]
        if isinstance(dv, (int, float)) and not isinstance(dv, bool):
            dv = [dv] * n  # keras-hps extension: one number is every table's default
        kw["default_value_for_each_table"] = per_table(
            "default_value_for_each_table", lambda k, v: _get_float(ctx, k, v),
            pad=0.0, raw_values=dv)
    else:
        kw["default_value_for_each_table"] = (0.0,) * n

    for k, v in raw.items():
        key = f"{where}.{k}"
        if k in kw or k in ("model",):
            continue
        if k == "deployed_device_list":
            devs = _get_list(ctx, key, v)
            kw[k] = tuple(_get_int(ctx, f"{key}[{j}]", d, minimum=0) for j, d in enumerate(devs))
        elif k in _MODEL_INT:
            kw[k] = _get_int(ctx, key, v, minimum=_MODEL_INT[k])
        elif k in _MODEL_BOOL:
            kw[k] = _get_bool(ctx, key, v)
        elif k == "gpucacheper":
            kw[k] = _get_float(ctx, key, v, 0.0, 1.0)
        elif k in ("hit_rate_threshold", "cache_refresh_percentage_per_iteration",
                   "refresh_delay", "refresh_interval"):
            kw[k] = _get_float(ctx, key, v, 0.0)
        elif k == "embedding_cache_type":
            t = _get_str(ctx, key, v)
            if t not in _CACHE_TYPES:
                raise ctx.error(key, f"unknown cache type {t!r}; one of {list(_CACHE_TYPES)}")
            kw[k] = t
        elif k in ("dense_file", "network_file"):
            kw[k] = _get_str(ctx, key, v)
        elif k == "gpu_cache_admission":
            a = _get_str(ctx, key, v)
            if a not in _ADMISSIONS:
                raise ctx.error(key, f"unknown admission {a!r}; one of {list(_ADMISSIONS)}")
            kw[k] = a

    return ModelConfig(**kw)


_TOP_KEYS = {"supportlonglong", "models", "volatile_db", "persistent_db", "update_source",
             "fuse_embedding_table"}


def load_config(config: str | os.PathLike | Mapping[str, Any] | PSConfig,
                base_dir: str | os.PathLike | None = None) -> PSConfig:
    """Validate a parameter-server config and return it as a `PSConfig`.

    `config` is a path to an hps.json, a dict with the same content, or an already loaded
    PSConfig (returned as is). Relative table paths resolve against the config file's folder
    (for a dict: `base_dir`, default the current directory). Raises ConfigError naming the key
    and the file for anything invalid.
    """
    if isinstance(config, PSConfig):
        return config
    if isinstance(config, Mapping):
        source = None
        raw = config
        ctx = _Ctx(None, Path(base_dir) if base_dir is not None else Path.cwd())
    elif isinstance(config, (str, os.PathLike)):
        path = Path(config).expanduser().absolute()
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: parameter-server config file not found")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from e
        ctx = _Ctx(source, Path(base_dir) if base_dir is not None else path.parent)
    else:
        raise ConfigError(f"expected a path or a dict for the config, got {_type_name(config)}")

    if not isinstance(raw, Mapping):
        raise ctx.error("<top level>", f"expected a JSON object, got {_type_name(raw)}")
    _check_keys(ctx, "", raw, _TOP_KEYS)
    if "models" not in raw:
        raise ctx.error("models", "required key is missing")
    models_raw = _get_list(ctx, "models", raw["models"])
    if not models_raw:
        raise ctx.error("models", "must list at least one model")
    models = tuple(_load_model(ctx, i, m) for i, m in enumerate(models_raw))
    seen: set[str] = set()
    for i, m in enumerate(models):
        if m.model in seen:
            raise ctx.error(f"models[{i}].model", f"model name {m.model!r} appears twice")
        seen.add(m.model)
    return PSConfig(
        models=models,
        supportlonglong=_get_bool(ctx, "supportlonglong", raw.get("supportlonglong", True)),
        volatile_db=_load_volatile(ctx, raw.get("volatile_db")),
        persistent_db=_load_persistent(ctx, raw.get("persistent_db")),
        update_source=_load_update_source(ctx, raw.get("update_source")),
        fuse_embedding_table=_get_bool(ctx, "fuse_embedding_table",
                                       raw.get("fuse_embedding_table", False)),
        source=source,
    )
