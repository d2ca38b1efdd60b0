"""Lazy package faces: a face lists what it exports; each name is imported on first use.

A face (``__init__.py``) that imported all of its rooms eagerly would load torch for callers
that need one torch-free fact (``edgetune --help``, ``edgetune.config``, ONNX-only inference),
so faces declare ``{module: names}`` and bind ``__getattr__``/``__dir__``/``__all__`` from
`lazy_face` (the pattern of SPEC 1 / ``lazy_loader``). Modules inside a package import their
siblings directly, never through their own face.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_face(
    package: str, exports: Mapping[str, tuple[str, ...]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package`` exporting ``{module: names}``."""
    owner = {name: module for module, names in exports.items() for name in names}
    if len(owner) != sum(len(names) for names in exports.values()):
        raise ValueError(f"{package}: a name is exported by two modules")

    def __getattr__(name: str) -> Any:
        module = owner.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(owner)

    return __getattr__, __dir__, sorted(owner)
