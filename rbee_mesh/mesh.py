"""Running actors: a queen (with static hives, or an integrated local hive) and a hive.

The same `Queen` and `Hive` run in every transport mode; only the endpoints differ. The integrated
mode binds in-memory endpoints (``mem://``), so a keeper, a queen and a hive in one process talk
with no sockets at all, through the same frames and the same code paths. Workers are always
processes of their own.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

from rbee_mesh.actors.hive.hive import Hive, HiveConfig, running_hive
from rbee_mesh.actors.jobserver import ServerConfig
from rbee_mesh.actors.keeper import daemon
from rbee_mesh.actors.queen.config import load_config, peer_endpoint
from rbee_mesh.actors.queen.queen import Queen
from rbee_mesh.actors.runtime import single_errors
from rbee_mesh.transport import local_endpoint_for, open_listener, open_subscriber

log = logging.getLogger("rbee_mesh.mesh")

DEFAULT_QUEEN_PORT = 7833
DEFAULT_QUEEN_BIND = f"tcp://127.0.0.1:{DEFAULT_QUEEN_PORT}"

_names = itertools.count(1)


def memory_endpoint(role: str) -> str:
    """A fresh in-memory endpoint name for `role` in this process."""
    return f"mem://{role}-{os.getpid()}-{next(_names)}"


@asynccontextmanager
async def running_queen(
    endpoint: str,
    config: ServerConfig | None = None,
    *,
    hives: Sequence[str] = (),
    local_hive: HiveConfig | None = None,
    max_queued: int = 64,
    discover: bool = False,
) -> AsyncIterator[Queen]:
    """A queen serving on `endpoint` for the duration of the block, stopped gracefully after.

    `hives`: control endpoints of hives to manage. `local_hive`: also run this hive in the same
    process, linked over the in-memory transport (the integrated mode). `max_queued`: inference
    jobs that may wait for a worker at once.
    """
    with single_errors():
        async with AsyncExitStack() as stack:
            listener = await stack.enter_async_context(await open_listener(endpoint))
            subscriber = await stack.enter_async_context(await open_subscriber())
            local: Hive | None = None
            if local_hive is not None:
                local = await stack.enter_async_context(running_hive(local_hive))
            nursery = await stack.enter_async_context(trio.open_nursery())
            queen = Queen(listener, subscriber, config, max_queued=max_queued, discover=discover)
            await nursery.start(queen.run)
            stack.push_async_callback(_stop_shielded, queen)
            if local is not None:
                link = await queen.add_hive(local.server.listener.endpoint, source="local")
                # In-process, the first answer takes milliseconds: start with the hive live.
                with trio.move_on_after(5):
                    await link.heard.wait()
            for hive in hives:
                await queen.add_hive(hive, source="static")
            yield queen


async def _stop_shielded(queen: Queen) -> None:
    with trio.CancelScope(shield=True):
        await queen.stop()


def local_hive_config(state_dir: Path, config: ServerConfig | None = None) -> HiveConfig:
    """The hive of the integrated mode: in-memory control and heartbeats."""
    return HiveConfig(
        state_dir=state_dir,
        control=memory_endpoint("local-hive"),
        heartbeats=memory_endpoint("local-hive-heartbeats"),
        server=config or ServerConfig(),
    )


@asynccontextmanager
async def integrated_mesh(
    state_dir: Path, config: ServerConfig | None = None
) -> AsyncIterator[Queen]:
    """A whole mesh inside this process: a queen and a local hive over the in-memory transport."""
    hive = local_hive_config(state_dir, config)
    async with running_queen(memory_endpoint("queen"), config, local_hive=hive) as queen:
        yield queen


@asynccontextmanager
async def embedded_mesh(state_dir: Path, hive_endpoint: str | None) -> AsyncIterator[Queen]:
    """A queen for one command: with the hive daemon at `hive_endpoint` if one runs on this
    machine, else with this machine's hive in-process (over the user's own catalog)."""
    if hive_endpoint is None:
        async with integrated_mesh(state_dir) as queen:
            yield queen
        return
    endpoint = local_endpoint_for(hive_endpoint)
    async with running_queen(memory_endpoint("queen"), hives=[endpoint]) as queen:
        with trio.move_on_after(5):  # a hive that does not answer shows up as such in the job
            await queen.hives.links[0].heard.wait()
        yield queen


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
    local_hive: bool = False,
    discover: bool = True,
) -> None:
    """`queen start --foreground`: serve on `bind` until SIGTERM or SIGINT, then stop gracefully.

    With `record`, the daemon info file says where this queen listens while it does.
    """
    hive = local_hive_config(daemon.state_dir()) if local_hive else None
    peers = [peer_endpoint(h) for h in hives]
    async with running_queen(bind, hives=peers, local_hive=hive, discover=discover) as queen:
        for endpoint in load_config(daemon.state_dir()).peers:
            if endpoint not in peers:
                await queen.add_hive(endpoint, source="config")
        # What is made by now lives as long as the queen (its links, their sockets and tasks):
        # the collector need not walk it again. At 1,000 hives each full collection walked it
        # for 100-165 ms, during which the queen answered nothing.
        gc.freeze()
        with daemon.recorded("queen", queen.listener.endpoint, enabled=record):
            await until_signalled()


async def serve_hive_forever(config: HiveConfig, record: bool) -> None:
    """`hive start --foreground`: serve until SIGTERM or SIGINT; workers are stopped on the way."""
    async with running_hive(config) as hive:
        endpoint = hive.server.listener.endpoint
        with daemon.recorded("hive", endpoint, ident=hive.id, enabled=record):
            await until_signalled()
