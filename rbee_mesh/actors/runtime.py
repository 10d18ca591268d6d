"""Small pieces every actor's trio code shares."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import trio

from rbee_mesh.actors.narration import narrate
from rbee_mesh.protocol import Ping

#: The cancel reason of jobs ended because their actor is stopping (not because a person asked).
SHUTDOWN_REASON = "shutdown"


@contextmanager
def single_errors() -> Iterator[None]:
    """Re-raise an exception group that holds one exception as that exception.

    A context manager that yields inside a nursery gets its body's exception wrapped in a group
    (trio's strict exception groups); its caller expects the exception itself, as with any other
    context manager. Groups of several exceptions are left alone.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if exc is group:
            raise
        raise exc from None


_T = TypeVar("_T")


async def hand_over(channel: trio.MemorySendChannel[_T], item: _T) -> None:
    """Put `item` in `channel`, waiting only while it is full: no task switch (and so no
    scheduler round) while the reader keeps up, as `channel.send` would cost."""
    try:
        channel.send_nowait(item)
    except trio.WouldBlock:
        await channel.send(item)


async def run_ping(op: Ping) -> dict[str, Any]:
    """The `ping` operation, wherever it runs: narrate `count` pongs, `interval_s` apart."""
    start = trio.current_time()
    for i in range(1, op.count + 1):
        narrate("pong", f"pong {i}/{op.count}")
        # Always a checkpoint: a long burst must not block the actor's other work.
        await trio.sleep(op.interval_s if i < op.count else 0)
    return {"count": op.count, "elapsed_s": round(trio.current_time() - start, 6)}
