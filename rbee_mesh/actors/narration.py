"""Narration: any code running inside a job tells the job's submitter what it is doing.

The actor running a job binds a `JobContext` to a context variable; trio tasks inherit it, so code
anywhere below the job's task calls `narrate(...)` without being handed the job. The context's
`emit` is synchronous and never blocks, so narration can be called from plain functions too.
Narration outside any job is not dropped: it goes to the actor's log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from rbee_mesh.protocol import (
    Data,
    Level,
    LocalProtocolError,
    Message,
    Narration,
    ProtocolError,
)
from rbee_mesh.protocol.messages import sentence

log = logging.getLogger("rbee_mesh.narration")

_LOG_LEVELS = {
    Level.DEBUG: logging.DEBUG,
    Level.INFO: logging.INFO,
    Level.WARN: logging.WARNING,
    Level.ERROR: logging.ERROR,
}


@dataclass(frozen=True)
class JobContext:
    """Where narration of the current job goes, and who is speaking."""

    job_id: str
    actor: str
    emit: Callable[[Message], None]
    hive_id: str = ""
    worker_id: str = ""


current_job: ContextVar[JobContext | None] = ContextVar("rbee_mesh_current_job", default=None)


def narrate(
    action: str,
    human: str,
    *,
    level: Level = Level.INFO,
    target: str = "",
    actor: str | None = None,
) -> None:
    """Narrate into the current job (or the log, outside a job).

    A sentence too long for a frame is cut; anything else a NARRATION cannot carry is this
    process's bug (LocalProtocolError), not the job's request.
    """
    ctx = current_job.get()
    if ctx is None:
        log.log(_LOG_LEVELS[level], "[%s] %s: %s", actor or "-", action, human)
        return
    try:
        narration = Narration(
            job_id=ctx.job_id,
            actor=actor or ctx.actor,
            action=action,
            human=sentence(human),
            level=level,
            ts=time.time(),
            target=target,
            hive_id=ctx.hive_id,
            worker_id=ctx.worker_id,
        )
    except ProtocolError as exc:
        raise LocalProtocolError(f"a narration that cannot be sent: {exc.message}") from None
    ctx.emit(narration)


def emit_record(record: dict[str, Any]) -> None:
    """Emit a structured record (a DATA frame, e.g. download progress) into the current job.

    Outside a job there is nobody to read it, so it goes to the log at debug level.
    """
    ctx = current_job.get()
    if ctx is None:
        log.debug("record outside a job: %s", record)
        return
    ctx.emit(Data(job_id=ctx.job_id, record=record))
