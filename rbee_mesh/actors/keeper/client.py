"""The keeper's side of the wire: submit jobs to a queen and stream their frames.

`open_keeper(endpoint)` connects and keeps two background tasks: one reads frames and hands each
to its job, one sends heartbeats (so the queen knows the keeper is alive) and watches the queen's
(so a queen that dies mid-job ends the job with UNAVAILABLE instead of hanging the keeper).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import trio

from rbee_mesh.actors.runtime import hand_over, single_errors
from rbee_mesh.protocol import (
    Accepted,
    Cancel,
    Disconnect,
    Error,
    ErrorCode,
    Heartbeat,
    JobTracker,
    MeshError,
    Message,
    Operation,
    PeerLiveness,
    ProtocolError,
    Submit,
    decode,
    encode,
)
from rbee_mesh.protocol.liveness import Liveness
from rbee_mesh.transport import Connection, TransportError, open_connection

log = logging.getLogger("rbee_mesh.keeper")


@dataclass(frozen=True)
class KeeperConfig:
    heartbeat_s: float = 1.0
    #: How long to wait for ACCEPTED before saying the queen is unreachable.
    accept_timeout_s: float = 3.0
    #: Frames buffered per job before the keeper stops reading (and the queen sees it as slow).
    job_buffer: int = 10_000


class QueenUnreachable(MeshError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, message)


class JobHandle:
    """One submitted job. Iterate it for its events; afterwards `terminal` holds how it ended."""

    def __init__(self, keeper: Keeper, ref: str, op: Operation, buffer: int) -> None:
        self.keeper = keeper
        self.ref = ref
        self.op = op
        self.job_id = ""
        self.accepted: Accepted | None = None
        self.terminal: Message | None = None
        self.submitted_at = trio.current_time()
        self._tracker = JobTracker()
        self._answered = trio.Event()
        self._send, self._receive = trio.open_memory_channel[Message](buffer)

    async def _deliver(self, message: Message) -> None:
        try:
            self._tracker.on_frame(message.KIND)
        except ProtocolError as exc:
            log.warning("ignored a frame for job %s: %s", self.job_id or self.ref, exc)
            return
        if isinstance(message, Accepted):
            self.accepted, self.job_id = message, message.job_id
        if message.is_terminal:
            self.terminal = message
        self._answered.set()
        await hand_over(self._send, message)
        if message.is_terminal:
            self._send.close()

    def __aiter__(self) -> JobHandle:
        return self

    async def __anext__(self) -> Message:
        """The job's next frame; iteration ends after its terminal frame. Leaving a loop over a
        job early and iterating again later resumes where it stopped."""
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def cancel(self, reason: str = "cancelled by the user") -> None:
        """Ask the queen to cancel; the CANCELLED (or a racing terminal) frame follows."""
        if self.job_id and self.terminal is None:
            await self.keeper.send(Cancel(job_id=self.job_id, reason=reason))


class Keeper:
    """A connection to one queen. Use `open_keeper`."""

    def __init__(self, conn: Connection, config: KeeperConfig) -> None:
        self.conn = conn
        self.config = config
        self.name = f"keeper-{os.getpid()}"
        self._refs = itertools.count(1)
        self._pending: dict[str, JobHandle] = {}
        self._jobs: dict[str, JobHandle] = {}
        self._queen = PeerLiveness(config.heartbeat_s, trio.current_time())
        self._heartbeats = itertools.count()

    @property
    def endpoint(self) -> str:
        return self.conn.endpoint

    async def send(self, message: Message) -> None:
        await self.conn.send(encode(message))

    async def submit(self, op: Operation, *, timeout_s: float | None = None) -> JobHandle:
        """Submit `op` and wait for the queen to accept it (or refuse it).

        Raises QueenUnreachable if the queen does not answer within `accept_timeout_s`.
        """
        ref = f"{self.name}-{next(self._refs)}"
        job = JobHandle(self, ref, op, self.config.job_buffer)
        self._pending[ref] = job
        with trio.move_on_after(self.config.accept_timeout_s):
            try:
                await self.send(Submit(job_id="", ref=ref, op=op, timeout_s=timeout_s))
            except TransportError as exc:
                self._pending.pop(ref, None)
                raise QueenUnreachable(
                    f"cannot reach the queen at {self.endpoint}: {exc}"
                ) from None
            await job._answered.wait()
            return job
        self._pending.pop(ref, None)
        raise QueenUnreachable(
            f"no answer from the queen at {self.endpoint} within "
            f"{self.config.accept_timeout_s:g}s; is it running? (rbee-mesh queen start)"
        )

    async def _receive_loop(self) -> None:
        while True:
            try:
                frames = await self.conn.receive()
            except TransportError:
                return
            self._queen.seen(trio.current_time())
            try:
                message = decode(frames)
            except ProtocolError as exc:
                log.warning("ignored a malformed frame from the queen: %s", exc)
                continue
            await self._route(message)

    async def _route(self, message: Message) -> None:
        match message:
            case Accepted():
                job = self._pending.pop(message.ref, None)
                if job is not None:
                    self._jobs[message.job_id] = job
                    await job._deliver(message)
            case Error(job_id=""):
                job = self._pending.pop(message.ref, None)
                if job is None:
                    log.warning("the queen rejected a frame: %s: %s", message.code, message.message)
                else:
                    await job._deliver(message)
            case Heartbeat():
                self._queen.interval_s = message.interval_s
            case _:
                job = self._jobs.get(message.job_id)
                if job is not None:
                    if message.is_terminal:
                        del self._jobs[message.job_id]
                    await job._deliver(message)

    async def _heartbeat_loop(self) -> None:
        while True:
            # If the queen is not there, the liveness check below decides what that means.
            with suppress(TransportError):
                await self.send(
                    Heartbeat(
                        job_id="",
                        sender=self.name,
                        seq=next(self._heartbeats),
                        interval_s=self.config.heartbeat_s,
                        ts=time.time(),
                    )
                )
            now = trio.current_time()
            if self._jobs:
                self._queen.check(now)
                if self._queen.state is Liveness.LOST:
                    await self._lose_queen(self._queen.missed(now))
            else:
                self._queen.seen(now)  # only silence during a job counts
            await trio.sleep(self.config.heartbeat_s)

    async def _lose_queen(self, missed: int) -> None:
        jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            await job._deliver(
                Error(
                    job_id=job.job_id,
                    code=ErrorCode.UNAVAILABLE,
                    message=f"lost contact with the queen at {self.endpoint}: "
                    f"nothing heard for {missed} heartbeat intervals",
                )
            )


@asynccontextmanager
async def open_keeper(endpoint: str, config: KeeperConfig | None = None) -> AsyncIterator[Keeper]:
    """Connect to the queen at `endpoint` for the duration of the block."""
    config = config or KeeperConfig()
    try:
        conn = await open_connection(endpoint)
    except TransportError as exc:
        raise QueenUnreachable(f"cannot reach the queen at {endpoint}: {exc}") from None
    keeper = Keeper(conn, config)
    try:
        with single_errors():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keeper._receive_loop)
                nursery.start_soon(keeper._heartbeat_loop)
                try:
                    yield keeper
                finally:
                    # A courtesy, also on Ctrl-C: the queen cancels this keeper's jobs at once
                    # instead of after three silent heartbeat intervals.
                    with (
                        trio.CancelScope(shield=True),
                        trio.move_on_after(0.5),
                        suppress(TransportError),
                    ):
                        await keeper.send(Disconnect(job_id="", sender=keeper.name, reason="done"))
                    nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await conn.aclose()
