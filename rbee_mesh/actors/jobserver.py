"""Serving jobs on a Listener: the one job server, for every actor that serves jobs (the queen
to keepers, a hive to its queen, a worker to its hive).

Guarantees (docs/protocol.md, "Job lifecycle", "At most once" and "Liveness"):

- every valid SUBMIT gets ACCEPTED with a job id at once, or a refusal (an ERROR with its `ref`
  and `started: false`); a SUBMIT that arrives after its `accept_by` is refused, because its
  sender has stopped waiting for it;
- after ACCEPTED, exactly one terminal frame (DONE, ERROR or CANCELLED), enforced where frames
  leave by the job's `JobLifecycle`; a job is never ended by silence;
- no job can stop the server: whatever its handler raises, and a result that cannot be sent
  (RESULT_TOO_LARGE, or INTERNAL for our own bug), becomes that job's terminal frame;
- every job has a deadline; its submitter (CANCEL) or anyone through `cancel()` can cancel it;
- with a `JobHistory` that keeps records (a queen's), every frame a job streams is recorded,
  and `watch()` lets another client follow it from its start (`jobs watch`);
- a slow client only fills its own outbox: past `peer_backlog` unread frames it is dropped;
- a client that vanishes (silent for SERVER_LOST_AFTER intervals, one fewer than a client waits
  for its server), leaves, or whose session reconnects (a newer READY) has its jobs cancelled
  (but those it submitted with `keep`, which run on), and its connection is fenced: nothing
  else it started outlives it, and nothing it sent that arrives afterwards runs (it must
  connect again, as a new epoch of its session);
- garbage, unknown versions and frames the server does not take are answered with ERROR (the
  peer's fault, logged as such) and the server goes on serving.

What a job does is the business of the actor's handlers: `{operation class: async handler}`. The
server does not know which transport is underneath.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import trio
from trio_util import AsyncValue

from rbee_mesh.actors.heartbeat import HeartbeatSchedule
from rbee_mesh.actors.narration import JobContext, current_job, emit_record, narrate
from rbee_mesh.actors.records import JobHistory, JobRecord, messages_in
from rbee_mesh.actors.runtime import SHUTDOWN_REASON
from rbee_mesh.actors.trust import Role, Trust, admitted
from rbee_mesh.protocol import (
    STREAMED,
    Accepted,
    Actor,
    Cancel,
    Cancelled,
    Disconnect,
    Done,
    Error,
    ErrorCode,
    Heartbeat,
    JobLifecycle,
    JobState,
    Kind,
    Liveness,
    MeshError,
    Message,
    Operation,
    PeerClock,
    PeerLiveness,
    ProtocolError,
    Ready,
    RemoteProtocolError,
    Submit,
    TooLarge,
    decode,
    encode,
    encode_batch,
)
from rbee_mesh.protocol.codec import HEADER
from rbee_mesh.protocol.constants import (
    BATCH_BYTES,
    COALESCE_S,
    FINISHED_JOBS_KEPT,
    HEARTBEAT_S,
    MAX_BATCH,
    MAX_CONNECTIONS_PER_KEY,
    MAX_DEADLINE_S,
    MIN_HEARTBEAT_S,
    SERVER_LOST_AFTER,
)
from rbee_mesh.protocol.messages import sentence
from rbee_mesh.transport import Listener, PeerBusy, PeerUnreachable, TransportClosed

log = logging.getLogger("rbee_mesh.jobs")

#: The frames a job's emit may hold to send as one BATCH.
_COALESCED = frozenset({Kind.NARRATION, Kind.DATA})

#: Connections dropped (and so fenced), remembered so that their late frames are refused (a
#: bounded memory: the oldest are forgotten).
_FENCED_REMEMBERED = 4_096


class _LineBudget:
    """At most `limit` lines per `window_s` seconds; the lines past it are counted, and the
    count is logged with the next line that is."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._window = -math.inf
        self._logged = 0
        self._unlogged = 0

    def log(self, level: int, message: str, *args: object) -> None:
        now = trio.current_time()
        if now - self._window >= self.window_s:
            self._window, self._logged = now, 0
        if self._logged >= self.limit:
            self._unlogged += 1
            return
        self._logged += 1
        if self._unlogged:
            message += f" ({self._unlogged} more such line(s) not logged before this one)"
            self._unlogged = 0
        log.log(level, message, *args)


@dataclass(frozen=True)
class ServerConfig:
    #: Heartbeat interval used towards peers, and assumed for a peer until it says its own.
    heartbeat_s: float = HEARTBEAT_S
    #: Frames buffered for one peer that is not reading; past this it is dropped as too slow.
    peer_backlog: int = 10_000
    #: How long one frame may wait for a congested peer before the peer is dropped.
    peer_stall_s: float = 10.0
    #: Jobs running at once; past this, SUBMIT is refused with BUSY.
    max_running_jobs: int = 10_000
    #: Jobs one connection may run at once (None: only `max_running_jobs`); past this, BUSY.
    max_jobs_per_peer: int | None = None
    #: Connections one key may hold open at once; past this a new one is told DISCONNECT.
    max_connections_per_key: int = MAX_CONNECTIONS_PER_KEY
    #: Finished jobs kept for job listings (unless the server is given a history of its own).
    job_history: int = FINISHED_JOBS_KEPT
    #: Grace given to running jobs to end on shutdown.
    shutdown_grace_s: float = 2.0
    #: Missed heartbeat intervals after which a silent client is dropped.
    lost_after: int = SERVER_LOST_AFTER
    #: Lines logged per window about what clients sent that is not acted on (a frame rejected,
    #: a SUBMIT refused, a CANCEL ignored), whoever sent it; past this they are counted, and
    #: the count goes with the next line. A client that floods such frames (10,000 a second is
    #: easy) must not fill the log, and the disk under it. Each frame is still answered.
    peer_lines_logged: int = 10
    peer_lines_window_s: float = 10.0


@dataclass(eq=False)
class Peer:
    """A connected client (a keeper, the queen at a hive, the hive at a worker)."""

    id: bytes
    label: str
    server: JobServer
    #: Its CURVE key ("" in this process) and the role the server trusts it in.
    key: str
    trusted_as: Role
    liveness: PeerLiveness
    outbox: trio.MemorySendChannel[Sequence[bytes]]
    inbox: trio.MemoryReceiveChannel[Sequence[bytes]]
    clock: PeerClock = field(default_factory=PeerClock)
    jobs: set[ServerJob] = field(default_factory=set)
    #: What its READY said: its name, role, session and epoch.
    name: str = ""
    role: Actor | None = None
    session: str = ""
    epoch: int = 0
    gone: bool = False
    #: Frames in the outbox or being sent by the peer's sender task. While any are, new frames
    #: queue behind them; while none are, a frame is sent at once (no task switch).
    backlog: int = 0
    heartbeats: int = 0
    #: When its connection closed under a send (EHOSTUNREACH). Nothing more is sent to it, and
    #: nothing it sends is acted on but a DISCONNECT; it is dropped at a beat at least half an
    #: interval later, by when what it sent before closing (a DISCONNECT, which libzmq may hold
    #: behind the news of the close) has been read.
    unreachable: float | None = None
    #: Set when its queued frames have drained below a quarter of the backlog (see `writable`).
    drained: trio.Event | None = None

    #: The server's own interval (the schedule's).
    beat_interval_s = None

    def beat(self) -> None:
        """The server's heartbeat to this client (skipped while frames queue for it), saying
        how many jobs the server runs, of how many it may."""
        if self.unreachable is not None:
            if trio.current_time() - self.unreachable >= self.server.config.heartbeat_s / 2:
                self.server._drop_peer(self, "it is unreachable (its connection closed)")
            return
        if self.backlog:
            return
        self.heartbeats += 1
        server = self.server
        message = Heartbeat(
            job_id="", sender=server.name, seq=self.heartbeats,
            interval_s=server.config.heartbeat_s, ts=time.time(),
            state={"jobs": len(server._jobs), "limit": server.config.max_running_jobs},
        )  # fmt: skip
        self.server._send(self, message)

    async def writable(self, limit: int | None = None) -> None:
        """Wait while more than `limit` frames (default: half its backlog) are queued: how a
        job that produces frames faster than the peer reads them (a replay, a model's bytes) is
        slowed rather than cut off."""
        limit = self.server.config.peer_backlog // 2 if limit is None else limit
        while self.backlog > limit and not self.gone:
            self.drained = self.drained or trio.Event()
            await self.drained.wait()

    def _sent_one(self) -> None:
        self.backlog -= 1
        if self.drained is not None and self.backlog <= self.server.config.peer_backlog // 4:
            self.drained.set()
            self.drained = None

    def liveness_changed(self, was: Liveness, now: Liveness) -> None:
        if now is Liveness.LOST:
            missed = self.liveness.missed(trio.current_time())
            self.server._drop_peer(self, f"it sent nothing for {missed} heartbeat intervals")


@dataclass(eq=False)
class ServerJob:
    """A job this server runs: accepted, running in its own task, ended exactly once."""

    id: str
    op: Operation
    peer: Peer
    deadline_s: float
    created: float = field(default_factory=time.time)
    #: When the first TOKEN frame of this job passed through (relayed), epoch seconds.
    first_token: float | None = None
    ended: float | None = None
    lifecycle: JobLifecycle = field(default_factory=lambda: JobLifecycle(JobState.RUNNING))
    error: str = ""
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Set when the job is aborted from outside: the terminal frame to send instead of a result.
    abort: Message | None = None
    #: Whether it runs on when its submitter disconnects (SUBMIT's `keep`).
    keep: bool = False
    #: Its frames, for watchers (a server whose history keeps records).
    record: JobRecord | None = None
    #: NARRATION and DATA frames held to go as one BATCH, as (kind, body), and their bytes.
    held: list[tuple[Kind, bytes]] = field(default_factory=list)
    held_bytes: int = 0
    #: When it last sent a streamed frame (trio's clock).
    sent_at: float = -math.inf

    @property
    def state(self) -> JobState:
        return self.lifecycle.state

    @property
    def time_left_s(self) -> float:
        """What is left of the job's deadline (for a job forwarded one hop down)."""
        return max(self.deadline_s - (time.time() - self.created), 0.001)

    def emit(self, message: Message) -> None:
        """Send a NARRATION, DATA or TOKEN frame of this job to its submitter, if still running.
        A NARRATION or DATA within COALESCE_S of the job's last frame is held, to go with those
        that follow it as one BATCH (`flush`).

        Raises TooLarge if the frame is over the size limit (the job then ends with it)."""
        frames = encode(message)
        body = frames[3]
        if (
            message.KIND in _COALESCED
            and (self.held or trio.current_time() - self.sent_at < COALESCE_S)
            and len(body) <= BATCH_BYTES
            and self.lifecycle.streaming
        ):
            if len(self.held) == MAX_BATCH or self.held_bytes + len(body) > BATCH_BYTES:
                self.flush()
            if not self.held:
                self.peer.server._flush_at(self, self.sent_at + COALESCE_S)
            self.held.append((message.KIND, body))
            self.held_bytes += len(body)
            return
        self.relay(frames, message.KIND)

    def relay(self, frames: Sequence[bytes], kind: Kind) -> None:
        """Pass a NARRATION, DATA, TOKEN or BATCH frame of this job (from an actor it was
        forwarded to) on, unopened, after what is held; dropped once the job has ended."""
        if kind in STREAMED and self.lifecycle.streaming:
            self.flush()
            if kind is Kind.TOKEN and self.first_token is None:
                self.first_token = time.time()
            self._send(frames, kind)

    def flush(self) -> None:
        """Send the frames held (one alone, several as a BATCH)."""
        if not self.held:
            return
        held, self.held, self.held_bytes = self.held, [], 0
        self.peer.server._flushes.pop(self, None)
        if len(held) == 1:
            kind, body = held[0]
            self._send([HEADER, bytes([kind]), self.id.encode("ascii"), body], kind)
        else:
            self._send(encode_batch(self.id, held), Kind.BATCH)

    def _send(self, frames: Sequence[bytes], kind: Kind) -> None:
        self.sent_at = trio.current_time()
        self.peer.server._send_frames(self.peer, frames)
        if self.record is not None:
            self.record.append(kind, frames[3])

    def summary(self) -> dict[str, Any]:
        end = self.ended if self.ended is not None else time.time()
        return {
            "id": self.id,
            "op": self.op.NAME,
            "state": str(self.state),
            "keeper": self.peer.name or self.peer.label,
            "created": self.created,
            "duration_s": round(end - self.created, 6),
            "error": self.error,
        }


Handler = Callable[[ServerJob, Any], Awaitable[Any]]


class JobObserver(Protocol):
    """Told of what a job server does (the queen's metrics)."""

    def job_ended(self, job: ServerJob, terminal: Message) -> None: ...

    def submit_refused(self, operation: str, code: ErrorCode) -> None: ...


@dataclass(frozen=True)
class Ending:
    """What a handler returns to end its job with this terminal frame, as another job ended
    (a watch ends as the job it watched did)."""

    terminal: Message


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
        ready_info: Callable[[Peer], dict[str, Any]] | None = None,
        peer_label: str = "keeper",
        hive_id: str = "",
        worker_id: str = "",
        on_peer_gone: Callable[[Peer, str, bool], None] | None = None,
        trust: Trust | None = None,
        history: JobHistory | None = None,
        observer: JobObserver | None = None,
    ) -> None:
        """`assigns_job_ids`: refuse SUBMITs that carry a job id (the queen) or adopt it (a hive
        or a worker, whose jobs keep the queen's id so narration is routed without
        translation). `ready_info`: what to answer a client's READY with. `on_peer_gone`: told
        when a client is dropped, why, and whether it left on purpose (DISCONNECT). `trust`:
        whose messages are taken, and what each role may submit (the listener's keys must be
        this trust's). `history`: the finished jobs remembered, and whether each job's frames
        are recorded (default: `config.job_history` summaries, no frames). `observer`: told of
        each job as it ends and of each submission refused (the queen's metrics)."""
        self.listener = listener
        self.trust = trust or Trust.for_process()
        self._admitted = admitted(actor)
        self.name = name
        self.actor = actor
        self.handlers = handlers
        self.config = config or ServerConfig()
        self.assigns_job_ids = assigns_job_ids
        self.ready_info = ready_info or (lambda peer: {})
        self.peer_label = peer_label
        self.hive_id = hive_id
        self.worker_id = worker_id
        self.on_peer_gone = on_peer_gone
        #: How many jobs are running; `await server.job_count.wait_value(0)` waits for none.
        self.job_count = AsyncValue(0)
        self.observer = observer
        self._peers: dict[bytes, Peer] = {}
        #: Connections open per key, and the keys told they hold too many (logged once).
        self._connections: Counter[str] = Counter()
        self._crowded: set[str] = set()
        self._sessions: dict[str, Peer] = {}
        #: Dropped connections, and when a late frame from each was last answered (None: never).
        self._fenced: dict[bytes, float | None] = {}
        self._jobs: dict[str, ServerJob] = {}
        self.history = history or JobHistory(self.config.job_history)
        self._peer_numbers = itertools.count(1)
        #: Beats and watches every client; an actor may add links of its own (a hive's PUB).
        self.schedule = HeartbeatSchedule(self.config.heartbeat_s)
        self._nursery: trio.Nursery | None = None
        self._senders: trio.Nursery | None = None
        self._stopping = False
        self._peer_lines = _LineBudget(
            self.config.peer_lines_logged, self.config.peer_lines_window_s
        )
        #: Jobs holding frames, and when each sends them; the flusher sleeps in the scope
        #: until the first of them.
        self._flushes: dict[ServerJob, float] = {}
        self._flush_wait = trio.CancelScope()

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `stop()` (graceful: every job gets its terminal frame) or cancellation."""
        async with trio.open_nursery() as senders:
            self._senders = senders
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._receive_loop)
                nursery.start_soon(self.schedule.run)
                nursery.start_soon(self._flusher)
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
            terminal = Error(job_id=job.id, code=ErrorCode.UNAVAILABLE, message=sentence(reason))
            self._abort(job, terminal, cancel_reason=SHUTDOWN_REASON)
        with trio.move_on_after(self.config.shutdown_grace_s):
            await self.job_count.wait_value(0)
        self._nursery.cancel_scope.cancel()

    @property
    def running_jobs(self) -> list[ServerJob]:
        return list(self._jobs.values())

    @property
    def peer_count(self) -> int:
        return len(self._peers)

    def job_summaries(self, *, include_finished: bool) -> list[dict[str, Any]]:
        jobs = [j.summary() for j in self._jobs.values()]
        if include_finished:
            jobs += [ended.summary for ended in self.history]
        return sorted(jobs, key=lambda j: float(j["created"]))

    def drop_peers_with_key(self, key: str, why: str) -> int:
        """Cut off every connection of the peer with `key` (its jobs cancelled); how many."""
        peers = [p for p in self._peers.values() if p.key == key]
        for peer in peers:
            self._drop_peer(peer, why)
        return len(peers)

    def cancel(self, job_id: str, *, by: str) -> ServerJob:
        """Cancel a running job on behalf of `by`; NOT_FOUND or CONFLICT if it is not running."""
        target = self._jobs.get(job_id)
        if target is None:
            ended = self.history.get(job_id)
            if ended is not None:
                state = ended.summary["state"]
                raise MeshError(ErrorCode.CONFLICT, f"job {job_id} already ended ({state})")
            raise MeshError(ErrorCode.NOT_FOUND, f"no job {job_id}")
        self._abort(target, Cancelled(job_id=target.id, reason=sentence(f"cancelled by {by}")))
        return target

    async def watch(self, watcher: ServerJob, job_id: str) -> Ending:
        """Stream the job `job_id` (running or remembered) into `watcher`'s own: a DATA record
        saying which job it is, its frames from the start (a gap that was not kept is narrated),
        then the new ones as it sends them; end as it ended. Frames that queue for a slow
        watcher slow the replay; live, a watcher that falls behind is dropped as any slow
        client is. NOT_FOUND for a job this server does not remember, or a server that keeps
        no records."""
        if job_id == watcher.id:
            raise MeshError(ErrorCode.INVALID_REQUEST, "a job cannot watch itself")
        running = self._jobs.get(job_id)
        ended = self.history.get(job_id) if running is None else None
        record = running.record if running is not None else ended.record if ended else None
        if record is None:
            raise MeshError(ErrorCode.NOT_FOUND, f"no job {job_id} to watch here")
        accepted = record.accepted
        header = {"kind": "watch", "job": job_id, "op": accepted.op, "ref": accepted.ref,
                  "deadline_s": accepted.deadline_s}  # fmt: skip
        emit_record(header)
        tag = watcher.id.encode("ascii")

        def relay(kind: Kind, body: bytes) -> None:
            watcher.relay([HEADER, bytes([kind]), tag, body], kind)

        if record.forgotten:
            narrate("watch", f"the frames of job {job_id} are no longer kept (an old job's, or one "
                    "that ran when the queen stopped); how it ended follows")  # fmt: skip
        index = seen = 0  # frames, and the messages in them (a BATCH holds several)
        while batch := list(itertools.islice(record.frames_from(index), 256)):
            for after, frame in batch:
                if frame is None:
                    dropped = record.messages_before_tail - seen
                    narrate("watch", f"{dropped} message(s) of job {job_id} were dropped here: "
                            "it streamed more than a queen keeps of one job")  # fmt: skip
                    seen += dropped
                else:
                    relay(*frame)
                    seen += messages_in(*frame)
                index = after
            await trio.lowlevel.checkpoint()  # let others run, and wait for a slow watcher
            await watcher.peer.writable()
        # All it has was sent; from here, in the same step, each frame as it comes.
        if record.end_frame is None:
            record.watchers.append(relay)
            try:
                await record.ended.wait()
            finally:
                with suppress(ValueError):
                    record.watchers.remove(relay)
        terminal = record.terminal
        assert terminal is not None
        return Ending(terminal)

    def _flush_at(self, job: ServerJob, when: float) -> None:
        self._flushes[job] = when
        self._flush_wait.deadline = min(self._flush_wait.deadline, when)

    async def _flusher(self) -> None:
        """Sends each job's held frames when they are due (a job's next frame, or its end,
        sends them sooner)."""
        while True:
            with trio.CancelScope(deadline=min(self._flushes.values(), default=math.inf)) as wait:
                self._flush_wait = wait
                await trio.sleep_forever()
            now = trio.current_time()
            for job in [job for job, when in self._flushes.items() if when <= now]:
                job.flush()

    # ---- receiving ---------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            try:
                peer_id, frames, key = await self.listener.receive()
            except TransportClosed:
                return
            peer = self._peers.get(peer_id)
            role = self.trust.role_of(key)
            if role not in self._admitted or (
                peer is not None and (peer.key != key or peer.trusted_as is not role)
            ):
                self._untrusted(peer, key)
                continue
            if peer is None:
                if peer_id in self._fenced:
                    self._refuse_fenced(peer_id)
                    continue
                if key and self._connections[key] >= self.config.max_connections_per_key:
                    self._too_many(peer_id, key)
                    continue
                peer = self._add_peer(peer_id, key, role)
            now = trio.current_time()
            peer.liveness.seen(now)
            try:
                message = decode(frames)
            except RemoteProtocolError as exc:
                self._peer_lines.log(
                    logging.WARNING, "rejected a frame from %s (their fault): %s", peer.label, exc
                )
                rejection = f"rejected: {exc.message}"
                refusal = Error(
                    job_id="", code=exc.code, message=rejection, ref=exc.ref, started=False
                )  # nothing it asked for ran
                self._send(peer, refusal)
                continue
            if peer.unreachable is not None and not isinstance(message, Disconnect):
                continue  # sent before it closed, or after a blip lost what was sent to it
            self._dispatch(peer, message)

    def _dispatch(self, peer: Peer, message: Message) -> None:
        match message:
            case Submit() if peer.role is None and message.accept_by is not None:
                # A client's first frame on a connection is READY: this one greeted an earlier
                # run of this server (it restarted), and its deadline cannot be judged here.
                why = f"the {self.actor} does not know this connection (it restarted)"
                self._send(
                    peer,
                    Error(job_id="", code=ErrorCode.UNAVAILABLE, ref=message.ref, message=why,
                          started=False),
                )  # fmt: skip
                self._stranger(peer)
            case Submit():
                self._submit(peer, message)
            case Cancel():
                job = self._jobs.get(message.job_id)
                if job is None or job.peer is not peer:
                    # Either it raced with the job's end (whose terminal frame is on its way), or
                    # it names another peer's job, which only `cancel()` may cancel. An ERROR
                    # here would be a second terminal frame for that job id.
                    self._peer_lines.log(
                        logging.INFO,
                        "ignored CANCEL of %s from %s: not a running job of theirs",
                        message.job_id,
                        peer.label,
                    )
                    return
                reason = message.reason or "cancelled by its submitter"
                self._abort(job, Cancelled(job_id=job.id, reason=reason))
            case Heartbeat() if peer.role is None:
                self._stranger(peer)  # it waits for jobs that no longer exist anywhere
            case Heartbeat():
                peer.liveness.interval_s = message.interval_s
                peer.clock.sample(message.ts, time.time())
            case Ready():
                self._on_ready(peer, message)
            case Disconnect():
                why = f"it disconnected ({message.reason or 'no reason given'})"
                self._drop_peer(peer, why, left=True)
            case _:
                refusal = f"a {self.actor} does not take {message.KIND.name} frames"
                self._send(
                    peer,
                    Error(job_id=message.job_id, code=ErrorCode.INVALID_REQUEST, message=refusal),
                )

    def _on_ready(self, peer: Peer, ready: Ready) -> None:
        """Say who this server is; a newer connection of a client's session fences the older."""
        peer.name, peer.role = ready.sender, ready.role
        peer.clock.sample(ready.ts, time.time())
        if ready.interval_s:
            peer.liveness.interval_s = max(ready.interval_s, MIN_HEARTBEAT_S)
        if ready.session:
            older = self._sessions.get(ready.session)
            if older is not None and older is not peer:
                if ready.epoch < older.epoch:
                    self._fence(peer, f"{ready.sender} connected again since (epoch {older.epoch})")
                    return
                self._fence(older, f"{ready.sender} connected again (epoch {ready.epoch})")
            peer.session, peer.epoch = ready.session, ready.epoch
            self._sessions[ready.session] = peer
        info = self.ready_info(peer)
        answer = Ready(
            job_id="", sender=self.name, role=self.actor, info=info, ts=time.time(),
            interval_s=self.config.heartbeat_s,
        )  # fmt: skip
        self._send(peer, answer)

    # ---- peers ---------------------------------------------------------------------------------

    def _untrusted(self, peer: Peer | None, key: str) -> None:
        """A message whose key is not trusted here (any more, or in another role now): nothing
        it says is acted on or answered, and the connection it came on is dropped, with the
        jobs it started (a key revoked or re-roled since the handshake; or another key taking a
        connection's routing id over)."""
        self.trust.admits(key, self._admitted)  # counted, and logged once per refused key
        if peer is not None:
            self._drop_peer(peer, "its key is not trusted here (any more)")

    def _too_many(self, peer_id: bytes, key: str) -> None:
        """A connection past `max_connections_per_key` for its key: told to go, and fenced
        (what else it sends is answered with DISCONNECT, at most once an interval)."""
        limit = self.config.max_connections_per_key
        if key not in self._crowded:
            self._crowded.add(key)
            log.warning("a key holds %d connections, the most one key may; refusing more", limit)
        self._fenced[peer_id] = trio.current_time()
        if len(self._fenced) > _FENCED_REMEMBERED:
            del self._fenced[next(iter(self._fenced))]
        why = f"this key holds {limit} connections to {self.name}, the most one key may"
        with suppress(PeerBusy, PeerUnreachable, TransportClosed):
            self.listener.send_nowait(
                peer_id, encode(Disconnect(job_id="", sender=self.name, reason=why))
            )

    def _add_peer(self, peer_id: bytes, key: str, role: Role) -> Peer:
        send, receive = trio.open_memory_channel[Sequence[bytes]](self.config.peer_backlog)
        peer = Peer(
            id=peer_id,
            label=f"{self.peer_label}-{next(self._peer_numbers)}",
            server=self,
            key=key,
            trusted_as=role,
            liveness=PeerLiveness(
                self.config.heartbeat_s, trio.current_time(), lost_after=self.config.lost_after
            ),
            outbox=send,
            inbox=receive,
        )
        self._peers[peer_id] = peer
        self._connections[key] += 1
        self.schedule.add(peer)
        assert self._senders is not None
        self._senders.start_soon(self._peer_sender, peer)
        return peer

    async def _peer_sender(self, peer: Peer) -> None:
        """Sends what queued for a congested peer, in order; only this peer waits for it."""
        async with peer.inbox:
            async for frames in peer.inbox:
                if not await self._send_patiently(peer, frames):
                    return
                peer._sent_one()

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
                except PeerUnreachable:
                    peer.unreachable = trio.current_time()
                    return False
                except TransportClosed:
                    return False
        self._drop_peer(peer, f"it read nothing for {self.config.peer_stall_s:g}s")
        return False

    def _send(self, peer: Peer, message: Message) -> None:
        """Send a frame that is not a job's (replies, heartbeats): small, never over a limit."""
        self._send_frames(peer, encode(message))

    def _send_frames(self, peer: Peer, frames: Sequence[bytes]) -> None:
        if peer.gone or peer.unreachable is not None:
            return
        if not peer.backlog:
            try:
                self.listener.send_nowait(peer.id, frames)
                return
            except PeerBusy:
                pass  # the sender task retries it
            except PeerUnreachable:
                peer.unreachable = trio.current_time()
                return
            except TransportClosed:
                return
        try:
            peer.outbox.send_nowait(frames)
            peer.backlog += 1
        except trio.WouldBlock:
            self._drop_peer(peer, f"it left {self.config.peer_backlog} frames unread")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _drop_peer(self, peer: Peer, why: str, *, left: bool = False) -> None:
        """Forget a peer, cancel what it started (nothing it began may outlive it), and fence
        its connection (nothing it sent may run later)."""
        if peer.gone:
            return
        peer.gone = True
        self._peers.pop(peer.id, None)
        self._connections[peer.key] -= 1
        if self._connections[peer.key] <= 0:
            del self._connections[peer.key]
            self._crowded.discard(peer.key)
        self._fenced[peer.id] = None
        if len(self._fenced) > _FENCED_REMEMBERED:
            del self._fenced[next(iter(self._fenced))]
        if self._sessions.get(peer.session) is peer:
            del self._sessions[peer.session]
        self.schedule.discard(peer)
        peer.outbox.close()
        if peer.drained is not None:
            peer.drained.set()
        ended = [job for job in peer.jobs if not job.keep]  # the others run on, recorded
        if ended:
            log.warning(
                "dropping %s because %s; cancelling its %d job(s)", peer.label, why, len(ended)
            )
        for job in ended:
            reason = sentence(f"{peer.label} is gone: {why}")
            self._abort(job, Cancelled(job_id=job.id, reason=reason))
        if self.on_peer_gone is not None:
            self.on_peer_gone(peer, why, left)

    def _refuse_fenced(self, peer_id: bytes) -> None:
        """A frame on a dropped connection: sent before the drop (it waited in a cut link or a
        frozen process), or by a client that does not know yet. Too late either way: it is not
        acted on, and the client is told (DISCONNECT, at most once an interval) so that it
        connects again rather than talk into the void. Logged once per connection."""
        now = trio.current_time()
        told = self._fenced[peer_id]
        if told is None:
            log.info("ignoring what comes on a dropped connection of a %s", self.peer_label)
        if told is None or now - told >= self.config.heartbeat_s:
            self._fenced[peer_id] = now
            goodbye = Disconnect(job_id="", sender=self.name, reason="this connection was dropped")
            with suppress(PeerBusy, PeerUnreachable, TransportClosed):
                self.listener.send_nowait(peer_id, encode(goodbye))

    def _stranger(self, peer: Peer) -> None:
        """A client speaks on a connection it has not greeted on (READY comes first): it greeted
        an earlier run of this server. Told to connect again, so that it ends what it waits for."""
        self._drop_peer(peer, "it greeted a server that is gone (a restart)")
        self._refuse_fenced(peer.id)

    def _fence(self, peer: Peer, why: str) -> None:
        """Drop a connection whose client has moved on (and so refuse what it sends later)."""
        self._drop_peer(peer, f"it was superseded: {why}")

    # ---- jobs ------------------------------------------------------------------------------------

    def _submit(self, peer: Peer, submit: Submit) -> None:
        refusal = self._refusal(peer, submit)
        if refusal is not None:
            code, why = refusal
            self._peer_lines.log(
                logging.INFO, "refused %s from %s: %s", submit.op.NAME, peer.label, why
            )
            self._send(
                peer, Error(job_id="", code=code, ref=submit.ref, message=why, started=False)
            )
            if self.observer is not None:
                self.observer.submit_refused(submit.op.NAME, code)
            return
        # An operation's own default may be longer than a frame may say (a long ping's).
        deadline = min(submit.timeout_s or submit.op.default_deadline_s, MAX_DEADLINE_S)
        job_id = submit.job_id or new_job_id()
        job = ServerJob(id=job_id, op=submit.op, peer=peer, deadline_s=deadline, keep=submit.keep)
        job.scope.relative_deadline = deadline
        self._jobs[job.id] = job
        self.job_count.value = len(self._jobs)
        peer.jobs.add(job)
        accepted = Accepted(job_id=job.id, ref=submit.ref, op=job.op.NAME, deadline_s=deadline)
        if self.history.records and job.op.RECORDED:
            job.record = JobRecord(accepted, self.history.budget)
            self.history.started({**job.summary(), "ref": submit.ref, "deadline_s": deadline})
        self._send(peer, accepted)
        assert self._nursery is not None
        self._nursery.start_soon(self._run_job, job, name=f"job {job.id} {job.op.NAME}")

    def _refusal(self, peer: Peer, submit: Submit) -> tuple[ErrorCode, str] | None:
        if self._stopping:
            return ErrorCode.UNAVAILABLE, f"the {self.actor} is shutting down"
        if type(submit.op) not in self.handlers:
            return ErrorCode.INVALID_REQUEST, f"a {self.actor} does not run {submit.op.NAME} jobs"
        if not self.trust.permits(self.actor, peer.trusted_as, submit.op):
            return (
                ErrorCode.FORBIDDEN,
                f"a {peer.trusted_as} may not submit {submit.op.NAME} to a {self.actor}",
            )
        if submit.job_id and self.assigns_job_ids:
            return ErrorCode.INVALID_REQUEST, f"the {self.actor} assigns job ids; leave it empty"
        if submit.job_id in self._jobs:
            return ErrorCode.CONFLICT, f"job {submit.job_id} is already running"
        if submit.accept_by is not None:
            late = peer.clock.late_by(submit.accept_by, time.time())
            if late > 0:
                return ErrorCode.TIMEOUT, (
                    f"the request arrived {late:.3f}s after its sender stopped waiting for it "
                    "(a cut link or a frozen process held it up); it was not run"
                )
        if len(self._jobs) >= self.config.max_running_jobs:
            limit = self.config.max_running_jobs
            return ErrorCode.BUSY, f"{self.actor} {self.name} is busy: {limit} of {limit} jobs run"
        per_peer = self.config.max_jobs_per_peer
        if per_peer is not None and len(peer.jobs) >= per_peer:
            return ErrorCode.BUSY, (
                f"this connection runs {per_peer} jobs at {self.name}, the most one may; "
                "try again when one ends"
            )
        return None

    def _abort(
        self, job: ServerJob, terminal: Message, *, cancel_reason: str | None = None
    ) -> None:
        if job.abort is None:
            job.abort = terminal
        job.scope.cancel(reason=cancel_reason)

    async def _run_job(self, job: ServerJob) -> None:
        current_job.set(
            JobContext(
                job_id=job.id,
                actor=str(self.actor),
                emit=job.emit,
                hive_id=self.hive_id,
                worker_id=self.worker_id,
            )
        )
        terminal: Message | None = None
        try:
            with job.scope:
                try:
                    result = await self.handlers[type(job.op)](job, job.op)
                except MeshError as exc:
                    terminal = self._error(job, exc.code, exc.message, started=exc.started)
                except Exception as exc:
                    log.exception("job %s (%s) failed", job.id, job.op.NAME)
                    message = f"{job.op.NAME} failed: {type(exc).__name__}: {exc}"
                    terminal = self._error(job, ErrorCode.INTERNAL, message)
                else:
                    if isinstance(result, Ending):
                        terminal = replace(result.terminal, job_id=job.id)
                    else:
                        terminal = self._done(job, result)
        finally:
            # Also when the server itself is cancelled (its grace over, or its task cancelled):
            # its cancellation passes through the job's scope, and the job must still end.
            if job.abort is not None and (terminal is None or job.scope.cancelled_caught):
                terminal = job.abort
            elif terminal is None and job.scope.cancelled_caught:
                message = f"{job.op.NAME} did not finish within {job.deadline_s:g}s"
                terminal = self._error(job, ErrorCode.TIMEOUT, message)
            elif terminal is None:
                terminal = self._error(job, ErrorCode.UNAVAILABLE, f"the {self.actor} stopped")
            self._finish(job, terminal)

    @staticmethod
    def _error(job: ServerJob, code: ErrorCode, message: str, *, started: bool = True) -> Error:
        return Error(job_id=job.id, code=code, message=sentence(message), started=started)

    def _done(self, job: ServerJob, result: Any) -> Message:
        """DONE with `result`, or the job's ERROR if the result is not a value a frame can
        carry (too many values, or malformed by our own bug)."""
        try:
            return Done(job_id=job.id, result=result)
        except ProtocolError as exc:
            return self._unsendable(job, exc)

    def _unsendable(self, job: ServerJob, exc: ProtocolError) -> Error:
        """The ERROR that ends a job whose own terminal frame cannot be sent: RESULT_TOO_LARGE
        for a result over a size limit, INTERNAL for anything else (a bug here, logged so)."""
        if isinstance(exc, TooLarge):
            message = f"the result of {job.op.NAME} is too large to send: {exc.message}"
            return self._error(job, ErrorCode.RESULT_TOO_LARGE, message)
        log.error("job %s (%s) made a frame it cannot send (a bug): %s", job.id, job.op.NAME, exc)
        message = f"{job.op.NAME} made a result that cannot be sent (a bug): {exc.message}"
        return self._error(job, ErrorCode.INTERNAL, message)

    def _finish(self, job: ServerJob, terminal: Message) -> None:
        """Send the job's terminal frame (checked here, where it is built, so that no result can
        stop the server) and record how it ended."""
        try:
            frames = encode(terminal)
        except ProtocolError as exc:
            terminal = self._unsendable(job, exc)
            frames = encode(terminal)
        job.flush()
        job.ended = time.time()
        job.lifecycle.send(terminal.KIND)
        if isinstance(terminal, Error):
            job.error = f"{terminal.code}: {terminal.message}"
        elif isinstance(terminal, Cancelled):
            job.error = terminal.reason
        self._send_frames(job.peer, frames)
        self._jobs.pop(job.id, None)
        self.job_count.value = len(self._jobs)
        job.peer.jobs.discard(job)
        if job.record is not None:
            job.record.end(terminal.KIND, frames[3])
        self.history.ended(job.summary(), job.record)
        if self.observer is not None:
            self.observer.job_ended(job, terminal)
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
