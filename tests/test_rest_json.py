"""REST JSON on its own: TF Serving's json_tensor_test.cc cases (predict, classify, regress,
results), bounded-memory parsing (lazy arrays read in chunks give exactly what json.loads
gives, errors included), and hostile documents (deep nesting, many dimensions, surrogates)."""

from __future__ import annotations

import json
import random
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("tensorflow_serving")

from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    regression_pb2,
)

from keras_hps.serving import lazy_json  # noqa: E402
from keras_hps.serving.rest_json import (  # noqa: E402
    classification_json,
    parse_classify_regress_request,
    parse_predict_request,
    regression_json,
)
from keras_hps.serving.status import ServingError  # noqa: E402


def specs(**dtypes):
    out = {name: SimpleNamespace(dtype=np.dtype(d)) for name, d in dtypes.items()}
    return lambda signature: out


def predict(body, **dtypes):
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    return parse_predict_request(body, specs(**dtypes))


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(ServingError) as info:
        fn(*args, **kwargs)
    assert info.value.code == "INVALID_ARGUMENT", info.value
    return info.value.message


# ---------------------------------------------------------------- json_tensor_test.cc: predict
def test_predict_cases_from_tf_serving():
    _, inputs, fmt = predict('{"instances": [[1,2],[3,4],[5,6]]}', default="int32")
    assert fmt == "row" and inputs["default"].dtype == np.int32
    np.testing.assert_array_equal(inputs["default"], [[1, 2], [3, 4], [5, 6]])
    _, inputs, _ = predict('{"instances": [1, 2.0, 3, 4, 5.003, 0.007, 0.0]}', default="float32")
    np.testing.assert_array_equal(inputs["default"],
                                  np.array([1, 2, 3, 4, 5.003, 0.007, 0], np.float32))
    sig, inputs, _ = predict('{"signature_name": "predict_images", "instances": [[1,2]]}',
                             default="int32")
    assert sig == "predict_images" and inputs["default"].shape == (1, 2)
    _, inputs, _ = predict('{"instances": [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}]}',
                           default=object)
    assert inputs["default"].tolist() == [b"hello", b"world"]
    _, inputs, _ = predict('{"instances": [[{"b64": "aGVsbG8="}], [{"b64": "d29ybGQ="}]]}',
                           default=object)
    assert inputs["default"].shape == (2, 1)
    _, inputs, _ = predict(
        '{"instances": [{"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"],'
        ' "float_tensor": [1.0, NaN], "dbl_tensor": [NaN]},'
        ' {"int_tensor": [[7,8],[9,0],[1,2]], "str_tensor": ["baz", "bat"],'
        ' "float_tensor": [2.0, Infinity], "dbl_tensor": [2.0]}]}',
        int_tensor="int32", str_tensor=object, float_tensor="float32", dbl_tensor="float64")
    assert inputs["int_tensor"].shape == (2, 3, 2)
    assert inputs["str_tensor"].tolist() == [[b"foo", b"bar"], [b"baz", b"bat"]]
    np.testing.assert_array_equal(inputs["float_tensor"], [[1, np.nan], [2, np.inf]])
    _, inputs, fmt = predict('{"inputs": [[[1,2],[3,4],[5,6]]]}', int_tensor="int32")
    assert fmt == "columnar" and inputs["int_tensor"].shape == (1, 3, 2)
    _, inputs, _ = predict(
        '{"inputs": {"int_tensor": [[[1,2],[3,4],[5,6]]], "str_tensor": ["foo", "bar"],'
        ' "bin_tensor": {"b64": "aGVsbG8="}}}',
        int_tensor="int32", str_tensor=object, bin_tensor=object)
    assert inputs["bin_tensor"].shape == () and inputs["bin_tensor"].item() == b"hello"


@pytest.mark.parametrize("body, message", [
    ("", "document is empty"),
    ('{"signature_name": 5, "instances": [[1,2],[3,4],[5,6,7]]}', "must be a string value"),
    ('{"instances": [[1,2],[3,4],[5,6,7]], "inputs": [[1,2]]}', "Not formatted correctly"),
    ('{"instances": [[1,2],[3,4],[5,6,7]]}', "Expecting tensor size"),
    ('{"instances": [[1,2],[3,4],[[5,6]]]}', "Expecting shape"),
    ('{"instances": [1, [1]]}', "Expecting shape"),
    ('{"instances": [[1,2],["a", "b"]]}', "not of expected type"),
])
def test_predict_errors_from_tf_serving(body, message):
    assert message in error(predict, body, default="int32")


def test_predict_lossy_and_named_errors_from_tf_serving():
    big = float(np.finfo(np.float64).max)
    assert "loss of precision" in error(predict, f'{{"instances": [{big!r}]}}', default="float32")
    assert "loss of precision" in error(predict, '{"instances": [16777217]}', default="float32")
    assert "loss of precision" in error(predict, '{"instances": [9007199254740993]}',
                                        default="float64")
    two = {"int_tensor": "int32", "str_tensor": object}
    row = {"int_tensor": [[1, 2], [3, 4], [5, 6]], "str_tensor": ["foo", "bar"]}
    assert "Expecting shape" in error(predict, {"instances": [
        row, {"int_tensor": [[[7, 8], [9, 0], [1, 2]]], "str_tensor": ["baz", "bat"]}]}, **two)
    assert "Expecting tensor size" in error(predict, {"instances": [
        {"int_tensor": [[1, 2], [3, 4], [5, 6], [7, 8]], "str_tensor": ["a", "b"]}, row]}, **two)
    assert "Expecting object but got list" in error(predict, {"instances": [row, [1, 20, 30]]},
                                                    **two)
    assert "Expecting value/list but got object" in error(
        predict, {"instances": [["baz", "bar"], {"str_tensor": ["baz", "bat"]}]},
        str_tensor=object)


# ---------------------------------------------------------------- json_tensor_test.cc: classify
@pytest.mark.parametrize("proto", [classification_pb2.ClassificationRequest,
                                   regression_pb2.RegressionRequest])
def test_classify_regress_requests_from_tf_serving(proto):
    from google.protobuf import text_format

    req = proto()
    parse_classify_regress_request(json.dumps({"examples": [
        {"names": ["foo", "bar"], "ratings": [8.0, 9.0], "age": 20},
        {"names": ["baz"], "ratings": 6.0}]}).encode(), req)
    want = proto()
    text_format.Parse("""input { example_list {
      examples { features {
        feature { key: "names" value { bytes_list { value: "foo" value: "bar" } } }
        feature { key: "ratings" value { float_list { value: 8.0 value: 9.0 } } }
        feature { key: "age" value { int64_list { value: 20 } } } } }
      examples { features {
        feature { key: "names" value { bytes_list { value: "baz" } } }
        feature { key: "ratings" value { float_list { value: 6.0 } } } } } } }""", want)
    assert req == want

    req = proto()
    parse_classify_regress_request(b"""{
      "signature_name": "custom_signture",
      "context": {"query": "pizza", "location": ["sfo"]},
      "examples": [
        {"names": ["foo", "bar"], "ratings": [8.0, 9.0, NaN, Infinity], "age": 20},
        {"names": ["baz", {"b64": "aGVsbG8="}], "ratings": 6.0, "intboolmix": [1, true, false]},
        {"names": "bar", "ratings": -Infinity}]}""", req)
    assert req.model_spec.signature_name == "custom_signture"
    lists = req.input.example_list_with_context
    assert list(lists.context.features.feature["query"].bytes_list.value) == [b"pizza"]
    assert list(lists.context.features.feature["location"].bytes_list.value) == [b"sfo"]
    first, second, third = (e.features.feature for e in lists.examples)
    ratings = np.array(first["ratings"].float_list.value)
    assert ratings[:2].tolist() == [8, 9] and np.isnan(ratings[2]) and ratings[3] == np.inf
    assert list(second["names"].bytes_list.value) == [b"baz", b"hello"]
    assert list(second["intboolmix"].int64_list.value) == [1, 1, 0]
    assert list(third["names"].bytes_list.value) == [b"bar"]
    assert list(third["ratings"].float_list.value) == [-np.inf]


@pytest.mark.parametrize("body, message", [
    ('{"signature_name": ["hello"], "examples": [{"names": ["foo", "bar"]}]}',
     "'signature_name' key must be a string"),
    ('{"context": [{"names": ["foo", "bar"]}]}', "Example must be JSON object"),
    ('{"examples": {"names": ["foo", "bar"]}}', "list/array"),
    ('{"examples": [[{"names": ["foo", "bar"]}]]}', "Example must be JSON object"),
    ('{"examples": [{"names": [10, null]}]}', "names has element with unexpected JSON type: Null"),
    ('{"examples": [{"names": [10, 10.0]}]}', "feature: names expecting type: int64"),
    ('{"examples": [{"names": [10, {"test": 10}]}]}',
     "names has element with unexpected JSON type: Object"),
    ('{"examples": [{"names": [[10], 20]}]}', "names has element with unexpected JSON type: Array"),
    ('{"examples": [{"names": [20, 18446744073709551603]}]}', "Only int64 is supported"),
    ('{"examples": [{"names": 1.7976931348623157e308}]}', "loss of precision"),
    ('{"examples": []}', "'examples' value is an empty array"),
    ('{"context": {}}', "key 'examples' is expected and was not found"),
    ('{"examples": [{"names": [{"b64": "!!"}]}]}', "Unable to base64 decode"),
])
def test_classify_regress_errors_from_tf_serving(body, message):
    for proto in (classification_pb2.ClassificationRequest, regression_pb2.RegressionRequest):
        assert message in error(parse_classify_regress_request, body.encode(), proto())


def test_classification_and_regression_results_from_tf_serving():
    from google.protobuf import text_format

    result = text_format.Parse("""
      classifications { classes { label: "car" score: 0.2 } classes { label: "bike" score: 0.7 }
                        classes { label: "bus" score: 0.1 } }
      classifications { classes { label: "car" score: 0.7 } classes { label: "bike" score: 0.1 }
                        classes { label: "bus" score: 0.2 } }""",
                               classification_pb2.ClassificationResult())
    assert json.loads(classification_json(result)) == {"results": [
        [["car", 0.2], ["bike", 0.7], ["bus", 0.1]], [["car", 0.7], ["bike", 0.1], ["bus", 0.2]]]}
    result = text_format.Parse("regressions { value: 0.2 } regressions { value: 0.9 } "
                               "regressions { value: 1.0 }", regression_pb2.RegressionResult())
    assert json.loads(regression_json(result)) == {"results": [0.2, 0.9, 1.0]}
    result = text_format.Parse(
        "regressions { value: 0.2 } regressions { value: inf } regressions { value: 1.0 } "
        "regressions { value: -inf } regressions { value: nan }", regression_pb2.RegressionResult())
    assert regression_json(result) == b'{"results":[0.2,Infinity,1.0,-Infinity,NaN]}'
    assert "empty ClassificationResults" in error(classification_json,
                                                  classification_pb2.ClassificationResult())
    assert "empty RegressionResults" in error(regression_json, regression_pb2.RegressionResult())


# ---------------------------------------------------------------- lazy (chunked) parsing
def random_json(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 4 or r < 0.3:
        return rng.choice([1, -2.5, 1e300, 'a,b]"}{', "x\\", True, None, 0, "", '\\"', 2**70,
                           "é€\U0001f600"])
    if r < 0.65:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 6))]
    return {rng.choice(["k", "a:b", 'q"', "[", "k2"]): random_json(rng, depth + 1)
            for _ in range(rng.randint(0, 4))}


def corrupt(rng: random.Random, text: bytes) -> bytes:
    b = bytearray(text)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(b) + 1)
        op = rng.random()
        if op < 0.4 and i < len(b):
            del b[i]
        else:
            b.insert(i, rng.choice(b'[]{},:"\\x1 '))
    return bytes(b)


def test_lazy_parse_equals_json_loads_on_random_and_corrupted_documents():
    rng = random.Random(7)
    for _ in range(1500):
        text = json.dumps(random_json(rng), indent=rng.choice([None, 1])).encode()
        bad = corrupt(rng, text)
        try:
            want, want_error = json.loads(bad), None
        except ValueError as exc:
            want, want_error = None, exc
        for lazy_above in (2, 8, 40):
            got = lazy_json.materialize(lazy_json.loads(text, lazy_above))
            assert json.dumps(got) == json.dumps(json.loads(text))
            try:
                got = lazy_json.materialize(lazy_json.loads(bad, lazy_above))
            except lazy_json.JSONError as exc:
                assert want_error is not None, (bad, lazy_above, exc)
                assert 0 <= exc.offset <= len(bad)
                continue
            assert want_error is None, (bad, lazy_above, got)
            assert json.dumps(got) == json.dumps(want)


@pytest.mark.parametrize("text", [
    b"[18446744073709551616, -9223372036854775809, 9223372036854775807, 12345678901234567890]",
    b'{"a": [NaN, Infinity, -Infinity, 1e400, -1e400, 1e-400, -0, -0.0, 0.1, 1E5]}',
    b'{"a": 1, "a": 2, "s": "\\u00e9\\ud83d\\ude00", "t": [true, false, null]}',
    b"\xef\xbb\xbf[1, 2]",
    b'["\\ud800", 1.7976931348623157e308, 4.9e-324, 123456789012345678.5]',
])
def test_small_documents_read_as_json_loads_reads_them(text):
    # the fast reader (orjson, when installed) must give json.loads's values and types
    assert repr(lazy_json.loads(text)) == repr(json.loads(text))


def test_lazy_and_eager_predict_agree_on_values_and_on_every_error(monkeypatch):
    rng = np.random.default_rng(3)
    dtypes = {"ids": "int64", "x": "float32", "s": object}
    ids = rng.integers(-5, 50, (40, 2)).tolist()
    x = rng.random((40, 3)).round(3).tolist()
    s = [[f"w{i}", {"b64": "aGk="}] for i in range(40)]
    good = [
        {"inputs": {"ids": ids, "x": x, "s": s}},
        {"instances": [{"ids": i, "x": v, "s": w} for i, v, w in zip(ids, x, s, strict=True)]},
    ]
    bad = []
    for doc in good:
        for mutate in range(60):
            bad_doc = json.loads(json.dumps(doc))
            col = bad_doc.get("inputs") or bad_doc["instances"][mutate % 40]
            key = ["ids", "x", "s"][mutate % 3]
            row = col[key] if "inputs" not in bad_doc else col[key][mutate % 40]
            row[mutate % 2] = [1.5, "a", None, [1], {"b64": "!!"}, 2**64, True, [[]]][mutate % 8]
            bad.append(bad_doc)
    for doc in good + bad:
        body = json.dumps(doc).encode()
        results = []
        for lazy_above in (1 << 30, 64, 9):
            monkeypatch.setattr(lazy_json, "LAZY_ABOVE", lazy_above)
            try:
                _, inputs, fmt = parse_predict_request(body, specs(**dtypes))
                results.append((fmt, {k: (v.dtype, v.shape, v.tolist())
                                      for k, v in inputs.items()}))
            except ServingError as exc:
                results.append((exc.code, exc.message))
        assert results[0] == results[1] == results[2], (doc, results)


def test_parsing_a_large_body_costs_a_small_multiple_of_it():
    rng = np.random.default_rng(0)
    n = 200_000
    body = json.dumps({"inputs": {"ids": rng.integers(0, 9, (n, 2)).tolist(),
                                  "x": rng.integers(0, 9, (n, 3)).tolist()}}).encode()
    tracemalloc.start()
    try:
        _, inputs, _ = parse_predict_request(body, specs(ids="int64", x="float32"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert inputs["ids"].shape == (n, 2) and inputs["x"].shape == (n, 3)
    # json.loads alone takes about 16x for single-digit numbers; chunked parsing: 1 MiB chunks
    assert peak < 3 * len(body) + 40e6, peak / len(body)


# ---------------------------------------------------------------- hostile documents
@pytest.mark.parametrize("lazy_above", [1 << 30, 16])
def test_hostile_documents_are_invalid_argument(monkeypatch, lazy_above):
    monkeypatch.setattr(lazy_json, "LAZY_ABOVE", lazy_above)
    deep = "[" * 100_000 + "]" * 100_000
    assert "JSON Parse error" in error(predict, '{"instances": ' + deep + "}", default="int64")
    assert "JSON Parse error" in error(predict, "[" * 5000, default="int64")
    dims65 = "[" * 65 + "1" + "]" * 65
    assert "dimensions" in error(predict, '{"inputs": ' + dims65 + "}", default="int64")
    dims64 = "[" * 64 + "1" + "]" * 64  # a 64-dimensional instance makes 65 with the batch
    assert "Failed to process element: 0 of 'instances' list" in error(
        predict, '{"instances": [' + dims64 + "]}", default="int64")
    assert "dimensions" in error(predict, '{"instances": [' + dims64 + "]}", default="int64")
    dims40 = "[" * 40 + "1" + "]" * 40
    _, inputs, _ = predict('{"inputs": ' + dims40 + "}", default="int64")
    assert inputs["default"].shape == (1,) * 40
    assert "surrogate" in error(predict, '{"inputs": ["\\ud800"]}', default=object)
    assert "not of expected type: int64" in error(predict, '{"inputs": [1e400]}', default="int64")
    assert "not of expected type: int64" in error(predict, '{"inputs": [' + "9" * 400 + "]}",
                                                  default="int64")
    assert "Unable to base64 decode" in error(predict, '{"inputs": [{"b64": "a"}]}',
                                              default=object)
    assert "Encountered list at unexpected level: 2 expected < 2" in error(
        predict, '{"inputs": [[1, 2], [3, [4, 5]]]}', default="int64")
    assert "Encountered list at unexpected size: 3 at level: 1 expected size: 2" in error(
        predict, '{"inputs": [[1, 2], [3, 4, 5]]}', default="int64")
    assert "Invalid encoding" in error(predict, b'{"inputs": ["\xff"]}', default=object)
    assert "Is not object" in error(predict, "[" * 30 + "]" * 30, default="int64")
