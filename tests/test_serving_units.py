"""The serving building blocks on their own: models.config, version policies, batching
parameters and the batcher, REST JSON conversion, TensorProto conversion."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("tensorflow_serving")

from keras_hps.errors import ConfigError  # noqa: E402
from keras_hps.serving.batching import (  # noqa: E402
    Batcher,
    BatchingOptions,
    parse_batching_parameters,
)
from keras_hps.serving.model_config import (  # noqa: E402
    VersionPolicy,
    parse_model_config_text,
    to_text,
    versions_on_disk,
)
from keras_hps.serving.rest_json import array_to_json, json_to_array  # noqa: E402
from keras_hps.serving.status import ServingError  # noqa: E402
from keras_hps.serving.tensors import from_proto, to_proto  # noqa: E402


def test_models_config_policies_labels_and_round_trip(tmp_path):
    text = """
    model_config_list {
      config { name: 'a' base_path: 'rel/a' model_platform: 'tensorflow'
               model_version_policy { specific { versions: 42 versions: 43 } }
               version_labels { key: 'stable' value: 42 }
               version_labels { key: 'canary' value: 43 } }
      config { name: 'b' base_path: '/abs/b' model_version_policy { latest { num_versions: 2 } } }
      config { name: 'c' base_path: '/abs/c' model_version_policy { all {} } }
      config { name: 'd' base_path: '/abs/d' }
    }"""
    a, b, c, d = parse_model_config_text(text, "models.config", root=str(tmp_path))
    assert a.base_path == str(tmp_path / "rel" / "a")
    assert a.policy == VersionPolicy("specific", versions=(42, 43))
    assert a.labels == {"stable": 42, "canary": 43}
    on_disk = {1, 5, 42, 7}
    assert a.policy.select(on_disk) == {42}
    assert b.policy.select(on_disk) == {7, 42}
    assert c.policy.select(on_disk) == on_disk
    assert d.policy.select(on_disk) == {42} and d.policy.select(set()) == set()
    again = parse_model_config_text(to_text([a, b, c, d]))
    assert again == [a, b, c, d]


@pytest.mark.parametrize(
    "text, message",
    [
        ("model_config_list { config { base_path: '/x' } }", "has no name"),
        ("model_config_list { config { name: 'a' } }", "has no base_path"),
        ("model_config_list { config { name: 'a/b' base_path: '/x' } }", "cannot contain"),
        ("model_config_list { config { name: 'a' base_path: '/x' } "
         "config { name: 'a' base_path: '/y' } }", "used twice"),
        ("model_config_list { config { name: 'a' base_path: '/x' "
         "model_platform: 'onnx' } }", "not supported"),
        ("model_config_list { config { name: 'a' base_path: '/x' "
         "version_labels { key: 'bad-label' value: 1 } } }", "[a-zA-Z0-9_]+"),
        ("model_config_list { config { name: 'a' bogus: 1 } }", "not a valid ModelServerConfig"),
    ],
)
def test_models_config_errors(text, message):
    with pytest.raises(ConfigError) as info:
        parse_model_config_text(text, "models.config")
    assert message in str(info.value) and "models.config" in str(info.value)


def test_versions_on_disk_ignores_non_numeric_and_files(tmp_path):
    for name in ["1", "007", "12", "tmp-3", "4.tmp-writing"]:
        (tmp_path / name).mkdir()
    (tmp_path / "9").write_text("a file, not a version")
    found = versions_on_disk(str(tmp_path))
    assert set(found) == {1, 7, 12}
    assert found[7].endswith("007")
    assert versions_on_disk(str(tmp_path / "missing")) == {}


def test_batching_parameters_file_format():
    opts = parse_batching_parameters(
        "max_batch_size { value: 128 }\nbatch_timeout_micros { value: 250 }\n"
        "max_enqueued_batches { value: 7 }\nnum_batch_threads { value: 3 }\n"
        "allowed_batch_sizes: 32\nallowed_batch_sizes: 128\n"
    )
    assert opts == BatchingOptions(128, 250, 7, 3, (32, 128))
    for bad, message in [
        ("max_batch_size: 12", "not a valid BatchingParameters"),
        ("max_batch_size { value: 0 }", "max_batch_size must be >= 1"),
        ("max_batch_size { value: 64 } allowed_batch_sizes: 32", "must equal max_batch_size"),
        ("max_batch_size { value: 64 } allowed_batch_sizes: 64 allowed_batch_sizes: 32",
         "must increase"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            parse_batching_parameters(bad, "batching.config")


def test_batcher_merges_pads_and_splits():
    calls = []

    def runner(inputs):
        calls.append(inputs["k"].shape[0])
        return {"twice": inputs["k"] * 2, "sum": inputs["k"].sum(axis=1)}

    batcher = Batcher(BatchingOptions(max_batch_size=16, batch_timeout_micros=200_000,
                                      num_batch_threads=1, allowed_batch_sizes=(8, 16)))
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 100, size=(n, 3)) for n in (1, 2, 3)]
    results = {}

    def submit(i):
        results[i] = batcher.run("key", runner, {"k": parts[i]})

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [8]  # 6 rows merged into one call, padded to the allowed size 8
    for i, part in enumerate(parts):
        np.testing.assert_array_equal(results[i]["twice"], part * 2)
        np.testing.assert_array_equal(results[i]["sum"], part.sum(axis=1))
    with pytest.raises(ServingError, match="Task size 17 is larger than maximum input batch"):
        batcher.run("key", runner, {"k": np.zeros((17, 3))})
    batcher.close()


def test_batcher_failure_reaches_every_request():
    def runner(inputs):
        raise ValueError("boom")

    batcher = Batcher(BatchingOptions(max_batch_size=8, batch_timeout_micros=0,
                                      num_batch_threads=1))
    with pytest.raises(ValueError, match="boom"):
        batcher.run("k", runner, {"x": np.zeros((2, 1))})
    batcher.close()


def test_json_to_array_rules():
    np.testing.assert_array_equal(json_to_array([[1, 2], [3, 4]], np.int64), [[1, 2], [3, 4]])
    assert json_to_array([], np.int64).shape == (0,)
    assert json_to_array(5, np.float32).shape == ()
    assert json_to_array([1, 2.5], np.float32).dtype == np.float32
    for value, dtype, message in [
        ([1, 2.0], np.int64, "JSON Value: 2.0 Type: Number is not of expected type: int64"),
        ([True], np.int32, "JSON Value: true Type: True is not of expected type: int32"),
        ([[1], 2], np.int64, "found at incorrect level"),
        ([1, [2]], np.int64, "Encountered list at unexpected level"),
        ([2**63], np.int64, "is not of expected type: int64"),
        ([16777217], np.float32, "to float without loss of precision"),
        ([1e300], np.float32, "without loss of precision"),
        ([None], np.float32, "Type: Null is not of expected type: float"),
        ([{"b64": 3}], object, "not formatted correctly for base64 data"),
    ]:
        with pytest.raises(ServingError) as info:
            json_to_array(value, dtype)
        assert info.value.code == "INVALID_ARGUMENT"
        assert message in info.value.message, info.value.message


def test_array_to_json_floats_and_specials():
    arr = np.array([0.1, 1.0, np.nan, np.inf, -np.inf, 1e-7], np.float32)
    assert array_to_json(arr) == "[0.1,1.0,NaN,Infinity,-Infinity,1e-07]"
    assert array_to_json(np.array([[1, 2]], np.int64)) == "[[1,2]]"
    assert array_to_json(np.array([b"\xff"], object), binary=True) == '[{"b64":"/w=="}]'


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array([-(2**62), 2**62], np.int64),
        np.array([[True, False]]),
        np.array([1.5, -2.25], np.float16),
        np.zeros((0, 3), np.int32),
        np.array([b"a", b"\x00b"], object),
        np.arange(4, dtype=">i8"),  # big-endian input: little-endian on the wire
    ],
)
def test_tensor_proto_round_trip_both_encodings(array):
    import tensorflow as tf

    for content in (False, True):
        proto = to_proto(array, tensor_content=content)
        back = from_proto(proto)
        assert back.shape == array.shape
        np.testing.assert_array_equal(back, array)
        np.testing.assert_array_equal(tf.make_ndarray(proto), array)
    if array.dtype.byteorder != ">":  # tf.make_tensor_proto copies big-endian bytes as is
        np.testing.assert_array_equal(from_proto(tf.make_tensor_proto(array)), array)


def test_tensor_proto_fill_and_bad_content():
    import tensorflow as tf

    proto = tf.make_tensor_proto(np.float32(2.0), shape=[2, 2])  # one value fills the shape
    np.testing.assert_array_equal(from_proto(proto), np.full((2, 2), 2.0, np.float32))
    proto = to_proto(np.zeros(4, np.float32), tensor_content=True)
    proto.tensor_content = proto.tensor_content[:-2]
    with pytest.raises(ServingError, match="tensor_content holds 14 bytes"):
        from_proto(proto, "x")


def test_tensor_proto_shapes_repeat_and_bad_shapes_stay_errors():
    from keras_hps.serving import tensors

    rng = np.random.default_rng(7)
    for _ in range(3):  # the second and third pass read shapes the first one remembered
        for shape in [(5,), (5, 1), (1, 5), (2, 3, 4), (0, 2), ()]:
            array = rng.normal(size=shape).astype(np.float32)
            for content in (False, True):
                back = from_proto(to_proto(array, tensor_content=content))
                assert back.shape == array.shape
                np.testing.assert_array_equal(back, array)
    for _ in range(2):  # a rejected shape is rejected every time
        proto = to_proto(np.zeros((2, 2), np.float32))
        proto.tensor_shape.dim[1].size = -1
        with pytest.raises(ServingError, match=r"x: negative dimension in \[2, -1\]"):
            from_proto(proto, "x")
        proto = to_proto(np.zeros(2, np.float32))
        proto.tensor_shape.unknown_rank = True
        with pytest.raises(ServingError, match="y: unknown rank"):
            from_proto(proto, "y")
    tensors._SHAPES.clear()
    for n in range(tensors._SHAPES_MAX + 10):  # the memo stays bounded
        assert from_proto(to_proto(np.zeros((n, 1), np.int64), tensor_content=True)).shape == (n, 1)
    assert len(tensors._SHAPES) <= tensors._SHAPES_MAX
