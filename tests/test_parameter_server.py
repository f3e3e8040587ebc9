"""ParameterServer lookups through every tier against a NumPy reference; errors; threads; init."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

import keras_hps
from keras_hps import parameter_server as psm
from keras_hps.errors import ConfigError, InvalidInputError, NotFoundError
from keras_hps.formats import write_hdf5_table, write_hps_table

# model -> list of (file name, dim, default value)
LAYOUT = {"alpha": [("a0", 8, 0.5), ("a1.h5", 4, -1.0)], "beta": [("b0.h5", 16, 0.0)]}


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """Tables on disk and their contents: {(model, table_id): {key: vector}}."""
    d = tmp_path_factory.mktemp("ps")
    rng = np.random.default_rng(20)
    keysets = {
        # wide int64 keys in random order (hash index), with 0 and negatives
        ("alpha", 0): rng.permutation(np.unique(np.concatenate(
            [[0, -1, -(2**40), 2**50], rng.integers(-(2**62), 2**62, 3000)]))),
        ("alpha", 1): np.arange(2000),  # compact keys (dense index)
        ("beta", 0): rng.permutation(np.arange(-500, 500)),
    }
    ref = {}
    for (model, t), keys in keysets.items():
        name, dim, _ = LAYOUT[model][t]
        vecs = rng.standard_normal((len(keys), dim)).astype(np.float32)
        (write_hdf5_table if name.endswith(".h5") else write_hps_table)(d / name, keys, vecs)
        ref[(model, t)] = {int(k): v for k, v in zip(keys, vecs, strict=True)}
    return d, ref


def make_config(**extra) -> dict:
    cfg = {"supportlonglong": True, "models": [
        {"model": m, "sparse_files": [f[0] for f in files],
         "embedding_vecsize_per_table": [f[1] for f in files],
         "default_value_for_each_table": [f[2] for f in files],
         "maxnum_catfeature_query_per_table_per_sample": [30] * len(files),
         "deployed_device_list": [0], "max_batch_size": 100}
        for m, files in LAYOUT.items()]}
    cfg.update(extra)
    return cfg


CONFIGS = {
    "full": {},
    "partial-lfu": {"volatile_db": {"type": "hash_map", "initial_cache_rate": 0.2,
                                    "overflow_margin": 400, "overflow_policy": "evict_least_used",
                                    "overflow_resolution_target": 0.5}},
    "partial-lru": {"volatile_db": {"type": "hash_map", "initial_cache_rate": 0.0,
                                    "overflow_margin": 300, "overflow_policy": "evict_oldest"}},
    "partial-random": {"volatile_db": {"initial_cache_rate": 0.5, "overflow_margin": 250,
                                       "overflow_policy": "evict_random"}},
    "cold-only": {"volatile_db": {"type": "disabled"}, "persistent_db": {"type": "hdf5"}},
}


def expected(ref: dict, keys: np.ndarray, dim: int, default: float) -> np.ndarray:
    flat = [ref.get(int(k), np.full(dim, default, np.float32)) for k in keys.reshape(-1)]
    return np.stack(flat).reshape(*keys.shape, dim) if flat else np.zeros((*keys.shape, dim))


def random_keys(rng, ref: dict, shape) -> np.ndarray:
    """Known keys with many repeats, some unknown keys, key 0 and a negative key."""
    known = np.array(list(ref))
    pool = np.concatenate([rng.choice(known, 60), rng.integers(-(2**62), 2**62, 8), [0, -7]])
    return rng.choice(pool, size=shape)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lookups_match_numpy_reference_through_every_tier(tables, name):
    d, ref = tables
    ps = psm.ParameterServer(keras_hps.load_config(make_config(**CONFIGS[name]), base_dir=d))
    rng = np.random.default_rng(21)
    shapes = [(0,), (0, 5), (1,), (17,), (8, 13), (2, 3, 5), (3000,)]
    try:
        for _round in range(3):
            for (model, t), table_ref in ref.items():
                _, dim, default = LAYOUT[model][t]
                for shape in shapes:
                    keys = random_keys(rng, table_ref, shape)
                    out = ps.lookup(model, t, keys)
                    assert out.dtype == np.float32 and out.shape == (*shape, dim)
                    # TensorFlow adopts 64-byte-aligned NumPy results without a copy
                    assert out.flags.c_contiguous and (out.size == 0 or out.ctypes.data % 64 == 0)
                    np.testing.assert_array_equal(out, expected(table_ref, keys, dim, default))
        for (model, t), table_ref in ref.items():
            s = ps.stats(model, t)
            host_hits = s["host"]["hits"] if s["host"] else 0
            assert host_hits + s["cold"]["hits"] + s["default"]["hits"] == s["unique_keys"]
            assert s["default"]["hits"] > 0
            if name == "full":
                assert s["resident_rows"] == len(table_ref) and s["cold"]["hits"] == 0
            elif name == "cold-only":
                assert s["host"] is None and s["cold"]["hits"] > 0
            else:
                margin = CONFIGS[name]["volatile_db"]["overflow_margin"]
                assert 0 < s["resident_rows"] <= margin
                assert s["evictions"] > 0 and s["cold"]["hits"] > 0 and host_hits > 0
    finally:
        ps.close()


@pytest.fixture(scope="module")
def server(tables):
    d, _ = tables
    ps = psm.ParameterServer(keras_hps.load_config(make_config(**CONFIGS["partial-random"]),
                                                   base_dir=d))
    yield ps
    ps.close()


def test_bad_input_is_an_error(server):
    with pytest.raises(InvalidInputError, match="keys must be integers, got float"):
        server.lookup("alpha", 0, np.array([1.0, 2.0]))
    with pytest.raises(InvalidInputError, match="got bool"):
        server.lookup("alpha", 0, np.array([True]))
    with pytest.raises(InvalidInputError, match="keys must be integers"):
        server.lookup("alpha", 0, ["a", "b"])
    with pytest.raises(InvalidInputError, match=r"key 9223372036854775808 is outside the key "
                                                r"type int64"):
        server.lookup("alpha", 0, np.array([1, 2**63], np.uint64))
    with pytest.raises(InvalidInputError, match=r"3001 keys in one lookup, more than "
                                                r"max_batch_size x .* = 3000"):
        server.lookup("beta", 0, np.zeros(3001, np.int64))
    with pytest.raises(NotFoundError, match="no model 'gamma'"):
        server.lookup("gamma", 0, [1])
    with pytest.raises(NotFoundError, match="no table 1"):
        server.lookup("beta", 1, [1])
    with pytest.raises(NotFoundError):
        server.stats("gamma", 0)
    everything = server.stats()
    assert sorted(everything) == ["alpha", "beta"] and sorted(everything["alpha"]) == [0, 1]
    assert server.stats("beta") == {"beta": {0: server.stats("beta", 0)}}
    spec = server.table_spec("alpha", 1)
    assert (spec.dim, spec.default_value, spec.max_keys_per_lookup, spec.num_rows) == \
        (4, -1.0, 3000, 2000)
    assert spec.key_dtype == np.int64 and spec.name == "sparse_embedding1"


def test_uint32_keys_when_supportlonglong_is_false(tables):
    d, ref = tables
    ps = psm.ParameterServer(keras_hps.load_config(make_config(supportlonglong=False),
                                                   base_dir=d))
    try:
        assert ps.table_spec("beta", 0).key_dtype == np.uint32
        with pytest.raises(InvalidInputError, match=r"key -1 is outside the key type uint32"):
            ps.lookup("beta", 0, np.array([3, -1]))
        with pytest.raises(InvalidInputError, match=r"key 4294967296 is outside"):
            ps.lookup("beta", 0, np.array([2**32]))
        keys = np.array([[0, 499], [2**32 - 1, 7]], np.uint32)
        np.testing.assert_array_equal(ps.lookup("beta", 0, keys),
                                      expected(ref[("beta", 0)], keys, 16, 0.0))
    finally:
        ps.close()
    # int64 tables: only key dtypes wider than int64 are range-checked
    ps = psm.ParameterServer(keras_hps.load_config(make_config(), base_dir=d))
    try:
        with pytest.raises(InvalidInputError, match=r"key 9223372036854775808 is outside"):
            ps.lookup("beta", 0, np.array([3, 2**63], np.uint64))
        keys = np.array([3, 2**62], np.uint64)
        np.testing.assert_array_equal(ps.lookup("beta", 0, keys),
                                      expected(ref[("beta", 0)], keys, 16, 0.0))
    finally:
        ps.close()


def test_torch_tensors_in_and_out(server, tables):
    torch = pytest.importorskip("torch")
    _, ref = tables
    keys = torch.tensor([[5, 0, -3], [5, 999, 10**12]], dtype=torch.int64)
    out = server.lookup("beta", 0, keys)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert tuple(out.shape) == (2, 3, 16)
    np.testing.assert_array_equal(out.numpy(), expected(ref[("beta", 0)], keys.numpy(), 16, 0.0))
    with pytest.raises(InvalidInputError, match="float"):
        server.lookup("beta", 0, torch.tensor([1.5]))


def test_eight_threads_get_exact_results(server, tables):
    _, ref = tables
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            start.wait()
            for i in range(25):
                model, t = list(ref)[(seed + i) % len(ref)]
                _, dim, default = LAYOUT[model][t]
                keys = random_keys(rng, ref[(model, t)], (rng.integers(1, 400),))
                out = server.lookup(model, t, keys)
                np.testing.assert_array_equal(out, expected(ref[(model, t)], keys, dim, default))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(100 + i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    assert server.stats("alpha", 0)["evictions"] > 0


@pytest.fixture
def no_global_server():
    """Each test starts and ends without a process-wide parameter server."""
    psm.close_all()
    yield
    psm.close_all()


def test_init_replaces_and_closes_the_previous_server(tables, tmp_path, no_global_server):
    d, ref = tables
    with pytest.raises(RuntimeError, match="call keras_hps.init"):
        keras_hps.get_parameter_server()
    cfg_path = d / "hps_full.json"
    cfg_path.write_text(json.dumps(make_config()))
    first = keras_hps.init(str(cfg_path))
    assert keras_hps.get_parameter_server() is first
    second = keras_hps.init(keras_hps.load_config(make_config(**CONFIGS["cold-only"]),
                                                  base_dir=d))
    assert keras_hps.get_parameter_server() is second and second is not first
    with pytest.raises(RuntimeError, match="closed"):
        first.lookup("beta", 0, [1])
    np.testing.assert_array_equal(second.lookup("beta", 0, [1]), [ref[("beta", 0)][1]])
    # a config that fails to load leaves the current server in place
    with pytest.raises(ConfigError):
        keras_hps.init({"models": []})
    assert keras_hps.get_parameter_server() is second


def test_hps_init_is_call_once(tables, no_global_server):
    d, _ = tables
    cfg_path = d / "hps_once.json"
    cfg_path.write_text(json.dumps(make_config()))
    with pytest.raises(ConfigError, match=r"max_batch_size: 100 is below global_batch_size=101"):
        keras_hps.Init(global_batch_size=101, ps_config_file=str(cfg_path))
    assert keras_hps.Init(global_batch_size=64, ps_config_file=str(cfg_path)) == "OK"
    ps = keras_hps.get_parameter_server()
    other = d / "hps_other.json"
    other.write_text(json.dumps(make_config(**CONFIGS["cold-only"])))
    with pytest.warns(UserWarning, match="call-once"):
        assert keras_hps.Init(global_batch_size=64, ps_config_file=str(other)) == "OK"
    assert keras_hps.get_parameter_server() is ps


def test_ensure_parameter_server_initialises_once_across_threads(tables, no_global_server):
    d, _ = tables
    with pytest.raises(RuntimeError, match="pass ps_config_file"):
        psm.ensure_parameter_server()
    cfg_path = d / "hps_lazy.json"
    cfg_path.write_text(json.dumps(make_config()))
    got: list[psm.ParameterServer] = []
    threads = [threading.Thread(target=lambda: got.append(
        psm.ensure_parameter_server(str(cfg_path)))) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(got) == 8 and all(p is got[0] for p in got)
    assert keras_hps.get_parameter_server() is got[0]
    assert psm.ensure_parameter_server() is got[0]


def test_registry_gives_each_config_its_own_server(tables, no_global_server):
    """Layers naming a ps_config_file read that config's server (issue 12), created once; the
    default (keras_hps.init) is shared with it when it was loaded from the same file; init
    with another config closes only the old default."""
    d, _ = tables
    a, b, c = (d / f"hps_reg_{n}.json" for n in "abc")
    a.write_text(json.dumps(make_config()))
    b.write_text(json.dumps(make_config(**CONFIGS["cold-only"])))
    c.write_text(json.dumps(make_config(**CONFIGS["partial-lru"])))
    default = keras_hps.init(str(a))
    assert psm.ensure_parameter_server(str(a)) is default  # same config: the same server
    from_b = psm.ensure_parameter_server(str(b))
    assert from_b is not default and from_b.config.source == str(b)
    assert psm.ensure_parameter_server(str(b)) is from_b  # call-once per config
    assert keras_hps.get_parameter_server() is default  # the default stays
    new_default = keras_hps.init(str(c))
    assert default.closed and not from_b.closed and not new_default.closed
    assert psm.ensure_parameter_server(str(b)) is from_b
    again = psm.ensure_parameter_server(str(a))  # the old default closed: built anew
    assert again is not default and not again.closed and again is not new_default
    psm.close_all()
    assert from_b.closed and new_default.closed and again.closed
