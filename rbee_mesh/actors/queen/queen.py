"""The queen: one per mesh. Takes jobs from keepers, answers, routes or schedules them, and
streams them back.

Serving jobs (accept at once, narrate, end exactly once, deadlines, cancel, slow and vanished
keepers) is `JobServer`'s; knowing the hives (links, liveness, forwarding) is `HiveRegistry`'s;
where an inference runs is `scheduler.place`'s. What is left here: the queen's own answers
(status, hives, jobs), finding hives on the LAN, the routing rule for what a hive runs, and
driving the scheduler (spawning, downloading, queueing, and placing again a job that was refused
before it started).
"""

from __future__ import annotations

import hmac
import itertools
import logging
import os
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from trio_util import AsyncValue

from rbee_mesh import __version__
from rbee_mesh.actors.jobclient import ClientConfig, JobClient, ServerUnreachable, running_client
from rbee_mesh.actors.jobserver import Ending, Handler, JobServer, ServerConfig, ServerJob
from rbee_mesh.actors.narration import narrate
from rbee_mesh.actors.queen.dashboard import MOST_HIVES, snapshot
from rbee_mesh.actors.queen.hives import HiveLink, HiveRegistry
from rbee_mesh.actors.queen.scheduler import Action, Decision, HiveView, place
from rbee_mesh.actors.queen.sharing import Sharing
from rbee_mesh.actors.records import JobHistory
from rbee_mesh.actors.runtime import run_ping
from rbee_mesh.actors.trust import (
    JoinToken,
    Role,
    Trust,
    Trusted,
    pairing_keypair,
    pairing_proof,
)
from rbee_mesh.protocol import (
    OPERATIONS,
    PROTOCOL_VERSION,
    Actor,
    Data,
    ErrorCode,
    Level,
    Liveness,
    MeshError,
    TooLarge,
    outcome,
)
from rbee_mesh.protocol import operations as ops
from rbee_mesh.protocol.constants import MAX_JOBS_PER_KEEPER
from rbee_mesh.transport import Listener, Subscriber, parse_endpoint
from rbee_mesh.transport.curve import ClientKeys, fingerprint
from rbee_mesh.transport.discovery import (
    SERVICE_TYPE,
    Found,
    Gone,
    HiveAnnouncement,
    browsing,
    machine_ipv4_addresses,
    protocol_compatible,
    remember,
)

if TYPE_CHECKING:
    from rbee_mesh.actors.queen.metrics import Metrics

log = logging.getLogger("rbee_mesh.queen")

#: How long `hive trust --code` waits for the hive to take the code.
PAIR_TIMEOUT_S = 5.0


class Queen:
    """One per mesh. Create with a bound Listener and a Subscriber, then `await run()`."""

    def __init__(
        self,
        listener: Listener,
        subscriber: Subscriber,
        config: ServerConfig | None = None,
        *,
        max_queued: int = 64,
        discover: bool = False,
        trust: Trust | None = None,
        journal: Path | None = None,
    ) -> None:
        """`discover`: link hives announced on the LAN (mDNS) that are trusted, list the others
        as pending, and drop them on goodbye. `trust`: this node's keys and whom it trusts
        (the listener's and subscriber's keys must be its). `journal`: where the finished jobs
        are remembered across restarts (a daemon's; in memory only without)."""
        self.name = f"queen-{os.uname().nodename}"
        self.trust = trust or Trust.for_process()
        self.started = time.time()
        handlers: dict[type[ops.Operation], Handler] = {
            op: self._route for op in OPERATIONS.values() if op.TARGET is not Actor.QUEEN
        }
        handlers.update(
            {
                ops.Status: self._op_status,
                ops.Ping: self._op_ping,
                ops.HiveList: self._op_hive_list,
                ops.HiveGet: self._op_hive_get,
                ops.JobList: self._op_job_list,
                ops.JobCancel: self._op_job_cancel,
                ops.JobWatch: self._op_job_watch,
                ops.Top: self._op_top,
                ops.Infer: self._op_infer,
                ops.Invite: self._op_invite,
                ops.Join: self._op_join,
                ops.HiveTrust: self._op_hive_trust,
                ops.HiveUntrust: self._op_hive_untrust,
                ops.KeeperList: self._op_keeper_list,
                ops.KeeperRevoke: self._op_keeper_revoke,
                ops.ApiKeyCreate: self._op_apikey_create,
                ops.ApiKeyList: self._op_apikey_list,
                ops.ApiKeyRevoke: self._op_apikey_revoke,
                ops.ModelRead: self._not_here,
                ops.PeerTrust: self._not_here,
                ops.PeerUntrust: self._not_here,
            }
        )
        config = config or ServerConfig()
        if config.max_jobs_per_peer is None:  # a keeper's share of the queen
            config = replace(config, max_jobs_per_peer=MAX_JOBS_PER_KEEPER)
        history = JobHistory(config.job_history, records=True, journal=journal)
        #: Its Prometheus metrics, once its HTTP server serves them (api.py makes them, and
        #: makes them the job server's observer): a queen without one pays nothing for them.
        self.metrics: Metrics | None = None
        self.server = JobServer(
            listener, name=self.name, actor=Actor.QUEEN, handlers=handlers, config=config,
            trust=self.trust, history=history,
        )  # fmt: skip
        self.hives = HiveRegistry(
            queen_name=self.name, heartbeat_s=self.server.config.heartbeat_s,
            subscriber=subscriber, trust=self.trust,
        )  # fmt: skip
        self.sharing = Sharing(self.hives, self.trust)
        #: Where its HTTP API serves (http://HOST:PORT/v1), while it does (`api.serving_api`).
        self.api_url = ""
        self.max_queued = max_queued
        self.discover = discover
        #: Hives announced on the LAN that speak another protocol version (for `doctor`).
        self.incompatible: dict[str, HiveAnnouncement] = {}
        #: Hives announced on the LAN with a key this queen does not trust: listed, not used.
        #: (Of each, the MAX_ANNOUNCED_HIVES announced last.)
        self.pending: dict[str, HiveAnnouncement] = {}
        #: Inference jobs this queen has running on each worker (by worker id).
        self._inflight: Counter[str] = Counter()
        #: Jobs waiting for a worker, in arrival order.
        #: Infer jobs waiting for a worker, in order.
        self.queue: list[ServerJob] = []
        #: Bumped whenever a worker slot frees up: waiting jobs look again.
        self._released = AsyncValue(0)
        self._placing = trio.Lock()
        #: One download or spawn at a time per hive and model.
        self._spawning: dict[tuple[str, str], trio.Lock] = {}
        #: Workers this queen decided to spawn, per hive and model, until the spawn is over:
        #: their cores are taken from the decision on (the next job does not spawn beside one).
        self._starting: Counter[tuple[str, str]] = Counter()

    @property
    def listener(self) -> Listener:
        return self.server.listener

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `stop()`, which returns from the server's run, or until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.hives.run)
            for hive in self.trust.entries(Role.HIVE):
                if hive.endpoint:  # joined or trusted before this queen's restart
                    await self.hives.add(hive.endpoint, source="trusted", key=hive.key)
            if self.discover:
                nursery.start_soon(self._discover)
            try:
                await self.server.run(task_status=task_status)
            finally:
                self.server.history.close()
            nursery.cancel_scope.cancel()

    async def stop(self, reason: str = "the queen is shutting down") -> None:
        """End every running job with ERROR UNAVAILABLE, then stop."""
        await self.server.stop(reason)

    async def add_hive(self, endpoint: str, *, source: str = "static", key: str = "") -> HiveLink:
        """Manage the hive whose control socket is `endpoint` (from `--peer`, the config, mDNS,
        a join, or the integrated mode) and whose key is `key` (default: see HiveRegistry.add)."""
        return await self.hives.add(endpoint, source=source, key=key)

    # ---- discovery ----------------------------------------------------------------------------

    async def _discover(self) -> None:
        """Link the hives announced on the LAN; forget those that say goodbye."""
        try:
            async with browsing() as events:
                log.info("looking for hives on the LAN (%s)", SERVICE_TYPE)
                async for event in events:
                    match event:
                        case Found():
                            await self._found(event.announcement)
                        case Gone():
                            self.pending.pop(event.hive_id, None)
                            for link in list(self.hives.links):
                                if link.hive_id == event.hive_id and link.source == "mdns":
                                    await self.hives.remove(link, "it said goodbye")
        except OSError as exc:
            log.warning("not looking for hives on the LAN: %s", exc)

    async def _found(self, ann: HiveAnnouncement) -> None:
        if not protocol_compatible(ann):
            remember(self.incompatible, ann.hive_id, ann)
            log.warning(
                "hive %s at %s speaks protocol %d, this queen %d: not linked",
                ann.hive_id,
                ann.control_endpoint,
                ann.protocol,
                PROTOCOL_VERSION,
            )
            return
        self.incompatible.pop(ann.hive_id, None)
        if self.trust.role_of(ann.key) not in (Role.HIVE, Role.OWNER):
            if ann.hive_id not in self.pending:
                log.warning("%s", self._pending_note(ann))
            remember(self.pending, ann.hive_id, ann)
            return
        self.pending.pop(ann.hive_id, None)
        for link in list(self.hives.links):
            if ann.control_endpoint == link.endpoint and ann.key == link.key:
                return  # known already (a static peer, or this announcement again)
            if link.key == ann.key and link.source in ("mdns", "trusted"):
                if link.is_live:  # announcements are not authenticated: heartbeats are
                    log.warning(
                        "hive %s is announced at %s, but answers at %s: keeping that",
                        ann.hive_id, ann.control_endpoint, link.endpoint,
                    )  # fmt: skip
                    return
                await self.hives.remove(link, f"it moved to {ann.control_endpoint}")
        log.info("found hive %s at %s", ann.hive_id, ann.control_endpoint)
        await self.add_hive(ann.control_endpoint, source="mdns", key=ann.key)

    def _pending_note(self, ann: HiveAnnouncement) -> str:
        """Why a hive found on the LAN is not used, and what a person can do about it."""
        found = f"hive {ann.hive_id} at {ann.control_endpoint} (fingerprint {fingerprint(ann.key)})"
        known = [t for t in self.trust.entries(Role.HIVE) if t.name == ann.hive_id]
        if known:
            return (
                f"{found} announces a key that is not the one trusted for it "
                f"({known[0].fingerprint}): not used. If it made a new key, "
                f"`rbee-mesh hive trust {ann.hive_id}` trusts the new one"
            )
        return f"{found} is pending: `rbee-mesh hive trust {ann.hive_id}` after comparing it"

    # ---- routing to hives -----------------------------------------------------------------------

    async def _route(self, job: ServerJob, op: ops.Operation) -> Any:
        """Run a hive operation: on its pinned hive, on every hive (lists), or on the one that
        holds what it names; with several candidates and no pin, ask the user to choose."""
        if op.hive_pin is not None:
            return await self._forward(job, op, self.hives.get(op.hive_pin))
        live = self.hives.live()
        if not live:
            known = ", ".join(f"{h.name} ({h.liveness_state})" for h in self.hives.links)
            raise MeshError(
                ErrorCode.UNAVAILABLE,
                f"{op.NAME} runs on a hive, and no hive is live"
                + (f" (known: {known})" if known else " (none is connected to this queen)"),
            )
        if isinstance(op, ops.WorkerList | ops.ModelList):
            return await self._fan_out(job, op, live)
        candidates = live
        if isinstance(op, ops.WorkerGet | ops.WorkerDelete):
            candidates = [h for h in live if _names(h.workers, op.worker)] or candidates
        elif isinstance(op, ops.ModelGet | ops.ModelDelete):
            candidates = [
                h for h in live if _names(await self.hives.fresh_models(h), op.model)
            ] or candidates
        if len(candidates) == 1:
            return await self._forward(job, op, candidates[0])
        names = ", ".join(h.name for h in candidates)
        raise MeshError(
            ErrorCode.INVALID_REQUEST,
            f"this mesh has {len(candidates)} hives that could run {op.NAME} ({names}); "
            "choose one with --hive",
        )

    async def _forward(self, job: ServerJob, op: ops.Operation, link: HiveLink) -> Any:
        """Run `op` on `link`'s hive; a download, from the hives that hold its model, where
        any does, and a spawn of a model the hive lacks and another holds, after it has taken
        it from there (sharing.py)."""
        if isinstance(op, ops.ModelDownload):
            return await self.sharing.download(job, link, op)
        if isinstance(op, ops.WorkerSpawn):
            await self.sharing.provide(job, link, op.model)
        return await self.hives.forward(job, op, link)

    async def _not_here(self, job: ServerJob, op: ops.Operation) -> Any:
        raise MeshError(
            ErrorCode.INVALID_REQUEST, f"{op.NAME} is for a hive, from its queen or a peer"
        )

    async def _fan_out(self, job: ServerJob, op: ops.Operation, links: list[HiveLink]) -> list[Any]:
        """Run a list operation on every live hive and merge the rows, each tagged with its hive.
        A hive that fails is narrated and left out; the others still answer."""
        results: dict[str, list[Any]] = {}

        async def one(link: HiveLink) -> None:
            try:
                results[link.name] = await self.hives.forward(job, op, link)
            except MeshError as exc:
                narrate(op.NAME, f"hive {link.name}: {exc.message}", level=Level.WARN)

        async with trio.open_nursery() as nursery:
            for link in links:
                nursery.start_soon(one, link)
        return [{"hive": name, **row} for name, rows in results.items() for row in rows]

    # ---- inference ---------------------------------------------------------------------------

    async def _op_infer(self, job: ServerJob, op: ops.Infer) -> Any:
        """Schedule `op` (docs/inference.md, "Scheduling"), then run it on its worker. A worker
        or hive that refuses it before it started (busy by an account the queen has not seen
        yet, dead, unreachable) is passed over, and the job placed again, within its deadline."""
        attempt = 0
        while True:
            try:
                link, worker, model = await self._reserve_worker(job, op)
            finally:  # (also a job that left the queue unplaced: its wait counts)
                placed = time.time()
                if attempt == 0 and self.metrics is not None:
                    self.metrics.queued.observe(max(0.0, placed - job.created))
            try:
                pinned = replace(op, hive=link.name, worker=worker, model=model)
                return _timed(await self.hives.forward(job, pinned, link), job, placed)
            except MeshError as exc:
                if exc.started:
                    raise
                # Until the hive's next state says how it is, the refusing worker is passed over.
                link.refused = {w: n for w, n in link.refused.items() if n >= link.states.value}
                link.refused[worker] = link.states.value
                if op.worker is not None and exc.code is not ErrorCode.BUSY:
                    raise
                narrate(
                    "schedule",
                    f"worker {worker} on hive {link.name} did not take the job ({exc.message}); "
                    "placing it again",
                    level=Level.WARN,
                )
            finally:
                self._inflight[worker] -= 1
                if self._inflight[worker] <= 0:
                    del self._inflight[worker]
                self._released.value += 1
            attempt += 1
            await trio.sleep(min(0.01 * 2**attempt, self.server.config.heartbeat_s))

    async def _reserve_worker(self, job: ServerJob, op: ops.Infer) -> tuple[HiveLink, str, str]:
        """Find (or make) a worker with a free slot for `op` and take the slot."""
        queued = False
        said = ""
        try:
            while True:
                views = await self._hive_views(op)
                async with self._placing:
                    decision = place(op, views, self._inflight)
                    starting = (decision.hive, str(decision.model))
                    if decision.action is Action.SPAWN:  # its cores are taken from now on
                        self._starting[starting] += 1
                    if decision.action is Action.USE:
                        assert decision.worker is not None and decision.model is not None
                        self._inflight[decision.worker] += 1
                        narrate("schedule", decision.reason)
                        return self.hives.get(decision.hive), decision.worker, decision.model
                if decision.action is Action.WAIT:
                    if not queued:
                        if len(self.queue) >= self.max_queued:
                            raise MeshError(
                                ErrorCode.BUSY,
                                f"{decision.reason}, and {len(self.queue)} jobs already wait "
                                "(the queue is full); try again later",
                                started=False,
                            )
                        self.queue.append(job)
                        queued = True
                    position = self.queue.index(job) + 1
                    saying = f"{decision.reason}: position {position} of {len(self.queue)}"
                    if saying != said:  # as the queue moves, not at every look
                        narrate("queued", f"{saying} in the queue")
                        said = saying
                    # A slot freed by this queen wakes the job at once; a heartbeat (a worker
                    # spawned elsewhere, a hive back) is seen at the next look.
                    with trio.move_on_after(self.server.config.heartbeat_s):
                        await self._released.wait_transition()
                    continue
                try:
                    await self._provide(job, decision)
                finally:
                    if decision.action is Action.SPAWN:  # spawned, or not: counted no more
                        self._starting[starting] -= 1
                        if self._starting[starting] <= 0:
                            del self._starting[starting]
        finally:
            if queued:
                self.queue.remove(job)

    async def _provide(self, job: ServerJob, decision: Decision) -> None:
        """Download the model or spawn a worker, as decided; the next look then uses it. One at
        a time per hive and model: a job that waited for another's provides nothing itself, but
        looks again (the worker just made may be its, or the cores may be taken by then)."""
        assert decision.model is not None
        link = self.hives.get(decision.hive)
        key = (link.name, decision.model)
        lock = self._spawning.setdefault(key, trio.Lock())
        waited = lock.locked()
        try:
            async with lock:
                if waited:
                    return
                narrate("schedule", decision.reason)
                op: ops.Operation
                if decision.action is Action.DOWNLOAD:
                    op = ops.ModelDownload(model=decision.model, hive=link.name)
                else:
                    op = ops.WorkerSpawn(model=decision.model, hive=link.name)
                await self._forward(job, op, link)  # seen at once: the next look uses it
        finally:
            if not lock.locked():  # nobody waits for it any more
                self._spawning.pop(key, None)

    async def _hive_views(self, op: ops.Infer) -> list[HiveView]:
        """The hives a job may go to: the pinned one, else those live now (a suspect one only
        when none is live), each with its catalog as of its last digest."""
        if op.hive is not None:
            links = [self.hives.get(op.hive)]
            for link in links:
                if not link.is_live:
                    raise MeshError(
                        ErrorCode.HIVE_LOST, f"hive {link.name} is {link.liveness_state}"
                    )
        else:
            live = self.hives.live()
            links = [link for link in live if link.liveness is Liveness.LIVE] or live
        return [
            HiveView(
                link.name,
                workers=link.workers,
                models=await self.hives.fresh_models(link),
                devices=link.state.get("devices", []),
                starting=[m for h, m in self._starting.elements() if h == link.name],
                models_unread=link.models_unread,
            )
            for link in links
        ]

    # ---- the queen's own answers --------------------------------------------------------------

    async def _op_status(self, job: ServerJob, op: ops.Status) -> dict[str, Any]:
        hives = [link.record() for link in self.hives.links]
        live = sum(1 for link in self.hives.links if link.is_live)
        narrate(
            "status",
            f"{len(self.server.running_jobs)} job(s) running, {self.server.peer_count} "
            f"keeper(s), {live} of {len(hives)} hive(s) live",
        )
        return {
            "queen": {
                "name": self.name,
                "version": __version__,
                "protocol": PROTOCOL_VERSION,
                "endpoint": self.listener.endpoint,
                "api": self.api_url or None,
                "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started, 3),
                "jobs_running": len(self.server.running_jobs),
                "keepers": self.server.peer_count,
                "heartbeats_received": self.hives.heartbeats_received,
                "fingerprint": self.trust.keypair.fingerprint,
                "refused_handshakes": self.trust.refusals,
                "pending_hives": len(self.pending),
            },
            "hives": hives,
        }

    async def _op_ping(self, job: ServerJob, op: ops.Ping) -> dict[str, Any]:
        if op.hive is not None:
            result: dict[str, Any] = await self._route(job, op)
            return result
        return await run_ping(op)

    async def _op_hive_list(self, job: ServerJob, op: ops.HiveList) -> list[dict[str, Any]]:
        pending = [self._pending_record(ann) for ann in self.pending.values()]
        narrate(
            "hive_list",
            f"{len(self.hives.links)} hive(s) known to this queen"
            + (f", {len(pending)} pending (found on the LAN, not trusted)" if pending else ""),
        )
        return [link.record() for link in self.hives.links] + pending

    @staticmethod
    def _pending_record(ann: HiveAnnouncement) -> dict[str, Any]:
        return {
            "hive": ann.hive_id, "endpoint": ann.control_endpoint,
            "fingerprint": fingerprint(ann.key), "source": "mdns", "liveness": "pending",
            "heartbeat_age_s": None, "devices": [], "workers": 0, "models": 0,
        }  # fmt: skip

    async def _op_hive_get(self, job: ServerJob, op: ops.HiveGet) -> dict[str, Any]:
        link = self.hives.get(op.hive)
        await self.hives.fresh_models(link)
        return link.record(detail=True)

    async def _op_job_list(self, job: ServerJob, op: ops.JobList) -> list[dict[str, Any]]:
        jobs = self.server.job_summaries(include_finished=op.include_finished)
        running = len(self.server.running_jobs)
        narrate("job_list", f"{running} running, {len(jobs) - running} finished")
        return jobs

    async def _op_job_cancel(self, job: ServerJob, op: ops.JobCancel) -> dict[str, Any]:
        if op.job == job.id:
            raise MeshError(ErrorCode.CONFLICT, "a job cannot cancel itself")
        target = self.server.cancel(op.job, by=job.peer.label)
        narrate(
            "job_cancel",
            f"cancelled job {target.id} ({target.op.NAME}) of {target.peer.label}",
            level=Level.WARN,
        )
        return {"job": target.id, "state": "cancelled"}

    async def _op_top(self, job: ServerJob, op: ops.Top) -> dict[str, Any]:
        """Snapshots of the mesh (dashboard.py's), every `interval_s`, as DATA records, as fast
        as its keeper reads them; one too large for a frame goes with fewer hives."""
        if job.keep:
            raise MeshError(ErrorCode.INVALID_REQUEST, "top shows the mesh to a keeper that "
                            "reads it: it does not run on without one", started=False)  # fmt: skip
        sent = 0
        while True:
            await job.peer.writable(0)
            most = MOST_HIVES
            while True:
                try:
                    job.emit(
                        Data(job_id=job.id, record={"kind": "snapshot", **snapshot(self, most)})
                    )
                    break
                except TooLarge:  # (raised before anything is sent)
                    if most == 0:
                        raise
                    most //= 2
            sent += 1
            if op.count is not None and sent >= op.count:
                return {"snapshots": sent}
            await trio.sleep(op.interval_s)

    async def _op_job_watch(self, job: ServerJob, op: ops.JobWatch) -> Ending:
        return await self.server.watch(job, op.job)

    # ---- trust ----------------------------------------------------------------------------------

    async def _op_invite(self, job: ServerJob, op: ops.Invite) -> dict[str, Any]:
        role = Role(op.role)
        endpoints = self._joinable_endpoints(op.address)
        invite = self.trust.invite(role, op.ttl_s)
        token = JoinToken(self.trust.public, endpoints, invite.keypair, role, invite.expires)
        narrate(
            "invite",
            f"a join token for a {role} at {', '.join(endpoints)}: good once, for {op.ttl_s:g} s",
        )
        return {
            "token": token.encode(),
            "role": str(role),
            "expires": invite.expires,
            "queen_fingerprint": self.trust.keypair.fingerprint,
        }

    def _joinable_endpoints(self, address: str | None) -> tuple[str, ...]:
        """Where a node of another machine reaches this queen's listener."""
        bound = parse_endpoint(self.listener.endpoint)
        if bound.scheme != "tcp":
            raise MeshError(
                ErrorCode.CONFLICT, f"this queen serves {bound} only: nothing can join it"
            )
        if address is not None:
            host = f"[{address}]" if ":" in address and not address.startswith("[") else address
            return (f"tcp://{host}:{bound.port}",)
        assert bound.host is not None
        if bound.host in ("*", "0.0.0.0", "[::]"):
            hosts = [a for a in machine_ipv4_addresses() if not a.startswith("127.")]
        elif bound.host.startswith("127.") or bound.host in ("localhost", "[::1]"):
            hosts = []
        else:
            hosts = [bound.host]
        if not hosts:
            raise MeshError(
                ErrorCode.CONFLICT,
                f"this queen listens on {bound} only, which other machines cannot reach: "
                "start it without --local-only (or give --address)",
            )
        return tuple(f"tcp://{h}:{bound.port}" for h in hosts)

    async def _op_join(self, job: ServerJob, op: ops.Join) -> dict[str, Any]:
        self._check_join(job.peer.key, op)
        invite = self.trust.redeem(job.peer.key)
        taken = {t.name for t in self.trust.entries(invite.role) if t.key != op.key}
        name = op.name
        for n in itertools.count(2):
            if name not in taken:
                break
            name = f"{op.name}-{n}"
        entry = self.trust.trust(op.key, invite.role, name, endpoint=op.control or "")
        narrate("join", f"{invite.role} {name} joined (fingerprint {entry.fingerprint})")
        if op.control is not None:
            for link in list(self.hives.links):
                if link.endpoint == op.control:
                    await self.hives.remove(link, "it joined again")
            await self.add_hive(op.control, source="joined", key=op.key)
        return {
            "queen": self.name,
            "queen_fingerprint": self.trust.keypair.fingerprint,
            "name": name,
            "role": str(invite.role),
        }

    def _check_join(self, invite_key: str, op: ops.Join) -> None:
        """Refuse a join that would take over what is trusted already, before the token is
        used up: a key of this node, of the token, or trusted in another role; an endpoint
        where another hive is trusted; an endpoint from anything but a hive."""
        invite = self.trust.invitation(invite_key)
        if (invite.role is Role.HIVE) != (op.control is not None):
            raise MeshError(
                ErrorCode.INVALID_REQUEST,
                "a hive joins with its control endpoint, and only a hive names one",
            )
        if op.key in (invite_key, self.trust.public):
            raise MeshError(ErrorCode.INVALID_REQUEST, "a node joins with a key of its own")
        known = self.trust.role_of(op.key)
        if known is not None and known is not invite.role:
            raise MeshError(
                ErrorCode.CONFLICT,
                f"this key is trusted as a {known} already; one key, one role (`rbee-mesh id`)",
            )
        pinned = self.trust.pinned(op.control) if op.control is not None else None
        if pinned is not None and pinned != op.key:
            raise MeshError(
                ErrorCode.CONFLICT,
                f"another hive ({fingerprint(pinned)}) is trusted at {op.control}; "
                "`rbee-mesh hive untrust` it first if this one replaces it",
            )

    async def _op_hive_trust(self, job: ServerJob, op: ops.HiveTrust) -> dict[str, Any]:
        ann = self.pending.get(op.hive)
        if ann is None:
            raise MeshError(
                ErrorCode.NOT_FOUND,
                f"no hive {op.hive!r} is pending (`rbee-mesh hive list` shows those found on "
                "the LAN and not trusted yet)",
            )
        found = fingerprint(ann.key)
        if op.fingerprint is not None and op.fingerprint != found:
            raise MeshError(
                ErrorCode.CONFLICT,
                f"hive {op.hive} has fingerprint {found}, not {op.fingerprint}: not trusted",
            )
        narrate("hive_trust", f"hive {op.hive} at {ann.control_endpoint}: fingerprint {found}")
        if op.code is not None:
            await self._pair(ann, op.code)
        else:
            narrate(
                "hive_trust",
                f"no pairing code: hive {op.hive} answers only if it trusts this queen already",
                level=Level.WARN,
            )
        self.trust.trust(ann.key, Role.HIVE, ann.hive_id, endpoint=ann.control_endpoint)
        self.pending.pop(op.hive, None)
        for link in list(self.hives.links):
            if link.endpoint == ann.control_endpoint:
                await self.hives.remove(link, "its key changed, and the new one is trusted")
        link = await self.add_hive(ann.control_endpoint, source="mdns", key=ann.key)
        return link.record()

    async def _pair(self, ann: HiveAnnouncement, code: str) -> None:
        """Prove the hive's pairing code to it (its one-time key), so that it trusts this
        queen: the hive's side of `hive trust`."""
        code_keypair = pairing_keypair(code, ann.key)
        keys = ClientKeys(code_keypair, ann.key)
        client = JobClient(
            ann.control_endpoint, name=self.name, role=Actor.QUEEN,
            server=f"hive {ann.hive_id}", lost_code=ErrorCode.UNAVAILABLE,
            config=ClientConfig(accept_timeout_s=PAIR_TIMEOUT_S), keys=keys,
        )  # fmt: skip
        try:
            async with running_client(client):
                paired = await client.submit(ops.Pair(name=self.name, key=self.trust.public))
                answer = outcome(await paired.end(), f"hive {ann.hive_id}")
        except ServerUnreachable:
            raise MeshError(
                ErrorCode.FORBIDDEN,
                f"hive {ann.hive_id} did not take the pairing code: a wrong or used code, or "
                "one past its time, is refused at the handshake (`rbee-mesh hive pair` on its "
                "machine prints a new one); or it cannot be reached from here",
            ) from None
        proof = answer.get("proof") if isinstance(answer, dict) else None
        expected = pairing_proof(code_keypair, self.trust.public, ann.key)
        if not isinstance(proof, str) or not hmac.compare_digest(proof, expected):
            raise MeshError(
                ErrorCode.FORBIDDEN,
                f"the hive announced as {ann.hive_id} ({fingerprint(ann.key)}) did not prove it "
                "knows the code: an impostor, not trusted",
            )
        narrate("hive_trust", f"hive {ann.hive_id} took the pairing code: it trusts this queen")

    async def _op_hive_untrust(self, job: ServerJob, op: ops.HiveUntrust) -> dict[str, Any]:
        entry = self.trust.find(op.hive, Role.HIVE)
        self.trust.untrust(entry)
        for link in list(self.hives.links):
            if link.key == entry.key:
                await self.hives.remove(link, "it is no longer trusted")
        narrate("hive_untrust", f"hive {entry.name} ({entry.fingerprint}) is cut off")
        await self.sharing.forget(entry.key, entry.name)
        return entry.record()

    async def _op_keeper_list(self, job: ServerJob, op: ops.KeeperList) -> list[dict[str, Any]]:
        return self._trusted(op, Role.KEEPER, "keeper(s) of other machines trusted")

    async def _op_keeper_revoke(self, job: ServerJob, op: ops.KeeperRevoke) -> dict[str, Any]:
        entry = self._revoke(Role.KEEPER, op.keeper)
        cut = self.server.drop_peers_with_key(entry.key, "its key was revoked")
        narrate(op.NAME, f"keeper {entry.name} revoked; {cut} connection(s) cut")
        return entry.record()

    async def _op_apikey_create(self, job: ServerJob, op: ops.ApiKeyCreate) -> dict[str, Any]:
        api_key, entry = self.trust.new_api_key(op.name)
        narrate(op.NAME, f"a new API key for {entry.name} ({entry.fingerprint})")
        return {**entry.record(), "key": api_key}

    async def _op_apikey_list(self, job: ServerJob, op: ops.ApiKeyList) -> list[dict[str, Any]]:
        return self._trusted(op, Role.API, "API key(s)")

    async def _op_apikey_revoke(self, job: ServerJob, op: ops.ApiKeyRevoke) -> dict[str, Any]:
        entry = self._revoke(Role.API, op.name)
        narrate(op.NAME, f"the API key of {entry.name} is revoked")
        return entry.record()

    def _trusted(self, op: ops.Operation, role: Role, what: str) -> list[dict[str, Any]]:
        """The records of whom this queen trusts in `role`, counted in the narration."""
        entries = self.trust.entries(role)
        narrate(op.NAME, f"{len(entries)} {what}")
        return [e.record() for e in entries]

    def _revoke(self, role: Role, who: str) -> Trusted:
        """Stop trusting `who` (a name or fingerprint) in `role`; NOT_FOUND if it is not."""
        entry = self.trust.find(who, role)
        self.trust.untrust(entry)
        return entry


def _timed(result: Any, job: ServerJob, placed: float) -> Any:
    """An inference's result with its times as its submitter saw them: `ttft_s` from the
    submission to the first token (the worker's own, from its accept, as `worker_ttft_s`), and
    `queue_s`, the wait for a worker (a download or a spawn included)."""
    usage = result.get("usage") if isinstance(result, dict) else None
    if isinstance(usage, dict):
        usage["worker_ttft_s"] = usage.get("ttft_s")
        first = job.first_token
        usage["ttft_s"] = None if first is None else round(first - job.created, 6)
        usage["queue_s"] = round(placed - job.created, 6)
    return result


def _names(rows: list[dict[str, Any]], ident: str) -> bool:
    """Whether `rows` (a hive's workers or models) hold one with this id."""
    return any(row.get("id") == ident for row in rows)
