"""JSON parsing whose memory stays a small multiple of the document.

`json.loads` turns every number of a request into a Python object (about 32 bytes each, more
for nested lists), so a large REST body costs ten to twenty times its size. `loads` here
parses small documents with `json.loads` and leaves every array or object larger than
`lazy_above` bytes as a `LazyArray` (or a dict of lazily parsed values): a range of the body
whose direct children are found with a vectorised scan and parsed a chunk at a time when read.
A reader that converts each chunk to NumPy before asking for the next (`serving.rest_json`
does) never holds more than one chunk's Python objects.

Errors are `JSONError(message, offset)`: Python's message for what `json.loads` rejects, and
the same style for what the scan finds (unbalanced brackets, nesting deeper than `MAX_DEPTH`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np

try:  # several times faster than json.loads; the same values for what it reads
    import orjson
except ImportError:  # pragma: no cover - orjson comes with the serving extra
    orjson = None

MAX_DEPTH = 512  # deeper nesting is refused (no tensor has that many dimensions)
LAZY_ABOVE = 1 << 20  # containers larger than this many bytes are parsed chunk by chunk
_WHITESPACE = b" \t\n\r"
# orjson reads integers beyond 64 bits as floats, where json.loads keeps them exact: text
# with a run of 19 digits goes to json.loads
_DIGITS_AS_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_RUN = b"0" * 19
_SCAN_BLOCK = 1 << 20  # bytes scanned at a time (bounds the scan's temporaries)


class JSONError(ValueError):
    """A document that is not valid JSON (or nests deeper than MAX_DEPTH)."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} at offset: {offset}")
        self.message = message
        self.offset = offset


def loads(body: bytes, lazy_above: int | None = None) -> Any:
    """The JSON value of `body`; arrays and objects above `lazy_above` bytes (default
    LAZY_ABOVE) stay lazy."""
    lazy_above = LAZY_ABOVE if lazy_above is None else lazy_above
    if len(body) <= lazy_above:
        return _loads_small(body, 0)
    return _Scan(body, lazy_above).top()


def materialize(value: Any) -> Any:
    """`value` with every LazyArray turned into a list (for tests and small values)."""
    if isinstance(value, LazyArray):
        return [materialize(v) for chunk in value.chunks() for v in chunk]
    if isinstance(value, dict):
        return {k: materialize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [materialize(v) for v in value]
    return value


def _loads_small(text: bytes, offset: int) -> Any:
    if orjson is not None and _LONG_RUN not in text.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass  # json.loads reads what orjson refuses (NaN, Infinity) or says what is wrong
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JSONError(exc.msg, offset + exc.pos) from None
    except UnicodeDecodeError as exc:
        raise JSONError("Invalid encoding in string", offset + exc.start) from None
    except RecursionError:
        raise JSONError(f"Nesting deeper than {MAX_DEPTH} levels", offset) from None


class LazyArray:
    """A JSON array still in the body: its length is known, its children are parsed a chunk
    (about `lazy_above` bytes) at a time by `chunks()`."""

    def __init__(self, scan: _Scan, start: int, end: int, starts: np.ndarray,
                 ends: np.ndarray) -> None:
        self._scan = scan
        self.start, self.end = start, end  # the array's text is body[start:end]
        self._starts, self._ends = starts, ends  # each child's text range
        self._bools: bool | None = None

    @property
    def has_bools(self) -> bool:
        """Whether the array's text holds `true` or `false` (perhaps inside a string)."""
        if self._bools is None:
            body, s, e = self._scan.body, self.start, self.end
            self._bools = body.find(b"true", s, e) >= 0 or body.find(b"false", s, e) >= 0
        return self._bools

    def __len__(self) -> int:
        return len(self._starts)

    def first(self) -> Any:
        """The first child (parsed; lazy itself when large)."""
        return self._scan.value(int(self._starts[0]), int(self._ends[0]))

    def text(self, limit: int) -> str:
        """At most `limit` characters of the array's JSON text (for error messages)."""
        raw = self._scan.body[self.start:min(self.end, self.start + limit)]
        return raw.decode("utf-8", "replace")

    def chunks(self) -> Iterator[list[Any]]:
        """The children in order, as lists of about `lazy_above` bytes of text each."""
        scan, limit = self._scan, self._scan.lazy_above
        starts, ends = self._starts, self._ends
        i, n = 0, len(starts)
        while i < n:
            s = int(starts[i])
            if ends[i] - s > limit:
                yield [scan.value(s, int(ends[i]))]
                i += 1
                continue
            bound = ends.dtype.type(min(s + limit, int(ends[-1])))
            j = int(np.searchsorted(ends, bound, side="right"))
            j = max(j, i + 1)
            while j > i + 1 and ends[j - 1] - starts[j - 1] > limit:
                j -= 1
            e = int(ends[j - 1])
            items = _loads_small(b"[" + scan.body[s:e] + b"]", s - 1)
            if len(items) != j - i:  # a run of only empty children reads as []
                raise JSONError("Expecting value", scan._strip(s, e)[1])
            yield items
            i = j


def _positions(a: np.ndarray, byte: int, index_type: type) -> np.ndarray:
    """Where `byte` occurs in `a`, found a block at a time (no body-sized temporary)."""
    parts = [
        (np.flatnonzero(a[b:b + _SCAN_BLOCK] == byte) + b).astype(index_type)
        for b in range(0, len(a), _SCAN_BLOCK)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, index_type)


class _Scan:
    """The structure of one document: where its brackets, braces, commas and colons are
    (outside strings), and how deep each one sits. About 0.4x the body for numeric arrays."""

    def __init__(self, body: bytes, lazy_above: int) -> None:
        self.body = body
        self.lazy_above = lazy_above
        self.array = a = np.frombuffer(body, np.uint8)
        index_type = np.int32 if len(body) < 2**31 else np.int64
        quotes = self._real_quotes(a, index_type)
        if len(quotes) % 2:
            raise JSONError("Unterminated string starting at", int(quotes[-1]))
        structural = np.zeros(256, bool)
        structural[list(b"[]{},:")] = True
        blocks = range(0, len(a), _SCAN_BLOCK)
        total = sum(int(np.count_nonzero(structural[a[b:b + _SCAN_BLOCK]])) for b in blocks)
        pos = np.empty(total, index_type)
        n = 0
        for b in blocks:
            hits = (np.flatnonzero(structural[a[b:b + _SCAN_BLOCK]]) + b).astype(index_type)
            if len(quotes):  # drop those inside strings: an odd number of quotes before them
                hits = hits[(np.searchsorted(quotes, hits) & 1) == 0]
            pos[n:n + len(hits)] = hits
            n += len(hits)
        self.pos = pos[:n]
        step = np.zeros(256, np.int8)
        step[list(b"[{")], step[list(b"]}")] = 1, -1
        depth = np.empty(n, np.int16 if MAX_DEPTH < 2**15 else np.int32)
        level = 0
        for b in range(0, n, _SCAN_BLOCK):
            block = np.cumsum(step[a[self.pos[b:b + _SCAN_BLOCK]]], dtype=depth.dtype)
            depth[b:b + len(block)] = block + level
            level = int(depth[b + len(block) - 1])
        self.depth = depth
        if n and depth.min() < 0:
            i = int(np.argmax(depth < 0))
            raise JSONError(f"Unexpected '{chr(a[self.pos[i]])}'", int(self.pos[i]))
        if n and depth.max() > MAX_DEPTH:
            i = int(np.argmax(depth > MAX_DEPTH))
            raise JSONError(f"Nesting deeper than {MAX_DEPTH} levels", int(self.pos[i]))
        if n and depth[-1] != 0:
            raise JSONError("Unterminated array or object", len(body))

    @staticmethod
    def _real_quotes(a: np.ndarray, index_type: type) -> np.ndarray:
        """Positions of the double quotes that are not escaped by an odd run of backslashes."""
        quotes = _positions(a, ord('"'), index_type)
        slashes = _positions(a, ord("\\"), index_type)
        if not len(quotes) or not len(slashes):
            return quotes
        before = np.searchsorted(slashes, quotes)  # backslashes before each quote
        prev = np.maximum(before - 1, 0)
        adjacent = (before > 0) & (slashes[prev] == quotes - 1)
        run_start = np.ones(len(slashes), bool)
        run_start[1:] = slashes[1:] != slashes[:-1] + 1
        first = np.maximum.accumulate(np.where(run_start, np.arange(len(slashes)), 0))
        run = prev - first[prev] + 1
        return quotes[~(adjacent & (run % 2 == 1))]

    # ------------------------------------------------------------------ values
    def _strip(self, start: int, end: int) -> tuple[int, int]:
        body = self.body
        while start < end and body[start] in _WHITESPACE:
            start += 1
        while end > start and body[end - 1] in _WHITESPACE:
            end -= 1
        return start, end

    def top(self) -> Any:
        """The document's value."""
        start, end = self._strip(0, len(self.body))
        if start == end:
            raise JSONError("Expecting value", start)
        return self.value(start, end)

    def value(self, start: int, end: int) -> Any:
        """The value whose text is body[start:end] (lazy when it is a large container)."""
        start, end = self._strip(start, end)
        if end - start <= self.lazy_above or self.body[start] not in b"[{":
            return _loads_small(self.body[start:end], start)
        typed = self.pos.dtype.type  # a Python int would make searchsorted copy `pos`
        i = int(np.searchsorted(self.pos, typed(start)))
        j = int(np.searchsorted(self.pos, typed(end - 1)))
        level = self.depth[i]
        inner = slice(i + 1, j)
        inside = self.depth[inner]
        if len(inside) and inside.min() < level:  # the container closes before `end`
            k = i + 1 + int(np.argmax(inside < level))
            raise JSONError("Extra data", self._strip(int(self.pos[k]) + 1, end)[0])
        closing = self.body[end - 1]
        if j >= len(self.pos) or self.pos[j] != end - 1 or closing not in b"]}":
            raise JSONError("Expecting ',' delimiter", end)
        if (closing == ord("]")) != (self.body[start] == ord("[")):
            raise JSONError(f"Mismatched '{chr(closing)}'", end - 1)
        direct = self.pos[inner][inside == level]  # separators of this container's children
        chars = self.array[direct]
        commas = direct[chars == ord(",")]
        starts = np.concatenate((np.array([start + 1], commas.dtype), commas + 1))
        ends = np.concatenate((commas, np.array([end - 1], commas.dtype)))
        if self.body[start] == ord("["):
            if len(commas) == 0 and self._strip(start + 1, end - 1)[0] == end - 1:
                starts = ends = np.zeros(0, commas.dtype)  # []
            return LazyArray(self, start, end, starts, ends)
        colons = direct[chars == ord(":")]
        return self._members(start, end, starts, ends, colons)

    def _members(self, start: int, end: int, starts: np.ndarray, ends: np.ndarray,
                 colons: np.ndarray) -> dict[str, Any]:
        if len(colons) == 0 and self._strip(start + 1, end - 1)[0] == end - 1:
            return {}  # {}
        out: dict[str, Any] = {}
        which = np.searchsorted(colons, starts)  # the first colon of each member
        for k, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            ks, _ = self._strip(s, e)
            c = int(colons[which[k]]) if which[k] < len(colons) else e
            if c >= e:
                if ks == e or self.body[ks] != ord('"'):
                    raise JSONError("Expecting property name enclosed in double quotes", ks)
                raise JSONError("Expecting ':' delimiter", self._strip(s, e)[1])
            key = _loads_small(self.body[ks:c], ks)
            if not isinstance(key, str):
                raise JSONError("Expecting property name enclosed in double quotes", ks)
            vs, ve = self._strip(c + 1, e)
            if vs == ve:
                raise JSONError("Expecting value", vs)
            out[key] = self.value(vs, ve)
        return out
