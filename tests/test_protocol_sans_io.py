"""The protocol package is sans-IO: it must never pull in trio or zmq."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import rbee_mesh.protocol

IO_PREFIXES = ("trio", "zmq")

# Every name of the package, each of its modules imported (most on first use: rbee_mesh/lazy.py).
_LIST_IO_MODULES = f"""
import json, sys
import rbee_mesh.protocol
[getattr(rbee_mesh.protocol, name) for name in rbee_mesh.protocol.__all__]
print(json.dumps(sorted(m for m in sys.modules if m.startswith({IO_PREFIXES!r}))))
"""


def _protocol_sources() -> list[Path]:
    (package_dir,) = rbee_mesh.protocol.__path__
    sources = sorted(Path(package_dir).rglob("*.py"))
    assert sources, f"no sources found under {package_dir}"
    return sources


def test_importing_protocol_in_fresh_interpreter_loads_neither_trio_nor_zmq() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _LIST_IO_MODULES],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing rbee_mesh.protocol loaded I/O modules: {loaded}"


def test_protocol_source_has_no_trio_or_zmq_import_statement() -> None:
    offenders = []
    for path in _protocol_sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            offenders += [
                f"{path.name}:{node.lineno}: {module}"
                for module in modules
                if module.startswith(IO_PREFIXES)
            ]
    assert offenders == []
