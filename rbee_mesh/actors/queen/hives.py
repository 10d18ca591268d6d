"""The queen's view of its hives: one link per hive, its liveness and state, and jobs run there.

A link is the one job client (`actors/jobclient.py`) connected to the hive's control ROUTER:
READY until the hive answers with its id, heartbeat endpoint and state, heartbeats, jobs
forwarded one hop down, and on loss every running job ended HIVE_LOST and the connection fenced.
The queen subscribes to each hive's heartbeats (PUB/SUB); any frame from the hive, on either
socket, counts as a heartbeat. A hive silent for one interval is *suspect*, for three *lost*;
when it speaks again it is live again, with no restart of the queen.

A heartbeat's state (devices, workers, the catalog's digest) stays packed until something reads
it: a queen of 1,000 hives takes 1,000 heartbeats a second and reads few of their states. The
hive's models are asked for (`model_list`) when the digest read differs from the one last
fetched, so a heartbeat stays small whatever the catalog holds.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_util import AsyncValue

from rbee_mesh.actors.heartbeat import HeartbeatSchedule
from rbee_mesh.actors.jobclient import JobClient, forward
from rbee_mesh.actors.jobserver import ServerJob
from rbee_mesh.actors.trust import Trust
from rbee_mesh.protocol import (
    Actor,
    ErrorCode,
    Liveness,
    MeshError,
    ModelDelete,
    ModelDownload,
    ModelList,
    Operation,
    ProtocolError,
    Ready,
    WorkerDelete,
    WorkerSpawn,
    decode_heartbeat,
    decode_state,
    outcome,
)
from rbee_mesh.transport import Subscriber, TransportError, parse_endpoint
from rbee_mesh.transport.curve import fingerprint

log = logging.getLogger("rbee_mesh.hives")

#: How long a placement waits for a hive's model list when its catalog has changed.
MODELS_FETCH_S = 5.0


@dataclass(eq=False)
class HiveLink:
    """One hive as the queen knows it."""

    endpoint: str
    source: str
    client: JobClient
    #: The hive's CURVE key, pinned: a server at `endpoint` with another key is not this hive;
    #: and its fingerprint (made once: a `status` of 1,000 hives lists every one).
    key: str = ""
    fingerprint: str = ""
    hive_id: str = ""
    heartbeat_endpoint: str = ""
    #: The state of the hive's last heartbeat as it came (msgpack) until `state` reads it.
    state_packed: bytes = b""
    _state: dict[str, Any] = field(default_factory=dict, repr=False)
    #: How many states the hive has sent (heartbeats, READY answers), to wait on:
    #: `await link.states.wait_value(lambda n: n > before)` waits for a newer one.
    states: AsyncValue = field(default_factory=lambda: AsyncValue(0))
    #: This machine's clock minus the hive's, from its last heartbeat (plus the network delay).
    clock_skew_s: float | None = None
    #: The liveness as it changes, to wait on: `await link.watch.wait_value(Liveness.LOST)`.
    watch: AsyncValue = field(default_factory=lambda: AsyncValue(Liveness.LIVE))
    #: The hive's catalog (id, status and size of each model) and the digest it was fetched at.
    models: list[dict[str, Any]] = field(default_factory=list)
    models_digest: str = ""
    fetched: trio.Event | None = None
    #: Why the last fetch of the catalog failed ("" if it did not).
    models_error: str = ""
    #: Workers that refused a job (busy, gone) when `states` was this: not chosen again until a
    #: newer state says how they are.
    refused: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.hive_id or self.endpoint

    @property
    def state(self) -> dict[str, Any]:
        """The state carried by the hive's last heartbeat (or READY): devices, workers and the
        catalog's count and digest.

        Unpacked and validated when first read: decoding each of 1,000 heartbeats a second into
        fresh dicts cost a queen half its time and, by churning its heap, 10 ms collector pauses
        every second.
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
        self.states.value += 1

    @property
    def workers(self) -> list[dict[str, Any]]:
        """The hive's workers as its last heartbeat listed them, less those that refused a job
        since."""
        rows = self.state.get("workers", [])
        return [w for w in rows if self.refused.get(str(w.get("id")), -1) < self.states.value]

    @property
    def catalog_digest(self) -> str:
        models = self.state.get("models")
        digest = models.get("digest") if isinstance(models, dict) else None
        return digest if isinstance(digest, str) else ""

    @property
    def models_unread(self) -> str:
        """Why this queen has never read the hive's catalog, or "" once it has: until then the
        hive may hold any model."""
        if self.models_digest:
            return ""
        return self.models_error or "it did not list them in time"

    @property
    def model_count(self) -> int:
        models = self.state.get("models")
        count = models.get("count") if isinstance(models, dict) else None
        return count if isinstance(count, int) else len(self.models)

    @property
    def heard(self) -> trio.Event:
        """Set once the hive has said anything at all."""
        return self.client.heard_once

    @property
    def ever_seen(self) -> bool:
        return self.client.heard_once.is_set()

    @property
    def liveness(self) -> Liveness:
        watched = self.client.liveness
        return watched.state if watched is not None else Liveness.LIVE

    @property
    def liveness_state(self) -> str:
        return self.client.state

    @property
    def is_live(self) -> bool:
        return self.client.is_live

    def record(self, *, detail: bool = False) -> dict[str, Any]:
        """What `hive list` (and with `detail`, `hive get`) shows of this hive."""
        silent = self.client.silent_s
        age = None if silent is None else round(silent, 3)
        workers = self.state.get("workers", [])
        if self.ever_seen and self.liveness is Liveness.LOST:
            workers = [{**w, "state": "unreachable"} for w in workers]
        rec: dict[str, Any] = {
            "hive": self.name,
            "endpoint": self.endpoint,
            "fingerprint": self.fingerprint,
            "source": self.source,
            "liveness": self.liveness_state,
            "heartbeat_age_s": age,
            "devices": [d.get("id", "?") for d in self.state.get("devices", [])],
            "workers": len(workers),
            "models": self.model_count,
        }
        if detail:
            rec.update(
                devices=self.state.get("devices", []),
                workers=workers,
                models=self.models,
                version=self.client.info.get("version", ""),
                protocol=self.client.info.get("protocol"),
                heartbeat_endpoint=self.heartbeat_endpoint,
                clock_skew_s=self.clock_skew_s,
            )
        return rec


class HiveRegistry:
    """All hives of one queen. Runs its loops in the nursery given to `run`."""

    def __init__(
        self, *, queen_name: str, heartbeat_s: float, subscriber: Subscriber, trust: Trust
    ) -> None:
        self.queen_name = queen_name
        self.trust = trust
        self.heartbeat_s = heartbeat_s
        self.subscriber = subscriber
        self.links: list[HiveLink] = []
        #: Heartbeats taken from the hives' PUB sockets since start (for `status`).
        self.heartbeats_received = 0
        self.schedule = HeartbeatSchedule(heartbeat_s)
        self._by_id: dict[str, HiveLink] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._heartbeat_receive_loop)
            nursery.start_soon(self.schedule.run)
            task_status.started()

    async def add(self, endpoint: str, *, source: str, key: str = "") -> HiveLink:
        """Connect to the hive whose control socket is `endpoint` (it may not be up yet) and
        whose key is `key` (default: the one trusted at that endpoint, else this node's own: a
        hive of this state directory)."""
        assert self._nursery is not None, "run() the registry first"
        key = key or self.trust.pinned(endpoint) or self.trust.public
        client = JobClient.forwarding(
            endpoint, name=self.queen_name, role=Actor.QUEEN, server=f"the hive at {endpoint}",
            lost_code=ErrorCode.HIVE_LOST, heartbeat_s=self.heartbeat_s,
            keys=self.trust.client_keys(key),
        )  # fmt: skip
        link = HiveLink(
            endpoint=endpoint, source=source, client=client, key=key, fingerprint=fingerprint(key)
        )
        client.on_ready = lambda ready: self._on_ready(link, ready)
        client.on_liveness = lambda was, now: self._changed(link, was, now)
        self.links.append(link)
        await self._nursery.start(client.run)
        self.schedule.add(client)
        return link

    async def remove(self, link: HiveLink, why: str) -> None:
        """Forget a hive (it said goodbye, or it is a second link to one hive): its forwarded
        jobs end, its sockets close."""
        if link not in self.links:
            return
        self.links.remove(link)
        if self._by_id.get(link.hive_id) is link:
            del self._by_id[link.hive_id]
        log.info("hive %s removed: %s", link.name, why)
        self.schedule.discard(link.client)
        link.client.lose(f"hive {link.name} left the mesh ({why})")
        if link.heartbeat_endpoint and link.heartbeat_endpoint not in self._heartbeat_endpoints():
            with contextlib.suppress(TransportError):
                await self.subscriber.disconnect(link.heartbeat_endpoint)
        await link.client.aclose(why)

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

    async def fresh_models(self, link: HiveLink) -> list[dict[str, Any]]:
        """`link`'s catalog, fetched first if its digest has changed (within MODELS_FETCH_S;
        else the last one known)."""
        if link.catalog_digest == link.models_digest:
            return link.models
        if link.fetched is None:
            link.fetched = trio.Event()
            self._start(self._fetch_models, link, link.catalog_digest)
        with trio.move_on_after(MODELS_FETCH_S):
            await link.fetched.wait()
        return link.models

    async def _fetch_models(self, link: HiveLink, digest: str) -> None:
        try:
            job = await link.client.submit(ModelList(hive=link.name))
            rows = outcome(await job.end(), link.client.server)
            link.models = [
                {"id": r.get("id"), "status": r.get("status"), "size": r.get("size")}
                for r in rows
                if isinstance(r, dict)
            ]
            link.models_digest, link.models_error = digest, ""
        except MeshError as exc:
            link.models_error = exc.message
            log.warning("could not list the models of hive %s: %s", link.name, exc)
        finally:
            assert link.fetched is not None
            link.fetched.set()
            link.fetched = None

    async def forward(self, job: ServerJob, op: Operation, link: HiveLink) -> Any:
        """Run `op` as `job` on `link`'s hive: relay its frames, return its result. A model it
        downloaded or deleted, or a worker it spawned or deleted, is in the queen's view at
        once, not at its next heartbeat, so that the next placement (the scheduler's, or a
        user's pin) finds it, or does not choose it."""
        if not link.is_live:
            raise MeshError(
                ErrorCode.HIVE_LOST if link.ever_seen else ErrorCode.UNAVAILABLE,
                f"hive {link.name} is {link.liveness_state}; it cannot run {op.NAME}",
                started=False,
            )
        result = await forward(
            link.client, op, job_id=job.id, timeout_s=job.time_left_s, relay=job.relay,
            cancelled_by=self.queen_name,
        )  # fmt: skip
        if isinstance(op, ModelDownload):
            _put(link.models, {k: result[k] for k in ("id", "status", "size")})
        elif isinstance(op, WorkerSpawn | WorkerDelete):  # a deleted worker: its stopped row
            _put(link.state.setdefault("workers", []), result)
        elif isinstance(op, ModelDelete):
            link.models = [m for m in link.models if m.get("id") != result["model"]]
        return result

    # ---- what the hives say --------------------------------------------------------------------

    def _on_ready(self, link: HiveLink, ready: Ready) -> None:
        hive_id = ready.sender
        other = self._by_id.get(hive_id)
        if other is not None and other is not link:
            # One hive named twice (two addresses of one machine): its heartbeats would feed
            # one link only, and the other would be lost. Keep the first.
            log.warning(
                "hive %s answers at %s and at %s; keeping %s", hive_id, other.endpoint,
                link.endpoint, other.endpoint,
            )  # fmt: skip
            self._start(self.remove, link, f"it is hive {hive_id}, linked at {other.endpoint}")
            return
        first = not link.hive_id
        link.hive_id = hive_id
        link.client.server = f"hive {hive_id}"
        self._by_id[hive_id] = link
        state = ready.info.get("state")
        if isinstance(state, dict):
            link.state = state
        advertised = str(ready.info.get("heartbeat", ""))
        if advertised:
            endpoint = reachable_endpoint(advertised, via=link.endpoint)
            if endpoint != link.heartbeat_endpoint:
                # A hive that restarted may publish elsewhere (an ephemeral port): follow it.
                if link.heartbeat_endpoint:
                    self._start(self.subscriber.disconnect, link.heartbeat_endpoint)
                link.heartbeat_endpoint = endpoint
                self._start(self.subscriber.connect, endpoint, link.key)
                first = True
        if first:
            log.info("hive %s answered at %s", hive_id, link.endpoint)

    def _start(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    def _heartbeat_endpoints(self) -> set[str]:
        return {link.heartbeat_endpoint for link in self.links}

    async def _heartbeat_receive_loop(self) -> None:
        while True:
            try:
                frames = await self.subscriber.receive()
            except TransportError:
                return
            try:
                beat, state = decode_heartbeat(frames)
            except ProtocolError as exc:
                log.warning("ignored a malformed heartbeat (its sender's fault): %s", exc)
                continue
            if (link := self._by_id.get(beat.sender)) is None:
                continue
            self.heartbeats_received += 1
            link.state_packed = state
            link.states.value += 1
            if beat.ts:
                link.clock_skew_s = round(time.time() - beat.ts, 3)
            link.client.heard(beat.interval_s)

    def _changed(self, link: HiveLink, was: Liveness, now: Liveness) -> None:
        link.watch.value = now
        if now is Liveness.LOST:
            log.error("hive %s is lost (was %s)", link.name, was)
        elif was is Liveness.LOST:
            log.warning("hive %s is live again", link.name)
        else:
            log.warning("hive %s is %s (was %s)", link.name, now, was)


def _put(rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
    """`row` in `rows`, in place of one with its id (a heartbeat may have listed it already)."""
    rows[:] = [r for r in rows if r.get("id") != row["id"]] + [row]


def reachable_endpoint(advertised: str, *, via: str) -> str:
    """Where to reach an endpoint a hive advertised: a wildcard host means "the host you used"."""
    ep = parse_endpoint(advertised)
    if ep.scheme != "tcp" or ep.host not in ("*", "0.0.0.0", "[::]"):
        return advertised
    host = parse_endpoint(via).host if via.startswith("tcp://") else "127.0.0.1"
    return f"tcp://{host}:{ep.port}"
