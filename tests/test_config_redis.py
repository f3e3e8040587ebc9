"""hps.json for a Redis Cluster tier and online updates: HPS's own `redis_cluster` example
loads unchanged, every key means what it meant in HPS, and what keras-hps does not implement
is one error naming the key."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from keras_hps.config import load_config
from keras_hps.errors import ConfigError
from keras_hps.formats import write_hdf5_table
from keras_hps.redis_tier import redis_cluster_settings

# HPS's sample `volatile_db` for a Redis Cluster (HugeCTR docs, "Parameter Server
# Configuration: Volatile Database"), verbatim but for its `// 256 MiB` comments, which JSON
# does not allow.
HPS_REDIS_EXAMPLE = """{
  "type": "redis_cluster",
  "address": "127.0.0.1:7003,127.0.0.1:7004,127.0.0.1:7005",
  "user_name":  "default",
  "password": "",
  "num_partitions": 8,
  "allocation_rate": 268435456,
  "shared_memory_size": 17179869184,
  "shared_memory_name": "hctr_mp_hash_map_database",
  "shared_memory_auto_remove": true,
  "max_batch_size": 65536,
  "enable_tls": false,
  "tls_ca_certificate": "cacertbundle.crt",
  "tls_client_certificate": "client_cert.pem",
  "tls_client_key": "client_key.pem",
  "tls_server_name_identification": "redis.localhost",
  "overflow_margin": 10000000,
  "overflow_policy": "evict_random",
  "overflow_resolution_target": 0.8,
  "initialize_after_startup": true,
  "initial_cache_rate": 1.0,
  "cache_missed_embeddings": false,
  "update_filters": [".+"]
}"""


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("redis_cfg")
    rng = np.random.default_rng(0)
    write_hdf5_table(d / "t0.h5", np.arange(40, dtype=np.int64),
                     rng.standard_normal((40, 8)).astype(np.float32))
    return d


def _config(volatile_db, **extra):
    return {"supportlonglong": True,
            "models": [{"model": "m", "sparse_files": ["t0.h5"],
                        "embedding_vecsize_per_table": [8],
                        "maxnum_catfeature_query_per_table_per_sample": [2],
                        **extra.pop("model", {})}],
            "volatile_db": volatile_db, **extra}


def test_hps_redis_example_loads_unchanged(config_dir):
    path = config_dir / "hps.json"
    path.write_text(json.dumps(_config(json.loads(HPS_REDIS_EXAMPLE))))
    v = load_config(path).volatile_db
    assert v.redis and v.enabled
    assert v.address == ("127.0.0.1:7003", "127.0.0.1:7004", "127.0.0.1:7005")
    assert (v.num_partitions, v.get_batch_size, v.set_batch_size) == (8, 65536, 65536)
    assert v.host_rows(40) == 0  # no host tier in front of Redis unless asked (as HPS)
    s = redis_cluster_settings(v)
    assert s.nodes == [("127.0.0.1", 7003), ("127.0.0.1", 7004), ("127.0.0.1", 7005)]
    assert s.overflow_margin == 10000000 and s.resolution_margin == 8000000
    assert s.overflow_policy == "evict_random" and not s.cache_missed_embeddings


def test_redis_settings_take_the_config_values(config_dir):
    raw = {"type": "redis", "address": ["h1:1", "h2:2"], "max_batch_size": 1000,
           "max_get_batch_size": 7, "socket_timeout": 0.5, "host_cache_rate": 0.25,
           "cache_missed_embeddings": True, "overflow_policy": "evict_oldest",
           "refresh_time_after_fetch": True, "num_node_connections": 3, "password": "pw",
           "user_name": "alice"}
    v = load_config(_config(raw), base_dir=config_dir).volatile_db
    s = redis_cluster_settings(v)
    assert (s.max_get_batch_size, s.max_set_batch_size) == (7, 1000)
    assert (s.socket_timeout, s.num_node_connections) == (0.5, 3)
    assert (s.user_name, s.password) == ("alice", "pw")
    assert s.cache_missed_embeddings and s.refresh_time_after_fetch
    assert v.host_rows(40) == 10 and v.host_rows(41) == math.ceil(0.25 * 41)
    # the hash_map host tier is sized by overflow_margin, host_cache_rate means nothing there
    h = load_config(_config({"overflow_margin": 30, "host_cache_rate": 0.5}),
                    base_dir=config_dir).volatile_db
    assert h.host_rows(40) == 30 and h.host_rows(20) == 20
    assert load_config(_config({"type": "disabled"}), base_dir=config_dir
                       ).volatile_db.host_rows(40) == 0


@pytest.mark.parametrize(("raw", "key", "message"), [
    ({"type": "redis_cluster", "enable_tls": True}, "volatile_db.enable_tls", "not supported"),
    ({"type": "redis_cluster", "update_filters": ["^hps_et\\.other\\."]},
     "volatile_db.update_filters", "hps_et.m.sparse_embedding0"),
    ({"type": "hash_map", "update_filters": ["^nothing$"]}, "volatile_db.update_filters",
     "matches no filter"),
    ({"type": "redis_cluster", "address": "localhost"}, "volatile_db.address", "host:port"),
    ({"type": "redis_cluster", "address": []}, "volatile_db.address", "host:port"),
    ({"type": "redis_cluster", "num_partitions": 0}, "volatile_db.num_partitions", ">= 1"),
    ({"type": "redis_cluster", "socket_timeout": 0}, "volatile_db.socket_timeout", "in"),
    ({"type": "redis_cluster", "host_cache_rate": 2}, "volatile_db.host_cache_rate", "in"),
    ({"type": "redis_cluster", "max_get_batch_size": 0}, "volatile_db.max_get_batch_size",
     ">= 1"),
    ({"type": "redis_cluster", "algorithm": "phm"}, "volatile_db.algorithm", "unknown key"),
])
def test_volatile_db_errors_name_the_key(config_dir, raw, key, message):
    path = config_dir / "bad.json"
    path.write_text(json.dumps(_config(raw)))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = str(e.value)
    assert text.startswith(f"{path}: {key}: ") and message in text and "\n" not in text


def test_kafka_update_source_is_one_line_naming_the_sources(config_dir):
    cfg = _config({}, update_source={"type": "kafka_message_queue", "brokers": "k:9092"})
    with pytest.raises(ConfigError) as e:
        load_config(cfg, base_dir=config_dir)
    text = str(e.value)
    assert "update_source.type: 'kafka_message_queue' is not supported" in text
    assert "keras-hps update" in text and "Redis Stream" in text and "update log" in text
    assert "\n" not in text
    # HPS files carry the block with type null: it loads
    load_config(_config({}, update_source={"type": None, "brokers": "k:9092"}),
                base_dir=config_dir)


@pytest.mark.parametrize("model", [{"embedding_cache_type": "static"},
                                   {"embedding_cache_type": "uvm"},
                                   {"use_static_table": True}])
def test_whole_table_gpu_modes_refuse_a_shared_redis_tier(config_dir, model):
    with pytest.raises(ConfigError, match=r"models\[0\]\.(embedding_cache_type|use_static_"
                                          r"table).*use dynamic"):
        load_config(_config({"type": "redis_cluster"}, model=model), base_dir=config_dir)
    # without Redis, or without a GPU tier, they load
    load_config(_config({}, model=model), base_dir=config_dir)
    load_config(_config({"type": "redis_cluster"}, model={**model, "gpucache": False}),
                base_dir=config_dir)
