"""The parameter-server config (`hps.json`): HPS's JSON schema as frozen dataclasses.

`load_config(path_or_dict)` validates a config and returns a `PSConfig`. Field names are
HPS's JSON keys, so a config written for NVIDIA HPS loads unchanged. Each field below is one
row of the schema (`keras_hps.schema.key`: default, type and range, meaning, HPS note): the
checks and the reference tables of docs/configuration.md are both made from these rows
(`python -m keras_hps.config --write-doc docs/configuration.md` regenerates them). Every
problem is a `ConfigError` that names the key (as a path such as `models[0].sparse_files[1]`)
and the config file. Loading opens no table file: `keras_hps.formats.check_config_tables`
checks the tables against the config.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from keras_hps.errors import ConfigError, NotFoundError
from keras_hps.schema import (
    REQUIRED,
    Block,
    Bool,
    Choice,
    Float,
    Int,
    Kind,
    List,
    LocalPath,
    PerTable,
    Source,
    Str,
    config_error,
    key,
    load_block,
    markdown_table,
    replace_generated,
)

__all__ = [
    "ConfigError",
    "ModelConfig",
    "PSConfig",
    "PersistentDBConfig",
    "UpdateSourceConfig",
    "VolatileDBConfig",
    "check_volatile_db",
    "config_error",
    "load_config",
    "reference_tables",
    "update_topic",
    "NO_OVERFLOW_LIMIT",
]

#: HPS's default `overflow_margin` (2**64 - 1): no limit on host-tier rows.
NO_OVERFLOW_LIMIT = 2**64 - 1

# volatile_db `type` values: HPS's names and aliases -> what keras-hps does.
_VOLATILE_TYPES = {
    "hash_map": "hash_map",
    "hashmap": "hash_map",
    "parallel_hash_map": "hash_map",
    "parallel_hashmap": "hash_map",
    "multi_process_hash_map": "hash_map",
    "mp_hash_map": "hash_map",
    "redis_cluster": "redis_cluster",
    "redis": "redis_cluster",
    "redis_cluster_backend": "redis_cluster",
    "disabled": "disabled",
    "disable": "disabled",
    "none": "disabled",
}
_IN_PROCESS = ("keras-hps serves the host tier from this process's RAM; shared-memory settings "
               "are ignored")
_NOT_IN_PROCESS = {t: _IN_PROCESS for t in ("multi_process_hash_map", "mp_hash_map")}

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
_ADMISSIONS = ("none", "tinylfu")
_PLACEMENTS = ("replicate", "shard")
_FILTERS = List(Str())
_REDIS = "With `redis_cluster`:"
_SHM = "Shared-memory setting of HPS's `multi_process_hash_map` volatile DB."
_TLS = "HPS's TLS setting; it only matters with `enable_tls`, which keras-hps does not support."
_FOR_REDIS = "Ignored by the `hash_map` host tier."


def _host_port(text: str) -> tuple[str, int] | None:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


class _Addresses(Kind):
    """Redis nodes: HPS's `"host:port,host:port"` string or a list of `"host:port"`."""

    def parse(self, src: Source, key: str, value: Any, built: Mapping[str, Any]
              ) -> tuple[str, ...]:
        parts = value.split(",") if isinstance(value, str) else value
        if not isinstance(parts, (list, tuple)) or not parts or \
                not all(isinstance(p, str) for p in parts):
            raise src.error(key, f"expected 'host:port[,host:port...]' or a list of them, "
                                 f"got {value!r}")
        for p in parts:
            if _host_port(p) is None:
                raise src.error(key, f"{p.strip()!r} is not host:port")
        return tuple(p.strip() for p in parts)

    def describe(self) -> str:
        return "string `host:port[,host:port...]`, or a list of `host:port`"


@dataclass(frozen=True)
class VolatileDBConfig:
    """`volatile_db`: the host RAM tier, or HPS's Redis Cluster tier.

    `type` is normalised to "hash_map" (host tier), "redis_cluster" (a Redis Cluster shared
    by every server, with an optional host tier in front of it: `host_cache_rate`) or
    "disabled". `multi_process_hash_map` is served by the in-process host tier, with a
    warning.
    """

    type: str = key(
        "hash_map", Choice(_VOLATILE_TYPES, "type", casefold=True, warn=_NOT_IN_PROCESS),
        "`hash_map`: the host tier in this process's RAM. `redis_cluster`: the rows live in a "
        "Redis Cluster that every server shares (see [deployment](deployment.md#several-servers"
        "-on-one-redis-cluster)); `host_cache_rate` puts a host tier in front of it. "
        "`multi_process_hash_map` loads with a warning and is served by the in-process host "
        "tier. `disabled`: no host tier, every lookup reads the cold tier.")
    initial_cache_rate: float = key(
        1.0, Float(0.0, 1.0),
        "Fraction of each table's rows loaded at start (the first rows of the file) into the "
        "host tier, or with `redis_cluster` copied into the cluster, once for all servers; the "
        "rest fill on demand.",
        hps="parsed it but loaded every row.")
    overflow_margin: int = key(
        NO_OVERFLOW_LIMIT, Int(minimum=1),
        "Most rows the host tier holds per table; keras-hps allocates `min(rows, "
        "overflow_margin)` rows up front. With `redis_cluster`: most rows per partition in the "
        "cluster, as in HPS (rows written by an update are never evicted).",
        hps="applied the limit per partition; the host tier has one partition per table.",
        default_text="2^64-1 (no limit)")
    overflow_policy: str = key(
        "evict_random", Choice(_OVERFLOW_POLICIES, "policy"),
        "What leaves when an insert would pass `overflow_margin`: `evict_random` (uniformly "
        "at random), `evict_least_used` (fewest hits since insertion), `evict_oldest` (least "
        "recently used: oldest last access).")
    overflow_resolution_target: float = key(
        0.8, Float(0.0, 1.0),
        "On overflow, evict down to this fraction of `overflow_margin` (or lower if the insert "
        "needs more room), so eviction runs once per many inserts.")
    cache_missed_embeddings: bool = key(
        False, Bool(),
        "With `redis_cluster`: rows found in the cold tier are added to the cluster (never "
        "replacing a row there). The `hash_map` host tier always keeps rows found in the cold "
        "tier.", hps="did so only when this was `true`, and asynchronously.")
    host_cache_rate: float = key(
        0.0, Float(0.0, 1.0),
        "keras-hps only. With `redis_cluster`: a host tier of `ceil(host_cache_rate x rows)` "
        "rows per table in this process's RAM, in front of the cluster, filled on demand and "
        "evicting by `overflow_policy` (0: none, as in HPS). Ignored by `hash_map`, whose host "
        "tier is sized by `overflow_margin`.")
    address: tuple[str, ...] = key(
        ("127.0.0.1:7000",), _Addresses(),
        f"{_REDIS} the cluster's nodes; one reachable node is enough, the client discovers the "
        f"others. {_FOR_REDIS}", default_text='`"127.0.0.1:7000"`')
    user_name: str = key("default", Str(), f"{_REDIS} the Redis ACL user. {_FOR_REDIS}")
    password: str = key(
        "", Str(), f"{_REDIS} the user's password (empty: no login). A password (or user) that "
        f"Redis rejects is a `ConfigError` naming this key when the server starts. {_FOR_REDIS}")
    num_partitions: int = key(
        16, Int(minimum=1),
        f"{_REDIS} each table is split into this many Redis hashes, spread over the masters "
        "(HPS recommended 2 to 5 times the number of nodes). Every server sharing a table must "
        f"use the same value: a server with another one fails at start. {_FOR_REDIS}",
        hps="defaulted to min(16, CPU cores), which differs between machines.")
    num_node_connections: int = key(
        5, Int(minimum=1), f"{_REDIS} most connections to one node. {_FOR_REDIS}")
    max_batch_size: int = key(
        65536, Int(minimum=1),
        f"{_REDIS} most keys in one read or write per partition; larger requests are split. "
        f"Sets `max_get_batch_size` and `max_set_batch_size` unless they are given. "
        f"{_FOR_REDIS}")
    max_get_batch_size: int | None = key(
        None, Int(minimum=1), f"{_REDIS} most keys in one read (HMGET) per partition. "
        f"{_FOR_REDIS}", hps="(before 23.x) wrote this and `max_set_batch_size`.",
        default_text="`max_batch_size`")
    max_set_batch_size: int | None = key(
        None, Int(minimum=1), f"{_REDIS} most keys in one write per partition. {_FOR_REDIS}",
        default_text="`max_batch_size`")
    socket_timeout: float = key(
        5.0, Float(0.001, 3600.0),
        f"keras-hps only. {_REDIS} seconds a Redis command may take before its node counts as "
        f"unreachable (the lookup then fails with UNAVAILABLE). {_FOR_REDIS}")
    refresh_time_after_fetch: bool = key(
        False, Bool(), f"{_REDIS} with `evict_oldest`, a lookup counts as a use (else only the "
        f"insert). {_FOR_REDIS}")
    enable_tls: bool = key(
        False, Bool(), "Only `false`: keras-hps connects to Redis without TLS; `true` is an error.")
    update_filters: tuple[str, ...] = key(
        ("^hps_.+$",), _FILTERS,
        "HPS's Kafka topic filters. keras-hps applies every update of the tables it serves, "
        "which is what HPS's default and `[\".+\"]` do; a list that matches no "
        "`hps_et.<model>.<table name>` of a served table is an error (that table's updates "
        "would have been dropped).")
    allocation_rate: int = key(256 * 1024 * 1024, Int(minimum=0),
                               "HPS's bytes per hash-map allocation.", ignored=True)
    shared_memory_size: int = key(16 * 1024**3, Int(minimum=0), _SHM, ignored=True)
    shared_memory_name: str = key("hctr_mp_hash_map_database", Str(), _SHM, ignored=True)
    shared_memory_auto_remove: bool = key(True, Bool(), _SHM, ignored=True)
    tls_ca_certificate: str = key("cacertbundle.crt", Str(), _TLS, ignored=True)
    tls_client_certificate: str = key("client_cert.pem", Str(), _TLS, ignored=True)
    tls_client_key: str = key("client_key.pem", Str(), _TLS, ignored=True)
    tls_server_name_identification: str = key("redis.localhost", Str(), _TLS, ignored=True)
    initialize_after_startup: bool = key(True, Bool(), "HPS documented it but never read it.",
                                         ignored=True)

    @property
    def enabled(self) -> bool:
        """Whether a volatile tier (host RAM or Redis Cluster) exists."""
        return self.type != "disabled"

    @property
    def redis(self) -> bool:
        """Whether the volatile tier is a Redis Cluster."""
        return self.type == "redis_cluster"

    @property
    def max_rows(self) -> int | None:
        """Host-tier row limit per table (`overflow_margin`), or None for no limit."""
        return None if self.overflow_margin >= NO_OVERFLOW_LIMIT else int(self.overflow_margin)

    def host_rows(self, rows: int) -> int:
        """Rows of a host tier over a table of `rows` rows (0: no host tier)."""
        if self.type == "disabled":
            return 0
        if self.redis:
            return min(rows, math.ceil(self.host_cache_rate * rows))
        return rows if self.max_rows is None else min(rows, self.max_rows)

    @property
    def get_batch_size(self) -> int:
        """Most keys in one Redis read per partition."""
        return self.max_get_batch_size or self.max_batch_size

    @property
    def set_batch_size(self) -> int:
        """Most keys in one Redis write per partition."""
        return self.max_set_batch_size or self.max_batch_size


@dataclass(frozen=True)
class PersistentDBConfig:
    """`persistent_db`: HPS's RocksDB block. keras-hps's cold tier reads the table files in
    `sparse_files` directly; `type` is normalised to "table_files" or "disabled" (see
    docs/configuration.md for what each means)."""

    type: str = key(
        "disabled", Choice(_PERSISTENT_TYPES, "type", casefold=True),
        "`table_files` (also HPS's `rocks_db`): the cold tier over the table files. "
        "`disabled` (HPS's default) reads the same files: nothing else can hold rows the host "
        "tier does not.")
    path: str = key("", Str(), "HPS's RocksDB directory (there is no database to put there).",
                    ignored=True)
    num_threads: int = key(16, Int(minimum=0), "HPS's RocksDB threads.", ignored=True)
    read_only: bool = key(False, Bool(), "The cold tier is always read-only.", ignored=True)
    max_batch_size: int = key(65536, Int(minimum=0), "HPS's batch size for database queries.",
                              ignored=True)
    update_filters: tuple[str, ...] = key(("^hps_.+$",), _FILTERS,
                                          "HPS's Kafka topics to apply updates from.",
                                          ignored=True)

    @property
    def enabled(self) -> bool:
        """Whether a persistent tier was configured (the cold tier is used either way
        when the host tier does not hold every row)."""
        return self.type != "disabled"


_KAFKA = "HPS's Kafka consumer setting."


#: update_source.type -> the error a configured Kafka source gets.
_KAFKA_ERROR = (
    "is not supported: keras-hps takes online updates from `keras-hps update` and "
    "ParameterServer.update (announced on a Redis Stream per model with volatile_db.type "
    "redis_cluster, else appended to each table's update log); set type to null or remove "
    "the block")


@dataclass(frozen=True)
class UpdateSourceConfig:
    """`update_source`: HPS's Kafka block. Accepted with `type: null` so HPS configs load; a
    Kafka source is an error (keras-hps's update sources are `keras-hps update` and
    `ParameterServer.update`)."""

    type: str = key(
        "null", Choice(("null", "kafka_message_queue"), "type", none="null"),
        "Only `null`. HPS's `kafka_message_queue` is an error that names keras-hps's update "
        "sources: `keras-hps update` and `ParameterServer.update`, announced on a Redis Stream "
        "per model with a `redis_cluster` volatile_db, else written to the table's update log "
        "(see [deployment](deployment.md#online-updates)).")
    brokers: str = key("127.0.0.1:9092", Str(), _KAFKA, ignored=True)
    metadata_refresh_interval_ms: int = key(30000, Int(minimum=0), _KAFKA, ignored=True)
    receive_buffer_size: int = key(262144, Int(minimum=0), _KAFKA, ignored=True)
    poll_timeout_ms: int = key(500, Int(minimum=0), _KAFKA, ignored=True)
    max_batch_size: int = key(8192, Int(minimum=0), _KAFKA, ignored=True)
    failure_backoff_ms: int = key(50, Int(minimum=0), _KAFKA, ignored=True)
    max_commit_interval: int = key(32, Int(minimum=0), _KAFKA, ignored=True)


_HPS_IMPL = "HPS implementation choice."
_HUGECTR = "HugeCTR-model / Triton-backend key."
_REFRESH = ("The GPU cache starts empty and fills on misses; updated rows are invalidated "
            "rather than refreshed on a timer.")
_FUSE = ("`FusedLookupLayer` (torch backend) looks the tables up in one kernel launch where "
         "their GPU tiers answer on the device: static tables, and dynamic caches inside a "
         "captured CUDA graph.")
_FUSE_HPS = "packed same-width tables into one."


@dataclass(frozen=True)
class ModelConfig:
    """One entry of `models[]`, with HPS's per-model keys and defaults."""

    model: str = key(
        REQUIRED, Str(r"[a-zA-Z0-9_\-]{1,120}", "[a-zA-Z0-9_-]{1,120}"),
        "The model's name: the `model_name` of the layers and of `ps.lookup`.")
    sparse_files: tuple[str, ...] = key(
        REQUIRED, List(LocalPath(), empty="must name at least one table"),
        "One table per entry: an HPS table directory (`key` + `emb_vector`) or a keras-hps "
        "HDF5 table (`.h5`/`.hdf5`); see [table formats](table_formats.md). Relative paths "
        "resolve against the config file's folder. Remote URLs (`s3://`, `hdfs://`) are an "
        "error: copy the table to local disk.")
    embedding_vecsize_per_table: tuple[int, ...] = key(
        REQUIRED, PerTable(Int(minimum=1)),
        "Vector size of each table, checked against the file (HDF5: its `dim` attribute; "
        "HPS: `emb_vector` bytes = rows x dim x 4) by `check_config_tables`.")
    maxnum_catfeature_query_per_table_per_sample: tuple[int, ...] = key(
        REQUIRED, PerTable(Int(minimum=1)),
        "Most keys one sample looks up in each table. With `max_batch_size` it bounds one "
        "lookup: more than `max_batch_size x maxnum_catfeature_query_per_table_per_sample` "
        "keys is an `InvalidInputError`.",
        hps="overran its buffers.")
    embedding_table_names: tuple[str, ...] = key(
        (), PerTable(Str(), default=lambda t: f"sparse_embedding{t}", unique=True),
        "Table names, shown in stats, `plan` and messages. Must be unique.",
        default_text="`sparse_embedding0`, `sparse_embedding1`, ...")
    default_value_for_each_table: tuple[float, ...] = key(
        (), PerTable(Float(), default=lambda t: 0.0, pad=0.0, broadcast=True),
        "The value every component of a key's vector takes when the key is in no tier. A short "
        "list is padded with `0.0` (as in HPS); keras-hps also accepts one number for every "
        "table, and a list longer than the number of tables is an error.",
        hps="required this key.", default_text="`0.0` for every table")
    deployed_device_list: tuple[int, ...] = key(
        (0,), List(Int(minimum=0)),
        "GPUs that hold this model's GPU tier, each table replicated on every one (as in HPS) "
        "or split over them (`gpu_placement`).",
        hps="required this key.")
    gpu_placement: str = key(
        "replicate", Choice(_PLACEMENTS, "placement"),
        "keras-hps only. How each table's GPU tier uses the GPUs of `deployed_device_list`. "
        "`replicate` (as in HPS): every GPU holds the whole cache (or static table) and a "
        "lookup runs on one GPU. `shard`: the cache (or static table) is split by key over "
        "the GPUs, so N GPUs hold N times the rows, and a lookup gathers each key's row from "
        "the GPU that owns it (peer-to-peer copies). See "
        "[the GPU tier](gpu_tier.md#devices-replicate-or-shard).")
    max_batch_size: int = key(
        64, Int(minimum=1),
        "Most samples per lookup (see `maxnum_catfeature_query_per_table_per_sample`). "
        "`hps.Init(global_batch_size=N)` with `N` above a model's `max_batch_size` is a "
        "`ConfigError`.",
        hps="logged it and went on.")
    gpucache: bool = key(
        True, Bool(),
        "Put a GPU tier on top of this model's tables when CUDA is available. The environment "
        "variable `KERAS_HPS_GPU_TIER=off` turns every GPU tier off, `interpret` runs it "
        "through Triton's interpreter on the CPU (tests), `virtual` puts every device of "
        "`deployed_device_list` on GPU 0 (tests of several GPUs on one).")
    gpucacheper: float = key(
        0.2, Float(0.0, 64.0),
        "GPU cache size as a fraction of the table's rows: `max(ceil(gpucacheper x rows), "
        "64)` slots, rounded up to whole groups of 32 slots (four 8-slot sets). Above 1 "
        "(keras-hps only; HPS took at most 1) the cache has more slots than the table has "
        "rows: an 8-way set-associative cache needs several times as many slots as the keys "
        "it must hold at once before no set overflows.")
    hit_rate_threshold: float = key(
        0.9, Float(0.0),
        "Lookups are exact whatever this is. It decides only when rows fetched from below "
        "enter the GPU cache: before the lookup returns when the batch's hit rate is below the "
        "threshold, on a background thread otherwise.",
        hps="answered the missed keys of such a batch with default vectors.")
    embedding_cache_type: str = key(
        "dynamic", Choice(_CACHE_TYPES, "cache type"),
        "`dynamic`: an LRU cache of `gpucacheper` of the rows. `static`: the whole table in "
        "GPU memory behind a hash index (none when the keys are 0..rows-1: a plain gather). "
        "`uvm`: the whole table in pinned host memory, read by the GPU, with a dynamic cache in "
        "front. See [the hierarchy](gpu_cache.md).")
    gpu_cache_admission: str = key(
        "none", Choice(_ADMISSIONS, "admission"),
        "keras-hps only. `tinylfu`: the dynamic cache (modes `dynamic`, `uvm`) counts every "
        "looked-up key in a frequency sketch, and a missed key enters a full set only if it "
        "was looked up more often than the slot it would evict (TinyLFU). Pays off on skewed "
        "keys in a long-running server; see [the GPU cache](gpu_cache.md#admission-tinylfu). "
        "`none`: every missed key is inserted, as in HPS.")
    use_static_table: bool = key(
        False, Bool(), "`true` means `embedding_cache_type: \"static\"`.",
        hps="its legacy flag for static tables.")
    num_of_worker_buffer_in_pool: int = key(
        1, Int(minimum=1),
        "keras-hps allocates per-lookup buffers as needed, so there is no pool to run dry.",
        hps="ran dry with \"memory pool is empty\".", ignored=True)
    num_of_refresher_buffer_in_pool: int = key(
        1, Int(minimum=0), "keras-hps has no refresher buffers.", ignored=True)
    cache_refresh_percentage_per_iteration: float = key(0.0, Float(0.0), _REFRESH, ignored=True)
    init_ec: bool = key(True, Bool(), _REFRESH, ignored=True)
    use_hctr_cache_implementation: bool = key(True, Bool(), _HPS_IMPL, ignored=True)
    use_context_stream: bool = key(True, Bool(), _HPS_IMPL, ignored=True)
    thread_pool_size: int = key(16, Int(minimum=1), _HPS_IMPL, ignored=True)
    enable_pagelock: bool = key(False, Bool(), "Static tables are fp32 in GPU memory.",
                                ignored=True)
    fp8_quant: bool = key(False, Bool(), "Static tables are fp32 in GPU memory.", ignored=True)
    maxnum_des_feature_per_sample: int = key(26, Int(minimum=0), _HUGECTR, ignored=True)
    refresh_delay: float = key(0.0, Float(0.0), _REFRESH, ignored=True)
    refresh_interval: float = key(0.0, Float(0.0), _REFRESH, ignored=True)
    fuse_embedding_table: bool = key(False, Bool(), _FUSE, hps=_FUSE_HPS, ignored=True)
    dense_file: str = key("", Str(), _HUGECTR, ignored=True)
    network_file: str = key("", Str(), _HUGECTR, ignored=True)
    label_dim: int = key(1, Int(minimum=0), _HUGECTR, ignored=True)
    slot_num: int = key(0, Int(minimum=0), _HUGECTR, ignored=True)

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

    models: tuple[ModelConfig, ...] = key(
        REQUIRED, List(Block(ModelConfig, null_ok=False), empty="must list at least one model"),
        "The models; names must be unique. Keys of each: [below](#per-model-keys-modelsi).")
    supportlonglong: bool = key(
        True, Bool(),
        "`true`: keys are int64. `false`: keys are uint32; a lookup key below 0 or above "
        "4294967295 is an `InvalidInputError`.",
        hps="required this key.")
    volatile_db: VolatileDBConfig = key(
        VolatileDBConfig(), Block(VolatileDBConfig),
        "The host RAM tier ([below](#volatile_db-the-host-ram-tier)).")
    persistent_db: PersistentDBConfig = key(
        PersistentDBConfig(), Block(PersistentDBConfig),
        "The cold tier ([below](#persistent_db-the-cold-tier)).")
    update_source: UpdateSourceConfig = key(
        UpdateSourceConfig(), Block(UpdateSourceConfig),
        "HPS's Kafka source ([below](#update_source)): only `type: null`; updates come from "
        "`keras-hps update`.")
    fuse_embedding_table: bool = key(False, Bool(), _FUSE, hps=_FUSE_HPS, ignored=True)
    source: str | None = None  # the config file, not a key

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


def load_config(config: str | os.PathLike | Mapping[str, Any] | PSConfig,
                base_dir: str | os.PathLike | None = None) -> PSConfig:
    """Validate a parameter-server config and return it as a `PSConfig`.

    `config` is a path to an hps.json, a dict with the same content, or an already loaded
    PSConfig (returned as is). Relative table paths resolve against the config file's folder
    (for a dict: `base_dir`, default the current directory). Raises ConfigError naming the key
    and the file for anything invalid. Opens no table file (see `check_config_tables`).
    """
    if isinstance(config, PSConfig):
        return config
    if isinstance(config, Mapping):
        raw: Any = config
        src = Source(None, Path(base_dir) if base_dir is not None else Path.cwd())
    elif isinstance(config, (str, os.PathLike)):
        path = Path(config).expanduser().absolute()
        if not path.is_file():
            raise ConfigError(f"{path}: parameter-server config file not found")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from e
        src = Source(str(path), Path(base_dir) if base_dir is not None else path.parent)
    else:
        raise ConfigError(f"expected a path or a dict for the config, got "
                          f"{type(config).__name__}")
    if not isinstance(raw, Mapping):
        raise src.error("<top level>", f"expected a JSON object, got {type(raw).__name__}")
    cfg = load_block(src, PSConfig, raw)
    seen: set[str] = set()
    for i, m in enumerate(cfg.models):
        if m.model in seen:
            raise src.error(f"models[{i}].model", f"model name {m.model!r} appears twice")
        seen.add(m.model)
    check_volatile_db(src, cfg.volatile_db, cfg.models)
    if cfg.update_source.type != "null":
        raise src.error("update_source.type", f"{cfg.update_source.type!r} {_KAFKA_ERROR}")
    return replace(cfg, source=src.source)


def update_topic(model: str, table_name: str) -> str:
    """HPS's name for the update topic of one table (what `update_filters` match)."""
    return f"hps_et.{model}.{table_name}"


def check_volatile_db(src: Source, vdb: VolatileDBConfig,
                      models: Sequence[ModelConfig] = ()) -> None:
    """The checks of `volatile_db` that span several keys (and the models it serves)."""
    if vdb.enable_tls:
        raise src.error("volatile_db.enable_tls", "true is not supported: keras-hps connects "
                                                  "to Redis without TLS")
    try:
        filters = [re.compile(f) for f in vdb.update_filters]
    except re.error as e:
        raise src.error("volatile_db.update_filters", f"not a regular expression: {e}") from None
    for m in models:
        for t in range(m.num_tables):
            topic = update_topic(m.model, m.table_name(t))
            if not any(f.search(topic) for f in filters):
                raise src.error("volatile_db.update_filters", f"{list(vdb.update_filters)} "
                                f"matches no filter for table {topic!r}; keras-hps applies "
                                "every update of a served table (use the default or [\".+\"])")
    if vdb.redis:
        for i, m in enumerate(models):
            if m.cache_type != "dynamic" and m.gpucache:
                which = "use_static_table" if m.use_static_table else "embedding_cache_type"
                raise src.error(f"models[{i}].{which}", f"{m.cache_type} tables hold the whole "
                                "table file on each server, which a shared Redis Cluster tier "
                                "would leave stale after updates; use dynamic with "
                                "volatile_db.type redis_cluster")


# ----------------------------------------------------------------------------------------------
# the reference doc

#: docs/configuration.md's generated regions -> the block each documents.
_DOC_BLOCKS = {
    "top": PSConfig,
    "models": ModelConfig,
    "volatile_db": VolatileDBConfig,
    "persistent_db": PersistentDBConfig,
    "update_source": UpdateSourceConfig,
}
DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def reference_tables() -> dict[str, str]:
    """The reference table of every block, in Markdown, by the name of its doc region."""
    return {name: markdown_table(cls) for name, cls in _DOC_BLOCKS.items()}


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keras_hps.config",
        description="Print or regenerate the hps.json reference tables from the schema.")
    parser.add_argument("--markdown", action="store_true", help="print every table")
    parser.add_argument("--write-doc", metavar="PATH", nargs="?", const=str(DOC_PATH),
                        help="rewrite the generated regions of PATH in place")
    args = parser.parse_args(argv)
    tables = reference_tables()
    if args.write_doc:
        doc = Path(args.write_doc)
        doc.write_text(replace_generated(doc.read_text(), tables))
    if args.markdown or not args.write_doc:
        for name, table in tables.items():
            print(f"{name}:\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())

