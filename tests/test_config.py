"""hps.json loading: HPS configs load unchanged, HPS defaults, and one clear error per mistake."""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from keras_hps.config import (
    NO_OVERFLOW_LIMIT,
    ModelConfig,
    PersistentDBConfig,
    PSConfig,
    UpdateSourceConfig,
    VolatileDBConfig,
    load_config,
    reference_tables,
)
from keras_hps.errors import ConfigError, NotFoundError
from keras_hps.formats import check_config_tables, write_hdf5_table, write_hps_table
from keras_hps.schema import replace_generated


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """A folder with an HPS table dir (dim 16, 40 rows) and an HDF5 table (dim 8, 30 rows)."""
    d = tmp_path_factory.mktemp("cfg")
    rng = np.random.default_rng(0)
    write_hps_table(d / "tables" / "t0", rng.permutation(40) - 7,
                    rng.standard_normal((40, 16)).astype(np.float32))
    write_hdf5_table(d / "tables" / "t1.h5", np.arange(30) * 3,
                     rng.standard_normal((30, 8)).astype(np.float32))
    return d


def hps_notebook_config() -> dict:
    """Shaped like the HPS TF notebooks' hps.json, with relative table paths."""
    return {
        "supportlonglong": True,
        "fuse_embedding_table": False,
        "models": [{
            "model": "demo-model_1",
            "sparse_files": ["tables/t0", "tables/t1.h5"],
            "num_of_worker_buffer_in_pool": 3,
            "embedding_table_names": ["sparse_embedding0", "sparse_embedding1"],
            "embedding_vecsize_per_table": [16, 8],
            "maxnum_catfeature_query_per_table_per_sample": [2, 26],
            "default_value_for_each_table": [1.0, 0.0],
            "deployed_device_list": [0],
            "max_batch_size": 1024,
            "cache_refresh_percentage_per_iteration": 0.2,
            "hit_rate_threshold": 1.0,
            "gpucacheper": 1.0,
            "gpucache": True,
            "init_ec": True,
            "embedding_cache_type": "dynamic",
            "use_context_stream": True,
        }],
        "volatile_db": {
            "type": "parallel_hash_map",
            "initial_cache_rate": 0.5,
            "overflow_margin": 1000,
            "overflow_policy": "evict_oldest",
            "overflow_resolution_target": 0.7,
            "num_partitions": 8,
            "allocation_rate": 1048576,
            "max_batch_size": 65536,
            "cache_missed_embeddings": True,
            "update_filters": [".+"],
        },
        "persistent_db": {
            "type": "rocks_db",
            "path": "/tmp/rocksdb",
            "num_threads": 16,
            "read_only": False,
            "max_batch_size": 65536,
            "update_filters": [".+"],
        },
        "update_source": {"type": "null", "brokers": "127.0.0.1:9092"},
    }


def write_config(folder, cfg, name="hps.json"):
    p = folder / name
    p.write_text(json.dumps(cfg))
    return p


def test_hps_config_loads_unchanged_with_paths_relative_to_the_file(tables, tmp_path, monkeypatch):
    path = write_config(tables, hps_notebook_config())
    monkeypatch.chdir(tmp_path)  # relative paths must not depend on the working directory
    cfg = load_config(str(path))
    assert cfg.source == str(path)
    m = cfg.model("demo-model_1")
    assert m.sparse_files == (str(tables / "tables" / "t0"), str(tables / "tables" / "t1.h5"))
    assert m.embedding_vecsize_per_table == (16, 8)
    assert check_config_tables(cfg) == {("demo-model_1", 0): 40, ("demo-model_1", 1): 30}
    assert m.max_keys_per_lookup(0) == 1024 * 2 and m.max_keys_per_lookup(1) == 1024 * 26
    assert m.num_of_worker_buffer_in_pool == 3
    assert m.default_value(0) == 1.0 and m.table_name(1) == "sparse_embedding1"
    assert cfg.volatile_db.type == "hash_map" and cfg.volatile_db.enabled
    assert cfg.volatile_db.max_rows == 1000
    assert cfg.volatile_db.overflow_policy == "evict_oldest"
    assert cfg.persistent_db.type == "table_files" and cfg.persistent_db.enabled
    assert cfg.key_dtype == np.int64


def test_hps_defaults(tables):
    cfg = load_config({"supportlonglong": False, "models": [{
        "model": "m", "sparse_files": ["tables/t0"], "embedding_vecsize_per_table": [16],
        "maxnum_catfeature_query_per_table_per_sample": [3]}]}, base_dir=tables)
    m = cfg.models[0]
    assert (m.max_batch_size, m.gpucache, m.gpucacheper) == (64, True, 0.2)
    assert m.hit_rate_threshold == 0.9
    assert (m.embedding_cache_type, m.cache_type, m.init_ec) == ("dynamic", "dynamic", True)
    assert m.embedding_table_names == ("sparse_embedding0",)
    assert m.default_value_for_each_table == (0.0,)
    assert m.max_keys_per_lookup(0) == 64 * 3
    assert cfg.key_dtype == np.uint32
    # volatile_db absent: the host tier holds every row (HPS's parallel_hash_map default)
    v = cfg.volatile_db
    assert v.enabled and v.initial_cache_rate == 1.0 and v.overflow_margin == NO_OVERFLOW_LIMIT
    assert v.max_rows is None and v.overflow_policy == "evict_random"
    assert v.overflow_resolution_target == 0.8
    assert not cfg.persistent_db.enabled


def test_volatile_and_persistent_types(tables):
    base = {"models": [{"model": "m", "sparse_files": ["tables/t0"],
                        "embedding_vecsize_per_table": [16],
                        "maxnum_catfeature_query_per_table_per_sample": [1]}]}
    cfg = load_config({**base, "volatile_db": {"initial_cache_rate": 0.25}}, base_dir=tables)
    assert cfg.volatile_db.enabled  # a block without `type` keeps the host tier on (HPS: off)
    cfg = load_config({**base, "volatile_db": {"type": "disabled"}}, base_dir=tables)
    assert not cfg.volatile_db.enabled
    with pytest.warns(UserWarning, match="multi_process_hash_map"):
        cfg = load_config({**base, "volatile_db": {"type": "multi_process_hash_map",
                                                   "shared_memory_size": 1}}, base_dir=tables)
    assert cfg.volatile_db.enabled and cfg.volatile_db.type == "hash_map"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # redis_cluster is served by a Redis Cluster now
        cfg = load_config({**base, "volatile_db": {"type": "Redis",
                                                   "address": "10.0.0.1:7000"}}, base_dir=tables)
    assert cfg.volatile_db.redis and cfg.volatile_db.address == ("10.0.0.1:7000",)
    for t, want in (("hdf5", "table_files"), ("rocks_db", "table_files"), ("disabled", "disabled")):
        cfg = load_config({**base, "persistent_db": {"type": t}}, base_dir=tables)
        assert cfg.persistent_db.type == want


def test_default_values_short_list_is_padded_and_scalar_broadcast(tables):
    cfg = hps_notebook_config()
    cfg["models"][0]["default_value_for_each_table"] = [0.5]
    assert load_config(cfg, base_dir=tables).models[0].default_value_for_each_table == (0.5, 0.0)
    cfg["models"][0]["default_value_for_each_table"] = -2
    assert load_config(cfg, base_dir=tables).models[0].default_value_for_each_table == (-2.0, -2.0)


def test_unknown_model_and_table(tables):
    cfg = load_config(hps_notebook_config(), base_dir=tables)
    with pytest.raises(NotFoundError, match="no model 'nope'"):
        cfg.model("nope")
    with pytest.raises(NotFoundError, match="no table 2"):
        cfg.models[0].max_keys_per_lookup(2)


def _mutate(cfg: dict, path: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    node = cfg
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    last = parts[-1]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return cfg


_DELETE = object()

M0 = r"models\[0\]\."  # the key path prefix of the first model

ERROR_CASES = [
    # (where to change, new value, regex the message must match after "<file>: ")
    ("surprise", 1, r"surprise: unknown key"),
    ("models.0.gpu_cache_per", 0.5, M0 + r"gpu_cache_per: unknown key"),
    ("models.0.Max_batch_size", 5,
     M0 + r"Max_batch_size: unknown key \(did you mean 'max_batch_size'"),
    ("volatile_db.overflow_marign", 5, r"volatile_db\.overflow_marign: unknown key"),
    ("persistent_db.colour", "red", r"persistent_db\.colour: unknown key"),
    ("models.0.max_batch_size", "64", M0 + r"max_batch_size: expected an integer, got str"),
    ("models.0.gpucache", 1, M0 + r"gpucache: expected true/false, got int"),
    ("models.0.gpucacheper", 64.5, M0 + r"gpucacheper: must be in \[0.0, 64.0\]"),
    ("models.0.gpucacheper", -0.5, M0 + r"gpucacheper: must be in \[0.0, 64.0\]"),
    ("supportlonglong", "yes", r"supportlonglong: expected true/false"),
    ("models.0.sparse_files", "tables/t0", M0 + r"sparse_files: expected a list, got str"),
    ("models.0.embedding_vecsize_per_table", [16],
     M0 + r"embedding_vecsize_per_table: has 1 entries but sparse_files names 2 table"),
    ("models.0.maxnum_catfeature_query_per_table_per_sample", [1, 2, 3],
     M0 + r"maxnum_catfeature_query_per_table_per_sample: has 3 entries"),
    ("models.0.embedding_table_names", ["a"], M0 + r"embedding_table_names: has 1 entries"),
    ("models.0.embedding_table_names", ["a", "a"], M0 + r"embedding_table_names: names repeat"),
    ("models.0.default_value_for_each_table", [1, 2, 3],
     M0 + r"default_value_for_each_table: has 3"),
    ("models.0.embedding_vecsize_per_table", [0, 8],
     M0 + r"embedding_vecsize_per_table\[0\]: must be >= 1"),
    ("models.0.sparse_files", ["tables/t0", "s3://bucket/t"],
     M0 + r"sparse_files\[1\]: remote paths are not supported"),
    ("models.0.model", "bad name!", M0 + r"model: must match"),
    ("models.0.model", "name\n", M0 + r"model: must match"),
    ("models.0.model", _DELETE, M0 + r"model: required key is missing"),
    ("models.0.hit_rate_threshold", -1, M0 + r"hit_rate_threshold: must be >= 0.0, got -1.0"),
    ("models.0.sparse_files", _DELETE, M0 + r"sparse_files: required key is missing"),
    ("models.0.embedding_cache_type", "magic",
     M0 + r"embedding_cache_type: unknown cache type 'magic'"),
    ("volatile_db.overflow_policy", "evict_all", r"volatile_db\.overflow_policy: unknown policy"),
    ("volatile_db.type", "memcached", r"volatile_db\.type: unknown type 'memcached'"),
    ("volatile_db.initial_cache_rate", 2, r"volatile_db\.initial_cache_rate: must be in"),
    ("volatile_db.overflow_margin", 0, r"volatile_db\.overflow_margin: must be >= 1"),
    ("persistent_db.type", "leveldb", r"persistent_db\.type: unknown type 'leveldb'"),
    ("update_source.type", "pulsar", r"update_source\.type: unknown type 'pulsar'"),
    ("models", [], r"models: must list at least one model"),
    ("models", [None], r"models\[0\]: expected an object, got NoneType"),
    ("volatile_db", [1], r"volatile_db: expected an object, got list"),
]


@pytest.mark.parametrize(("where", "value", "message"), ERROR_CASES,
                         ids=[f"{c[0]}={'<deleted>' if c[1] is _DELETE else repr(c[1])}"[:60]
                              for c in ERROR_CASES])
def test_each_config_error_names_the_key_and_the_file(tables, where, value, message):
    path = write_config(tables, _mutate(hps_notebook_config(), where, value), "bad.json")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {message}"):
        load_config(path)


# Problems of the table files themselves: the config loads (config.py opens no table file);
# checking its tables (what the parameter server and `keras-hps plan` do) names the key.
TABLE_ERROR_CASES = [
    ("models.0.embedding_vecsize_per_table", [16, 9],
     M0 + r"embedding_vecsize_per_table\[1\]: is 9 but the table .*t1\.h5 has dim 8"),
    ("models.0.embedding_vecsize_per_table", [32, 8],
     M0 + r"embedding_vecsize_per_table\[0\]: is 32 but .*t0/emb_vector holds 2560 bytes"),
    ("models.0.sparse_files", ["tables/t0", "tables/missing"],
     M0 + r"sparse_files\[1\]: table not found: .*tables/missing"),
]


@pytest.mark.parametrize(("where", "value", "message"), TABLE_ERROR_CASES,
                         ids=[f"{c[0]}={c[1]!r}"[:60] for c in TABLE_ERROR_CASES])
def test_each_table_error_names_the_key_and_the_file(tables, where, value, message):
    path = write_config(tables, _mutate(hps_notebook_config(), where, value), "bad.json")
    cfg = load_config(path)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {message}"):
        check_config_tables(cfg)


def test_duplicate_model_names(tables):
    cfg = hps_notebook_config()
    cfg["models"].append(copy.deepcopy(cfg["models"][0]))
    path = write_config(tables, cfg, "dup.json")
    with pytest.raises(ConfigError, match=r"models\[1\]\.model: model name 'demo-model_1' appears"):
        load_config(path)


def test_file_level_errors(tables, tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.json")
    bad = tmp_path / "broken.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match=rf"{bad}: not valid JSON"):
        load_config(bad)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_config(tmp_path / "list.json")
    with pytest.raises(ConfigError, match=r"<dict config>: models: required key is missing"):
        load_config({"supportlonglong": True})


def test_table_file_errors_surface_as_config_errors(tables):
    d = tables / "tables" / "broken"
    d.mkdir(exist_ok=True)
    (d / "key").write_bytes(b"\0" * 12)
    (d / "emb_vector").write_bytes(b"")
    cfg = _mutate(hps_notebook_config(), "models.0.sparse_files", ["tables/t0", "tables/broken"])
    path = write_config(tables, cfg, "broken.json")
    cfg = load_config(path)
    with pytest.raises(ConfigError, match=r"sparse_files\[1\]: .*key: size 12 bytes is not a "
                                          r"multiple of 8"):
        check_config_tables(cfg)
    assert os.path.isdir(d)


BLOCKS = [("", PSConfig), ("models.0", ModelConfig), ("volatile_db", VolatileDBConfig),
          ("persistent_db", PersistentDBConfig), ("update_source", UpdateSourceConfig)]


@pytest.mark.parametrize(("where", "cls"), BLOCKS, ids=[b[1].__name__ for b in BLOCKS])
def test_every_schema_key_is_checked(tables, where, cls):
    """Each key of the schema (the rows the reference doc is made from) is validated: a JSON
    object where it expects anything else is an error naming that key and the file."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(cls) if "key" in f.metadata]
    assert len(names) >= 6
    base = hps_notebook_config()
    for name in names:
        path = write_config(tables, _mutate(base, f"{where}.{name}".lstrip("."), {"x": 1}),
                            "bad.json")
        key_path = re.sub(r"\.(\d+)", r"[\1]", f"{where}.{name}".lstrip("."))
        with pytest.raises(ConfigError, match=rf"^{re.escape(f'{path}: {key_path}')}"):
            load_config(path)


def test_configuration_doc_tables_are_generated_from_the_schema():
    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    text = doc.read_text()
    assert replace_generated(text, reference_tables()) == text, (
        "docs/configuration.md is out of date: run python -m keras_hps.config --write-doc")
    for table in reference_tables().values():
        assert table in text
