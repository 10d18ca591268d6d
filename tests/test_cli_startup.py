"""`rbee-mesh` imports what a command needs when it needs it (issue 21, item 5), proved by what a
fresh interpreter has imported once a command is done, not by timing it (the timing is
benchmarks/cli_startup.py's). And the lazy package attributes that make it so
(`rbee_mesh/lazy.py`) name what mypy reads."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clitools import Mesh, free_port

#: Run `rbee-mesh ARGS` as its console script does, then print its exit code and every module
#: imported by then.
SCRIPT = """
import json, sys
from rbee_mesh.actors.keeper.cli import run
try:
    run(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"exit": code, "modules": sorted(sys.modules)}))
"""

#: What a command that only answers (`--version`, `--help`) needs none of.
HEAVY = (
    "zmq", "trio", "msgpack", "msgspec", "hypercorn", "huggingface_hub", "llama_cpp",
    "ctransformers", "numpy", "gguf", "jinja2",
)  # fmt: skip

#: What a command that talks to a queen needs none of: the hub client, the backends, the HTTP
#: server, the actors a queen or a hive is made of, asyncio (pyzmq's auth and monitor modules
#: import it; a keeper uses neither), and msgspec (the protocol's checks in C, for classes that
#: have had C_PATH_AFTER instances: a command builds a few).
NOT_FOR_A_KEEPER = (
    "huggingface_hub", "llama_cpp", "ctransformers", "numpy", "gguf", "jinja2", "hypercorn",
    "asyncio", "rbee_mesh.actors.hive", "rbee_mesh.actors.queen", "rbee_mesh.actors.worker",
    "rbee_mesh.actors.mesh", "rbee_mesh.actors.jobserver", "rbee_mesh.inference", "msgspec",
)  # fmt: skip


def imported(mesh: Mesh, *args: str) -> tuple[int, set[str]]:
    """The exit code of `rbee-mesh ARGS` in a fresh interpreter, and the modules imported."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args],
        env=mesh.env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    end = json.loads(done.stdout.splitlines()[-1])
    return end["exit"], set(end["modules"])


def loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """Which of `names` (packages, with their modules) are among `modules`."""
    return sorted(n for n in names if any(m == n or m.startswith(n + ".") for m in modules))


@pytest.mark.parametrize(
    "args", [["--version"], ["--help"], ["hive", "--help"], ["infer", "--help"]], ids=" ".join
)
def test_a_command_that_only_answers_imports_nothing_heavy(tmp_path: Path, args: list[str]) -> None:
    code, modules = imported(Mesh(tmp_path / "state"), *args)
    assert code == 0 and "click" in modules
    assert loaded(modules, HEAVY) == []


def test_version_does_not_make_the_operation_commands(tmp_path: Path) -> None:
    code, modules = imported(Mesh(tmp_path / "state"), "--version")
    assert code == 0 and "rbee_mesh.protocol.operations" not in modules


def test_status_imports_what_talking_to_a_queen_needs_and_no_more(tmp_path: Path) -> None:
    # Nothing listens there: the job client gives up after its accept timeout (3 s), exit 3.
    mesh = Mesh(tmp_path / "state")
    code, modules = imported(mesh, "--queen", f"tcp://127.0.0.1:{free_port()}", "status")
    assert code == 3  # unreachable: it did try
    assert {"zmq", "trio", "msgpack", "rbee_mesh.actors.jobclient"} <= modules
    assert loaded(modules, NOT_FOR_A_KEEPER) == []


@pytest.mark.parametrize("package", ["rbee_mesh.protocol", "rbee_mesh.transport"])
def test_lazy_names_are_the_typed_ones_and_resolve_to_them(package: str) -> None:
    module = importlib.import_module(package)
    source = Path(module.__file__ or "").read_text()
    eager: set[str] = set()  # what the package imports at once
    typed = {}  # what it imports for mypy only, and from where: lazy_attributes' names
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom):
            eager |= {alias.name for alias in node.names}
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom)
                home = importlib.import_module("." * imp.level + (imp.module or ""), package)
                typed |= {alias.name: home for alias in imp.names}
    assert set(module.__all__) == eager - {"TYPE_CHECKING", "lazy_attributes"} | set(typed)
    for name, home in typed.items():
        assert getattr(module, name) is getattr(home, name), name
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018
