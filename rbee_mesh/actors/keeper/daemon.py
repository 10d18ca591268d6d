"""Long-running actors as daemons: state directory, pid and info files, start, stop, and what a
daemon runs in the foreground (`queen start --foreground`, `hive start --foreground`).

Each daemon (a queen, a hive) keeps, under the state directory:
``<name>.json`` (pid, endpoint, version, start time; written atomically once it is serving, removed
when it stops) and ``<name>.log`` (its stderr). The state directory is $RBEE_MESH_HOME, else
$XDG_STATE_HOME/rbee-mesh, else ~/.local/state/rbee-mesh.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from rbee_mesh import __version__
from rbee_mesh.protocol.constants import DEFAULT_API_BIND, HEARTBEAT_S

if TYPE_CHECKING:  # the actors are imported by the daemon that runs them, not by every command
    from rbee_mesh.actors.hive.hive import HiveConfig

log = logging.getLogger("rbee_mesh.daemon")


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


async def until_signalled() -> None:
    """Return on SIGTERM or SIGINT: how a foreground daemon waits to be stopped."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s; stopping", signal.Signals(signum).name)
            return


async def serve_queen_forever(
    bind: str,
    record: bool,
    hives: Sequence[str] = (),
    integrated: bool = False,
    discover: bool = True,
    heartbeat_s: float = HEARTBEAT_S,
    api: str | None = DEFAULT_API_BIND,
) -> None:
    """`queen start --foreground`: serve on `bind` (and its HTTP API on `api`, HOST:PORT,
    unless None) until SIGTERM or SIGINT, then stop gracefully.

    With `record`, the daemon info file says where this queen listens while it does.
    """
    from rbee_mesh.actors.jobserver import ServerConfig
    from rbee_mesh.actors.mesh import integrated_hive_config, running_queen
    from rbee_mesh.actors.queen.api import serving_api  # HTTP: in the queen's process only
    from rbee_mesh.actors.queen.config import load_config, peer_spec
    from rbee_mesh.actors.trust import Trust

    config = ServerConfig(heartbeat_s=heartbeat_s)
    trust = Trust.load(state_dir())
    hive = integrated_hive_config(state_dir(), config, trust) if integrated else None
    peers = [peer_spec(h) for h in hives]
    async with running_queen(
        bind, config, hives=peers, integrated_hive=hive, discover=discover, trust=trust
    ) as queen:
        for endpoint, key in load_config(state_dir()).peers:
            if endpoint not in (p[0] for p in peers):
                await queen.add_hive(endpoint, source="config", key=key)
        # What is made by now lives as long as the queen (its links, their sockets and tasks):
        # the collector need not walk it again. At 1,000 hives each full collection walked it
        # for 100-165 ms, during which the queen answered nothing.
        gc.freeze()
        async with AsyncExitStack() as stack:
            url = "" if api is None else await stack.enter_async_context(serving_api(queen, api))
            with recorded("queen", queen.listener.endpoint, api=url, enabled=record):
                await until_signalled()


async def serve_hive_forever(config: HiveConfig, record: bool) -> None:
    """`hive start --foreground`: serve until SIGTERM or SIGINT; workers are stopped on the way."""
    from rbee_mesh.actors.hive.hive import running_hive

    async with running_hive(config) as hive:
        endpoint = hive.server.listener.endpoint
        with recorded("hive", endpoint, ident=hive.id, enabled=record):
            await until_signalled()
