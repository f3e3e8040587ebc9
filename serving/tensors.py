"""NumPy arrays <-> `tensorflow.TensorProto`, without building TensorFlow tensors.

Decoding accepts both encodings a client may send (`tensor_content` bytes or the typed
`*_val` fields) and reads them as TensorFlow's `Tensor::FromProto` does; a proto it would
refuse is an INVALID_ARGUMENT "tensor parsing error". Encoding writes typed
fields by default, as TF Serving answers, or `tensor_content` when asked (faster for large
tensors; TF Serving's `--enable_serialization_as_tensor_content`).
"""

from __future__ import annotations

import math

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from .status import ServingError, invalid_argument

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
    try:
        name = types_pb2.DataType.Name(dtype)
    except ValueError:  # a number that names no DataType
        return str(dtype)
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
# TensorFlow's TensorShape takes at most 254 dimensions; NumPy arrays at most 64 (32 before
# NumPy 2). A tensor of more than NumPy takes is refused as TensorFlow refuses one of more
# than 254: a tensor parsing error.
MAX_RANK = 64 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 32
_INT64_MAX = 2**63 - 1
_MAX_ITEMSIZE = 8  # the widest dtype a TensorProto decodes to (int64, float64, objects)
# A tensor given fewer values than its shape holds is filled (TensorFlow's rule, below). The
# fill may make a request of a few bytes cost its whole shape in memory: beyond this many
# bytes, or beyond the bytes of the request's own values if that is more, the tensor is
# refused instead.
MAX_FILL_BYTES = 64 * 1024 * 1024


def _parse_error(name: str, what: str) -> ServingError:
    return invalid_argument(f"tensor parsing error: {name}: {what}")


def _shape_of(tensor_shape: tensor_shape_pb2.TensorShapeProto, name: str) -> tuple[int, ...]:
    """The shape of a TensorProto, checked as TensorFlow's `TensorShape::IsValid` checks it
    (no negative size, an element count that fits int64), plus NumPy's rank limit."""
    key = tensor_shape.SerializeToString()
    shape = _SHAPES.get(key)
    if shape is not None:
        return shape
    if tensor_shape.unknown_rank:
        raise _parse_error(name, "unknown rank")
    shape = tuple([d.size for d in tensor_shape.dim])
    if len(shape) > MAX_RANK:
        raise _parse_error(name, f"{len(shape)} dimensions; at most {MAX_RANK} are supported")
    if shape and min(shape) < 0:
        raise _parse_error(name, f"negative dimension in {list(shape)}")
    # TensorFlow refuses an element count beyond int64; NumPy also a byte count beyond it,
    # counted over the non-zero dimensions even when one dimension is 0
    if math.prod(d for d in shape if d) * _MAX_ITEMSIZE > _INT64_MAX:
        raise _parse_error(name, f"shape {list(shape)} is too large")
    if len(_SHAPES) >= _SHAPES_MAX:
        _SHAPES.clear()
    _SHAPES[key] = shape
    return shape


def from_proto(proto: tensor_pb2.TensorProto, name: str = "") -> np.ndarray:
    """The NumPy array a TensorProto holds, read as TensorFlow's `Tensor::FromProto` reads it;
    INVALID_ARGUMENT ("tensor parsing error") where that fails.

    `tensor_content`, when not empty, must hold exactly the shape's elements. Otherwise the
    dtype's typed field is read: fewer values than the shape holds are completed with the last
    value, no values give zeros (empty strings, False), and values beyond the shape are
    ignored. Fields of other dtypes are ignored, as TensorFlow ignores them."""
    enum = proto.dtype
    dtype = _WIRE_BY_ENUM.get(enum)
    if dtype is None:
        if enum not in _BY_ENUM:
            raise _parse_error(name, f"dtype {dtype_name(enum)} is not supported")
        dtype = _BY_ENUM[enum][0]  # DT_STRING
    shape = _shape_of(proto.tensor_shape, name)
    count = math.prod(shape)
    if count == 0:  # TensorFlow reads no values for an empty tensor
        return np.empty(shape, dtype=dtype.newbyteorder("="))
    content = proto.tensor_content  # read once: each read copies the bytes
    if content:
        if dtype.kind == "O":
            return _decode_string_list(content, count, name).reshape(shape)
        if len(content) != count * dtype.itemsize:
            raise _parse_error(
                name, f"tensor_content holds {len(content)} bytes, shape {list(shape)} of "
                f"{dtype_name(enum)} needs {count * dtype.itemsize}"
            )
        array = np.frombuffer(content, dtype=dtype)
        if dtype.kind == "b" and array.view(np.uint8).max() > 1:  # as TensorFlow refuses it
            raise _parse_error(name, "tensor_content holds bool bytes other than 0 and 1")
        return array.reshape(shape)
    return _from_typed_field(proto, name, dtype.newbyteorder("="), shape, count)


def _from_typed_field(
    proto: tensor_pb2.TensorProto, name: str, dtype: np.dtype, shape: tuple, count: int
) -> np.ndarray:
    """The typed `*_val` field read as TensorFlow's `FromProtoField` reads it
    (tensorflow/core/framework/tensor.cc): with `in_n` values for `n` elements, `n <= in_n`
    copies the first `n`; `0 < in_n < n` copies them and fills the rest with the last one;
    `in_n == 0` fills with `T()` (zero, the empty string, false)."""
    field = _BY_ENUM[proto.dtype][1]
    values = getattr(proto, field)
    n = len(values)
    if n < count:
        given = max(n, 1) * dtype.itemsize
        if count * dtype.itemsize > max(MAX_FILL_BYTES, given):
            raise _parse_error(
                name, f"{n} values fill shape {list(shape)} ({count} elements), more than "
                f"{MAX_FILL_BYTES} bytes once filled"
            )
    if proto.dtype == types_pb2.DT_STRING:
        flat = np.empty(min(n, count), dtype=object)
        flat[:] = list(values[:count]) if n > count else list(values)
    elif proto.dtype == types_pb2.DT_HALF:  # half_val holds the bits in int32s
        flat = np.asarray(values, dtype=np.int32)[:count].astype(np.uint16).view(np.float16)
    else:  # narrower integers wrap as C++'s conversion does (int_val 300 -> uint8 44)
        flat = np.asarray(values, dtype=dtype)[:count]
    if n >= count:
        return flat.reshape(shape)
    out = np.empty(count, dtype=dtype)
    out[:n] = flat
    out[n:] = flat[-1] if n else (b"" if dtype.kind == "O" else 0)
    return out.reshape(shape)


def _decode_string_list(content: bytes, count: int, name: str) -> np.ndarray:
    """`count` strings from `tensor_content` as TensorFlow encodes them
    (`port::DecodeStringList`): `count` varint32 lengths, then the bytes of each string, with
    no byte left over."""
    if count > len(content):  # each length takes at least one byte
        raise _parse_error(name, f"tensor_content of {len(content)} bytes cannot hold "
                           f"{count} strings")
    sizes = np.empty(count, dtype=np.int64)
    pos = 0
    for i in range(count):
        size, shift = 0, 0
        while True:
            if pos >= len(content) or shift > 28:
                raise _parse_error(name, "tensor_content is not a string list")
            byte = content[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        if size >= 2**32:
            raise _parse_error(name, "tensor_content is not a string list")
        sizes[i] = size
    if int(sizes.sum()) != len(content) - pos:
        raise _parse_error(name, "tensor_content is not a string list")
    out = np.empty(count, dtype=object)
    for i, size in enumerate(sizes.tolist()):
        out[i] = content[pos:pos + size]
        pos += size
    return out
