"""What a daemon runs in the foreground (`queen start --foreground`, `hive start --foreground`,
and so the daemon itself): its actor, recorded in its info file while it serves, until SIGTERM
or SIGINT. Imported by those commands only.
"""

from __future__ import annotations

import gc
import logging
import signal
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import trio

from rbee_mesh.actors.keeper.daemon import recorded, state_dir
from rbee_mesh.protocol.constants import DEFAULT_API_BIND, HEARTBEAT_S

if TYPE_CHECKING:  # the actors are imported by the daemon that runs them, not by every command
    from rbee_mesh.actors.hive.hive import HiveConfig

log = logging.getLogger("rbee_mesh.daemon")

#: The queen daemon's finished jobs, in its state directory (actors/records.py).
JOB_JOURNAL = "jobs.journal"


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
    journal = state_dir() / JOB_JOURNAL
    async with running_queen(
        bind, config, hives=peers, integrated_hive=hive, discover=discover, trust=trust,
        journal=journal,
    ) as queen:  # fmt: skip
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
