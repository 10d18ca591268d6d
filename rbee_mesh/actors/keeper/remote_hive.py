"""A hive on another machine, over SSH: `hive install`, `hive uninstall`, and `hive start`,
`hive stop` and `hive status` with `--ssh HOST`.

Where: a virtual environment in the remote user's data directory, `REMOTE_DIR/venv` (no root
needed), with the wheels copied over beside it (`REMOTE_DIR/wheels`). What: this machine's own
rbee-mesh, as a wheel built from its source, so that both ends run the same code whatever the
version string says; its dependencies come from the remote's package index, or with `offline`
from wheels fetched here and copied over (the remote then needs this machine's platform and
Python minor version, or pip refuses them, and says so). Installing again upgrades in place.
Uninstalling removes REMOTE_DIR and nothing else: a hive's state (its models) stays where the
hive keeps it.

Starting runs the installed rbee-mesh's own `hive start` there (a daemon that outlives the SSH
session: a systemd user unit where a user manager runs that outlives the user's sessions, as
`--service auto` says, else a detached process), joined to this machine's queen with a join token
that this command asks the queen for and passes to it over the SSH connection, on its standard
input: the secret that makes the queen trust the hive (and the hive the queen) travels only inside
the authenticated channel, and the person runs no pairing step. The token names the queen at the
address the remote sees this machine at (the SSH connection's own). Stopping and asking run `hive
stop` and `hive status` there.

Each step is reported to `say` as it starts; a failure is a `RemoteHiveError` (no Python 3.11
on the remote, rbee-mesh not installed there, its port in use, or a step that failed, with the
last lines of what it printed) or the SshError of the connection.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

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


class HiveFailure(StrEnum):
    NO_PYTHON = "no-python"
    NOT_INSTALLED = "not-installed"
    PORT_IN_USE = "port-in-use"
    FAILED = "step-failed"


class RemoteHiveError(Exception):
    def __init__(self, failure: HiveFailure, message: str) -> None:
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
        raise RemoteHiveError(
            HiveFailure.FAILED,
            f"the rbee-mesh installed on {host} says {version!r}, this one is {__version__}",
        )
    return Installed(str(host), python, where, version)


async def uninstall(host: Host, *, say: Say) -> bool:
    """Remove rbee-mesh from `host`, its hive stopped first if it runs; whether there was one
    to remove."""
    say("connect", f"connecting to {host}")
    ran = await _step(
        host, "remove",
        f'd={REMOTE_DIR}; [ -d "$d" ] || exit 0; '
        '[ -x "$d/venv/bin/rbee-mesh" ] && "$d/venv/bin/rbee-mesh" hive stop >/dev/null; '
        'rm -rf "$d" && echo removed',
    )  # fmt: skip
    return ran.stdout.strip() == "removed"


@dataclass(frozen=True)
class Started:
    host: str
    #: The hive's name, where it serves (as the remote says it), and its process there.
    hive: str
    endpoint: str
    pid: int
    #: The queen's address as the remote reaches it (what the join token named).
    queen_address: str
    #: How it runs there: "systemd" (a user unit) or "daemon"; and, for a daemon, why no unit.
    service: str
    not_systemd_because: str | None


async def start(
    host: Host,
    hive_args: list[str],
    *,
    invite: Callable[[str], Awaitable[str]],
    say: Say,
) -> Started:
    """Start the hive on `host` (`hive start` there with `hive_args`), joined to the queen that
    `invite(address)` asks for a join token naming it at `address`."""
    say("connect", f"connecting to {host}")
    look = 'echo "${SSH_CONNECTION%% *}"; [ -x "$d/venv/bin/rbee-mesh" ] && echo ok'
    ran = await _step(host, "the look at rbee-mesh", f"d={REMOTE_DIR}; {look}", allowed=(1,))
    address, _, installed = ran.stdout.strip().partition("\n")
    _require_installed(host, installed)
    say(
        "invite",
        f"asking this machine's queen for a join token, for {host} to reach it at {address}",
    )
    token = await invite(address)
    say("start", f"starting the hive on {host}, joined to this queen")
    starting = f'"$d/venv/bin/rbee-mesh" --json hive start --join - {shlex.join(hive_args)}'
    token_line = f"{token}\n".encode()
    ran = await _step(host, "hive start", f"d={REMOTE_DIR}; {starting}", stdin=token_line)
    events = _json_lines(ran.stdout)
    hive = next((e for e in events if e.get("event") == "hive"), None)
    joined = next((e for e in events if e.get("event") == "joined"), None)
    if hive is None or joined is None:
        raise RemoteHiveError(HiveFailure.FAILED, f"hive start on {host} said: {ran.stdout[-500:]}")
    return Started(
        str(host), str(joined["name"]), str(hive["endpoint"]), int(hive["pid"]), address,
        str(hive.get("service", "daemon")), hive.get("not_systemd_because"),
    )  # fmt: skip


async def stop(host: Host, *, say: Say) -> bool:
    """Stop the hive on `host`; whether one was running."""
    say("connect", f"connecting to {host}")
    ran = await _step(
        host, "hive stop", f'd={REMOTE_DIR}; [ -x "$d/venv/bin/rbee-mesh" ] || exit 9; '
        '"$d/venv/bin/rbee-mesh" --json hive stop', allowed=(9,),
    )  # fmt: skip
    _require_installed(host, "ok" if ran.status != 9 else "")
    return any(e.get("state") == "stopped" and e.get("pid") for e in _json_lines(ran.stdout))


async def status(host: Host, *, say: Say) -> dict[str, Any]:
    """What runs on `host`: {"host", "version" (None: not installed), "running", and where
    it runs: "hive" (its status, as `hive status` there says it)}."""
    say("connect", f"connecting to {host}")
    ran = await _step(
        host, "hive status",
        f'd={REMOTE_DIR}; [ -x "$d/venv/bin/rbee-mesh" ] || exit 9; "$d/venv/bin/rbee-mesh" '
        '--version; "$d/venv/bin/rbee-mesh" --json hive status',
        allowed=(9, 3),
    )  # fmt: skip
    if ran.status == 9:
        return {"host": str(host), "version": None, "running": False}
    version, _, rest = ran.stdout.strip().partition("\n")
    answers = _json_lines(rest)
    result = next((a["result"] for a in answers if isinstance(a.get("result"), dict)), None)
    return {"host": str(host), "version": version, "running": ran.status == 0, "hive": result}


def _require_installed(host: Host, said: str) -> None:
    if said.strip() != "ok":
        raise RemoteHiveError(
            HiveFailure.NOT_INSTALLED,
            f"rbee-mesh is not installed on {host}: `rbee-mesh hive install {host}` first",
        )


def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                out.append(value)
    return out


async def _python(host: Host) -> tuple[str, str]:
    """The version of the remote's python3, and where rbee-mesh goes there; RemoteHiveError if it
    has no python3, or one too old."""
    probe = (
        f"echo {REMOTE_DIR}; command -v python3 >/dev/null 2>&1 || exit 0; "
        "python3 -c 'import sys; print(\"%d.%d.%d\" % sys.version_info[:3])'"
    )
    ran = await run(host, ["sh", "-c", probe], timeout_s=60)
    where, _, version = ran.stdout.strip().partition("\n")
    wanted = ".".join(map(str, PYTHON_MIN))
    if ran.status != 0 or not version:
        raise RemoteHiveError(
            HiveFailure.NO_PYTHON,
            f"{host} has no python3 on its PATH; rbee-mesh needs Python {wanted} or newer there",
        )
    if tuple(int(part) for part in version.split(".")[:2]) < PYTHON_MIN:
        raise RemoteHiveError(
            HiveFailure.NO_PYTHON,
            f"{host}'s python3 is {version}; rbee-mesh needs Python {wanted} or newer there",
        )
    return version, where


async def _step(
    host: Host,
    what: str,
    script: str,
    *,
    stdin: bytes = b"",
    hint: str = "",
    allowed: tuple[int, ...] = (),
) -> Ran:
    """Run `script` with sh on the remote; RemoteHiveError with its output's last lines if it
    fails (exits with a status other than 0 and `allowed`)."""
    ran = await run(host, ["sh", "-c", script], stdin=stdin, timeout_s=STEP_TIMEOUT_S)
    if ran.status != 0 and ran.status not in allowed:
        output = f"{ran.stderr.strip()}\n{ran.stdout.strip()}".strip()
        advice = f"\n{hint}" if hint else ""
        failure = HiveFailure.PORT_IN_USE if "in use" in output else HiveFailure.FAILED
        raise RemoteHiveError(
            failure,
            f"{what} failed on {host} (exit status {ran.status}):\n  {_tail(output)}{advice}",
        )
    return ran


def _build_wheel(into: Path) -> Path:
    """This rbee-mesh's wheel, built from its source (the directory its package lives in)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").is_file():
        raise RemoteHiveError(
            HiveFailure.FAILED,
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
        output = done.stderr.strip() or done.stdout.strip()
        raise RemoteHiveError(HiveFailure.FAILED, f"{what} failed here:\n  {_tail(output)}")


def _tail(output: str) -> str:
    """The last TAIL_LINES lines of what a step printed, indented under its message."""
    return "\n  ".join(output.splitlines()[-TAIL_LINES:]) or "(it printed nothing)"


def _tar(directory: Path) -> tuple[int, bytes]:
    """The files in `directory` as one uncompressed tar (wheels are zips already), and how many."""
    files = sorted(directory.iterdir())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for file in files:
            archive.add(file, arcname=file.name)
    return len(files), buffer.getvalue()
