"""The queen: one per mesh. Accepts jobs from keepers, runs or routes them, streams them back.

Guarantees (docs/protocol.md, "Job lifecycle"):

- every valid SUBMIT gets ACCEPTED with a job id at once, then narration, then exactly one terminal
  frame (DONE, ERROR or CANCELLED); a job is never ended by silence;
- every job has a deadline; it can be cancelled by its submitter (CANCEL) or by anyone (job_cancel);
- a slow keeper only fills its own outbox: past `peer_backlog` unread frames it is dropped;
- a keeper that vanishes (no frame for three heartbeat intervals, or unroutable) has its jobs
  cancelled, so nothing it started keeps running;
- garbage, unknown versions and frames the queen does not take are answered with ERROR and the
  queen goes on serving.

The queen's I/O is one `Listener`; it does not know which transport is underneath.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_util import AsyncValue, periodic

from rbee_mesh import __version__
from rbee_mesh.actors.narration import JobContext, current_job, narrate
from rbee_mesh.protocol import (
    PROTOCOL_VERSION,
    Accepted,
    Cancel,
    Cancelled,
    Disconnect,
    Done,
    Error,
    ErrorCode,
    Heartbeat,
    HiveGet,
    HiveList,
    JobCancel,
    JobList,
    JobState,
    Level,
    MeshError,
    Message,
    Operation,
    PeerLiveness,
    Ping,
    ProtocolError,
    Status,
    Submit,
    decode,
    encode,
)
from rbee_mesh.protocol.liveness import Liveness
from rbee_mesh.transport import Listener, PeerBusy, PeerUnreachable, TransportClosed

log = logging.getLogger("rbee_mesh.queen")


@dataclass(frozen=True)
class QueenConfig:
    #: Heartbeat interval the queen uses towards keepers, and assumes for a keeper until it says.
    heartbeat_s: float = 1.0
    #: Frames buffered for one keeper that is not reading; past this it is dropped as too slow.
    peer_backlog: int = 10_000
    #: How long one frame may wait for a congested keeper before the keeper is dropped.
    peer_stall_s: float = 10.0
    #: Jobs running at once; past this, SUBMIT is answered with BUSY.
    max_running_jobs: int = 10_000
    #: Finished jobs kept for `jobs list`.
    job_history: int = 200
    #: Grace given to running jobs to end on shutdown.
    shutdown_grace_s: float = 2.0


@dataclass(eq=False)
class Job:
    id: str
    op: Operation
    peer: Peer
    deadline_s: float
    created: float = field(default_factory=time.time)
    ended: float | None = None
    state: JobState = JobState.RUNNING
    error: str = ""
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Set when the job is aborted from outside: the terminal frame to send instead of a result.
    abort: Message | None = None

    def summary(self) -> dict[str, Any]:
        end = self.ended if self.ended is not None else time.time()
        return {
            "id": self.id,
            "op": self.op.NAME,
            "state": str(self.state),
            "keeper": self.peer.label,
            "created": self.created,
            "duration_s": round(end - self.created, 6),
            "error": self.error,
        }


@dataclass(eq=False)
class Peer:
    """A connected keeper (or any client) as the queen sees it."""

    id: bytes
    label: str
    liveness: PeerLiveness
    outbox: trio.MemorySendChannel[list[bytes]]
    inbox: trio.MemoryReceiveChannel[list[bytes]]
    jobs: set[Job] = field(default_factory=set)
    heartbeat_seq: int = 0
    gone: bool = False


Handler = Callable[[Job, Any], Awaitable[Any]]


class Queen:
    """One per mesh. Create with a bound Listener, then `await run()` in a nursery."""

    def __init__(self, listener: Listener, config: QueenConfig | None = None) -> None:
        self.listener = listener
        self.config = config or QueenConfig()
        self.name = f"queen-{os.uname().nodename}"
        self.started = time.time()
        self._peers: dict[bytes, Peer] = {}
        self._jobs: dict[str, Job] = {}
        self._history: deque[Job] = deque(maxlen=self.config.job_history)
        self._peer_numbers = itertools.count(1)
        #: How many jobs are running; `await queen.job_count.wait_value(0)` waits for none.
        self.job_count = AsyncValue(0)
        self._nursery: trio.Nursery | None = None
        self._senders: trio.Nursery | None = None
        self._stopping = False
        self._handlers: dict[type[Operation], Handler] = {
            Status: self._op_status,
            Ping: self._op_ping,
            HiveList: self._op_hive_list,
            HiveGet: self._op_hive_get,
            JobList: self._op_job_list,
            JobCancel: self._op_job_cancel,
        }

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `stop()` (graceful: every job gets its terminal frame) or cancellation."""
        async with trio.open_nursery() as senders:
            self._senders = senders
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._receive_loop)
                nursery.start_soon(self._liveness_loop)
                log.info("queen %s serving on %s", self.name, self.listener.endpoint)
                task_status.started()
            # Let each keeper's last frames go out, but never wait on a stalled one for long.
            for peer in self._peers.values():
                peer.outbox.close()
            senders.cancel_scope.deadline = trio.current_time() + self.config.shutdown_grace_s

    async def stop(self, reason: str = "the queen is shutting down") -> None:
        """End every running job with ERROR UNAVAILABLE, then stop serving."""
        if self._stopping or self._nursery is None:
            return
        self._stopping = True
        for job in list(self._jobs.values()):
            self._abort(job, Error(job_id=job.id, code=ErrorCode.UNAVAILABLE, message=reason))
        with trio.move_on_after(self.config.shutdown_grace_s):
            await self.job_count.wait_value(0)
        self._nursery.cancel_scope.cancel()

    @property
    def running_jobs(self) -> list[Job]:
        return list(self._jobs.values())

    # ---- receiving ---------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            try:
                peer_id, frames = await self.listener.receive()
            except TransportClosed:
                return
            peer = self._peers.get(peer_id) or self._add_peer(peer_id)
            peer.liveness.seen(trio.current_time())
            try:
                message = decode(frames)
            except ProtocolError as exc:
                log.warning("rejected a frame from %s: %s", peer.label, exc)
                self._send(
                    peer,
                    Error(
                        job_id="", code=exc.code, message=f"rejected: {exc.message}", ref=exc.ref
                    ),
                )
                continue
            self._dispatch(peer, message)

    def _dispatch(self, peer: Peer, message: Message) -> None:
        match message:
            case Submit():
                self._submit(peer, message)
            case Cancel():
                job = self._jobs.get(message.job_id)
                if job is None or job.peer is not peer:
                    # Either it raced with the job's end (whose terminal frame is on its way), or
                    # it names another keeper's job, which only `job_cancel` may cancel. An ERROR
                    # here would be a second terminal frame for that job id.
                    log.info(
                        "ignored CANCEL of %s from %s: not a running job of theirs",
                        message.job_id,
                        peer.label,
                    )
                    return
                reason = message.reason or "cancelled by its submitter"
                self._abort(job, Cancelled(job_id=job.id, reason=reason))
            case Heartbeat():
                peer.liveness.interval_s = message.interval_s
            case Disconnect():
                self._drop_peer(peer, f"it disconnected ({message.reason or 'no reason given'})")
            case _:
                self._send(
                    peer,
                    Error(
                        job_id=message.job_id,
                        code=ErrorCode.INVALID_REQUEST,
                        message=f"the queen does not take {message.KIND.name} frames from keepers",
                    ),
                )

    # ---- peers ---------------------------------------------------------------------------------

    def _add_peer(self, peer_id: bytes) -> Peer:
        send, receive = trio.open_memory_channel[list[bytes]](self.config.peer_backlog)
        peer = Peer(
            id=peer_id,
            label=f"keeper-{next(self._peer_numbers)}",
            liveness=PeerLiveness(self.config.heartbeat_s, trio.current_time()),
            outbox=send,
            inbox=receive,
        )
        self._peers[peer_id] = peer
        assert self._senders is not None
        self._senders.start_soon(self._peer_sender, peer)
        return peer

    async def _peer_sender(self, peer: Peer) -> None:
        """Moves one peer's outbox to the socket; only this peer waits when it is congested."""
        async with peer.inbox:
            async for frames in peer.inbox:
                backoff = 0.001
                with trio.move_on_after(self.config.peer_stall_s) as stall:
                    while True:
                        try:
                            await self.listener.send(peer.id, frames)
                            break
                        except PeerBusy:
                            await trio.sleep(backoff)
                            backoff = min(backoff * 2, 0.05)
                        except (PeerUnreachable, TransportClosed):
                            self._drop_peer(peer, "it is unreachable")
                            return
                if stall.cancelled_caught:
                    self._drop_peer(peer, f"it read nothing for {self.config.peer_stall_s:g}s")
                    return

    def _send(self, peer: Peer, message: Message) -> None:
        if peer.gone:
            return
        try:
            peer.outbox.send_nowait(encode(message))
        except trio.WouldBlock:
            self._drop_peer(peer, f"it left {self.config.peer_backlog} frames unread")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _drop_peer(self, peer: Peer, why: str) -> None:
        """Forget a peer and cancel what it started: nothing it began may outlive it."""
        if peer.gone:
            return
        peer.gone = True
        self._peers.pop(peer.id, None)
        peer.outbox.close()
        if peer.jobs:
            log.warning(
                "dropping %s because %s; cancelling its %d job(s)", peer.label, why, len(peer.jobs)
            )
        for job in list(peer.jobs):
            self._abort(job, Cancelled(job_id=job.id, reason=f"{peer.label} is gone: {why}"))

    async def _liveness_loop(self) -> None:
        """Heartbeats to keepers with running jobs; drops keepers that fell silent."""
        async for _ in periodic(self.config.heartbeat_s / 2):
            now = trio.current_time()
            for peer in list(self._peers.values()):
                peer.liveness.check(now)
                if peer.liveness.state is Liveness.LOST:
                    missed = peer.liveness.missed(now)
                    self._drop_peer(peer, f"it sent nothing for {missed} heartbeat intervals")
                elif peer.jobs:
                    self._heartbeat(peer, now)

    def _heartbeat(self, peer: Peer, now: float) -> None:
        # The loop runs every half interval; send one heartbeat per interval.
        due = math.floor(now / self.config.heartbeat_s)
        if due == peer.heartbeat_seq:
            return
        peer.heartbeat_seq = due
        self._send(
            peer,
            Heartbeat(
                job_id="",
                sender=self.name,
                seq=due,
                interval_s=self.config.heartbeat_s,
                ts=time.time(),
            ),
        )

    # ---- jobs ------------------------------------------------------------------------------------

    def _submit(self, peer: Peer, submit: Submit) -> None:
        if self._stopping:
            self._send(
                peer,
                Error(
                    job_id="",
                    code=ErrorCode.UNAVAILABLE,
                    ref=submit.ref,
                    message="the queen is shutting down",
                ),
            )
            return
        if len(self._jobs) >= self.config.max_running_jobs:
            self._send(
                peer,
                Error(
                    job_id="",
                    code=ErrorCode.BUSY,
                    ref=submit.ref,
                    message=f"the queen runs {len(self._jobs)} jobs, its limit",
                ),
            )
            return
        deadline = submit.timeout_s or submit.op.default_deadline_s
        job = Job(id=new_job_id(), op=submit.op, peer=peer, deadline_s=deadline)
        job.scope.relative_deadline = deadline
        self._jobs[job.id] = job
        self.job_count.value = len(self._jobs)
        peer.jobs.add(job)
        self._send(
            peer, Accepted(job_id=job.id, ref=submit.ref, op=job.op.NAME, deadline_s=deadline)
        )
        assert self._nursery is not None
        self._nursery.start_soon(self._run_job, job, name=f"job {job.id} {job.op.NAME}")

    def _abort(self, job: Job, terminal: Message) -> None:
        if job.abort is None:
            job.abort = terminal
        job.scope.cancel()

    async def _run_job(self, job: Job) -> None:
        current_job.set(JobContext(job_id=job.id, actor="queen", emit=self._emitter(job)))
        terminal: Message | None = None
        with job.scope:
            try:
                result = await self._execute(job)
                terminal = Done(job_id=job.id, result=result)
            except MeshError as exc:
                terminal = Error(job_id=job.id, code=exc.code, message=exc.message)
            except Exception as exc:
                log.exception("job %s (%s) failed", job.id, job.op.NAME)
                terminal = Error(
                    job_id=job.id,
                    code=ErrorCode.INTERNAL,
                    message=f"{job.op.NAME} failed: {type(exc).__name__}: {exc}",
                )
        if job.abort is not None and (terminal is None or job.scope.cancelled_caught):
            terminal = job.abort
        elif terminal is None:
            terminal = Error(
                job_id=job.id,
                code=ErrorCode.TIMEOUT,
                message=f"{job.op.NAME} did not finish within {job.deadline_s:g}s",
            )
        self._finish(job, terminal)

    def _emitter(self, job: Job) -> Callable[[Message], None]:
        def emit(message: Message) -> None:
            if job.state is JobState.RUNNING:
                self._send(job.peer, message)

        return emit

    def _finish(self, job: Job, terminal: Message) -> None:
        job.ended = time.time()
        match terminal:
            case Done():
                job.state = JobState.DONE
            case Error():
                job.state, job.error = JobState.FAILED, f"{terminal.code}: {terminal.message}"
            case _:
                job.state = JobState.CANCELLED
                job.error = getattr(terminal, "reason", "")
        self._send(job.peer, terminal)
        self._jobs.pop(job.id, None)
        self.job_count.value = len(self._jobs)
        job.peer.jobs.discard(job)
        self._history.append(job)
        log.info(
            "job %s %s %s in %.3fs%s",
            job.id,
            job.op.NAME,
            job.state,
            job.ended - job.created,
            f" ({job.error})" if job.error else "",
        )

    async def _execute(self, job: Job) -> Any:
        handler = self._handlers.get(type(job.op))
        if handler is None:
            raise MeshError(
                ErrorCode.UNAVAILABLE,
                f"{job.op.NAME} runs on a {job.op.target}, and no hive is connected to this queen",
            )
        return await handler(job, job.op)

    # ---- operations the queen answers itself -------------------------------------------------

    async def _op_status(self, job: Job, op: Status) -> dict[str, Any]:
        narrate(
            "status",
            f"{len(self._jobs)} job(s) running, {len(self._peers)} keeper(s), no hives connected",
        )
        return {
            "queen": {
                "name": self.name,
                "version": __version__,
                "protocol": PROTOCOL_VERSION,
                "endpoint": self.listener.endpoint,
                "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started, 3),
                "jobs_running": len(self._jobs),
                "keepers": len(self._peers),
            },
            "hives": [],
        }

    async def _op_ping(self, job: Job, op: Ping) -> dict[str, Any]:
        start = trio.current_time()
        for i in range(1, op.count + 1):
            narrate("pong", f"pong {i}/{op.count}")
            # Always a checkpoint: a long burst must not block the queen's other work.
            await trio.sleep(op.interval_s if i < op.count else 0)
        return {"count": op.count, "elapsed_s": round(trio.current_time() - start, 6)}

    async def _op_hive_list(self, job: Job, op: HiveList) -> list[dict[str, Any]]:
        narrate("hive_list", "no hives are connected to this queen")
        return []

    async def _op_hive_get(self, job: Job, op: HiveGet) -> dict[str, Any]:
        raise MeshError(ErrorCode.NOT_FOUND, f"no hive named {op.hive!r} is known to this queen")

    async def _op_job_list(self, job: Job, op: JobList) -> list[dict[str, Any]]:
        jobs = [j.summary() for j in self._jobs.values()]
        if op.include_finished:
            jobs += [j.summary() for j in self._history]
        jobs.sort(key=lambda j: j["created"])
        narrate("job_list", f"{len(self._jobs)} running, {len(self._history)} finished")
        return jobs

    async def _op_job_cancel(self, job: Job, op: JobCancel) -> dict[str, Any]:
        target = self._jobs.get(op.job)
        if target is None:
            ended = next((j for j in self._history if j.id == op.job), None)
            if ended is not None:
                raise MeshError(ErrorCode.CONFLICT, f"job {op.job} already ended ({ended.state})")
            raise MeshError(ErrorCode.NOT_FOUND, f"no job {op.job}")
        if target is job:
            raise MeshError(ErrorCode.CONFLICT, "a job cannot cancel itself")
        narrate(
            "job_cancel",
            f"cancelling job {target.id} ({target.op.NAME}) of {target.peer.label}",
            level=Level.WARN,
        )
        self._abort(target, Cancelled(job_id=target.id, reason=f"cancelled by {job.peer.label}"))
        return {"job": target.id, "state": str(JobState.CANCELLED)}


def new_job_id() -> str:
    return f"job-{secrets.token_hex(6)}"
