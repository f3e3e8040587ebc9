"""Hostile gRPC input against a real server on loopback: TF Serving's status for every
well-formed but malformed request (never INTERNAL), TensorProtos read as TensorFlow reads
them, the receive-size limit, and the server still serving afterwards."""

from __future__ import annotations

import collections
import os
import time

import grpc
import numpy as np
import pytest
import requests
from grpc_fuzz import mutated_call
from serving_models import (
    VOCAB,
    ServeProcess,
    free_port,
    reference,
    save_tf1_half_plus_two,
    save_version,
)

tf = pytest.importorskip("tensorflow")

from tensorflow.core.framework import tensor_pb2, types_pb2  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from keras_hps.serving import tensors  # noqa: E402
from keras_hps.serving.model_config import ModelEntry  # noqa: E402
from keras_hps.serving.server import ModelServer, ServerOptions  # noqa: E402
from keras_hps.serving.status import ServingError  # noqa: E402
from keras_hps.serving.tensors import from_proto, to_proto  # noqa: E402

SEED = 3
FUZZ_REQUESTS = 8000
FUZZ_SECONDS = 60.0  # bound: the fuzz stops here even if fewer requests were sent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    save_version(str(root / "m" / "1"), SEED)
    save_tf1_half_plus_two(str(root / "hp" / "1"))
    entries = [ModelEntry("m", str(root / "m")), ModelEntry("hp", str(root / "hp"))]
    options = ServerOptions(port=0, rest_api_port=free_port(), host="127.0.0.1",
                            file_system_poll_wait_seconds=0)
    srv = ModelServer(entries, options).start()
    yield srv
    srv.stop(grace=5)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        yield ch


def predict_request(ids: np.ndarray, x: np.ndarray, model: str = "m") -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["ids"].CopyFrom(to_proto(ids))
    request.inputs["x"].CopyFrom(to_proto(x))
    return request


def check_serving(channel) -> None:
    """A valid Predict still gets the exact answer."""
    rng = np.random.default_rng()
    ids = rng.integers(0, VOCAB, size=(3, 2), dtype=np.int64)
    x = rng.normal(size=(3, 3)).astype(np.float32)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    response = stub.Predict(predict_request(ids, x), timeout=30)
    np.testing.assert_allclose(from_proto(response.outputs["score"]),
                               reference(SEED, ids, x)["score"], rtol=1e-5)


# ---------------------------------------------------------------- TensorProto decoding
def _parse_tensor(proto: tensor_pb2.TensorProto) -> np.ndarray | None:
    """TensorFlow's own reading of a serialized TensorProto (`ParseTensor` runs
    `Tensor::FromProto`); None where TensorFlow refuses it."""
    try:
        value = tf.raw_ops.ParseTensor(serialized=proto.SerializeToString(),
                                       out_type=tf.dtypes.as_dtype(proto.dtype)).numpy()
    except tf.errors.InvalidArgumentError:
        return None
    return np.array(value, dtype=object) if proto.dtype == types_pb2.DT_STRING else value


FIELDS = {types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val",
          types_pb2.DT_INT32: "int_val", types_pb2.DT_UINT8: "int_val",
          types_pb2.DT_INT8: "int_val", types_pb2.DT_INT16: "int_val",
          types_pb2.DT_UINT16: "int_val", types_pb2.DT_INT64: "int64_val",
          types_pb2.DT_BOOL: "bool_val", types_pb2.DT_STRING: "string_val",
          types_pb2.DT_HALF: "half_val", types_pb2.DT_UINT32: "uint32_val",
          types_pb2.DT_UINT64: "uint64_val"}


def _random_values(rng: np.random.Generator, field: str, n: int) -> list:
    if field == "string_val":
        return [rng.bytes(int(rng.integers(0, 5))) for _ in range(n)]
    if field == "bool_val":
        return rng.integers(0, 2, size=n).astype(bool).tolist()
    if field in ("float_val", "double_val"):
        return rng.normal(size=n).tolist()
    if field == "uint64_val":
        return rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64).tolist()
    if field == "uint32_val":
        return rng.integers(0, 2**32 - 1, size=n).tolist()
    if field == "int64_val":
        return rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64).tolist()
    return rng.integers(-(2**31), 2**31 - 1, size=n).tolist()  # int_val, half_val


def test_tensor_protos_read_as_tensorflow_reads_them():
    """Random protos (fewer, more or no values for the shape, other dtypes' fields, wrong
    tensor_content lengths, string lists in tensor_content) decode to what TensorFlow's
    `Tensor::FromProto` makes of them, and fail where it fails."""
    rng = np.random.default_rng(15)
    outcomes = collections.Counter()
    for _ in range(600):
        enum = int(rng.choice(list(FIELDS)))
        proto = tensor_pb2.TensorProto(dtype=enum)
        for _ in range(int(rng.integers(0, 4))):
            proto.tensor_shape.dim.add(size=int(rng.integers(0, 4)))
        count = int(np.prod([d.size for d in proto.tensor_shape.dim]))
        for field in sorted({FIELDS[enum], str(rng.choice(list(FIELDS.values())))}):
            n = int(rng.integers(0, 2 * count + 2))
            getattr(proto, field).extend(_random_values(rng, field, n))
        if rng.integers(4) == 0:
            if enum == types_pb2.DT_STRING:
                strings = np.empty(count, object)
                strings[:] = _random_values(rng, "string_val", count)
                proto.tensor_content = _string_list(list(strings))
                if rng.integers(2):
                    proto.tensor_content += b"x"
            else:
                itemsize = tensors.enum_to_numpy(enum).itemsize
                n = max(0, count + int(rng.integers(-1, 2)))
                proto.tensor_content = rng.bytes(itemsize * n)
        want = _parse_tensor(proto)
        if want is None:
            with pytest.raises(ServingError) as err:
                from_proto(proto, "t")
            assert err.value.code == "INVALID_ARGUMENT"
            assert err.value.message.startswith("tensor parsing error: t: ")
            outcomes["refused"] += 1
            continue
        got = from_proto(proto, "t")
        assert got.shape == want.shape and got.dtype == want.dtype, proto
        if enum == types_pb2.DT_HALF:
            want, got = want.view(np.uint16), got.view(np.uint16)  # NaN bits compare too
        np.testing.assert_array_equal(got, want)
        outcomes["fewer" if len(getattr(proto, FIELDS[enum])) < count else "read"] += 1
    assert min(outcomes.values()) >= 20, outcomes


def _string_list(strings: list[bytes]) -> bytes:
    """TensorFlow's `EncodeStringList`: the varint lengths, then the bytes."""
    out = bytearray()
    for s in strings:
        size = len(s)
        while size >= 0x80:
            out.append(size & 0x7F | 0x80)
            size >>= 7
        out.append(size)
    return bytes(out) + b"".join(strings)


@pytest.mark.parametrize("mutate, message", [
    (lambda p: setattr(p, "dtype", 999), "dtype 999 is not supported"),
    (lambda p: setattr(p, "dtype", types_pb2.DT_RESOURCE), "dtype resource is not supported"),
    (lambda p: [p.tensor_shape.dim.add(size=1) for _ in range(64)],
     "66 dimensions; at most 64 are supported"),
    (lambda p: [p.tensor_shape.dim.add(size=2**62) for _ in range(2)], "is too large"),
    (lambda p: p.tensor_shape.dim.add(size=-3), r"negative dimension in \[2, 1, -3\]"),
    (lambda p: setattr(p, "tensor_content", b"\0" * 7), "tensor_content holds 7 bytes"),
    (lambda p: p.tensor_shape.dim.add(size=2**40), "more than 67108864 bytes once filled"),
])
def test_each_malformed_tensor_class_is_a_parsing_error(mutate, message):
    proto = to_proto(np.zeros((2, 1), np.float32))
    mutate(proto)
    with pytest.raises(ServingError, match=message) as err:
        from_proto(proto, "x")
    assert err.value.code == "INVALID_ARGUMENT"


def test_fill_rules_and_their_bound():
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    proto.tensor_shape.dim.add(size=4)
    proto.string_val.append(b"1.5")  # another dtype's field: ignored, zeros
    np.testing.assert_array_equal(from_proto(proto), np.zeros(4, np.float32))
    proto.float_val.extend([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # more values: the first four
    np.testing.assert_array_equal(from_proto(proto), [1.0, 2.0, 3.0, 4.0])
    proto.tensor_shape.dim[0].size = 0  # an empty tensor reads no values
    assert from_proto(proto).shape == (0,)
    # one value fills up to MAX_FILL_BYTES; a request that sent that many values is read
    proto.tensor_shape.dim[0].size = tensors.MAX_FILL_BYTES // 4
    assert from_proto(proto).shape == (tensors.MAX_FILL_BYTES // 4,)
    proto.tensor_shape.dim[0].size += 1
    with pytest.raises(ServingError, match="once filled"):
        from_proto(proto)
    proto.ClearField("float_val")
    proto.tensor_content = np.ones(tensors.MAX_FILL_BYTES // 4 + 1, "<f4").tobytes()
    assert from_proto(proto).sum() == tensors.MAX_FILL_BYTES // 4 + 1


# ---------------------------------------------------------------- a real server
def test_grpc_fuzz_gets_no_internal_error(server, channel, capfd):
    """8,000 mutated, well-formed requests (seeded; at least 2,000 within the time bound):
    TF Serving's codes for all, none INTERNAL or UNKNOWN, no traceback on stderr, and the
    server answers exactly after."""
    rng = np.random.default_rng(20240615)
    prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    model = model_service_pb2_grpc.ModelServiceStub(channel)
    codes: collections.Counter = collections.Counter()
    internal = []
    deadline = time.monotonic() + FUZZ_SECONDS
    while sum(codes.values()) < FUZZ_REQUESTS and time.monotonic() < deadline:
        method, request = mutated_call(rng)
        stub = model if method == "GetModelStatus" else prediction
        try:
            getattr(stub, method)(request, timeout=30)
            codes["OK"] += 1
        except grpc.RpcError as exc:
            codes[exc.code().name] += 1
            if exc.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                internal.append((method, exc.details(), request))
    assert sum(codes.values()) >= 2000, codes
    assert not internal, internal[:3]
    assert codes["OK"] >= 100 and codes["INVALID_ARGUMENT"] >= 1000, codes
    check_serving(channel)
    assert "Traceback" not in capfd.readouterr().err


def test_label_on_unknown_model_is_invalid_argument(server, channel):
    """TF Serving's ServerCore::GetModelVersionForLabel: 400 / INVALID_ARGUMENT, as for an
    unknown label of a known model."""
    ids, x = np.zeros((1, 2), np.int64), np.zeros((1, 3), np.float32)
    for model in ("nope", "m"):
        request = predict_request(ids, x, model)
        request.model_spec.version_label = "stable"
        with pytest.raises(grpc.RpcError) as err:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "Unrecognized servable version label: stable"
        status = get_model_status_pb2.GetModelStatusRequest()
        status.model_spec.CopyFrom(request.model_spec)
        with pytest.raises(grpc.RpcError) as err:
            model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        url = f"http://127.0.0.1:{server.rest_port}/v1/models/{model}/labels/stable"
        r = requests.post(url + ":predict", json={"instances": [{"ids": [0, 1], "x": [0, 0, 0]}]})
        assert (r.status_code, r.json()) == (
            400, {"error": "Unrecognized servable version label: stable"})
        r = requests.get(url)
        assert r.status_code == 400, r.text


def test_larger_messages_than_the_limit_are_resource_exhausted(tmp_path):
    """The receive limit is TF Serving's INT32_MAX unless --grpc_channel_arguments sets
    grpc.max_receive_message_length: then a larger request is RESOURCE_EXHAUSTED, a smaller
    one served, and the server keeps serving."""
    save_version(str(tmp_path / "m" / "1"), SEED)
    limit = 1 << 20
    options = ServerOptions(port=0, host="127.0.0.1", file_system_poll_wait_seconds=0,
                            grpc_channel_arguments=f"grpc.max_receive_message_length={limit}")
    srv = ModelServer([ModelEntry("m", str(tmp_path / "m"))], options).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            rng = np.random.default_rng(1)
            for rows, served in ((limit // 28 - 500, True), (limit // 28 + 500, False)):
                ids = rng.integers(0, VOCAB, size=(rows, 2), dtype=np.int64)  # 28 bytes a row
                x = rng.normal(size=(rows, 3)).astype(np.float32)
                request = predict_request(ids, x)
                request.inputs["ids"].CopyFrom(to_proto(ids, tensor_content=True))
                request.inputs["x"].CopyFrom(to_proto(x, tensor_content=True))
                assert (request.ByteSize() <= limit) == served
                if served:
                    response = stub.Predict(request, timeout=60)
                    np.testing.assert_allclose(from_proto(response.outputs["score"]),
                                               reference(SEED, ids, x)["score"], atol=1e-5)
                    continue
                with pytest.raises(grpc.RpcError) as err:
                    stub.Predict(request, timeout=60)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            check_serving(ch)
    finally:
        srv.stop(grace=5)


def _memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak since the last reset) of a process, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return {key: int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux /proc only")
def test_large_grpc_requests_cost_a_small_constant_times_their_size(tmp_path):
    """A `keras-hps serve` process's peak RSS while it reads a 48 MiB request (refused after
    parsing: float64 for a float32 input) grows by less than 5x the message; a request over
    --grpc_channel_arguments' receive limit is refused before it is read (< 0.25x)."""
    save_version(str(tmp_path / "m" / "1"), SEED)
    port = free_port()
    limit = 64 << 20
    flags = [f"--port={port}", "--host=127.0.0.1", "--model_name=m",
             f"--model_base_path={tmp_path / 'm'}", "--file_system_poll_wait_seconds=0",
             f"--grpc_channel_arguments=grpc.max_receive_message_length={limit}"]
    with ServeProcess(*flags) as serve, grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        check_serving(ch)
        for mib, code, bound in ((48, grpc.StatusCode.INVALID_ARGUMENT, 5.0),
                                 (160, grpc.StatusCode.RESOURCE_EXHAUSTED, 0.25)):
            rows = (mib << 20) // 40  # ids int64 [rows, 2] + x float64 [rows, 3]
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "m"
            request.inputs["ids"].CopyFrom(to_proto(np.zeros((rows, 2), np.int64), True))
            request.inputs["x"].CopyFrom(to_proto(np.zeros((rows, 3), np.float64), True))
            size_mib = request.ByteSize() / 2**20
            with open(f"/proc/{serve.proc.pid}/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            before = _memory_mib(serve.proc.pid)["VmRSS"]
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(request, timeout=120)
            assert err.value.code() == code, err.value.details()
            growth = _memory_mib(serve.proc.pid)["VmHWM"] - before
            assert growth < bound * size_mib, (mib, growth)
        check_serving(ch)


def test_missing_model_spec_and_checks_in_tf_servings_order(channel):
    """predict_impl / get_model_metadata_impl: no ModelSpec is "Missing ModelSpec"; metadata
    fields are checked before the model is looked up."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    metadata = get_model_metadata_pb2.GetModelMetadataRequest
    for call, request, message in [
        (stub.Predict, predict_pb2.PredictRequest(), "Missing ModelSpec"),
        (stub.GetModelMetadata, metadata(metadata_field=["signature_def"]),
         "Missing ModelSpec"),
        (stub.GetModelMetadata, metadata(model_spec={"name": ""}),
         "GetModelMetadataRequest must specify at least one metadata_field"),
        (stub.GetModelMetadata, metadata(model_spec={"name": "nope"}, metadata_field=["x"]),
         "Metadata field x is not supported"),
        (stub.GetModelMetadata, metadata(model_spec={"name": ""},
                                         metadata_field=["signature_def"]),
         "ModelSpec has no name specified."),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=30)
        assert (err.value.code(), err.value.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT, message)
