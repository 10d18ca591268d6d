"""Package attributes imported on first use (PEP 562 module `__getattr__`).

Importing any module of a package first runs the package's `__init__`: if that imported every
module, `rbee-mesh --help`, which needs the operation table (`protocol/operations.py`) and
endpoint parsing (`transport/endpoints.py`), would load msgpack, zmq and trio as well. So
`rbee_mesh.protocol` and `rbee_mesh.transport` import their light modules at once, and name the
others in imports under `if TYPE_CHECKING:`, which mypy reads and Python skips. Those imports are
the one list of the lazy names: on the first such name read, `lazy_attributes` reads them from
the package's source (ast, loaded by then with dataclasses' inspect) and imports its module.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def lazy_attributes(package: str) -> Callable[[str], Any]:
    """The `__getattr__` of `package`, for the names its `if TYPE_CHECKING:` block imports: it
    imports that name's module, and keeps the value on the package, so that each name is looked
    up once."""

    @functools.cache
    def homes() -> dict[str, str]:
        source = Path(sys.modules[package].__file__ or "").read_text(encoding="utf-8")
        found: dict[str, str] = {}
        for node in ast.parse(source).body:
            if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
                for imp in node.body:
                    assert isinstance(imp, ast.ImportFrom), "only `from ... import` there"
                    home = "." * imp.level + (imp.module or "")
                    module = importlib.util.resolve_name(home, package)
                    found |= {alias.name: module for alias in imp.names}
        return found

    def __getattr__(name: str) -> Any:
        module = homes().get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
