"""Lazy public names for a package (PEP 562): imported on first attribute access."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any


def lazy_exports(
    package: str, names: dict[str, str], also: Sequence[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package` serving `names` (public name -> module);
    `also` lists the package's eagerly defined public names, for `dir()`.

    A name is imported from its module on first access and then cached in the package, so
    importing the package itself stays cheap.
    """

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted([*names, *also])

    return __getattr__, __dir__
