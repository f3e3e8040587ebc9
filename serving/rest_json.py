"""TF Serving's REST JSON: predict (row and columnar), classify and regress requests and
their responses.

Follows tensorflow_serving/util/json_tensor.cc: the same keys, the same shape rules, `b64`
objects for binary strings, `_bytes` outputs written as `{"b64": ...}`, tf.Example features for
classify and regress, and the same error messages (INVALID_ARGUMENT). Documents are parsed with
`serving.lazy_json`, so a large array is converted to NumPy a chunk at a time and parsing
costs a small multiple of the body; arrays convert through NumPy, and the element-by-element
walk that names the offending value runs only when the fast conversion fails.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from .lazy_json import JSONError, LazyArray
from .lazy_json import loads as lazy_loads
from .status import ServingError, invalid_argument

ROW, COLUMNAR = "row", "columnar"
_MAX_ECHO = 1000  # longest JSON value echoed back in an error message
_FLUSH = 1 << 16  # checked values gathered before they become a NumPy block
_INT64_MAX, _UINT64_MAX = 2**63 - 1, 2**64 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _max_rank() -> int:
    """The most dimensions a NumPy array may have (32 before NumPy 2, 64 since)."""
    try:
        np.empty((1,) * 64)
        return 64
    except ValueError:
        return 32


MAX_RANK = _max_rank()


def _json_type(value: Any) -> str:
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, (list, LazyArray)):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


def _float_text(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def _echo(value: Any) -> str:
    """Compact JSON of `value` for an error message, cut after _MAX_ECHO characters (the
    value is never serialized whole: it may be a large or deeply nested request)."""
    parts: list[str] = []
    _echo_into(value, parts, [_MAX_ECHO + 1], 0)
    text = "".join(parts)
    return text if len(text) <= _MAX_ECHO else text[:_MAX_ECHO] + "..."


def _echo_into(value: Any, parts: list[str], budget: list[int], depth: int) -> None:
    if budget[0] <= 0:
        return
    if isinstance(value, LazyArray):
        text = value.text(budget[0])
    elif isinstance(value, (list, dict)):
        if depth > MAX_RANK:
            text = "..."
        else:
            items = value.items() if isinstance(value, dict) else enumerate(value)
            parts.append("{" if isinstance(value, dict) else "[")
            budget[0] -= 1
            for i, (key, item) in enumerate(items):
                if budget[0] <= 0:
                    return
                prefix = "," if i else ""
                if isinstance(value, dict):
                    prefix += json.dumps(key) + ":"
                parts.append(prefix)
                budget[0] -= len(prefix)
                _echo_into(item, parts, budget, depth + 1)
            text = "}" if isinstance(value, dict) else "]"
    elif isinstance(value, float):
        text = _float_text(value)
    elif isinstance(value, str):
        text = json.dumps(value[: budget[0]])
    else:
        text = json.dumps(value)
    parts.append(text)
    budget[0] -= len(text)


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _b64decode(value: dict) -> bytes:
    try:
        return base64.b64decode(value["b64"].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise invalid_argument("Unable to base64 decode") from None


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate written as \\udXXX
        raise invalid_argument(
            "JSON Parse error: The surrogate pair in string is invalid."
        ) from None


def _chunks(value: list | LazyArray) -> Iterable[list]:
    """A JSON array's children in lists (one list for a small array)."""
    return value.chunks() if isinstance(value, LazyArray) else (value,)


def _first(value: list | LazyArray) -> Any:
    return value.first() if isinstance(value, LazyArray) else value[0]


def _parse_error(exc: JSONError) -> ServingError:
    return invalid_argument(f"JSON Parse error: {exc.message} at offset: {exc.offset}")


def _reading_lazily(fn: Callable) -> Callable:
    """`fn` with the parse errors of lazily read arrays (found as they are read, so in a
    large body after errors that come earlier in it) turned into INVALID_ARGUMENT."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except JSONError as exc:
            raise _parse_error(exc) from None

    return wrapper


# ---------------------------------------------------------------- JSON value -> array
def _dense_shape(value: Any) -> list[int]:
    shape = []
    while isinstance(value, (list, LazyArray)):
        shape.append(len(value))
        if not len(value) or len(shape) > MAX_RANK:
            break
        value = _first(value)
    return shape


def _check_rank(shape: list[int], value: Any) -> None:
    if len(shape) > MAX_RANK:
        raise invalid_argument(
            f"JSON Value: {_echo(value)} has more than {MAX_RANK} dimensions, the most a "
            "tensor may have here"
        )


def _type_error(value: Any, dtype: np.dtype) -> ServingError:
    from .tensors import dtype_name

    return invalid_argument(
        f"JSON Value: {_echo(value)} Type: {_json_type(value)} is not of expected type: "
        f"{dtype_name(dtype)}"
    )


def _lossy_error(value: Any, target: str) -> ServingError:
    return invalid_argument(
        f"Cannot convert JSON value: {_echo(value)} to {target} without loss of precision."
    )


def _check_scalar(value: Any, dtype: np.dtype) -> Any:
    kind = dtype.kind
    if kind == "O":
        if isinstance(value, str):
            return _utf8(value)
        if isinstance(value, dict):
            if not _is_b64(value):
                raise invalid_argument(
                    f"JSON Value: {_echo(value)} not formatted correctly for base64 data"
                )
            return _b64decode(value)
        raise _type_error(value, dtype)
    if isinstance(value, bool):
        if kind == "b":
            return value
        raise _type_error(value, dtype)
    if kind == "b" or not isinstance(value, (int, float)):
        raise _type_error(value, dtype)
    if kind in "iu":
        if not isinstance(value, int):
            raise _type_error(value, dtype)
        info = np.iinfo(dtype if dtype.itemsize >= 4 else np.int32)
        if not info.min <= value <= info.max:
            raise _type_error(value, dtype)
        return value
    # float target: integers must convert without loss, doubles must fit the type
    target = "double" if dtype == np.float64 else "float"
    if isinstance(value, int):
        digits = 53 if dtype == np.float64 else 24
        if abs(value) > (1 << digits) - 1:
            raise _lossy_error(value, target)
    elif value == value and abs(value) != float("inf") and abs(value) > float(np.finfo(dtype).max):
        raise _lossy_error(value, target)
    return value


class _Sink:
    """Checked values in order, gathered into one array of `total` values when that size is
    known and plausible, else into NumPy blocks of at most _FLUSH items."""

    def __init__(self, dtype: np.dtype, total: int | None = None) -> None:
        self.dtype = dtype
        self.out = np.empty(total, dtype=dtype) if total is not None else None
        self.filled = 0
        self.parts: list[np.ndarray] = []
        self.items: list = []

    def append(self, value: Any) -> None:
        self.items.append(value)
        if len(self.items) >= _FLUSH:
            self._flush()

    def extend(self, block: np.ndarray) -> None:
        self._flush()
        self._put(block.reshape(-1))

    def _put(self, block: np.ndarray) -> None:
        if self.out is None:
            self.parts.append(block)
        else:
            self.out[self.filled:self.filled + len(block)] = block
            self.filled += len(block)

    def _flush(self) -> None:
        if self.items:
            if self.dtype.kind == "O":
                block = np.empty(len(self.items), dtype=object)
                block[:] = self.items
            else:
                block = np.asarray(self.items, dtype=self.dtype)
            self._put(block)
            self.items = []

    def array(self, shape: list[int]) -> np.ndarray:
        self._flush()
        if self.out is not None:
            return self.out.reshape(shape)
        if not self.parts:
            return np.empty(shape, dtype=self.dtype)
        flat = self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)
        return flat.reshape(shape)


def _plausible(size: int, text_bytes: int) -> int | None:
    """`size` when JSON text of `text_bytes` bytes can hold that many values (each takes a
    character and a separator), else None: a ragged array's first-element shape may promise
    far more values than it has."""
    return size if size <= (text_bytes + 1) // 2 else None


def _walk(value: Any, level: int, shape: list[int], dtype: np.dtype, sink: _Sink) -> None:
    """Appends `value`'s scalars to `sink` depth first, failing where TF Serving's
    FillTensorProto fails, with its message."""
    rank = len(shape)
    if not isinstance(value, (list, LazyArray)):
        if level != rank:
            raise invalid_argument(
                f"JSON Value: {_echo(value)} found at incorrect level: {level + 1} in the JSON "
                f"DOM. Expected at level: {rank}"
            )
        sink.append(_check_scalar(value, dtype))
        return
    if level >= rank:
        raise invalid_argument(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(value) != shape[level]:
        raise invalid_argument(
            f"Encountered list at unexpected size: {len(value)} at level: {level} expected "
            f"size: {shape[level]}"
        )
    if not isinstance(value, LazyArray):
        for item in value:
            _walk(item, level + 1, shape, dtype, sink)
        return
    below = tuple(shape[level + 1:])
    for chunk in value.chunks():
        fast = _fast_numeric(chunk, dtype, value.has_bools)
        if fast is not None and fast.shape == (len(chunk), *below):
            sink.extend(fast)
            continue
        for item in chunk:
            _walk(item, level + 1, shape, dtype, sink)


@_reading_lazily
def json_to_array(value: Any, dtype: np.dtype, bools: bool = True) -> np.ndarray:
    """The dense array a JSON value (scalar or nested lists, possibly lazy) holds, as `dtype`.

    Raises INVALID_ARGUMENT with TF Serving's wording for ragged lists, values of the wrong
    JSON type (e.g. 1.5 for an int64 input) and lossy conversions. `bools=False` promises that
    the value holds no JSON true/false (a faster conversion is then exact).
    """
    dtype = np.dtype(dtype)
    if not isinstance(value, LazyArray):
        fast = _fast_numeric(value, dtype, bools)
        if fast is not None:
            return fast
    shape = _dense_shape(value)
    _check_rank(shape, value)
    total = None
    if isinstance(value, LazyArray):
        total = _plausible(int(np.prod(shape, dtype=np.float64)), value.end - value.start)
    sink = _Sink(dtype, total)
    _walk(value, 0, shape, dtype, sink)
    return sink.array(shape)


def _fast_numeric(value: Any, dtype: np.dtype, bools: bool) -> np.ndarray | None:
    """np.asarray when it is certainly right; None sends the value to the checking walk.

    NumPy turns true into 1 and mixes integers into float arrays, where TF Serving checks
    each JSON value: so with `bools` (the value may hold true/false) only a bool target is
    converted here, and integers too large for a float target without loss go to the walk."""
    if dtype.kind == "O" or (bools and dtype.kind != "b"):
        return None
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError, RecursionError):
        return None
    kind = arr.dtype.kind
    if dtype.kind == "b":
        return arr if kind == "b" else None
    if arr.size == 0:
        return arr.astype(dtype)
    if dtype.kind in "iu":
        if kind not in "iu":
            return None
        info = np.iinfo(dtype if dtype.itemsize >= 4 else np.int32)
        if arr.min() < info.min or arr.max() > info.max:
            return None
        return arr.astype(dtype)
    digits = 24 if dtype.itemsize <= 4 else 53  # integers a float target holds exactly
    if kind == "f":
        finite = np.abs(arr[np.isfinite(arr)])  # an integer among these may be inexact
        if finite.size and finite.max() > (1 << digits) - 1:
            return None
        return arr.astype(dtype)
    if kind in "iu":
        if np.abs(arr).max() > (1 << digits) - 1:
            return None
        return arr.astype(dtype)
    return None


# ---------------------------------------------------------------- requests
def _parse_document(body: bytes) -> dict:
    if not body or body.isspace():
        raise invalid_argument("JSON Parse error: The document is empty")
    try:
        doc = lazy_loads(body)
    except JSONError as exc:
        raise _parse_error(exc) from None
    if not isinstance(doc, dict):
        raise _format_error(doc, "Is not object")
    return doc


def _format_error(value: Any, message: str) -> ServingError:
    """json_tensor.cc's FormatError: the offending JSON value, then what is wrong with it."""
    return invalid_argument(f"JSON Value: {_echo(value)} {message}")


def _signature_name(doc: dict) -> str | None:
    """The optional 'signature_name' (None when absent)."""
    if "signature_name" not in doc:
        return None
    signature = doc["signature_name"]
    if not isinstance(signature, str):
        raise invalid_argument(
            f"JSON Value: {_echo(doc)} not formatted correctly. 'signature_name' key must be "
            "a string value."
        )
    return signature


@_reading_lazily
def parse_predict_request(
    body: bytes, input_specs: Callable[[str], Mapping[str, Any]]
) -> tuple[str, dict[str, np.ndarray], str]:
    """(signature_name, inputs, format) of a REST predict body.

    `input_specs(signature_name)` returns the signature's inputs {name: spec with .dtype}
    (and raises for an unknown signature); format is ROW (`instances`) or COLUMNAR (`inputs`).
    """
    doc = _parse_document(body)
    bools = b"true" in body or b"false" in body  # see _fast_numeric
    signature = _signature_name(doc) or "serving_default"
    specs = input_specs(signature)
    if not specs:
        raise invalid_argument(f"Failed to get input map for signature: {signature}")
    has_rows, has_cols = "instances" in doc, "inputs" in doc
    if has_rows and has_cols:
        raise _format_error(
            doc, "Not formatted correctly expecting only one of 'inputs' or 'instances' keys "
            "to exist "
        )
    if has_rows:
        rows = doc["instances"]
        if not isinstance(rows, (list, LazyArray)):
            raise _format_error(doc, "Excepting 'instances' to be an list/array")
        if not len(rows):
            raise _format_error(doc, "No values in 'instances' array")
        return signature, _rows_to_inputs(rows, specs, bools), ROW
    if has_cols:
        return signature, _columns_to_inputs(doc["inputs"], specs, bools), COLUMNAR
    raise invalid_argument("Missing 'inputs' or 'instances' key")


def _is_named_object(value: Any) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


def _rows_to_inputs(
    rows: list | LazyArray, specs: Mapping[str, Any], bools: bool
) -> dict[str, np.ndarray]:
    names = sorted(specs)
    first = _first(rows)
    if not isinstance(first, dict) and len(names) > 1:
        raise invalid_argument(
            "instances is a plain list, but expecting list of objects as multiple input "
            "tensors required as per tensorinfo_map"
        )
    objects = _is_named_object(first)
    if isinstance(rows, LazyArray):
        bools = rows.has_bools
    text_bytes = rows.end - rows.start if isinstance(rows, LazyArray) else None
    columns = {n: _RowColumn(n, np.dtype(specs[n].dtype), objects, bools, len(rows), text_bytes)
               for n in names}
    start = 0
    for chunk in _chunks(rows):
        values: dict[str, list] = {n: [] for n in names}
        for i, row in enumerate(chunk, start):
            if objects:
                _check_row_keys(row, i, specs, names)
                for n in names:
                    values[n].append(row[n])
            else:
                if _is_named_object(row):
                    raise invalid_argument(
                        f"Expecting value/list but got object at item {i} of input list"
                    )
                values[names[0]].append(row)
        for n in names:
            columns[n].add(values[n], start)
        start += len(chunk)
    return {n: column.result() for n, column in columns.items()}


def _check_row_keys(row: Any, i: int, specs: Mapping[str, Any], names: list[str]) -> None:
    if not _is_named_object(row):
        raise invalid_argument(f"Expecting object but got list at item {i} of input list")
    for key in row:
        if key not in specs:
            raise invalid_argument(
                f"Failed to process element: {i} key: {key} of 'instances' list. "
                f"Error: INVALID_ARGUMENT: JSON object: does not have named input: {key}"
            )
    if set(row) != set(names):
        raise invalid_argument(
            f"Failed to process element: {i} of 'instances' list. JSON object: "
            f"{_echo(row)} keys must be equal to: {','.join(names)}"
        )


class _RowColumn:
    """One input's rows of `instances`, gathered a chunk of rows at a time (into one array of
    all rows, for a large request)."""

    def __init__(self, name: str, dtype: np.dtype, objects: bool, bools: bool, rows: int,
                 text_bytes: int | None) -> None:
        self.name, self.dtype, self.objects, self.bools = name, dtype, objects, bools
        self.rows, self.text_bytes = rows, text_bytes
        self.parts: list[np.ndarray] = []
        self.out: np.ndarray | None = None
        self.filled = 0
        self.row_shape: tuple[int, ...] | None = None
        self.row_size = 0

    def add(self, items: list, start: int) -> None:
        fast = _fast_numeric(items, self.dtype, self.bools)
        if fast is not None and fast.ndim >= 1 and (
            self.row_shape is None or fast.shape[1:] == self.row_shape
        ):
            if self.row_shape is None:
                self.row_shape, self.row_size = fast.shape[1:], int(np.prod(fast.shape[1:]))
            self._put(fast)
            return
        rows = []
        for i, item in enumerate(items, start):
            rows.append(self._row(item, i))
        self._put(np.stack(rows))

    def _put(self, block: np.ndarray) -> None:
        if self.out is None and self.text_bytes is not None and not self.parts:
            if _plausible(self.rows * self.row_size, self.text_bytes) is not None:
                self.out = np.empty((self.rows, *self.row_shape), dtype=self.dtype)
        if self.out is None:
            self.parts.append(block)
        else:
            self.out[self.filled:self.filled + len(block)] = block
            self.filled += len(block)

    def _row(self, item: Any, i: int) -> np.ndarray:
        where = f"Failed to process element: {i} " + (f"key: {self.name} " if self.objects else "")
        try:
            part = json_to_array(item, self.dtype, self.bools)
            if part.ndim >= MAX_RANK:  # the batch adds a dimension
                _check_rank([0] * (part.ndim + 1), item)
        except ServingError as exc:
            raise invalid_argument(
                f"{where}of 'instances' list. Error: INVALID_ARGUMENT: {exc.message}"
            ) from None
        if self.row_shape is None:
            self.row_shape, self.row_size = part.shape, part.size
        elif part.size != self.row_size:
            raise invalid_argument(
                f"{where}of 'instances' list. Error: INVALID_ARGUMENT: Expecting tensor size: "
                f"{self.row_size} but got: {part.size}"
            )
        elif part.shape != self.row_shape:
            raise invalid_argument(
                f"{where}of 'instances' list. Error: INVALID_ARGUMENT: Expecting shape "
                f"[{','.join(map(str, self.row_shape))}] but got: "
                f"[{','.join(map(str, part.shape))}]"
            )
        return part

    def result(self) -> np.ndarray:
        if self.out is not None:
            return self.out
        return self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)


def _columns_to_inputs(
    value: Any, specs: Mapping[str, Any], bools: bool
) -> dict[str, np.ndarray]:
    names = sorted(specs)
    if not isinstance(value, dict) or _is_b64(value):
        if len(names) > 1:
            raise invalid_argument(
                "inputs is a plain value/list, but expecting an object as multiple input "
                "tensors required as per tensorinfo_map"
            )
        return {names[0]: json_to_array(value, specs[names[0]].dtype, bools)}
    for name in names:
        if name not in value:
            raise invalid_argument(f"Missing named input: {name} in 'inputs' object.")
    out = _same_shaped_inputs(value, specs, names, bools)
    for name in names:
        if name not in out:
            out[name] = json_to_array(value[name], specs[name].dtype, bools)
    return out


def _same_shaped_inputs(
    value: dict, specs: Mapping[str, Any], names: list[str], bools: bool
) -> dict[str, np.ndarray]:
    """Inputs of one dtype converted with a single NumPy call when they have one shape (e.g.
    a model's 26 [batch, 1] key inputs): per input, that call's fixed cost dominates a small
    batch. Inputs it cannot take exactly are left to json_to_array."""
    groups: dict[np.dtype, list[str]] = {}
    for name in names:
        dtype = np.dtype(specs[name].dtype)
        if dtype.kind != "O" and isinstance(value[name], list):
            groups.setdefault(dtype, []).append(name)
    out = {}
    for dtype, group in groups.items():
        if len(group) < 2:
            continue
        stacked = _fast_numeric([value[n] for n in group], dtype, bools)
        if stacked is not None and stacked.ndim >= 1 and len(stacked) == len(group):
            out.update(zip(group, stacked, strict=True))
    return out


@_reading_lazily
def parse_classify_regress_request(body: bytes, request: Any, method: str = "classify") -> None:
    """Fills a ClassificationRequest or RegressionRequest's signature name and input from a
    REST body: `{"signature_name": ..., "context": {...}, "examples": [{...}, ...]}`
    (json_tensor.cc's FillClassifyRegressRequestFromJson)."""
    doc = _parse_document(body)
    signature = _signature_name(doc)
    if signature is not None:
        request.model_spec.signature_name = signature
    has_context = "context" in doc
    if has_context:
        _example_from_json(doc["context"], request.input.example_list_with_context.context)
    if "examples" not in doc:  # TF Serving names "classify" for both methods
        raise _format_error(doc, "When method is classify, key 'examples' is expected and "
                            "was not found")
    examples = doc["examples"]
    if not isinstance(examples, (list, LazyArray)):
        raise _format_error(doc, "Expecting 'examples' value to be an list/array")
    if not len(examples):
        raise _format_error(doc, "'examples' value is an empty array")
    target = (
        request.input.example_list_with_context.examples
        if has_context
        else request.input.example_list.examples
    )
    for chunk in _chunks(examples):
        for value in chunk:
            _example_from_json(value, target.add())


def _example_from_json(value: Any, example: Any) -> None:
    if not isinstance(value, dict):
        raise invalid_argument(f"Example must be JSON object but got JSON {_json_type(value)}")
    features = example.features.feature
    for name, content in value.items():
        feature = features[name]  # present even with no values, as in TF Serving
        feature.SetInParent()
        items = _iter_values(content) if isinstance(content, (list, LazyArray)) else (content,)
        for item in items:
            _add_to_feature(item, name, feature)


def _iter_values(value: list | LazyArray) -> Iterator[Any]:
    for chunk in _chunks(value):
        yield from chunk


_FEATURE_KIND_NAMES = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64"}


def _add_to_feature(value: Any, name: str, feature: Any) -> None:
    """One JSON value into a tf.train.Feature (json_tensor.cc's AddValueToFeature)."""

    def kind_ok(kind: str) -> None:
        current = feature.WhichOneof("kind")
        if current is not None and current != kind:
            raise invalid_argument(
                f"Unexpected element type in feature: {name} expecting type: "
                f"{_FEATURE_KIND_NAMES[current]}"
            )

    if value is None or isinstance(value, (list, LazyArray)) or (
        isinstance(value, dict) and not _is_b64(value)
    ):
        raise invalid_argument(
            f"Feature: {name} has element with unexpected JSON type: {_json_type(value)}"
        )
    if isinstance(value, bool):
        kind_ok("int64_list")
        feature.int64_list.value.append(1 if value else 0)
    elif isinstance(value, dict):
        kind_ok("bytes_list")
        feature.bytes_list.value.append(_b64decode(value))
    elif isinstance(value, str):
        kind_ok("bytes_list")
        feature.bytes_list.value.append(_utf8(value))
    elif isinstance(value, float) or not -_INT64_MAX - 1 <= value <= _UINT64_MAX:
        # a JSON double (or an integer too large for rapidjson's 64-bit types)
        kind_ok("float_list")
        number = float(value)
        if number == number and abs(number) != float("inf") and abs(number) > _FLOAT32_MAX:
            raise _lossy_error(value, "float")
        feature.float_list.value.append(number)
    else:
        kind_ok("int64_list")
        if value > _INT64_MAX:
            raise invalid_argument(
                f"Feature: {name} has uint64 element. Only int64 is supported."
            )
        feature.int64_list.value.append(value)


# ---------------------------------------------------------------- responses
def _float_texts(array: np.ndarray) -> np.ndarray:
    """Each float in its shortest round-trip form, NaN/Infinity as TF Serving writes them."""
    texts = array.astype(str)
    if not np.isfinite(array).all():
        texts = np.where(np.isnan(array), "NaN", texts)
        texts = np.where(np.isposinf(array), "Infinity", texts)
        texts = np.where(np.isneginf(array), "-Infinity", texts)
    return texts


_BLOCK = 1 << 16  # tensor elements formatted at a time


def _scalar_texts(block: np.ndarray) -> np.ndarray:
    """JSON text of each number or bool of `block`, as an array of str."""
    kind = block.dtype.kind
    if kind == "f":
        return _float_texts(block)
    if kind == "b":
        return np.where(block, "true", "false")
    if kind in "iu":
        return block.astype(str)
    from .tensors import dtype_name

    raise invalid_argument(
        f"Failed to write JSON value for tensor type: {dtype_name(block.dtype)}"
    )


def _nested(shape: tuple[int, ...]) -> Callable[[list[str]], str]:
    """A function writing nested JSON lists of `shape` around scalar texts in row-major order."""
    if not shape:
        return lambda flat: flat[0]
    if len(shape) == 1:
        return lambda flat: "[" + ",".join(flat) + "]"
    last = shape[-1]
    spans = [math.prod(shape[d:-1]) for d in range(len(shape) - 1)]  # rows per container
    rows = spans[0]
    opens = ["[" * (1 + sum(r % span == 0 for span in spans)) for r in range(rows)]
    closes = ["]" * (1 + sum((r + 1) % span == 0 for span in spans)) for r in range(rows)]

    def write(flat: list[str]) -> str:
        return ",".join(opens[r] + ",".join(flat[r * last:(r + 1) * last]) + closes[r]
                        for r in range(rows))

    return write


def _row_texts(array: np.ndarray, binary: bool, rows: int) -> Iterator[list[str]]:
    """The JSON text of array[i] for every i, `rows` at a time (array.ndim >= 1)."""
    write = _nested(array.shape[1:])
    for start in range(0, array.shape[0], rows):
        block = array[start:start + rows]
        if array.dtype.kind in "OSU" or block.size == 0:
            yield [json.dumps(_strings(row, binary), separators=(",", ":"))
                   for row in block.tolist()]
            continue
        texts = _scalar_texts(block.reshape(len(block), -1)).tolist()
        yield [write(flat) for flat in texts]


def _rows_per_block(*arrays: np.ndarray) -> int:
    widest = max((math.prod(a.shape[1:]) for a in arrays), default=1)
    return max(1, _BLOCK // max(1, widest))


def _tensor_pieces(array: np.ndarray, binary: bool) -> list[bytes]:
    """The JSON of a tensor in pieces of about _BLOCK values (never one Python object per
    value for the whole tensor)."""
    if array.ndim == 0:
        return [next(_row_texts(array.reshape(1), binary, 1))[0].encode()]
    pieces = [b"["]
    for i, block in enumerate(_row_texts(array, binary, _rows_per_block(array))):
        pieces.append((b"," if i else b"") + ",".join(block).encode())
    pieces.append(b"]")
    return pieces


def array_to_json(array: np.ndarray, binary: bool = False) -> str:
    """JSON text of a tensor: floats in their shortest round-trip form, NaN/Infinity as TF
    Serving writes them, strings as text or `{"b64": ...}` (always for `binary`)."""
    return b"".join(_tensor_pieces(np.asarray(array), binary)).decode()


def _strings(value: Any, binary: bool) -> Any:
    if isinstance(value, list):
        return [_strings(v, binary) for v in value]
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if not binary:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return {"b64": base64.b64encode(raw).decode("ascii")}


def predict_response(outputs: Mapping[str, np.ndarray], fmt: str) -> bytes:
    """The REST body for predict outputs: `predictions` (row) or `outputs` (columnar)."""
    names = sorted(outputs)
    arrays = {n: np.asarray(outputs[n]) for n in names}
    if fmt == COLUMNAR or len(names) == 1:
        if fmt != COLUMNAR and arrays[names[0]].ndim == 0:
            raise invalid_argument(f"Tensor name: {names[0]} has no shape information ")
        pieces = [b'{"outputs":' if fmt == COLUMNAR else b'{"predictions":']
        if len(names) > 1:
            pieces.append(b"{")
        for i, n in enumerate(names):
            if len(names) > 1:
                pieces.append((b"," if i else b"") + json.dumps(n).encode() + b":")
            pieces.extend(_tensor_pieces(arrays[n], n.endswith("_bytes")))
        pieces.append(b"}}" if len(names) > 1 else b"}")
        return b"".join(pieces)
    batch = None
    for n in names:
        arr = arrays[n]
        if arr.ndim == 0:
            raise invalid_argument(f"Tensor name: {n} has no shape information ")
        if batch is None:
            batch = arr.shape[0]
        elif arr.shape[0] != batch:
            raise invalid_argument(
                f"Tensor name: {n} has inconsistent batch size: {arr.shape[0]} expecting: {batch}"
            )
    rows = _rows_per_block(*arrays.values())
    keys = [json.dumps(n) + ":" for n in names]
    blocks = zip(*(_row_texts(arrays[n], n.endswith("_bytes"), rows) for n in names),
                 strict=True)
    pieces = [b'{"predictions":[']
    for i, texts in enumerate(blocks):
        objects = ("{" + ",".join(k + t for k, t in zip(keys, row, strict=True)) + "}"
                   for row in zip(*texts, strict=True))
        pieces.append((b"," if i else b"") + ",".join(objects).encode())
    pieces.append(b"]}")
    return b"".join(pieces)


def classification_json(result: Any) -> bytes:
    """`{"results": [[[label, score], ...], ...]}` of a ClassificationResult."""
    if not len(result.classifications):
        raise invalid_argument("Cannot convert empty ClassificationResults to JSON")
    rows = []
    for classifications in result.classifications:
        classes = classifications.classes
        scores = _float_texts(np.array([c.score for c in classes], np.float32)).tolist()
        rows.append(
            "[" + ",".join(f"[{json.dumps(c.label)},{s}]" for c, s in zip(classes, scores,
                                                                       strict=True)) + "]"
        )
    return ('{"results":[' + ",".join(rows) + "]}").encode()


def regression_json(result: Any) -> bytes:
    """`{"results": [value, ...]}` of a RegressionResult."""
    if not len(result.regressions):
        raise invalid_argument("Cannot convert empty RegressionResults to JSON")
    values = np.array([r.value for r in result.regressions], np.float32)
    return b'{"results":' + b"".join(_tensor_pieces(values, False)) + b"}"


def error_body(message: str) -> bytes:
    """TF Serving's error body: `{ "error": "<message>" }`."""
    return json.dumps({"error": message}, indent=4).encode()
