"""Serving jobs on a Listener: the part of the protocol that the queen and every hive share.

Guarantees (docs/protocol.md, "Job lifecycle" and "Liveness"):

- every valid SUBMIT gets ACCEPTED with a job id at once, then narration, then exactly one terminal
  frame (DONE, ERROR or CANCELLED); a job is never ended by silence;
- every job has a deadline; it can be cancelled by its submitter (CANCEL) or through `cancel()`;
- a slow peer only fills its own outbox: past `peer_backlog` unread frames it is dropped;
- a peer that vanishes (no frame for three heartbeat intervals, or unroutable) has its jobs
  cancelled, so nothing it started keeps running;
- garbage, unknown versions and frames the server does not take are answered with ERROR and the
  server goes on serving.

What a job does is the business of the actor's handlers: `{operation class: async handler}`. The
server does not know which transport is underneath.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_util import AsyncValue, periodic

from rbee_mesh.actors.narration import JobContext, current_job
from rbee_mesh.actors.runtime import SHUTDOWN_REASON
from rbee_mesh.protocol import (
    Accepted,
    Actor,
    Cancel,
    Cancelled,
    Disconnect,
    Done,
    Error,
    ErrorCode,
    Heartbeat,
    JobState,
    MeshError,
    Message,
    Operation,
    PeerLiveness,
    ProtocolError,
    Ready,
    Submit,
    decode,
    encode,
)
from rbee_mesh.protocol.liveness import Liveness
from rbee_mesh.transport import Listener, PeerBusy, PeerUnreachable, TransportClosed

log = logging.getLogger("rbee_mesh.jobs")


@dataclass(frozen=True)
class ServerConfig:
    #: Heartbeat interval used towards peers, and assumed for a peer until it says its own.
    heartbeat_s: float = 1.0
    #: Frames buffered for one peer that is not reading; past this it is dropped as too slow.
    peer_backlog: int = 10_000
    #: How long one frame may wait for a congested peer before the peer is dropped.
    peer_stall_s: float = 10.0
    #: Jobs running at once; past this, SUBMIT is answered with BUSY.
    max_running_jobs: int = 10_000
    #: Finished jobs kept for job listings.
    job_history: int = 200
    #: Grace given to running jobs to end on shutdown.
    shutdown_grace_s: float = 2.0


@dataclass(eq=False)
class Peer:
    """A connected client (a keeper, or the queen at a hive) as the server sees it."""

    id: bytes
    label: str
    liveness: PeerLiveness
    outbox: trio.MemorySendChannel[Sequence[bytes]]
    inbox: trio.MemoryReceiveChannel[Sequence[bytes]]
    jobs: set[Job] = field(default_factory=set)
    heartbeat_seq: int = 0
    gone: bool = False
    #: Frames in the outbox or being sent by the peer's sender task. While any are, new frames
    #: queue behind them; while none are, a frame is sent at once (no task switch).
    backlog: int = 0


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


Handler = Callable[[Job, Any], Awaitable[Any]]


class JobServer:
    """Runs jobs submitted on `listener` with `handlers`. `await run()` in a nursery."""

    def __init__(
        self,
        listener: Listener,
        *,
        name: str,
        actor: Actor,
        handlers: dict[type[Operation], Handler],
        config: ServerConfig | None = None,
        assigns_job_ids: bool = True,
        ready_info: Callable[[], dict[str, Any]] | None = None,
        peer_label: str = "keeper",
        hive_id: str = "",
    ) -> None:
        """`assigns_job_ids`: refuse SUBMITs that carry a job id (the queen) or adopt it (a hive,
        whose jobs keep the queen's id so narration is routed without translation).
        `ready_info`: what to answer a READY with."""
        self.listener = listener
        self.name = name
        self.actor = actor
        self.handlers = handlers
        self.config = config or ServerConfig()
        self.assigns_job_ids = assigns_job_ids
        self.ready_info = ready_info or dict
        self.peer_label = peer_label
        self.hive_id = hive_id
        #: How many jobs are running; `await server.job_count.wait_value(0)` waits for none.
        self.job_count = AsyncValue(0)
        self._peers: dict[bytes, Peer] = {}
        self._jobs: dict[str, Job] = {}
        self._history: deque[Job] = deque(maxlen=self.config.job_history)
        self._peer_numbers = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._senders: trio.Nursery | None = None
        self._stopping = False

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `stop()` (graceful: every job gets its terminal frame) or cancellation."""
        async with trio.open_nursery() as senders:
            self._senders = senders
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._receive_loop)
                nursery.start_soon(self._liveness_loop)
                log.info("%s serving on %s", self.name, self.listener.endpoint)
                task_status.started()
            # Let each peer's last frames go out, but never wait on a stalled one for long.
            for peer in self._peers.values():
                peer.outbox.close()
            senders.cancel_scope.deadline = trio.current_time() + self.config.shutdown_grace_s

    async def stop(self, reason: str) -> None:
        """End every running job with ERROR UNAVAILABLE, then stop serving."""
        if self._stopping or self._nursery is None:
            return
        self._stopping = True
        for job in list(self._jobs.values()):
            terminal = Error(job_id=job.id, code=ErrorCode.UNAVAILABLE, message=reason)
            self._abort(job, terminal, cancel_reason=SHUTDOWN_REASON)
        with trio.move_on_after(self.config.shutdown_grace_s):
            await self.job_count.wait_value(0)
        self._nursery.cancel_scope.cancel()

    @property
    def running_jobs(self) -> list[Job]:
        return list(self._jobs.values())

    @property
    def peer_count(self) -> int:
        return len(self._peers)

    def job_summaries(self, *, include_finished: bool) -> list[dict[str, Any]]:
        jobs = [j.summary() for j in self._jobs.values()]
        if include_finished:
            jobs += [j.summary() for j in self._history]
        return sorted(jobs, key=lambda j: float(j["created"]))

    def cancel(self, job_id: str, *, by: str) -> Job:
        """Cancel a running job on behalf of `by`; NOT_FOUND or CONFLICT if it is not running."""
        target = self._jobs.get(job_id)
        if target is None:
            ended = next((j for j in self._history if j.id == job_id), None)
            if ended is not None:
                raise MeshError(ErrorCode.CONFLICT, f"job {job_id} already ended ({ended.state})")
            raise MeshError(ErrorCode.NOT_FOUND, f"no job {job_id}")
        self._abort(target, Cancelled(job_id=target.id, reason=f"cancelled by {by}"))
        return target

    def relay(self, job: Job, frames: Sequence[bytes]) -> None:
        """Pass a job's frames from another actor to its submitter without decoding them."""
        if job.state is JobState.RUNNING:
            self._send_frames(job.peer, frames)

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
                rejection = f"rejected: {exc.message}"
                self._send(peer, Error(job_id="", code=exc.code, message=rejection, ref=exc.ref))
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
                    # it names another peer's job, which only `cancel()` may cancel. An ERROR
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
            case Ready():
                info = self.ready_info()
                self._send(peer, Ready(job_id="", sender=self.name, role=self.actor, info=info))
            case Disconnect():
                self._drop_peer(peer, f"it disconnected ({message.reason or 'no reason given'})")
            case _:
                refusal = f"a {self.actor} does not take {message.KIND.name} frames"
                self._send(
                    peer,
                    Error(job_id=message.job_id, code=ErrorCode.INVALID_REQUEST, message=refusal),
                )

    # ---- peers ---------------------------------------------------------------------------------

    def _add_peer(self, peer_id: bytes) -> Peer:
        send, receive = trio.open_memory_channel[Sequence[bytes]](self.config.peer_backlog)
        peer = Peer(
            id=peer_id,
            label=f"{self.peer_label}-{next(self._peer_numbers)}",
            liveness=PeerLiveness(self.config.heartbeat_s, trio.current_time()),
            outbox=send,
            inbox=receive,
        )
        self._peers[peer_id] = peer
        assert self._senders is not None
        self._senders.start_soon(self._peer_sender, peer)
        return peer

    async def _peer_sender(self, peer: Peer) -> None:
        """Sends what queued for a congested peer, in order; only this peer waits for it."""
        async with peer.inbox:
            async for frames in peer.inbox:
                if not await self._send_patiently(peer, frames):
                    return
                peer.backlog -= 1

    async def _send_patiently(self, peer: Peer, frames: Sequence[bytes]) -> bool:
        """Retry while the peer is busy, for up to `peer_stall_s`; drop it if it never reads."""
        backoff = 0.001
        with trio.move_on_after(self.config.peer_stall_s):
            while True:
                try:
                    await self.listener.send(peer.id, frames)
                    return True
                except PeerBusy:
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 0.05)
                except (PeerUnreachable, TransportClosed):
                    self._drop_peer(peer, "it is unreachable")
                    return False
        self._drop_peer(peer, f"it read nothing for {self.config.peer_stall_s:g}s")
        return False

    def _send(self, peer: Peer, message: Message) -> None:
        self._send_frames(peer, encode(message))

    def _send_frames(self, peer: Peer, frames: Sequence[bytes]) -> None:
        if peer.gone:
            return
        if not peer.backlog:
            try:
                self.listener.send_nowait(peer.id, frames)
                return
            except PeerBusy:
                pass  # the sender task retries it
            except (PeerUnreachable, TransportClosed):
                self._drop_peer(peer, "it is unreachable")
                return
        try:
            peer.outbox.send_nowait(frames)
            peer.backlog += 1
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
        """Heartbeats to peers with running jobs; drops peers that fell silent."""
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
        beat = Heartbeat(
            job_id="", sender=self.name, seq=due, interval_s=self.config.heartbeat_s, ts=time.time()
        )
        self._send(peer, beat)

    # ---- jobs ------------------------------------------------------------------------------------

    def _submit(self, peer: Peer, submit: Submit) -> None:
        refusal = self._refusal(submit)
        if refusal is not None:
            code, why = refusal
            self._send(peer, Error(job_id="", code=code, ref=submit.ref, message=why))
            return
        deadline = submit.timeout_s or submit.op.default_deadline_s
        job_id = submit.job_id or new_job_id()
        job = Job(id=job_id, op=submit.op, peer=peer, deadline_s=deadline)
        job.scope.relative_deadline = deadline
        self._jobs[job.id] = job
        self.job_count.value = len(self._jobs)
        peer.jobs.add(job)
        accepted = Accepted(job_id=job.id, ref=submit.ref, op=job.op.NAME, deadline_s=deadline)
        self._send(peer, accepted)
        assert self._nursery is not None
        self._nursery.start_soon(self._run_job, job, name=f"job {job.id} {job.op.NAME}")

    def _refusal(self, submit: Submit) -> tuple[ErrorCode, str] | None:
        if self._stopping:
            return ErrorCode.UNAVAILABLE, f"the {self.actor} is shutting down"
        if len(self._jobs) >= self.config.max_running_jobs:
            return ErrorCode.BUSY, f"the {self.actor} runs {len(self._jobs)} jobs, its limit"
        if submit.job_id and self.assigns_job_ids:
            return ErrorCode.INVALID_REQUEST, f"the {self.actor} assigns job ids; leave it empty"
        if submit.job_id in self._jobs:
            return ErrorCode.CONFLICT, f"job {submit.job_id} is already running"
        return None

    def _abort(self, job: Job, terminal: Message, *, cancel_reason: str | None = None) -> None:
        if job.abort is None:
            job.abort = terminal
        job.scope.cancel(reason=cancel_reason)

    async def _run_job(self, job: Job) -> None:
        current_job.set(
            JobContext(
                job_id=job.id, actor=str(self.actor), emit=self._emitter(job), hive_id=self.hive_id
            )
        )
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

    async def _execute(self, job: Job) -> Any:
        handler = self.handlers.get(type(job.op))
        if handler is None:
            raise MeshError(
                ErrorCode.INVALID_REQUEST, f"a {self.actor} does not run {job.op.NAME} jobs"
            )
        return await handler(job, job.op)

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


def new_job_id() -> str:
    return f"job-{secrets.token_hex(6)}"
