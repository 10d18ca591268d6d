"""Running a queen: as a foreground server on any endpoint, or integrated in this process.

The same `Queen` runs in every transport mode; only the listener differs. The integrated mode binds
an in-memory endpoint (``mem://``), so a keeper in the same process talks to the queen with no
sockets at all, through the same frames and the same code paths.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from rbee_mesh import __version__, daemon
from rbee_mesh.actors.queen import Queen, QueenConfig
from rbee_mesh.actors.runtime import single_errors
from rbee_mesh.transport import open_listener

log = logging.getLogger("rbee_mesh.mesh")

DEFAULT_QUEEN_PORT = 7833
DEFAULT_QUEEN_BIND = f"tcp://127.0.0.1:{DEFAULT_QUEEN_PORT}"

_integrated_names = itertools.count(1)


@asynccontextmanager
async def running_queen(endpoint: str, config: QueenConfig | None = None) -> AsyncIterator[Queen]:
    """A queen serving on `endpoint` for the duration of the block, stopped gracefully after."""
    with single_errors():
        async with await open_listener(endpoint) as listener, trio.open_nursery() as nursery:
            queen = Queen(listener, config)
            await nursery.start(queen.run)
            try:
                yield queen
            finally:
                with trio.CancelScope(shield=True):
                    await queen.stop()


@asynccontextmanager
async def integrated_mesh(config: QueenConfig | None = None) -> AsyncIterator[Queen]:
    """A whole mesh inside this process, over the in-memory transport."""
    name = f"mem://integrated-{os.getpid()}-{next(_integrated_names)}"
    async with running_queen(name, config) as queen:
        yield queen


async def serve_queen_forever(bind: str, record: bool) -> None:
    """`queen start --foreground`: serve on `bind` until SIGTERM or SIGINT, then stop gracefully.

    With `record`, the daemon info file says where this queen listens while it does.
    """
    async with running_queen(bind) as queen:
        if record:
            daemon.write_info(
                daemon.DaemonInfo(
                    name="queen",
                    pid=os.getpid(),
                    endpoint=queen.listener.endpoint,
                    version=__version__,
                    started=time.time(),
                )
            )
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received %s; stopping", signal.Signals(signum).name)
                    break
        finally:
            if record:
                daemon.remove_info("queen", os.getpid())
