"""Declarative config fields: each key's type, range, default and documentation in one row.

A config block is a frozen dataclass whose fields are declared with `key(default, kind, doc)`.
`load_block` checks a JSON object against it and builds the dataclass; `markdown_table`
writes its reference table. Validation and the reference doc therefore come from the same
rows and cannot drift apart. Every problem is a `ConfigError` naming the key, as a path such
as `models[0].sparse_files[1]`, and the config file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from keras_hps.errors import ConfigError

__all__ = [
    "REQUIRED",
    "Block",
    "Bool",
    "Choice",
    "Float",
    "Int",
    "Key",
    "Kind",
    "List",
    "LocalPath",
    "PerTable",
    "Source",
    "Str",
    "config_error",
    "key",
    "load_block",
    "markdown_table",
    "replace_generated",
]

#: The default of a key that must be given.
REQUIRED: Any = dataclasses.MISSING
_ABSENT = object()  # a kind's `absent()` when the dataclass default applies


def config_error(source: str | None, key: str, problem: str) -> ConfigError:
    """The ConfigError for `problem` with `key` (a path like `models[0].sparse_files[1]`) of
    the config file `source` (None: a dict)."""
    return ConfigError(f"{source if source else '<dict config>'}: {key}: {problem}")


def _type_name(value: Any) -> str:
    return type(value).__name__


class Source:
    """Where a config comes from: its file (for messages) and its folder (for relative
    paths)."""

    def __init__(self, source: str | None, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir

    def error(self, key: str, problem: str) -> ConfigError:
        """A ConfigError about `key` of this config."""
        return config_error(self.source, key, problem)

    def warn(self, key: str, value: Any, note: str) -> None:
        """A UserWarning about `key` having `value`."""
        where = self.source if self.source else "<dict config>"
        warnings.warn(f"{where}: {key} {value!r}: {note}", UserWarning, stacklevel=5)


# ----------------------------------------------------------------------------------------------
# kinds of value


class Kind:
    """How one key's JSON value is checked and converted, and how the doc names it."""

    def parse(self, src: Source, key: str, value: Any, built: Mapping[str, Any]) -> Any:
        """The checked value of `key` (`built`: the keys of the same block parsed before)."""
        raise NotImplementedError

    def absent(self, built: Mapping[str, Any]) -> Any:
        """The value when the key is absent, if it depends on other keys of the block."""
        return _ABSENT

    def describe(self) -> str:
        """The type and range, in words, for the reference doc."""
        raise NotImplementedError


class Bool(Kind):
    """true or false."""

    def parse(self, src: Source, key: str, value: Any, built: Mapping[str, Any]) -> bool:
        if isinstance(value, bool):
            return value
        raise src.error(key, f"expected true/false, got {_type_name(value)} {value!r}")

    def describe(self) -> str:
        return "boolean"


class Int(Kind):
    """An integer (a float with an integral value is accepted), at least `minimum`."""

    def __init__(self, minimum: int | None = None) -> None:
        self.minimum = minimum

    def parse(self, src: Source, key: str, value: Any, built: Mapping[str, Any]) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
                value = int(value)
            else:
                raise src.error(key, f"expected an integer, got {_type_name(value)} {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise src.error(key, f"must be >= {self.minimum}, got {value}")
        return value

    def describe(self) -> str:
        return "integer" if self.minimum is None else f"integer >= {self.minimum}"


class Float(Kind):
    """A finite number in [lo, hi] (either bound may be open)."""

    def __init__(self, lo: float | None = None, hi: float | None = None) -> None:
        self.lo = lo
        self.hi = hi

    def parse(self, src: Source, key: str, value: Any, built: Mapping[str, Any]) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise src.error(key, f"expected a number, got {_type_name(value)} {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise src.error(key, f"must be finite, got {value}")
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise src.error(key, f"must be {self._range()}, got {value}")
        return value

    def _range(self) -> str:
        if self.hi is None:
            return f">= {self.lo}"
        if self.lo is None:
            return f"<= {self.hi}"
        return f"in [{self.lo}, {self.hi}]"

    def describe(self) -> str:
        if self.lo is None and self.hi is None:
            return "number"
        return f"number {self._range()}"


class Str(Kind):
    """A string, optionally matching `pattern` as a whole (shown as `pattern_text`)."""

    def __init__(self, pattern: str | None = None, pattern_text: str | None = None) -> None:
        self.pattern = None if pattern is None else re.compile(pattern)
        self.pattern_text = pattern_text or pattern

    def parse(self, src: Source, key: str, value: Any, built: Mapping[str, Any]) -> str:
        if not isinstance(value, str):
            raise src.error(key, f"expected a string, got {_type_name(value)} {value!r}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise src.error(key, f"must match {self.pattern_text}, got {value!r}")
        return value

    def describe(self) -> str:
        return "string" if self.pattern is None else f"string matching `{self.pattern_text}`"


class Choice(Kind):
    """One of a set of names; `values` maps each accepted spelling (aliases included) to the
    value keras-hps keeps. `warn` maps spellings to a note given as a UserWarning; `none` is
    the spelling that JSON null stands for (None: null is an error)."""

    def __init__(self, values: Mapping[str, str] | Sequence[str], noun: str, *,
                 casefold: bool = False, none: str | None = None,
                 warn: Mapping[str, str] | None = None) -> None:
        self.values = dict(values) if isinstance(values, Mapping) else {v: v for v in values}
        self.noun = noun
        self.casefold = casefold
        self.none = none
        self.warn = dict(warn or {})

    def parse(self, src: Source, key: str, value: Any, built: Mapping[str, Any]) -> str:
        if value is None and self.none is not None:
            value = self.none
        name = Str().parse(src, key, value, built)
        if self.casefold:
            name = name.lower()
        if name not in self.values:
            raise src.error(key, f"unknown {self.noun} {value!r}; one of {sorted(self.values)}")
        if name in self.warn:
            src.warn(key, value, self.warn[name])
        return self.values[name]

    def describe(self) -> str:
        groups: dict[str, list[str]] = {}
        for spelling, value in self.values.items():
            groups.setdefault(value, [])
            if spelling != value:
                groups[value].append(spelling)
        parts = [f"`{v}`" + (f" (or {', '.join(f'`{a}`' for a in aliases)})" if aliases else "")
                 for v, aliases in groups.items()]
        return "one of " + ", ".join(parts)


class LocalPath(Kind):
    """A local file or folder; a relative path resolves against the config file's folder."""

    def parse(self, src: Source, key: str, value: Any, built: Mapping[str, Any]) -> str:
        text = Str().parse(src, key, value, built)
        if not text:
            raise src.error(key, "empty path")
        if "://" in text:
            raise src.error(key, f"remote paths are not supported, got {text!r}; "
                                 "copy the table to local disk")
        p = Path(os.path.expanduser(text))
        if not p.is_absolute():
            p = src.base_dir / p
        return str(p)

    def describe(self) -> str:
        return "path"


class List(Kind):
    """A JSON list of `item`s, kept as a tuple; `empty` is the problem when it is empty (None:
    an empty list is fine)."""

    def __init__(self, item: Kind, *, empty: str | None = None) -> None:
        self.item = item
        self.empty = empty

    def parse(self, src: Source, key: str, value: Any, built: Mapping[str, Any]) -> tuple:
        values = _as_list(src, key, value)
        if not values and self.empty:
            raise src.error(key, self.empty)
        return tuple(self.item.parse(src, f"{key}[{i}]", v, built) for i, v in enumerate(values))

    def describe(self) -> str:
        return f"{'non-empty ' if self.empty else ''}list of {_plural(self.item.describe())}"


class PerTable(Kind):
    """A list with one `item` per entry of the block's key `of` (a table list).

    `default(t)` gives table t's value when the key is absent (None: the key is required);
    a shorter list is padded with `pad`; `broadcast`: one number stands for every table;
    `unique`: entries may not repeat."""

    def __init__(self, item: Kind, *, of: str = "sparse_files",
                 default: Callable[[int], Any] | None = None, pad: Any = None,
                 broadcast: bool = False, unique: bool = False) -> None:
        self.item = item
        self.of = of
        self.default = default
        self.pad = pad
        self.broadcast = broadcast
        self.unique = unique

    def parse(self, src: Source, key: str, value: Any, built: Mapping[str, Any]) -> tuple:
        n = len(built[self.of])
        if self.broadcast and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * n
        values = _as_list(src, key, value)
        if self.pad is not None and len(values) < n:
            values += [self.pad] * (n - len(values))
        if len(values) != n:
            raise src.error(key, f"has {len(values)} entries but {self.of} names {n} table(s)")
        out = tuple(self.item.parse(src, f"{key}[{t}]", v, built) for t, v in enumerate(values))
        if self.unique and len(set(out)) != len(out):
            raise src.error(key, f"names repeat: {list(out)}")
        return out

    def absent(self, built: Mapping[str, Any]) -> Any:
        if self.default is None:
            return _ABSENT
        return tuple(self.default(t) for t in range(len(built[self.of])))

    def describe(self) -> str:
        text = f"list, one {self.item.describe()} per table"
        return text + (" (or one number for every table)" if self.broadcast else "")


class Block(Kind):
    """A JSON object checked against the dataclass `cls`; with `null_ok`, JSON null stands
    for the defaults (as an absent key does)."""

    def __init__(self, cls: type, *, null_ok: bool = True) -> None:
        self.cls = cls
        self.null_ok = null_ok

    def parse(self, src: Source, key: str, value: Any, built: Mapping[str, Any]) -> Any:
        if value is None and self.null_ok:
            return self.cls()
        return load_block(src, self.cls, value, key)

    def describe(self) -> str:
        return "object"


def _as_list(src: Source, key: str, value: Any) -> list:
    if not isinstance(value, (list, tuple)):
        raise src.error(key, f"expected a list, got {_type_name(value)} {value!r}")
    return list(value)


def _plural(text: str) -> str:
    head, _, rest = text.partition(" ")
    return f"{head}s {rest}".rstrip() if head in ("integer", "string", "number", "path",
                                                  "boolean", "object") else text


# ----------------------------------------------------------------------------------------------
# keys and blocks


@dataclasses.dataclass(frozen=True)
class Key:
    """One key of a block: its kind, its meaning in keras-hps and how HPS differed."""

    kind: Kind
    doc: str
    hps: str = ""
    ignored: bool = False
    default_text: str | None = None


def key(default: Any, kind: Kind, doc: str, *, hps: str = "", ignored: bool = False,
        default_text: str | None = None) -> Any:
    """A dataclass field declaring one config key: default (REQUIRED for none), kind, what it
    means in keras-hps (`doc`), how HPS differed (`hps`), whether keras-hps ignores it, and
    the default as the doc shows it (`default_text`, else the default in JSON)."""
    meta = {"key": Key(kind, doc, hps, ignored, default_text)}
    return dataclasses.field(default=default, metadata=meta)


def _keys(cls: type) -> dict[str, tuple[dataclasses.Field, Key]]:
    return {f.name: (f, f.metadata["key"]) for f in dataclasses.fields(cls) if "key" in f.metadata}


def load_block(src: Source, cls: type, raw: Any, where: str = "") -> Any:
    """Check the JSON object `raw` (at key path `where`, "" for the top level) against the
    dataclass `cls` and build it: unknown keys, missing required keys, wrong types and values
    out of range are ConfigErrors."""
    if not isinstance(raw, Mapping):
        raise src.error(where or "<top level>", f"expected an object, got {_type_name(raw)}")
    keys = _keys(cls)
    prefix = f"{where}." if where else ""
    for k in raw:
        if k not in keys:
            near = [c for c in sorted(keys) if c.lower() == str(k).lower()]
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise src.error(f"{prefix}{k}", f"unknown key{hint}")
    for name, (f, _) in keys.items():
        if f.default is REQUIRED and name not in raw:
            raise src.error(f"{prefix}{name}", "required key is missing")
    built: dict[str, Any] = {}
    for name, (_, spec) in keys.items():
        if name in raw:
            built[name] = spec.kind.parse(src, f"{prefix}{name}", raw[name], built)
        else:
            value = spec.kind.absent(built)
            if value is not _ABSENT:
                built[name] = value
    return cls(**built)


# ----------------------------------------------------------------------------------------------
# the reference doc


def _default_text(f: dataclasses.Field, spec: Key) -> str:
    if spec.default_text is not None:
        return spec.default_text
    if f.default is REQUIRED:
        return "required"
    if isinstance(spec.kind, Block):
        return "its defaults"
    value = list(f.default) if isinstance(f.default, tuple) else f.default
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def markdown_table(cls: type) -> str:
    """The reference table of a block: one row per key, the keys keras-hps ignores last."""
    rows = ["| key | type | default | meaning in keras-hps |", "|---|---|---|---|"]
    keys = sorted(_keys(cls).items(), key=lambda item: item[1][1].ignored)
    for name, (f, spec) in keys:
        meaning = ("Accepted and ignored. " if spec.ignored else "") + spec.doc
        if spec.hps:
            meaning += f" *HPS:* {spec.hps}"
        rows.append(f"| `{name}` | {_cell(spec.kind.describe())} | {_cell(_default_text(f, spec))}"
                    f" | {_cell(meaning)} |")
    return "\n".join(rows) + "\n"


_REGION = re.compile(r"(<!-- generated: (?P<name>[\w.]+) [^\n]*-->\n)(?P<body>.*?)"
                     r"(<!-- end generated: (?P=name) -->)", re.S)


def replace_generated(text: str, sections: Mapping[str, str]) -> str:
    """`text` with the body of every region `<!-- generated: NAME ... -->` ...
    `<!-- end generated: NAME -->` replaced by `sections[NAME]`. Every section must have a
    region, and every region a section."""
    seen = [m.group("name") for m in _REGION.finditer(text)]
    if sorted(seen) != sorted(sections):
        raise ValueError(f"generated regions {sorted(seen)} differ from sections "
                         f"{sorted(sections)}")
    return _REGION.sub(lambda m: m.group(1) + sections[m.group("name")] + m.group(4), text)
