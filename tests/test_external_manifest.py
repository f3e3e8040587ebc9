"""`keras_hps.external`'s manifest checks and the lookups in pieces, against NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from keras_hps.errors import ConfigError, InvalidInputError
from keras_hps.external import Lookup, lookup_in_pieces, parse_manifest, pooled

V2 = {"format": "keras-hps-external", "format_version": 2, "model_name": "m",
      "keys_step": {"signature": "keras_hps_keys"}, "dense": {"signature": "serving_default"},
      "lookups": [{"keys": "hps_keys_0", "feeds": "hps_lookup_0", "model": "m", "table_id": 0,
                   "combiner": None}]}


def test_format_2_and_format_1_parse():
    flow = parse_manifest(V2, "v2.json")
    assert (flow.format_version, flow.keys_signature, flow.dense_signature) == (
        2, "keras_hps_keys", "serving_default")
    assert flow.lookups == (Lookup("hps_keys_0", "hps_lookup_0", "m", 0, None),)
    v1 = {"format": "keras-hps-external", "format_version": 1,
          "lookups": [{"input": "ids", "feeds": "f", "model": "m", "table_id": 1,
                       "dtype": "int32", "shape": [None, 2], "combiner": "sum"}]}
    flow = parse_manifest(v1, "v1.json")
    assert flow.keys_signature is None and flow.lookups[0].keys == "ids"
    assert flow.key_inputs == {"ids": ("int32", [None, 2])}


@pytest.mark.parametrize("change,message", [
    ({"format_version": 3}, r"v\.json: unsupported format_version 3 \(this keras-hps reads 1, 2\)"),
    ({"format": "other"}, "'format' must be 'keras-hps-external'"),
    ({"lookups": []}, "'lookups' must be a non-empty list"),
    ({"keys_step": None}, "format 2 needs 'keys_step' and 'dense'"),
    ({"lookups": [{"feeds": "f", "model": "m", "table_id": 0}]}, r"lookups\[0\] is malformed"),
    ({"lookups": [{**V2["lookups"][0], "combiner": "max"}]}, "combiner 'max' is not one of"),
])
def test_bad_manifests_are_one_line_errors(change, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_manifest({**V2, **change}, "v.json")
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A real parameter server over one HDF5 table; one lookup holds at most 4 x 4 keys."""
    from keras_hps.formats import write_hdf5_table
    from keras_hps.parameter_server import ParameterServer

    rng = np.random.default_rng(7)
    keys = rng.choice(10**6, 50, replace=False).astype(np.int64)
    vectors = rng.standard_normal((50, 3)).astype(np.float32)
    root = tmp_path_factory.mktemp("pieces")
    write_hdf5_table(root / "t.h5", keys, vectors)
    ps = ParameterServer({"supportlonglong": True, "models": [{
        "model": "m", "sparse_files": [str(root / "t.h5")], "embedding_vecsize_per_table": [3],
        "maxnum_catfeature_query_per_table_per_sample": [4],
        "default_value_for_each_table": [-1.0], "max_batch_size": 4, "gpucache": False}]})
    assert ps.table_spec("m", 0).max_keys_per_lookup == 16
    yield ps, keys, vectors
    ps.close()


@pytest.mark.parametrize("combiner", [None, "sum", "mean", "sqrtn"])
def test_lookups_in_pieces_match_numpy(table, combiner):
    """148 keys, 16 per lookup at most: the real parameter server refuses more in one go."""
    ps, keys, vectors = table
    rng = np.random.default_rng(8)
    ids = keys[rng.integers(0, 50, (37, 4))]
    ids[0] = -1  # an empty bag
    ids[1, 2:] = -1
    ids[2, 1] = 999_999_999  # a miss: the default vector
    got = pooled(ps, Lookup("k", "f", "m", 0, combiner), ids)
    row = {int(k): i for i, k in enumerate(keys)}
    per_key = np.array([[vectors[row[int(k)]] if int(k) in row else np.full(3, -1.0)
                         for k in bag] for bag in ids], np.float32)
    if combiner is None:
        np.testing.assert_allclose(got, per_key)
        with pytest.raises(InvalidInputError, match="148 keys in one lookup"):
            ps.lookup("m", 0, ids)
        return
    valid = (ids >= 0)[..., None]
    total = (per_key * valid).sum(axis=1)
    count = valid.sum(axis=1).astype(np.float32)
    scale = {"sum": np.ones_like(count), "mean": count, "sqrtn": np.sqrt(count)}[combiner]
    want = np.divide(total, scale, out=np.zeros_like(total), where=scale > 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert lookup_in_pieces(ps, "m", 0, np.zeros((0, 2), np.int64)).shape == (0, 2, 3)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_bags_of_only_padding_and_no_rows_pool_to_zeros(table, combiner):
    """A request whose bags are all padding looks nothing up and answers zeros; an empty
    batch answers an empty array of the table's dim."""
    ps, _, _ = table
    lookup = Lookup("k", "f", "m", 0, combiner)
    np.testing.assert_array_equal(pooled(ps, lookup, np.full((3, 2, 4), -1)),
                                  np.zeros((3, 2, 3), np.float32))
    assert pooled(ps, lookup, np.zeros((0, 4), np.int64)).shape == (0, 3)
