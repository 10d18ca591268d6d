"""The queen's view of its hives: one link per hive, its liveness, and forwarding jobs to it.

A link is a DEALER to the hive's control ROUTER. The queen says READY until the hive answers with
its id and heartbeat endpoint, then subscribes to the hive's heartbeats (PUB/SUB). Any frame from
the hive, on either socket, counts as a heartbeat: a hive silent for one interval is *suspect*,
for three *lost*. Jobs forwarded to a lost hive end with HIVE_LOST; when the hive speaks again it
is live again, with no restart of the queen.

Forwarded jobs keep the queen's job id, so the hive's NARRATION, DATA and TOKEN frames are relayed
to the keeper as they are, routed on the first three frames and never unpacked.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_util import AsyncValue

from rbee_mesh.actors.jobserver import Job, JobServer
from rbee_mesh.actors.runtime import CANCEL_CONFIRM_S, hand_over
from rbee_mesh.protocol import (
    TERMINAL_KINDS,
    Actor,
    Cancel,
    Cancelled,
    Done,
    Error,
    ErrorCode,
    Heartbeat,
    Kind,
    Liveness,
    MeshError,
    Operation,
    PeerLiveness,
    ProtocolError,
    Ready,
    Submit,
    decode,
    decode_heartbeat,
    decode_state,
    encode,
    peek_route,
)
from rbee_mesh.transport import (
    Connection,
    Subscriber,
    TransportError,
    open_connection,
    parse_endpoint,
)

log = logging.getLogger("rbee_mesh.hives")

#: Frames relayed to the keeper untouched.
_RELAYED = frozenset({Kind.NARRATION, Kind.DATA, Kind.TOKEN})
#: The hives are checked and greeted a tenth at a time (see `HiveRegistry._liveness_loop`).
_SLICES = 10


@dataclass(frozen=True)
class Forwarded:
    """Where a forwarded job's frames go: those the keeper streams (narration, data, tokens)
    straight to it, as they come; the others (ACCEPTED, the terminal frame) to the task that
    forwarded the job."""

    relay: Callable[[Sequence[bytes]], None]
    frames: trio.MemorySendChannel[Sequence[bytes]]


@dataclass(eq=False)
class HiveLink:
    """One hive as the queen knows it."""

    endpoint: str
    source: str
    conn: Connection
    liveness: PeerLiveness
    hive_id: str = ""
    heartbeat_endpoint: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    #: The state of the hive's last heartbeat as it came (msgpack) until `state` reads it.
    state_packed: bytes = b""
    _state: dict[str, Any] = field(default_factory=dict, repr=False)
    last_heard: float | None = None  # wall clock, for "heartbeat age"
    #: This machine's clock minus the hive's, from its last heartbeat (plus the network delay).
    clock_skew_s: float | None = None
    #: Set once the hive has said anything at all.
    heard: trio.Event = field(default_factory=trio.Event)
    #: The liveness as it changes, to wait on: `await link.watch.wait_value(Liveness.LOST)`.
    watch: AsyncValue = field(default_factory=lambda: AsyncValue(Liveness.LIVE))
    #: Jobs forwarded to this hive and running, by id.
    jobs: dict[str, Forwarded] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.hive_id or self.endpoint

    @property
    def state(self) -> dict[str, Any]:
        """The state carried by the hive's last heartbeat (or READY): devices, workers, models.

        Unpacked and validated when first read: a queen of 1,000 hives takes 1,000 heartbeats a
        second and reads few of their states, and decoding each into fresh dicts cost it half
        its time and, by churning its heap, 10 ms collector pauses every second.
        """
        if self.state_packed:
            packed, self.state_packed = self.state_packed, b""
            try:
                self._state = decode_state(packed)
            except ProtocolError as exc:
                log.warning("hive %s sent a malformed state; keeping its last: %s", self.name, exc)
        return self._state

    @state.setter
    def state(self, value: dict[str, Any]) -> None:
        self._state, self.state_packed = value, b""

    @property
    def ever_seen(self) -> bool:
        return self.heard.is_set()

    @property
    def liveness_state(self) -> str:
        return str(self.liveness.state) if self.ever_seen else "connecting"

    @property
    def is_live(self) -> bool:
        return self.ever_seen and self.liveness.state is not Liveness.LOST

    def record(self, *, detail: bool = False) -> dict[str, Any]:
        """What `hive list` (and with `detail`, `hive get`) shows of this hive."""
        age = None if self.last_heard is None else round(time.time() - self.last_heard, 3)
        workers = self.state.get("workers", [])
        if self.liveness.state is Liveness.LOST:
            workers = [{**w, "state": "unreachable"} for w in workers]
        rec: dict[str, Any] = {
            "hive": self.name,
            "endpoint": self.endpoint,
            "source": self.source,
            "liveness": self.liveness_state,
            "heartbeat_age_s": age,
            "devices": [d.get("id", "?") for d in self.state.get("devices", [])],
            "workers": len(workers),
            "models": len(self.state.get("models", [])),
        }
        if detail:
            rec.update(
                devices=self.state.get("devices", []),
                workers=workers,
                models=self.state.get("models", []),
                version=self.info.get("version", ""),
                protocol=self.info.get("protocol"),
                heartbeat_endpoint=self.heartbeat_endpoint,
                clock_skew_s=self.clock_skew_s,
            )
        return rec


class HiveRegistry:
    """All hives of one queen. Runs its loops in the nursery given to `run`."""

    def __init__(self, *, queen_name: str, heartbeat_s: float, subscriber: Subscriber) -> None:
        self.queen_name = queen_name
        self.heartbeat_s = heartbeat_s
        self.subscriber = subscriber
        self.links: list[HiveLink] = []
        #: Heartbeats taken from the hives' PUB sockets since start (for `status`).
        self.heartbeats_received = 0
        self._by_id: dict[str, HiveLink] = {}
        self._nursery: trio.Nursery | None = None
        self._beats = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._heartbeat_receive_loop)
            nursery.start_soon(self._liveness_loop)
            task_status.started()

    async def add(self, endpoint: str, *, source: str) -> HiveLink:
        """Connect to the hive whose control socket is `endpoint` (it may not be up yet)."""
        assert self._nursery is not None, "run() the registry first"
        conn = await open_connection(endpoint)
        link = HiveLink(
            endpoint=endpoint,
            source=source,
            conn=conn,
            liveness=PeerLiveness(self.heartbeat_s, trio.current_time()),
        )
        self.links.append(link)
        self._nursery.start_soon(self._link_receive_loop, link)
        await self._send(link, Ready(job_id="", sender=self.queen_name, role=Actor.QUEEN))
        return link

    async def remove(self, link: HiveLink, why: str) -> None:
        """Forget a hive (it said goodbye): its forwarded jobs end, its sockets close."""
        if link not in self.links:
            return
        self.links.remove(link)
        if self._by_id.get(link.hive_id) is link:
            del self._by_id[link.hive_id]
        log.info("hive %s removed: %s", link.name, why)
        self._fail_jobs(link, ErrorCode.HIVE_LOST, f"hive {link.name} left the mesh ({why})")
        if link.heartbeat_endpoint:
            with contextlib.suppress(TransportError):
                await self.subscriber.disconnect(link.heartbeat_endpoint)
        await link.conn.aclose()

    def get(self, hive_id: str) -> HiveLink:
        link = self._by_id.get(hive_id)
        if link is not None:
            return link
        for link in self.links:
            if hive_id == link.endpoint:
                return link
        known = ", ".join(link.name for link in self.links) or "none"
        raise MeshError(ErrorCode.NOT_FOUND, f"no hive {hive_id!r} is known (known: {known})")

    def live(self) -> list[HiveLink]:
        return [link for link in self.links if link.is_live]

    # ---- forwarding --------------------------------------------------------------------------

    async def forward(self, server: JobServer, job: Job, op: Operation, link: HiveLink) -> Any:
        """Run `op` as job `job` on `link`'s hive: relay its frames, return its result."""
        if not link.is_live:
            raise MeshError(
                ErrorCode.HIVE_LOST if link.ever_seen else ErrorCode.UNAVAILABLE,
                f"hive {link.name} is {link.liveness_state}; it cannot run {op.NAME}",
            )
        send, receive = trio.open_memory_channel[Sequence[bytes]](1_000)
        link.jobs[job.id] = Forwarded(relay=lambda frames: server.relay(job, frames), frames=send)
        ended = False
        try:
            elapsed = time.time() - job.created
            timeout = max(job.deadline_s - elapsed, 0.001)
            await self._send(link, Submit(job_id=job.id, ref=job.id, op=op, timeout_s=timeout))
            async for frames in receive:
                if peek_route(frames)[0] is not Kind.ACCEPTED:
                    ended = True
                    return self._outcome(link, decode(frames))
            ended = True
            raise MeshError(ErrorCode.HIVE_LOST, f"hive {link.name} went away during {op.NAME}")
        finally:
            if not ended:
                # Cancelled here (deadline, keeper): the hive must stop too, and the job ends
                # when the hive says so, so that what it used (a worker's slot) is free by then.
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(CANCEL_CONFIRM_S),
                    contextlib.suppress(MeshError),
                ):
                    await self._send(link, Cancel(job_id=job.id, reason="cancelled at the queen"))
                    async for frames in receive:
                        if peek_route(frames)[0] in TERMINAL_KINDS:
                            break
            link.jobs.pop(job.id, None)

    @staticmethod
    def _outcome(link: HiveLink, terminal: Any) -> Any:
        match terminal:
            case Done():
                return terminal.result
            case Error():
                raise MeshError(terminal.code, terminal.message)
            case Cancelled():
                raise MeshError(ErrorCode.CANCELLED, f"hive {link.name}: {terminal.reason}")
        raise MeshError(ErrorCode.INTERNAL, f"hive {link.name} ended a job with {terminal!r:.80}")

    async def _send(self, link: HiveLink, message: Any) -> None:
        try:
            await link.conn.send(encode(message))
        except TransportError as exc:
            raise MeshError(
                ErrorCode.UNAVAILABLE, f"cannot reach hive {link.name}: {exc}"
            ) from None

    # ---- what the hives say --------------------------------------------------------------------

    async def _link_receive_loop(self, link: HiveLink) -> None:
        while True:
            try:
                frames = await link.conn.receive()
            except TransportError:
                return
            try:
                kind, job_id = peek_route(frames)
            except ProtocolError as exc:
                log.warning("ignored a malformed frame from hive %s: %s", link.name, exc)
                continue
            self._heard(link)
            if job_id:
                job = link.jobs.get(job_id)
                if job is not None and kind in _RELAYED:
                    job.relay(frames)  # straight on to the keeper: no task in between
                elif job is not None:
                    # Closed: the hive was declared lost and the job is ending; drop late frames.
                    with contextlib.suppress(trio.ClosedResourceError):
                        await hand_over(job.frames, frames)
                continue
            if kind is Kind.READY:
                self._on_ready(link, frames)

    def _on_ready(self, link: HiveLink, frames: Sequence[bytes]) -> None:
        try:
            ready = decode(frames)
        except ProtocolError as exc:
            log.warning("hive at %s sent a bad READY: %s", link.endpoint, exc)
            return
        if not isinstance(ready, Ready):
            return
        first = not link.hive_id
        if link.hive_id and self._by_id.get(link.hive_id) is link:
            del self._by_id[link.hive_id]
        link.hive_id, link.info = ready.sender, ready.info
        self._by_id[link.hive_id] = link
        state = ready.info.get("state")
        if isinstance(state, dict):
            link.state = state
        advertised = str(ready.info.get("heartbeat", ""))
        if advertised:
            endpoint = reachable_endpoint(advertised, via=link.endpoint)
            if endpoint != link.heartbeat_endpoint:
                # A hive that restarted may publish elsewhere (an ephemeral port): follow it.
                if link.heartbeat_endpoint:
                    self._nursery_start(self.subscriber.disconnect, link.heartbeat_endpoint)
                link.heartbeat_endpoint = endpoint
                self._nursery_start(self.subscriber.connect, endpoint)
                first = True
        if first:
            log.info("hive %s answered at %s", link.hive_id, link.endpoint)

    def _nursery_start(self, fn: Any, *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    async def _heartbeat_receive_loop(self) -> None:
        while True:
            try:
                frames = await self.subscriber.receive()
            except TransportError:
                return
            try:
                beat, state = decode_heartbeat(frames)
            except ProtocolError as exc:
                log.warning("ignored a malformed heartbeat: %s", exc)
                continue
            if (link := self._by_id.get(beat.sender)) is None:
                continue
            self.heartbeats_received += 1
            link.state_packed = state
            link.liveness.interval_s = beat.interval_s
            if beat.ts:
                link.clock_skew_s = round(time.time() - beat.ts, 3)
            self._heard(link)

    def _heard(self, link: HiveLink) -> None:
        link.last_heard = time.time()
        was = link.liveness.seen(trio.current_time())
        link.heard.set()
        if was is not None:
            link.watch.value = Liveness.LIVE
        if was is Liveness.LOST:
            log.warning("hive %s is live again", link.name)

    async def _liveness_loop(self) -> None:
        """Checks every hive at least twice per its heartbeat interval (so that no state is
        skipped: suspect lasts two intervals), and greets each once per the queen's interval.
        Both take a slice of the hives at a time, the slices spread over the interval: at 1,000
        hives, checking them all held the queen's loop for 2-3 ms, and greeting them all sent
        1,000 frames in one burst."""
        start = trio.current_time()
        next_greeting = [start + n * self.heartbeat_s / _SLICES for n in range(_SLICES)]
        greeting: list[bytes] = []
        fastest = self.heartbeat_s
        turn = 0
        while True:
            n = turn % _SLICES
            if n == 0:
                fastest = min(
                    [self.heartbeat_s, *(link.liveness.interval_s for link in self.links)]
                )
            links = self.links
            part = links[n * len(links) // _SLICES : (n + 1) * len(links) // _SLICES]
            now = trio.current_time()
            for link in part:
                if link.ever_seen:
                    was = link.liveness.check(now)
                    if was is not None:
                        self._changed(link, was, link.liveness.state)
            if now >= next_greeting[n]:
                next_greeting[n] = max(next_greeting[n] + self.heartbeat_s, now)
                if n == 0 or not greeting:  # one heartbeat per round, encoded once for all
                    self._beats += 1
                    beat = Heartbeat(
                        job_id="",
                        sender=self.queen_name,
                        seq=self._beats,
                        interval_s=self.heartbeat_s,
                    )
                    greeting = encode(beat)
                for link in list(part):
                    await self._greet(link, greeting)
            turn += 1
            await trio.sleep(fastest / 2 / _SLICES)

    async def _greet(self, link: HiveLink, heartbeat: list[bytes]) -> None:
        """Heartbeat to every hive (a hive drops a silent queen); READY until it answers."""
        unknown = not link.hive_id or link.liveness.state is Liveness.LOST
        frames = (
            encode(Ready(job_id="", sender=self.queen_name, role=Actor.QUEEN))
            if unknown
            else heartbeat
        )
        with trio.move_on_after(self.heartbeat_s), contextlib.suppress(TransportError):
            await link.conn.send(frames)

    def _changed(self, link: HiveLink, was: Liveness, now: Liveness) -> None:
        link.watch.value = now
        level = logging.ERROR if now is Liveness.LOST else logging.WARNING
        log.log(level, "hive %s is %s (was %s)", link.name, now, was)
        if now is not Liveness.LOST:
            return
        missed = link.liveness.missed(trio.current_time())
        why = f"hive {link.name} stopped answering: nothing heard for {missed} heartbeat intervals"
        self._fail_jobs(link, ErrorCode.HIVE_LOST, why)

    @staticmethod
    def _fail_jobs(link: HiveLink, code: ErrorCode, why: str) -> None:
        for job_id, job in list(link.jobs.items()):
            # The job's own task turns this into its terminal frame.
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                job.frames.send_nowait(encode(Error(job_id=job_id, code=code, message=why)))
            job.frames.close()


def reachable_endpoint(advertised: str, *, via: str) -> str:
    """Where to reach an endpoint a hive advertised: a wildcard host means "the host you used"."""
    ep = parse_endpoint(advertised)
    if ep.scheme != "tcp" or ep.host not in ("*", "0.0.0.0", "[::]"):
        return advertised
    host = parse_endpoint(via).host if via.startswith("tcp://") else "127.0.0.1"
    return f"tcp://{host}:{ep.port}"
