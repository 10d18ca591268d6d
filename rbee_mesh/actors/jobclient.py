"""Submitting jobs to a server over one Connection: the one job client, for every actor that
submits or forwards jobs (a keeper to its queen, the queen to each hive, a hive to each worker).

A `JobClient` owns one connection and what travels on it:

- **joining**: it says READY (its name, role, session and epoch) until the server answers with
  its own READY, then heartbeats; every frame from the server counts as a heartbeat;
- **jobs**: `submit` sends SUBMIT and waits for ACCEPTED or a refusal, at most
  `accept_timeout_s`; the SUBMIT's `accept_by` lies a fifth of that earlier, so that a server
  refuses what its client has already given up on, and the client's "no answer" is the truth:
  the job never started (`started=False`, it may be placed again). An ACCEPTED that comes after
  all is answered with CANCEL. Each job's frames are checked against the job lifecycle; the
  streamed ones (NARRATION, DATA, TOKEN) are relayed unopened when the job is being forwarded,
  the others decoded and handed to whoever waits on the job;
- **loss**: a server silent for CLIENT_LOST_AFTER intervals ends every running job (`lost_code`,
  e.g. HIVE_LOST) and the connection is fenced: closed (what still waits in it is dropped) and
  opened again under a new epoch, whose READY makes the server cancel what it still runs for
  the old one. The server gave up one interval sooner (SERVER_LOST_AFTER), so a job reported
  lost here has already been stopped there.

`forward` runs a job one hop down (queen to hive, hive to worker): written once, here.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import trio

from rbee_mesh.actors.heartbeat import HeartbeatSchedule
from rbee_mesh.actors.runtime import hand_over, single_errors
from rbee_mesh.actors.trust import Trust
from rbee_mesh.protocol import (
    STREAMED,
    TERMINAL_KINDS,
    Accepted,
    Actor,
    Batch,
    Cancel,
    Disconnect,
    Error,
    ErrorCode,
    Heartbeat,
    JobLifecycle,
    Kind,
    Liveness,
    MeshError,
    Message,
    Operation,
    PeerLiveness,
    Ready,
    RemoteProtocolError,
    Submit,
    decode,
    encode,
    outcome,
    peek_route,
)
from rbee_mesh.protocol.constants import CLIENT_LOST_AFTER, FORWARD_ACCEPT_S, HEARTBEAT_S
from rbee_mesh.protocol.messages import sentence
from rbee_mesh.transport import (
    Connection,
    PeerBusy,
    PeerUnreachable,
    SocketOptions,
    TransportError,
    open_connection,
)
from rbee_mesh.transport.curve import ClientKeys

log = logging.getLogger("rbee_mesh.jobs")

#: The part of `accept_timeout_s` between a SUBMIT's `accept_by` and its client giving up: room
#: for the ACCEPTED's way back and for the error in the estimate of the client's clock.
ACCEPT_SLACK = 0.2
#: Refs of submissions given up on, remembered so that a late ACCEPTED is answered with CANCEL.
_ABANDONED_REMEMBERED = 1_024

Relay = Callable[[Sequence[bytes], Kind], None]


@dataclass(frozen=True)
class ClientConfig:
    heartbeat_s: float = HEARTBEAT_S
    #: How long `submit` waits for ACCEPTED or a refusal before the job counts as not started.
    accept_timeout_s: float = 3.0
    #: Decoded frames buffered per job for its reader; past this the client stops reading.
    job_buffer: int = 10_000
    #: Past `job_buffer`, cancel the job whose reader fell behind rather than stop reading: for
    #: a client whose jobs have readers of their own (the HTTP API's requests), so that one
    #: slow reader does not hold up the others' frames, nor the heartbeats.
    cancel_slow_readers: bool = False
    #: Missed heartbeat intervals after which the server counts as lost.
    lost_after: int = CLIENT_LOST_AFTER
    #: How soon a connect is tried again: a hive's worker binds its socket once its model is
    #: loaded, and the hive, connecting first, should find it at once.
    reconnect_ivl_ms: int = 100


class ServerUnreachable(MeshError):
    """The server did not answer a SUBMIT in time (or could not be reached): the job was not
    started there, and never will be."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, message, started=False)


class ClientJob:
    """One submitted job as its client sees it.

    Iterate it for its frames (ACCEPTED, then NARRATION / DATA / TOKEN unless they are relayed,
    then the terminal frame); iteration ends after the terminal frame, which `terminal` then
    holds. Leaving a loop early and iterating again later resumes where it stopped.
    """

    def __init__(
        self, client: JobClient, ref: str, op: Operation, relay: Relay | None, buffer: int
    ) -> None:
        self.client = client
        self.ref = ref
        self.op = op
        self.relay = relay
        self.job_id = ""
        self.accepted: Accepted | None = None
        self.terminal: Message | None = None
        self.submitted_at = trio.current_time()
        self.lifecycle = JobLifecycle()
        self._answered = trio.Event()
        self._fell_behind = False
        self._send, self._receive = trio.open_memory_channel[Message](buffer)
        #: Frames of a BATCH not read yet (a BATCH is delivered whole, and read frame by frame).
        self._unread: deque[Message] = deque()

    async def _deliver(self, message: Message) -> None:
        if isinstance(message, Accepted):
            self.accepted, self.job_id = message, message.job_id
        if message.is_terminal:
            self.terminal = message
        self._answered.set()
        if not self.client.config.cancel_slow_readers:
            await hand_over(self._send, message)
        else:
            try:
                self._send.send_nowait(message)
            except trio.WouldBlock:  # (a terminal frame is left in `terminal` for the reader)
                if not message.is_terminal and not self._fell_behind:
                    self._fell_behind = True
                    await self.cancel("its reader fell behind")
        if message.is_terminal:
            self._send.close()

    def __aiter__(self) -> ClientJob:
        return self

    async def __anext__(self) -> Message:
        if self._unread:  # the rest of a BATCH: no task switch per frame
            await trio.lowlevel.checkpoint_if_cancelled()
            return self._unread.popleft()
        try:
            message = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        if isinstance(message, Batch):
            self._unread.extend(message.messages)
            return self._unread.popleft()
        return message

    async def end(self) -> Message:
        """Wait for the job's terminal frame (passing over what else is delivered)."""
        async for _ in self:
            pass
        assert self.terminal is not None
        return self.terminal

    async def cancel(self, reason: str = "cancelled by the user") -> None:
        """Ask the server to cancel; the CANCELLED (or a racing terminal) frame follows."""
        if self.job_id and self.terminal is None:
            await self.client.send(Cancel(job_id=self.job_id, reason=reason))


class JobClient:
    """One connection to a job server and the jobs submitted over it. Run it with `run` and
    keep it on a `HeartbeatSchedule` (`running_client` does both, for a client alone)."""

    def __init__(
        self,
        endpoint: str,
        *,
        name: str,
        role: Actor,
        server: str,
        lost_code: ErrorCode,
        config: ClientConfig | None = None,
        on_ready: Callable[[Ready], None] | None = None,
        on_liveness: Callable[[Liveness, Liveness], None] | None = None,
        keys: ClientKeys | None = None,
    ) -> None:
        """`server` names the server for messages ("the queen at ...", "hive h1");
        `lost_code` ends this client's running jobs when the server is lost. `on_ready` and
        `on_liveness` are told of the server's READY and of changes of its liveness. `keys`:
        this node's and the server's CURVE keys (default: a server of this process's node)."""
        self.endpoint = endpoint
        self.keys = keys or Trust.for_process().client_keys()
        self.name = name
        self.role = role
        self.server = server
        self.lost_code = lost_code
        self.config = config or ClientConfig()
        self.on_ready = on_ready
        self.on_liveness = on_liveness
        self.session = secrets.token_hex(8)
        self.epoch = 0
        #: What the server's READY said about it (for a hive: its id, endpoints and state).
        self.info: dict[str, Any] = {}
        #: Set once the server has answered READY on the current connection.
        self.answered = trio.Event()
        #: Set once anything at all has been heard from the server.
        self.heard_once = trio.Event()
        self._heard = False
        self._liveness = PeerLiveness(
            self.config.heartbeat_s, trio.current_time(), lost_after=self.config.lost_after
        )
        self._conn: Connection | None = None
        self._connected = trio.Event()
        self._receiving: trio.CancelScope | None = None
        self._closed = False
        self._jobs: dict[str, ClientJob] = {}
        self._pending: dict[str, ClientJob] = {}
        self._abandoned: deque[str] = deque(maxlen=_ABANDONED_REMEMBERED)
        self._refs = itertools.count(1)
        self._beats = itertools.count(1)

    @classmethod
    def forwarding(
        cls, endpoint: str, *, name: str, role: Actor, server: str, lost_code: ErrorCode,
        heartbeat_s: float, keys: ClientKeys, reconnect_ivl_ms: int = 100,
    ) -> JobClient:  # fmt: skip
        """A client that an actor forwards jobs through one hop down (queen to hive, hive to
        worker): it waits FORWARD_ACCEPT_S for each to be accepted."""
        config = ClientConfig(
            heartbeat_s=heartbeat_s,
            accept_timeout_s=FORWARD_ACCEPT_S,
            reconnect_ivl_ms=reconnect_ivl_ms,
        )
        return cls(
            endpoint, name=name, role=role, server=server, lost_code=lost_code, config=config,
            keys=keys,
        )  # fmt: skip

    # ---- the link ------------------------------------------------------------------------------

    @property
    def liveness(self) -> PeerLiveness | None:
        """The server's liveness, watched once it has been heard from."""
        return self._liveness if self.heard_once.is_set() else None

    @property
    def silent_s(self) -> float | None:
        """Seconds since the server was last heard from (None: never)."""
        if not self._heard:
            return None
        return trio.current_time() - self._liveness.last_seen

    @property
    def is_live(self) -> bool:
        return self.heard_once.is_set() and self._liveness.state is not Liveness.LOST

    @property
    def state(self) -> str:
        return str(self._liveness.state) if self.heard_once.is_set() else "connecting"

    @property
    def jobs(self) -> list[ClientJob]:
        """The jobs accepted by the server and not ended yet."""
        return list(self._jobs.values())

    @property
    def beat_interval_s(self) -> float:
        """Ours, or the server's if it is shorter: the server judges us by the interval our
        heartbeats say, and must give up on us (SERVER_LOST_AFTER of them) before we give up on
        it (CLIENT_LOST_AFTER of its own)."""
        if self._heard:
            return min(self.config.heartbeat_s, self._liveness.interval_s)
        return self.config.heartbeat_s

    def beat(self) -> None:
        """READY until the server answers on this connection, then HEARTBEAT; never waits."""
        if self._conn is None:
            return
        if self.answered.is_set():
            message: Message = Heartbeat(
                job_id="", sender=self.name, seq=next(self._beats),
                interval_s=self.beat_interval_s, ts=time.time(),
            )  # fmt: skip
        else:
            message = self._ready()
        with suppress(TransportError):
            self._conn.send_nowait(encode(message))

    def liveness_changed(self, was: Liveness, now: Liveness) -> None:
        if self.on_liveness is not None:
            self.on_liveness(was, now)
        if now is Liveness.LOST:
            missed = self._liveness.missed(trio.current_time())
            self.lose(
                f"{self.server} stopped answering: nothing heard for {missed} heartbeat intervals"
            )
            self._fence()

    def heard(self, interval_s: float | None = None) -> None:
        """A frame came from the server (on this connection, or another of its sockets, such
        as a hive's heartbeats); `interval_s`: the heartbeat interval it says it keeps."""
        if not self._heard:
            self._heard = True
            self.heard_once.set()
        if interval_s is not None:
            self._liveness.interval_s = interval_s
        was = self._liveness.seen(trio.current_time())
        if was is not None and self.on_liveness is not None:
            self.on_liveness(was, Liveness.LIVE)

    def lose(self, why: str) -> None:
        """End every job the server had accepted with `lost_code`: the server is gone (or as
        good as gone). Submissions not accepted yet end at their own accept deadline."""
        jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            lost = Error(job_id=job.job_id, code=self.lost_code, message=sentence(why))
            job.lifecycle.receive(Kind.ERROR)
            job.terminal = lost
            job._answered.set()
            with suppress(trio.WouldBlock, trio.BrokenResourceError):
                job._send.send_nowait(lost)
            job._send.close()

    async def send(self, message: Message) -> None:
        await self.send_frames(encode(message))

    async def send_frames(self, frames: Sequence[bytes]) -> None:
        """Send frames as they are, on the current connection (once there is one)."""
        await self._send_now(frames)

    async def _send_now(self, frames: Sequence[bytes]) -> None:
        """Send at once while the pipe has room (no task switch: a job's SUBMIT is on the path
        of every operation), else wait for room; first wait for a connection if there is none."""
        while self._conn is None:  # (a fence may come between the connection and this task)
            await self._connected.wait()
        try:
            self._conn.send_nowait(frames)
        except PeerBusy:
            await self._conn.send(frames)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, and keep a connection open until `aclose`: one per epoch. Raises
        EndpointError at once for an endpoint that cannot be connected to."""
        started = False
        while not self._closed:
            try:
                conn = await open_connection(self.endpoint, options=self._socket_options())
            except PeerUnreachable:  # mem:// with nobody bound there (yet, or any more)
                conn = None
            if not started:
                task_status.started()
                started = True
            if conn is None:
                await trio.sleep(self.config.heartbeat_s)
                continue
            self._conn = conn
            self._connected.set()
            self.beat()  # READY at once, not at the next beat
            try:
                with trio.CancelScope() as self._receiving:
                    await self._receive_loop(conn)
                    # The server's end went away (in memory): try again an interval later.
                    await trio.sleep(self.config.heartbeat_s)
            finally:
                self._disconnected()
                with trio.CancelScope(shield=True):
                    await conn.aclose()
            self.epoch += 1
            self.answered = trio.Event()

    async def aclose(self, reason: str = "done") -> None:
        """Say goodbye (the server cancels what it still runs for this client at once, rather
        than after its silence) and close; jobs still open here end with `lost_code`."""
        self._closed = True
        if self._conn is not None:
            with trio.move_on_after(0.5), suppress(TransportError):
                await self._conn.send(
                    encode(Disconnect(job_id="", sender=self.name, reason=sentence(reason)))
                )
        self._fence()
        self.lose(f"the link to {self.server} was closed: {reason}")

    def _fence(self) -> None:
        """Close this connection; `run` opens the next epoch's (unless closed). Nothing more is
        sent on it from now: what is sent next waits for the next connection."""
        self._disconnected()
        if self._receiving is not None:
            self._receiving.cancel()

    def _disconnected(self) -> None:
        self._conn = None
        if self._connected.is_set():  # (an unset one may have waiters: they wait on)
            self._connected = trio.Event()

    def _ready(self) -> Ready:
        return Ready(
            job_id="", sender=self.name, role=self.role, session=self.session,
            epoch=self.epoch, ts=time.time(), interval_s=self.beat_interval_s,
        )  # fmt: skip

    def _socket_options(self) -> SocketOptions:
        # A routing id of our own: a connection that libzmq re-establishes after a blip is the
        # same client to the server (ROUTER_HANDOVER), while each epoch is a new one.
        return SocketOptions(
            routing_id=f"{self.session}.{self.epoch}".encode(),
            reconnect_ivl_ms=self.config.reconnect_ivl_ms,
            curve=self.keys,
        )

    # ---- jobs ----------------------------------------------------------------------------------

    async def submit(
        self,
        op: Operation,
        *,
        job_id: str = "",
        timeout_s: float | None = None,
        relay: Relay | None = None,
        keep: bool = False,
    ) -> ClientJob:
        """Submit `op` and wait for the server to accept it or refuse it (then the job's
        terminal frame is the refusal). `job_id`: the id it must run under (a forwarded job's);
        `relay`: where its streamed frames go, unopened; `keep`: the job runs on if this
        client disconnects.

        Raises ServerUnreachable if no answer comes within `accept_timeout_s`: the job did not
        start and will not (the server refuses it past its `accept_by`).
        """
        ref = job_id or f"{self.session[:8]}-{next(self._refs)}"
        job = ClientJob(self, ref, op, relay, self.config.job_buffer)
        wait = self.config.accept_timeout_s
        accept_by = time.time() + wait * (1 - ACCEPT_SLACK)
        frames = encode(
            Submit(
                job_id=job_id, ref=ref, op=op, timeout_s=timeout_s, accept_by=accept_by, keep=keep
            )
        )
        self._pending[ref] = job
        try:
            with trio.move_on_after(wait):
                try:
                    await self._send_now(frames)
                except TransportError as exc:
                    raise ServerUnreachable(f"cannot reach {self.server}: {exc}") from None
                await job._answered.wait()
        finally:
            if not job._answered.is_set() and self._pending.pop(ref, None) is not None:
                self._abandoned.append(ref)
        if job._answered.is_set():  # also when the answer came as the wait ran out
            return job
        raise ServerUnreachable(
            f"no answer from {self.server} within {wait:g}s; it did not run {op.NAME}"
        )

    async def _receive_loop(self, conn: Connection) -> None:
        while True:
            try:
                frames = await conn.receive()
            except TransportError:
                return
            try:
                kind, job_id = peek_route(frames)
            except RemoteProtocolError as exc:
                log.warning("ignored a malformed frame from %s (their fault): %s", self.server, exc)
                continue
            self.heard()
            if job_id and kind is not Kind.ACCEPTED:
                await self._job_frame(kind, job_id, frames)
                continue
            if kind is Kind.ACCEPTED and job_id in self._pending:
                self._accept_forwarded(job_id)
                continue
            try:
                message = decode(frames, (kind, job_id))
            except RemoteProtocolError as exc:
                log.warning("ignored a malformed frame from %s (their fault): %s", self.server, exc)
                continue
            await self._connection_frame(message)

    def _accept_forwarded(self, job_id: str) -> None:
        """ACCEPTED for a job submitted under its own id (forwarded: its ref is its id), which
        nobody reads: it need not be opened."""
        job = self._pending.pop(job_id)
        job.lifecycle.receive(Kind.ACCEPTED)
        job.job_id = job_id
        self._jobs[job_id] = job
        job._answered.set()

    async def _job_frame(self, kind: Kind, job_id: str, frames: Sequence[bytes]) -> None:
        job = self._jobs.get(job_id)
        if job is None:
            return  # a frame of a job that has ended here (lost, fenced): too late
        if kind in STREAMED and job.relay is not None:
            if job.lifecycle.streaming:
                job.relay(frames, kind)  # straight on, unopened: no task in between
            else:
                log.warning(
                    "ignored a %s of job %s from %s after its end", kind.name, job_id, self.server
                )
            return
        try:
            message = decode(frames, (kind, job_id))
        except RemoteProtocolError as exc:
            log.warning(
                "ignored a frame of job %s from %s (their fault): %s", job_id, self.server, exc
            )
            if kind not in TERMINAL_KINDS:
                return
            message = Error(
                job_id=job_id,
                code=ErrorCode.INTERNAL,
                message=f"{self.server} ended the job with a malformed frame: {exc.message}",
            )
        if not self._advance(job, kind):
            return
        if message.is_terminal:
            del self._jobs[job_id]
        await job._deliver(message)

    def _advance(self, job: ClientJob, kind: Kind) -> bool:
        try:
            job.lifecycle.receive(kind)
        except RemoteProtocolError as exc:
            log.warning("ignored a frame of job %s from %s: %s", job.job_id, self.server, exc)
            return False
        return True

    async def _connection_frame(self, message: Message) -> None:
        match message:
            case Accepted():
                job = self._pending.pop(message.ref, None)
                if job is None:
                    if message.ref in self._abandoned:
                        # Given up on already (and perhaps placed elsewhere): it must not run.
                        reason = "accepted after its submitter had stopped waiting for it"
                        with suppress(TransportError):
                            await self.send(Cancel(job_id=message.job_id, reason=reason))
                    return
                job.lifecycle.receive(Kind.ACCEPTED)
                self._jobs[message.job_id] = job
                await job._deliver(message)
            case Error(job_id=""):
                job = self._pending.pop(message.ref, None)
                if job is None:
                    log.warning(
                        "%s refused a frame: %s: %s", self.server, message.code, message.message
                    )
                    return
                job.lifecycle.receive(Kind.ERROR)
                await job._deliver(message)
            case Ready():
                self.info = dict(message.info)
                if message.interval_s:
                    self.heard(message.interval_s)
                self.answered.set()
                if self.on_ready is not None:
                    self.on_ready(message)
            case Heartbeat():
                self.heard(message.interval_s)
            case Disconnect():
                # The server has dropped this connection (or is going): what it ran for this
                # client has ended there; connect again, as a new epoch.
                why = message.reason or "no reason given"
                log.info("%s ended this connection: %s", self.server, why)
                self.lose(f"{self.server} ended the connection: {why}")
                self._fence()
            case _:
                log.warning("ignored a %s frame from %s", message.KIND.name, self.server)


@asynccontextmanager
async def running_client(client: JobClient) -> AsyncIterator[JobClient]:
    """`client` connected and heartbeating for the duration of the block (on a schedule of its
    own: one client alone, as a keeper has); it says goodbye when the block ends."""
    schedule = HeartbeatSchedule(client.config.heartbeat_s)
    schedule.add(client)
    with single_errors():
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            nursery.start_soon(schedule.run)
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
                nursery.cancel_scope.cancel()


#: A server answers CANCEL at once (a worker after the prefill it is in), and one that cannot is
#: found lost within CLIENT_LOST_AFTER intervals; this bounds the wait for its answer only when
#: nothing watches the link any more (the whole actor cancelled at once).
_CONFIRM_BACKSTOP_S = 30.0


async def forward(
    client: JobClient,
    op: Operation,
    *,
    job_id: str,
    timeout_s: float,
    relay: Relay,
    cancelled_by: str,
) -> Any:
    """Run `op` as job `job_id` one hop down, on `client`'s server: its streamed frames go to
    `relay` as they come, unopened, and its result is returned (or its MeshError raised; with
    `started=False` when it was refused, or not answered, before it began).

    If the job ends here first (cancelled, deadline, shutdown), the server is told to cancel it,
    and this returns once the server has ended it, or has been found lost: so that nothing runs
    there, and what it used (a worker's slot) is free, by the time the job is reported ended.
    """
    # Not interrupted until the server has answered (FORWARD_ACCEPT_S at most): until then,
    # whether the job runs there is unknown, and a job reported ended must not start later.
    with trio.CancelScope(shield=True):
        handle = await client.submit(op, job_id=job_id, timeout_s=timeout_s, relay=relay)
    try:
        terminal = await handle.end()
    finally:
        if handle.terminal is None:
            with trio.CancelScope(shield=True), trio.move_on_after(_CONFIRM_BACKSTOP_S):
                with suppress(TransportError):
                    await handle.cancel(f"cancelled at {cancelled_by}")
                await handle.end()
    return outcome(terminal, client.server)
