"""rbee-mesh on another machine, over SSH: `hive install HOST` and `hive uninstall HOST`.

Where: a virtual environment in the remote user's data directory, `REMOTE_DIR/venv` (no root
needed), with the wheels copied over beside it (`REMOTE_DIR/wheels`). What: this machine's own
rbee-mesh, as a wheel built from its source, so that both ends run the same code whatever the
version string says; its dependencies come from the remote's package index, or with `offline`
from wheels fetched here and copied over (the remote then needs this machine's platform and
Python minor version, or pip refuses them, and says so). Installing again upgrades in place.
Uninstalling removes REMOTE_DIR and nothing else: a hive's state (its models) stays where the
hive keeps it.

Each step is reported to `say` as it starts; a failure is an `InstallError` (no Python 3.11 on
the remote, or a step that failed, with the last lines of what it printed) or the SshError of
the connection.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import trio

from rbee_mesh import __version__
from rbee_mesh.actors.keeper.remote import Host, Ran, run

#: Where rbee-mesh goes on the remote: a shell expression, expanded there.
REMOTE_DIR = '"${XDG_DATA_HOME:-$HOME/.local/share}/rbee-mesh"'
#: The oldest Python rbee-mesh runs on (pyproject.toml's requires-python).
PYTHON_MIN = (3, 11)
#: How long a step may take: pip installing numpy and the rest from an index can take minutes.
STEP_TIMEOUT_S = 900.0
#: The lines of a failed step's output that a person is shown.
TAIL_LINES = 12

#: Told of each step as it starts: (the step's name, a sentence).
Say = Callable[[str, str], None]


class InstallFailure(StrEnum):
    NO_PYTHON = "no-python"
    FAILED = "install-failed"


class InstallError(Exception):
    def __init__(self, failure: InstallFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure
        self.message = message


@dataclass(frozen=True)
class Installed:
    host: str
    python: str
    #: Where it went there, and what its `rbee-mesh --version` says.
    path: str
    version: str


async def install(host: Host, *, offline: bool, say: Say) -> Installed:
    say("connect", f"connecting to {host}")
    python, where = await _python(host)
    say("python", f"{host} has Python {python}; rbee-mesh goes to {where}")
    with tempfile.TemporaryDirectory(prefix="rbee-mesh-wheels-") as scratch:
        wheels = Path(scratch)
        say("build", f"building the wheel of this rbee-mesh ({__version__})")
        wheel = await trio.to_thread.run_sync(_build_wheel, wheels)
        if offline:
            say("download", "fetching the wheels of its dependencies, here")
            await trio.to_thread.run_sync(_download_dependencies, wheel, wheels)
        count, packed = await trio.to_thread.run_sync(_tar, wheels)
        say("copy", f"copying {count} wheel(s), {len(packed) / 1e6:.1f} MB, to {host}")
        await _step(
            host, "copy", f'd={REMOTE_DIR}; rm -rf "$d/wheels" && mkdir -p "$d/wheels" && '
            'tar -C "$d/wheels" -xf -', stdin=packed,
        )  # fmt: skip
    say("venv", f"making its virtual environment, {where}/venv, unless it is there")
    await _step(
        host, "python3 -m venv",
        f'd={REMOTE_DIR}; [ -x "$d/venv/bin/python" ] || python3 -m venv "$d/venv"',
        hint="on Debian and Ubuntu the venv module is a package of its own: "
        "`apt install python3-venv` there",
    )  # fmt: skip
    index = f"{host}'s package index" if not offline else "the wheels copied over"
    say("install", f"installing rbee-mesh and its dependencies from {index}")
    sources = '--no-index --find-links "$d/wheels"' if offline else ""
    pip = '"$d/venv/bin/python" -m pip install --disable-pip-version-check --quiet'
    await _step(
        host, "pip install",
        # The second pip replaces rbee-mesh itself even where the version string is the same.
        f'd={REMOTE_DIR}; {pip} {sources} "$d/wheels/{wheel.name}" && '
        f'{pip} --no-deps --force-reinstall "$d/wheels/{wheel.name}"',
    )  # fmt: skip
    say("verify", "asking the installed rbee-mesh its version")
    ran = await _step(
        host, "rbee-mesh --version", f'd={REMOTE_DIR}; "$d/venv/bin/rbee-mesh" --version'
    )
    version = ran.stdout.strip()
    if version != f"rbee-mesh, version {__version__}":
        raise InstallError(
            InstallFailure.FAILED,
            f"the rbee-mesh installed on {host} says {version!r}, this one is {__version__}",
        )
    return Installed(str(host), python, where, version)


async def uninstall(host: Host, *, say: Say) -> bool:
    """Remove rbee-mesh from `host`; whether there was one to remove."""
    say("connect", f"connecting to {host}")
    ran = await _step(
        host, "remove", f'd={REMOTE_DIR}; if [ -d "$d" ]; then rm -rf "$d" && echo removed; fi'
    )
    return ran.stdout.strip() == "removed"


async def _python(host: Host) -> tuple[str, str]:
    """The version of the remote's python3, and where rbee-mesh goes there; InstallError if it
    has no python3, or one too old."""
    probe = (
        f"echo {REMOTE_DIR}; command -v python3 >/dev/null 2>&1 || exit 0; "
        "python3 -c 'import sys; print(\"%d.%d.%d\" % sys.version_info[:3])'"
    )
    ran = await run(host, ["sh", "-c", probe], timeout_s=60)
    where, _, version = ran.stdout.strip().partition("\n")
    wanted = ".".join(map(str, PYTHON_MIN))
    if ran.status != 0 or not version:
        raise InstallError(
            InstallFailure.NO_PYTHON,
            f"{host} has no python3 on its PATH; rbee-mesh needs Python {wanted} or newer there",
        )
    if tuple(int(part) for part in version.split(".")[:2]) < PYTHON_MIN:
        raise InstallError(
            InstallFailure.NO_PYTHON,
            f"{host}'s python3 is {version}; rbee-mesh needs Python {wanted} or newer there",
        )
    return version, where


async def _step(host: Host, what: str, script: str, *, stdin: bytes = b"", hint: str = "") -> Ran:
    """Run `script` with sh on the remote; InstallError with its output's last lines if it
    fails."""
    ran = await run(host, ["sh", "-c", script], stdin=stdin, timeout_s=STEP_TIMEOUT_S)
    if ran.status != 0:
        lines = (ran.stderr.strip() or ran.stdout.strip()).splitlines()[-TAIL_LINES:]
        said = "\n  ".join(lines) or "(it printed nothing)"
        advice = f"\n{hint}" if hint else ""
        raise InstallError(
            InstallFailure.FAILED,
            f"{what} failed on {host} (exit status {ran.status}):\n  {said}{advice}",
        )
    return ran


def _build_wheel(into: Path) -> Path:
    """This rbee-mesh's wheel, built from its source (the directory its package lives in)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").is_file():
        raise InstallError(
            InstallFailure.FAILED,
            f"this rbee-mesh ({root}) is not a source checkout: there is no source to build "
            "the wheel that goes to the remote from",
        )
    _local("building the wheel", [sys.executable, "-m", "pip", "wheel", "--no-deps",
           "--quiet", "--wheel-dir", str(into), str(root)])  # fmt: skip
    [wheel] = into.glob("rbee_mesh-*.whl")
    return wheel


def _download_dependencies(wheel: Path, into: Path) -> None:
    _local(
        "fetching the dependencies' wheels",
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
         "--dest", str(into), str(wheel)],
    )  # fmt: skip


def _local(what: str, argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip()).splitlines()[-TAIL_LINES:]
        raise InstallError(InstallFailure.FAILED, f"{what} failed here:\n  " + "\n  ".join(lines))


def _tar(directory: Path) -> tuple[int, bytes]:
    """The files in `directory` as one uncompressed tar (wheels are zips already), and how many."""
    files = sorted(directory.iterdir())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for file in files:
            archive.add(file, arcname=file.name)
    return len(files), buffer.getvalue()
