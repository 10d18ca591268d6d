"""Composing actors into a mesh: a queen (with its hives), a hive, or both in one process.

The same `Queen` and `Hive` run in every transport mode; only the endpoints differ. The
**integrated** mode runs the queen and this machine's hive in one process over the in-memory
transport (``mem://``), so a keeper, a queen and a hive in one process talk with no sockets at
all, through the same frames and the same code paths. Workers are always processes of their own.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path

import trio

from rbee_mesh.actors.hive.hive import Hive, HiveConfig, running_hive
from rbee_mesh.actors.jobserver import ServerConfig
from rbee_mesh.actors.queen.queen import Queen
from rbee_mesh.actors.runtime import single_errors
from rbee_mesh.actors.trust import Trust
from rbee_mesh.protocol import Actor
from rbee_mesh.transport import (
    PUBSUB_OPTIONS,
    SocketOptions,
    local_endpoint_for,
    open_listener,
    open_subscriber,
)

_names = itertools.count(1)


def memory_endpoint(role: str) -> str:
    """A fresh in-memory endpoint name for `role` in this process."""
    return f"mem://{role}-{os.getpid()}-{next(_names)}"


@asynccontextmanager
async def running_queen(
    endpoint: str,
    config: ServerConfig | None = None,
    *,
    hives: Sequence[str | tuple[str, str]] = (),
    integrated_hive: HiveConfig | None = None,
    max_queued: int = 64,
    discover: bool = False,
    trust: Trust | None = None,
    journal: Path | None = None,
) -> AsyncIterator[Queen]:
    """A queen serving on `endpoint` for the duration of the block, stopped gracefully after.

    `hives`: control endpoints of hives to manage (`(endpoint, key)` pins a key; an endpoint
    alone takes the one trusted there, else this node's). `integrated_hive`: also run this hive
    in the same process, linked over the in-memory transport (the integrated mode).
    `max_queued`: inference jobs that may wait for a worker at once. `trust`: this node's keys
    and whom it trusts (default: this process's node). `journal`: where its finished jobs are
    remembered across restarts (none: in memory only).
    """
    trust = trust or Trust.for_process()
    listening = SocketOptions(curve=trust.server_keys(Actor.QUEEN))
    subscribing = replace(PUBSUB_OPTIONS, curve=trust.client_keys())
    with single_errors():
        async with AsyncExitStack() as stack:
            listener = await stack.enter_async_context(
                await open_listener(endpoint, options=listening)
            )
            subscriber = await stack.enter_async_context(await open_subscriber(options=subscribing))
            local: Hive | None = None
            if integrated_hive is not None:
                local = await stack.enter_async_context(running_hive(integrated_hive))
            nursery = await stack.enter_async_context(trio.open_nursery())
            queen = Queen(
                listener, subscriber, config, max_queued=max_queued, discover=discover,
                trust=trust, journal=journal,
            )  # fmt: skip
            await nursery.start(queen.run)
            stack.push_async_callback(_stop_shielded, queen)
            if local is not None:
                link = await queen.add_hive(local.server.listener.endpoint, source="integrated")
                # In-process, the first answer takes milliseconds: start with the hive live.
                with trio.move_on_after(5):
                    await link.client.answered.wait()
            for hive in hives:
                hive_endpoint, key = hive if isinstance(hive, tuple) else (hive, "")
                await queen.add_hive(hive_endpoint, source="static", key=key)
            yield queen


async def _stop_shielded(queen: Queen) -> None:
    with trio.CancelScope(shield=True):
        await queen.stop()


def integrated_hive_config(
    state_dir: Path, config: ServerConfig | None = None, trust: Trust | None = None
) -> HiveConfig:
    """This machine's hive in the integrated mode: in-memory control and heartbeats."""
    return HiveConfig(
        state_dir=state_dir,
        control=memory_endpoint("integrated-hive"),
        heartbeats=memory_endpoint("integrated-hive-heartbeats"),
        server=config or ServerConfig(),
        trust=trust or Trust.for_process(),
    )


@asynccontextmanager
async def integrated_mesh(
    state_dir: Path, config: ServerConfig | None = None, trust: Trust | None = None
) -> AsyncIterator[Queen]:
    """A whole mesh inside this process: a queen and this machine's hive, in memory."""
    hive = integrated_hive_config(state_dir, config, trust)
    async with running_queen(
        memory_endpoint("queen"), config, integrated_hive=hive, trust=trust
    ) as queen:
        yield queen


@asynccontextmanager
async def mesh_for_one_command(state_dir: Path, hive_endpoint: str | None) -> AsyncIterator[Queen]:
    """A queen for one command (no queen daemon runs): with the hive daemon at `hive_endpoint`
    if one runs on this machine, else integrated with this machine's hive (over the user's own
    catalog). Either is this state directory's node."""
    trust = Trust.load(state_dir)
    if hive_endpoint is None:
        async with integrated_mesh(state_dir, trust=trust) as queen:
            yield queen
        return
    endpoint = local_endpoint_for(hive_endpoint)
    async with running_queen(memory_endpoint("queen"), hives=[endpoint], trust=trust) as queen:
        with trio.move_on_after(5):  # a hive that does not answer shows up as such in the job
            await queen.hives.links[0].client.answered.wait()
        yield queen
