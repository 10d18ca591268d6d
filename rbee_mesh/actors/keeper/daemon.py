"""Long-running actors as daemons: state directory, pid and info files, start and stop (what a
daemon runs is serving.py's). Every command reads these files: this module imports neither
trio nor logging, and subprocess only to start a daemon.

Each daemon (a queen, a hive) keeps, under the state directory:
``<name>.json`` (pid, endpoint, version, start time; written atomically once it is serving, removed
when it stops) and ``<name>.log`` (its stderr). The state directory is $RBEE_MESH_HOME, else
$XDG_STATE_HOME/rbee-mesh, else ~/.local/state/rbee-mesh.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rbee_mesh import __version__

if TYPE_CHECKING:
    import subprocess


def state_dir() -> Path:
    """Where daemons keep their files; created on first use."""
    home = os.environ.get("RBEE_MESH_HOME")
    if home:
        path = Path(home)
    else:
        xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        path = Path(xdg) / "rbee-mesh"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds this node's key
    return path


@dataclass(frozen=True)
class DaemonInfo:
    name: str
    pid: int
    endpoint: str
    version: str
    started: float
    #: The actor's own name in the mesh (a hive's id), where it has one.
    ident: str = ""
    #: A queen's HTTP API (http://HOST:PORT/v1), when it serves one.
    api: str = ""


def info_path(name: str) -> Path:
    return state_dir() / f"{name}.json"


def log_path(name: str) -> Path:
    return state_dir() / f"{name}.log"


def write_info(info: DaemonInfo) -> None:
    """Atomically record that this process serves `info.endpoint`."""
    path = info_path(info.name)
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(info)))
    os.replace(tmp, path)


@contextmanager
def recorded(
    name: str, endpoint: str, *, ident: str = "", api: str = "", enabled: bool = True
) -> Iterator[None]:
    """While the block runs, the info file says this process serves `endpoint` as `name`."""
    if not enabled:
        yield
        return
    write_info(
        DaemonInfo(
            name=name,
            pid=os.getpid(),
            endpoint=endpoint,
            version=__version__,
            started=time.time(),
            ident=ident,
            api=api,
        )
    )
    try:
        yield
    finally:
        remove_info(name, os.getpid())


def remove_info(name: str, pid: int) -> None:
    """Remove the info file if it is still this process's (a newer daemon may own it)."""
    current = read_info(name, require_alive=False)
    if current is not None and current.pid == pid:
        info_path(name).unlink(missing_ok=True)


def read_info(name: str, *, require_alive: bool = True) -> DaemonInfo | None:
    """The recorded daemon, or None if there is none (or, by default, it is no longer running).

    A stale or corrupt file (a daemon killed with -9, a half-written file) reads as None.
    """
    try:
        raw = json.loads(info_path(name).read_text())
        info = DaemonInfo(**raw)
    except (OSError, ValueError, TypeError):
        return None
    if require_alive and not is_running(info.pid):
        return None
    return info


def is_running(pid: int) -> bool:
    """Whether `pid` is a live rbee-mesh process (not merely a reused pid, not a zombie)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return b"rbee_mesh" in cmdline or b"rbee-mesh" in cmdline


def spawn_detached(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start `python -m rbee_mesh <argv>` in its own session, its output appended to the log."""
    import subprocess

    log = log_path(name)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "rbee_mesh", *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            close_fds=True,
        )


def log_tail(name: str, lines: int = 15) -> str:
    try:
        text = log_path(name).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def stop_process(pid: int, grace_s: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL after `grace_s`. True if it had to be killed."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not is_running(pid):
            return False
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True
