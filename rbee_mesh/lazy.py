"""Package attributes imported on first use (PEP 562 module `__getattr__`).

Importing any module of a package first runs the package's `__init__`: if that imported every
module, `rbee-mesh --help`, which needs the operation table (`protocol/operations.py`) and
endpoint parsing (`transport/endpoints.py`), would load msgpack, zmq and trio as well. So
`rbee_mesh.protocol` and `rbee_mesh.transport` import their light modules at once and the others
when one of their names is first read. mypy reads the same names from imports under
`if TYPE_CHECKING:`; tests/test_cli_startup.py checks that the two lists agree.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """The `__getattr__` of `package`, for the names (separated by spaces) that `homes` lists
    under the module that holds them (relative to the package): it imports that module, and
    keeps the value on the package, so that each name is looked up once."""
    home = {name: module for module, names in homes.items() for name in names.split()}

    def __getattr__(name: str) -> Any:
        module = home.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
