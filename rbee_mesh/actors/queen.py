"""The queen: one per mesh. Takes jobs from keepers, answers or routes them, streams them back.

Serving jobs (accept at once, narrate, end exactly once, deadlines, cancel, slow and vanished
keepers) is `JobServer`'s; knowing the hives (links, liveness, forwarding) is `HiveRegistry`'s.
What is left here is the queen's own answers (status, hives, jobs) and the routing rule for
everything a hive runs.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import trio

from rbee_mesh import __version__
from rbee_mesh.actors.hives import HiveLink, HiveRegistry
from rbee_mesh.actors.jobserver import Handler, Job, JobServer, ServerConfig
from rbee_mesh.actors.narration import narrate
from rbee_mesh.actors.runtime import run_ping
from rbee_mesh.protocol import (
    OPERATIONS,
    PROTOCOL_VERSION,
    Actor,
    ErrorCode,
    HiveGet,
    HiveList,
    JobCancel,
    JobList,
    Level,
    MeshError,
    ModelDelete,
    ModelGet,
    ModelList,
    Operation,
    Ping,
    Status,
    WorkerDelete,
    WorkerGet,
    WorkerList,
)
from rbee_mesh.transport import Listener, Subscriber

log = logging.getLogger("rbee_mesh.queen")


class Queen:
    """One per mesh. Create with a bound Listener and a Subscriber, then `await run()`."""

    def __init__(
        self, listener: Listener, subscriber: Subscriber, config: ServerConfig | None = None
    ) -> None:
        self.name = f"queen-{os.uname().nodename}"
        self.started = time.time()
        handlers: dict[type[Operation], Handler] = {
            op: self._route for op in OPERATIONS.values() if op.TARGET is not Actor.QUEEN
        }
        handlers.update(
            {
                Status: self._op_status,
                Ping: self._op_ping,
                HiveList: self._op_hive_list,
                HiveGet: self._op_hive_get,
                JobList: self._op_job_list,
                JobCancel: self._op_job_cancel,
            }
        )
        self.server = JobServer(
            listener, name=self.name, actor=Actor.QUEEN, handlers=handlers, config=config
        )
        self.hives = HiveRegistry(
            queen_name=self.name, heartbeat_s=self.server.config.heartbeat_s, subscriber=subscriber
        )

    @property
    def listener(self) -> Listener:
        return self.server.listener

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `stop()`, which returns from the server's run, or until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.hives.run)
            await self.server.run(task_status=task_status)
            nursery.cancel_scope.cancel()

    async def stop(self, reason: str = "the queen is shutting down") -> None:
        """End every running job with ERROR UNAVAILABLE, then stop."""
        await self.server.stop(reason)

    async def add_hive(self, endpoint: str, *, source: str = "static") -> HiveLink:
        """Manage the hive whose control socket is `endpoint` (`--hive`, or the local hive)."""
        return await self.hives.add(endpoint, source=source)

    # ---- routing to hives -----------------------------------------------------------------------

    async def _route(self, job: Job, op: Operation) -> Any:
        """Run a hive operation: on its pinned hive, on every hive (lists), or on the one that
        holds what it names; with several candidates and no pin, ask the user to choose."""
        if op.hive_pin is not None:
            return await self.hives.forward(self.server, job, op, self.hives.get(op.hive_pin))
        live = self.hives.live()
        if not live:
            known = ", ".join(f"{h.name} ({h.liveness_state})" for h in self.hives.links)
            raise MeshError(
                ErrorCode.UNAVAILABLE,
                f"{op.NAME} runs on a hive, and no hive is live"
                + (f" (known: {known})" if known else " (none is connected to this queen)"),
            )
        if isinstance(op, WorkerList | ModelList):
            return await self._fan_out(job, op, live)
        candidates = live
        if isinstance(op, WorkerGet | WorkerDelete):
            candidates = [h for h in live if _names(h, "workers", op.worker)] or candidates
        elif isinstance(op, ModelGet | ModelDelete):
            candidates = [h for h in live if _names(h, "models", op.model)] or candidates
        if len(candidates) == 1:
            return await self.hives.forward(self.server, job, op, candidates[0])
        names = ", ".join(h.name for h in candidates)
        raise MeshError(
            ErrorCode.INVALID_REQUEST,
            f"this mesh has {len(candidates)} hives that could run {op.NAME} ({names}); "
            "choose one with --hive",
        )

    async def _fan_out(self, job: Job, op: Operation, links: list[HiveLink]) -> list[Any]:
        """Run a list operation on every live hive and merge the rows, each tagged with its hive.
        A hive that fails is narrated and left out; the others still answer."""
        results: dict[str, list[Any]] = {}

        async def one(link: HiveLink) -> None:
            try:
                results[link.name] = await self.hives.forward(self.server, job, op, link)
            except MeshError as exc:
                narrate(op.NAME, f"hive {link.name}: {exc.message}", level=Level.WARN)

        async with trio.open_nursery() as nursery:
            for link in links:
                nursery.start_soon(one, link)
        return [{"hive": name, **row} for name, rows in results.items() for row in rows]

    # ---- the queen's own answers --------------------------------------------------------------

    async def _op_status(self, job: Job, op: Status) -> dict[str, Any]:
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
                "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started, 3),
                "jobs_running": len(self.server.running_jobs),
                "keepers": self.server.peer_count,
            },
            "hives": hives,
        }

    async def _op_ping(self, job: Job, op: Ping) -> dict[str, Any]:
        if op.hive is not None:
            result: dict[str, Any] = await self._route(job, op)
            return result
        return await run_ping(op)

    async def _op_hive_list(self, job: Job, op: HiveList) -> list[dict[str, Any]]:
        narrate("hive_list", f"{len(self.hives.links)} hive(s) known to this queen")
        return [link.record() for link in self.hives.links]

    async def _op_hive_get(self, job: Job, op: HiveGet) -> dict[str, Any]:
        return self.hives.get(op.hive).record(detail=True)

    async def _op_job_list(self, job: Job, op: JobList) -> list[dict[str, Any]]:
        jobs = self.server.job_summaries(include_finished=op.include_finished)
        running = len(self.server.running_jobs)
        narrate("job_list", f"{running} running, {len(jobs) - running} finished")
        return jobs

    async def _op_job_cancel(self, job: Job, op: JobCancel) -> dict[str, Any]:
        if op.job == job.id:
            raise MeshError(ErrorCode.CONFLICT, "a job cannot cancel itself")
        target = self.server.cancel(op.job, by=job.peer.label)
        narrate(
            "job_cancel",
            f"cancelled job {target.id} ({target.op.NAME}) of {target.peer.label}",
            level=Level.WARN,
        )
        return {"job": target.id, "state": "cancelled"}


def _names(link: HiveLink, kind: str, ident: str) -> bool:
    """Whether the hive's last heartbeat lists a worker or model with this id."""
    return any(row.get("id") == ident for row in link.state.get(kind, []))
