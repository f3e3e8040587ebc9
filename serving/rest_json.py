"""TF Serving's REST JSON for predict: request parsing (row and columnar) and responses.

Follows tensorflow_serving/util/json_tensor.cc: the same keys, the same shape rules, `b64`
objects for binary strings, `_bytes` outputs written as `{"b64": ...}`, and the same error
messages (INVALID_ARGUMENT). Arrays convert through NumPy; the element-by-element walk that
names the offending value runs only when the fast conversion fails.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .status import ServingError, invalid_argument

ROW, COLUMNAR = "row", "columnar"
_MAX_ECHO = 1000  # longest JSON value echoed back in an error message


def _json_type(value: Any) -> str:
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


def _echo(value: Any) -> str:
    if isinstance(value, float):
        text = _float_text(value)
    else:
        text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= _MAX_ECHO else text[:_MAX_ECHO] + "..."


def _float_text(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _b64decode(value: dict) -> bytes:
    try:
        return base64.b64decode(value["b64"].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise invalid_argument("Unable to base64 decode") from None


# ---------------------------------------------------------------- JSON value -> array
def _dense_shape(value: Any) -> list[int]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _type_error(value: Any, dtype: np.dtype) -> ServingError:
    from .tensors import dtype_name

    return invalid_argument(
        f"JSON Value: {_echo(value)} Type: {_json_type(value)} is not of expected type: "
        f"{dtype_name(dtype)}"
    )


def _check_scalar(value: Any, dtype: np.dtype) -> Any:
    kind = dtype.kind
    if kind == "O":
        if isinstance(value, str):
            return value.encode("utf-8")
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
    if isinstance(value, int):
        digits = 24 if dtype == np.float32 or dtype == np.float16 else 53
        if abs(value) > (1 << digits) - 1:
            target = "float" if dtype != np.float64 else "double"
            raise invalid_argument(
                f"Cannot convert JSON value: {value} to {target} without loss of precision."
            )
    elif value == value and abs(value) != float("inf") and abs(value) > float(np.finfo(dtype).max):
        target = "float" if dtype != np.float64 else "double"
        raise invalid_argument(
            f"Cannot convert JSON value: {_echo(value)} to {target} without loss of precision."
        )
    return value


def _walk(value: Any, level: int, shape: list[int], dtype: np.dtype, out: list) -> None:
    rank = len(shape)
    if not isinstance(value, list):
        if level != rank:
            raise invalid_argument(
                f"JSON Value: {_echo(value)} found at incorrect level: {level + 1} in the JSON "
                f"DOM. Expected at level: {rank}"
            )
        out.append(_check_scalar(value, dtype))
        return
    if level >= rank:
        raise invalid_argument(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(value) != shape[level]:
        raise invalid_argument(
            f"Encountered list at unexpected size: {len(value)} at level: {level} expected "
            f"size: {shape[level]}"
        )
    for item in value:
        _walk(item, level + 1, shape, dtype, out)


def json_to_array(value: Any, dtype: np.dtype) -> np.ndarray:
    """The dense array a JSON value (scalar or nested lists) holds, as `dtype`.

    Raises INVALID_ARGUMENT with TF Serving's wording for ragged lists, values of the wrong
    JSON type (e.g. 1.5 for an int64 input) and lossy conversions.
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in "O":
        fast = _fast_numeric(value, dtype)
        if fast is not None:
            return fast
    shape = _dense_shape(value)
    flat: list = []
    _walk(value, 0, shape, dtype, flat)
    if dtype.kind == "O":
        arr = np.empty(len(flat), dtype=object)
        arr[:] = flat
        return arr.reshape(shape)
    return np.asarray(flat, dtype=dtype).reshape(shape)


def _fast_numeric(value: Any, dtype: np.dtype) -> np.ndarray | None:
    """np.asarray when it is certainly right; None sends the value to the checking walk."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError):
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
    if kind == "f":
        if arr.size and dtype != np.float64:
            finite = np.abs(arr[np.isfinite(arr)])
            if finite.size and finite.max() > np.finfo(dtype).max:
                return None
        return arr.astype(dtype)
    if kind in "iu":
        digits = 24 if dtype.itemsize <= 4 else 53
        if arr.size and np.abs(arr).max() > (1 << digits) - 1:
            return None
        return arr.astype(dtype)
    return None


# ---------------------------------------------------------------- requests
def _parse_document(body: bytes) -> dict:
    if not body.strip():
        raise invalid_argument("JSON Parse error: The document is empty")
    try:
        doc = json.loads(body)
    except UnicodeDecodeError:
        raise invalid_argument("JSON Parse error: Invalid encoding in string.") from None
    except json.JSONDecodeError as exc:
        raise invalid_argument(f"JSON Parse error: {exc.msg} at offset: {exc.pos}") from None
    if not isinstance(doc, dict):
        raise invalid_argument(f"JSON Value: {_echo(doc)} Is not object")
    return doc


def parse_predict_request(
    body: bytes, input_specs: Callable[[str], Mapping[str, Any]]
) -> tuple[str, dict[str, np.ndarray], str]:
    """(signature_name, inputs, format) of a REST predict body.

    `input_specs(signature_name)` returns the signature's inputs {name: spec with .dtype}
    (and raises for an unknown signature); format is ROW (`instances`) or COLUMNAR (`inputs`).
    """
    doc = _parse_document(body)
    signature = doc.get("signature_name", "serving_default")
    if not isinstance(signature, str):
        raise invalid_argument(
            f"JSON Value: {_echo(doc)} not formatted correctly. 'signature_name' key must be "
            "a string value."
        )
    signature = signature or "serving_default"
    specs = input_specs(signature)
    if not specs:
        raise invalid_argument(f"Failed to get input map for signature: {signature}")
    has_rows, has_cols = "instances" in doc, "inputs" in doc
    if has_rows and has_cols:
        raise invalid_argument(
            f"JSON Value: {_echo(doc)} Not formatted correctly expecting only one of 'inputs' "
            "or 'instances' keys to exist "
        )
    if has_rows:
        rows = doc["instances"]
        if not isinstance(rows, list):
            raise invalid_argument(
                f"JSON Value: {_echo(doc)} Excepting 'instances' to be an list/array"
            )
        if not rows:
            raise invalid_argument(f"JSON Value: {_echo(doc)} No values in 'instances' array")
        return signature, _rows_to_inputs(rows, specs), ROW
    if has_cols:
        return signature, _columns_to_inputs(doc["inputs"], specs), COLUMNAR
    raise invalid_argument("Missing 'inputs' or 'instances' key")


def _is_named_object(value: Any) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


def _rows_to_inputs(rows: list, specs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    names = sorted(specs)
    if not isinstance(rows[0], dict) and len(names) > 1:
        raise invalid_argument(
            "instances is a plain list, but expecting list of objects as multiple input "
            "tensors required as per tensorinfo_map"
        )
    objects = _is_named_object(rows[0])
    columns: dict[str, list] = {n: [] for n in names}
    for i, row in enumerate(rows):
        if objects:
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
            for n in names:
                columns[n].append(row[n])
        else:
            if _is_named_object(row):
                raise invalid_argument(
                    f"Expecting value/list but got object at item {i} of input list"
                )
            columns[names[0]].append(row)
    out = {}
    for name, items in columns.items():
        dtype = np.dtype(specs[name].dtype)
        arr = _fast_numeric(items, dtype) if dtype.kind != "O" else None
        if arr is None:
            arr = _rows_checked(items, dtype, name, objects)
        out[name] = arr
    return out


def _rows_checked(items: list, dtype: np.dtype, name: str, objects: bool) -> np.ndarray:
    parts, first_shape, first_size = [], None, None
    for i, item in enumerate(items):
        where = f"Failed to process element: {i} " + (f"key: {name} " if objects else "")
        try:
            part = json_to_array(item, dtype)
        except ServingError as exc:
            raise invalid_argument(
                f"{where}of 'instances' list. Error: INVALID_ARGUMENT: {exc.message}"
            ) from None
        if first_shape is None:
            first_shape, first_size = part.shape, part.size
        elif part.size != first_size:
            raise invalid_argument(
                f"{where}of 'instances' list. Error: INVALID_ARGUMENT: Expecting tensor size: "
                f"{first_size} but got: {part.size}"
            )
        elif part.shape != first_shape:
            raise invalid_argument(
                f"{where}of 'instances' list. Error: INVALID_ARGUMENT: Expecting shape "
                f"[{','.join(map(str, first_shape))}] but got: [{','.join(map(str, part.shape))}]"
            )
        parts.append(part)
    return np.stack(parts)


def _columns_to_inputs(value: Any, specs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    names = sorted(specs)
    if not isinstance(value, dict) or _is_b64(value):
        if len(names) > 1:
            raise invalid_argument(
                "inputs is a plain value/list, but expecting an object as multiple input "
                "tensors required as per tensorinfo_map"
            )
        return {names[0]: json_to_array(value, specs[names[0]].dtype)}
    out = {}
    for name in names:
        if name not in value:
            raise invalid_argument(f"Missing named input: {name} in 'inputs' object.")
        out[name] = json_to_array(value[name], specs[name].dtype)
    return out


# ---------------------------------------------------------------- responses
def array_to_json(array: np.ndarray, binary: bool = False) -> str:
    """JSON text of a tensor: floats in their shortest round-trip form, NaN/Infinity as TF
    Serving writes them, strings as text or `{"b64": ...}` (always for `binary`)."""
    array = np.asarray(array)
    kind = array.dtype.kind
    if kind == "f":
        texts = array.astype(str)
        if not np.isfinite(array).all():
            texts = np.where(np.isnan(array), "NaN", texts)
            texts = np.where(np.isposinf(array), "Infinity", texts)
            texts = np.where(np.isneginf(array), "-Infinity", texts)
        return _nest(texts)
    if kind in "OSU":
        return json.dumps(_strings(array.tolist(), binary), separators=(",", ":"))
    return json.dumps(array.tolist(), separators=(",", ":"))


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


def _nest(texts: np.ndarray) -> str:
    if texts.ndim == 0:
        return str(texts.item())
    if texts.ndim == 1:
        return "[" + ",".join(texts.tolist()) + "]"
    return "[" + ",".join(_nest(sub) for sub in texts) + "]"


def predict_response(outputs: Mapping[str, np.ndarray], fmt: str) -> bytes:
    """The REST body for predict outputs: `predictions` (row) or `outputs` (columnar)."""
    names = sorted(outputs)
    enc = {n: array_to_json(outputs[n], binary=n.endswith("_bytes")) for n in names}
    if fmt == COLUMNAR:
        if len(names) == 1:
            body = enc[names[0]]
        else:
            body = "{" + ",".join(f"{json.dumps(n)}:{enc[n]}" for n in names) + "}"
        return ('{"outputs":' + body + "}").encode()
    if len(names) == 1:
        arr = np.asarray(outputs[names[0]])
        if arr.ndim == 0:
            raise invalid_argument(f"Tensor name: {names[0]} has no shape information ")
        return ('{"predictions":' + enc[names[0]] + "}").encode()
    batch = None
    for n in names:
        arr = np.asarray(outputs[n])
        if arr.ndim == 0:
            raise invalid_argument(f"Tensor name: {n} has no shape information ")
        if batch is None:
            batch = arr.shape[0]
        elif arr.shape[0] != batch:
            raise invalid_argument(
                f"Tensor name: {n} has inconsistent batch size: {arr.shape[0]} expecting: {batch}"
            )
    rows = [
        "{"
        + ",".join(
            f"{json.dumps(n)}:{array_to_json(outputs[n][i], binary=n.endswith('_bytes'))}"
            for n in names
        )
        + "}"
        for i in range(batch or 0)
    ]
    return ('{"predictions":[' + ",".join(rows) + "]}").encode()


def error_body(message: str) -> bytes:
    """TF Serving's error body: `{ "error": "<message>" }`."""
    return json.dumps({"error": message}, indent=4).encode()
