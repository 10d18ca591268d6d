"""The queen's live dashboard (docs/observability.md): a page at `/` of its HTTP server, and the
snapshots it shows, pushed as server-sent events at `/events`.

The page (`dashboard.html`, beside this module) is one file with its script and style inline: no
build step, nothing fetched from anywhere but this queen. A snapshot is what the queen knows
now, read from its registries (no job is run for it, so watching the dashboard adds nothing to
`jobs list`): its hives with their devices and workers, the jobs running with the end of their
narration and of their generated text, and the jobs that failed lately. One connection per open
page; a snapshot goes when it differs from the last one sent, at most every `interval_s`, and
at least every `KEEPALIVE_S` (a comment line), so that a proxy keeps the connection open.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING, Any

import trio

from rbee_mesh.protocol import Batch, Kind, Narration, ProtocolError, Token, decode
from rbee_mesh.protocol.codec import HEADER

if TYPE_CHECKING:
    from rbee_mesh.actors.jobserver import ServerJob
    from rbee_mesh.actors.queen.queen import Queen

#: How often a page is sent a changed snapshot, at most; and a keep-alive when nothing changed.
INTERVAL_S = 0.25
KEEPALIVE_S = 15.0
#: Of each running job: the narration lines, and the characters of its text, shown.
NARRATION_LINES = 6
TEXT_CHARS = 2_000
#: The frames of a job's record looked at for them (its most recent).
FRAMES_READ = 200
#: Failed jobs listed; and the hives and running jobs a snapshot shows at most (it is one
#: frame: a DATA record for `top`, which must stay well within a frame's limits).
FAILURES = 10
MOST_HIVES = 100
MOST_JOBS = 50


def page() -> str:
    """The dashboard's HTML."""
    return resources.files(__package__).joinpath("dashboard.html").read_text(encoding="utf-8")


def snapshot(queen: Queen) -> dict[str, Any]:
    """What the dashboard (and `top`) shows of `queen` now."""
    running = [job for job in queen.server.running_jobs if job.op.NAME != "top"]
    return {
        "queen": {
            "name": queen.name,
            "uptime_s": round(time.time() - queen.started),
            "jobs_running": len(running),
            "queued": len(queen.queue),
            "hives": len(queen.hives.links),
        },
        "hives": [_hive(link) for link in queen.hives.links[:MOST_HIVES]],
        "jobs": [_job(job) for job in running[:MOST_JOBS]],
        "failures": [
            {k: e.summary.get(k) for k in ("id", "op", "error", "created")}
            for e in reversed(list(queen.server.history))
            if e.summary.get("error") and e.summary.get("state") != "cancelled"
        ][:FAILURES],
    }


async def events(queen: Queen, interval_s: float = INTERVAL_S) -> AsyncIterator[str]:
    """Server-sent events: a snapshot whenever it changed (at most every `interval_s`)."""
    last, quiet_since = "", trio.current_time()
    while True:
        data = json.dumps(snapshot(queen), separators=(",", ":"), default=str)
        now = trio.current_time()
        if data != last:
            last, quiet_since = data, now
            yield f"event: snapshot\ndata: {data}\n\n"
        elif now - quiet_since >= KEEPALIVE_S:
            quiet_since = now
            yield ": still here\n\n"
        await trio.sleep(interval_s)


def _hive(link: Any) -> dict[str, Any]:
    state = link.state
    silent = link.client.silent_s
    return {
        "hive": link.name,
        "liveness": link.liveness_state,
        "heartbeat_age_s": None if silent is None else round(silent, 1),
        "devices": [
            {k: d.get(k) for k in ("id", "name", "memory_total", "memory_free", "utilization")}
            for d in state.get("devices", [])
            if isinstance(d, dict)
        ],
        "workers": [
            {k: w.get(k) for k in ("id", "model", "state", "slots", "busy", "device")}
            for w in state.get("workers", [])
            if isinstance(w, dict)
        ],
        "models": link.model_count,
    }


def _job(job: ServerJob) -> dict[str, Any]:
    narration: list[str] = []
    text: list[str] = []
    record = job.record
    if record is not None:
        frames = [*record.head[-FRAMES_READ:], *list(record.tail)[-FRAMES_READ:]][-FRAMES_READ:]
        for kind, body in frames:
            for message in _messages(job.id, kind, body):
                if isinstance(message, Narration):
                    narration.append(f"[{message.actor}] {message.human}")
                elif isinstance(message, Token):
                    text.append(message.text)
    return {
        "id": job.id,
        "op": job.op.NAME,
        "model": getattr(job.op, "model", None),
        "age_s": round(time.time() - job.created, 1),
        "narration": narration[-NARRATION_LINES:],
        "text": "".join(text)[-TEXT_CHARS:],
    }


def _messages(job_id: str, kind: Kind, body: bytes) -> list[Any]:
    """The messages of a recorded frame (a BATCH's, one by one); none if it does not decode."""
    if kind not in (Kind.NARRATION, Kind.TOKEN, Kind.BATCH):
        return []
    try:
        message = decode([HEADER, bytes([kind]), job_id.encode("ascii"), body])
    except ProtocolError:
        return []
    return list(message.messages) if isinstance(message, Batch) else [message]
