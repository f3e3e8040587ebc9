"""NumPy arrays <-> `tensorflow.TensorProto`, without building TensorFlow tensors.

Decoding accepts both encodings a client may send (`tensor_content` bytes or the typed
`*_val` fields, with TF's rule that one value fills the whole shape). Encoding writes typed
fields by default, as TF Serving answers, or `tensor_content` when asked (faster for large
tensors; TF Serving's `--enable_serialization_as_tensor_content`).
"""

from __future__ import annotations

import math

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from .status import invalid_argument

# numpy dtype -> (DataType enum, typed field)
_BY_NUMPY: dict[np.dtype, tuple[int, str]] = {
    np.dtype(np.float32): (types_pb2.DT_FLOAT, "float_val"),
    np.dtype(np.float64): (types_pb2.DT_DOUBLE, "double_val"),
    np.dtype(np.float16): (types_pb2.DT_HALF, "half_val"),
    np.dtype(np.int8): (types_pb2.DT_INT8, "int_val"),
    np.dtype(np.int16): (types_pb2.DT_INT16, "int_val"),
    np.dtype(np.int32): (types_pb2.DT_INT32, "int_val"),
    np.dtype(np.int64): (types_pb2.DT_INT64, "int64_val"),
    np.dtype(np.uint8): (types_pb2.DT_UINT8, "int_val"),
    np.dtype(np.uint16): (types_pb2.DT_UINT16, "int_val"),
    np.dtype(np.uint32): (types_pb2.DT_UINT32, "uint32_val"),
    np.dtype(np.uint64): (types_pb2.DT_UINT64, "uint64_val"),
    np.dtype(np.bool_): (types_pb2.DT_BOOL, "bool_val"),
}
_BY_ENUM: dict[int, tuple[np.dtype, str]] = {e: (d, f) for d, (e, f) in _BY_NUMPY.items()}
_BY_ENUM[types_pb2.DT_STRING] = (np.dtype(object), "string_val")
# tensor_content is little-endian; on a big-endian host read it as such
_WIRE_BY_ENUM: dict[int, np.dtype] = {e: d.newbyteorder("<") for d, (e, _) in _BY_NUMPY.items()}


def dtype_name(dtype: np.dtype | int) -> str:
    """TF's name of a dtype, e.g. "int64" (as in TF Serving's error messages)."""
    if not isinstance(dtype, int):
        dtype = numpy_to_enum(dtype)
    name = types_pb2.DataType.Name(dtype)
    return name[3:].lower() if name.startswith("DT_") else name


def numpy_to_enum(dtype: np.dtype) -> int:
    """The `tensorflow.DataType` enum of a NumPy dtype (bytes/str/object -> DT_STRING)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return types_pb2.DT_STRING
    try:
        return _BY_NUMPY[dtype][0]
    except KeyError:
        raise invalid_argument(f"dtype {dtype} is not supported") from None


def enum_to_numpy(dtype: int) -> np.dtype:
    """The NumPy dtype of a `tensorflow.DataType` enum (DT_STRING -> object holding bytes)."""
    try:
        return _BY_ENUM[dtype][0]
    except KeyError:
        raise invalid_argument(f"tensor dtype {dtype_name(dtype)} is not supported") from None


def to_proto(array: np.ndarray, tensor_content: bool = False) -> tensor_pb2.TensorProto:
    """A TensorProto holding `array` (strings as `string_val`, bytes kept as is)."""
    array = np.asarray(array)
    proto = tensor_pb2.TensorProto()
    proto.tensor_shape.CopyFrom(shape_proto(array.shape))
    if array.dtype.kind in "OSU":
        proto.dtype = types_pb2.DT_STRING
        proto.string_val.extend(
            v.encode() if isinstance(v, str) else bytes(v) for v in array.reshape(-1).tolist()
        )
        return proto
    if array.dtype.byteorder == ">":  # TensorProto bytes are little-endian
        array = array.astype(array.dtype.newbyteorder("<"))
    enum, field = _BY_NUMPY.get(array.dtype, (None, None))
    if enum is None:
        raise invalid_argument(f"dtype {array.dtype} is not supported")
    proto.dtype = enum
    if tensor_content:
        proto.tensor_content = np.ascontiguousarray(array).tobytes()
    elif enum == types_pb2.DT_HALF:
        proto.half_val.extend(array.reshape(-1).view(np.uint16).astype(np.int32).tolist())
    else:
        getattr(proto, field).extend(array.reshape(-1).tolist())
    return proto


def shape_proto(shape: tuple) -> tensor_shape_pb2.TensorShapeProto:
    """A TensorShapeProto; None dims become -1 (unknown)."""
    return tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=-1 if d is None else int(d)) for d in shape]
    )


# Serialized TensorShapeProto -> shape. Requests repeat a few shapes, and reading the dims
# field by field costs about three times as much as serialising the small message.
_SHAPES: dict[bytes, tuple[int, ...]] = {}
_SHAPES_MAX = 4096


def _shape_of(tensor_shape: tensor_shape_pb2.TensorShapeProto, name: str) -> tuple[int, ...]:
    key = tensor_shape.SerializeToString()
    shape = _SHAPES.get(key)
    if shape is not None:
        return shape
    if tensor_shape.unknown_rank:
        raise invalid_argument(f"tensor parsing error: {name}: unknown rank")
    shape = tuple([d.size for d in tensor_shape.dim])
    if shape and min(shape) < 0:
        raise invalid_argument(f"tensor parsing error: {name}: negative dimension in {list(shape)}")
    if len(_SHAPES) >= _SHAPES_MAX:
        _SHAPES.clear()
    _SHAPES[key] = shape
    return shape


def from_proto(proto: tensor_pb2.TensorProto, name: str = "") -> np.ndarray:
    """The NumPy array a TensorProto holds; INVALID_ARGUMENT if it is malformed."""
    dtype = _WIRE_BY_ENUM.get(proto.dtype)
    if dtype is None:
        if proto.dtype not in _BY_ENUM:
            raise invalid_argument(f"tensor dtype {dtype_name(proto.dtype)} is not supported")
        dtype = _BY_ENUM[proto.dtype][0]  # DT_STRING
    shape = _shape_of(proto.tensor_shape, name)
    count = math.prod(shape)
    content = proto.tensor_content  # read once: each read copies the bytes
    if content and dtype.kind != "O":
        if len(content) != count * dtype.itemsize:
            raise invalid_argument(
                f"tensor parsing error: {name}: tensor_content holds {len(content)} "
                f"bytes, shape {list(shape)} of {dtype_name(proto.dtype)} needs "
                f"{count * dtype.itemsize}"
            )
        return np.frombuffer(content, dtype=dtype).reshape(shape)
    return _from_typed_field(proto, name, dtype.newbyteorder("="), shape, count)


def _from_typed_field(
    proto: tensor_pb2.TensorProto, name: str, dtype: np.dtype, shape: tuple, count: int
) -> np.ndarray:
    field = _BY_ENUM[proto.dtype][1]
    values = getattr(proto, field)
    n = len(values)
    if proto.dtype == types_pb2.DT_STRING:
        flat = np.empty(n, dtype=object)
        flat[:] = list(values)
    elif proto.dtype == types_pb2.DT_HALF:
        flat = np.asarray(values, dtype=np.int32).astype(np.uint16).view(np.float16)
    else:
        flat = np.asarray(values, dtype=dtype)
    if n == count:
        return flat.reshape(shape)
    if n == 0 and count == 0:
        return np.empty(shape, dtype=dtype)
    if 0 < n < count:  # TF fills the rest with the last value given
        out = np.empty(count, dtype=dtype)
        out[:n] = flat
        out[n:] = flat[-1]
        return out.reshape(shape)
    raise invalid_argument(
        f"tensor parsing error: {name}: {n} values for shape {list(shape)} ({count} elements)"
    )
