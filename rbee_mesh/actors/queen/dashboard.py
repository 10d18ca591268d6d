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
import weakref
from collections.abc import AsyncIterator, Callable
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
#: Pages following /events at once (each is a connection the queen writes to).
MAX_VIEWERS = 16
#: Of each running job: the narration lines, and the characters of its text, shown.
NARRATION_LINES = 6
TEXT_CHARS = 2_000
#: The frames of a job's record looked at for them (its most recent).
FRAMES_READ = 200
#: Failed jobs listed; and the hives, their workers and devices, and the running jobs a
#: snapshot shows at most, each text cut to SHORT characters: a snapshot is one frame for `top`
#: (a DATA record), which must stay well within a frame's limits however large the mesh.
FAILURES = 10
MOST_HIVES = 100
MOST_WORKERS = 16
MOST_DEVICES = 16
MOST_JOBS = 50
SHORT = 300


def page() -> str:
    """The dashboard's HTML."""
    return resources.files(__package__).joinpath("dashboard.html").read_text(encoding="utf-8")


def snapshot(queen: Queen, most_hives: int = MOST_HIVES) -> dict[str, Any]:
    """What the dashboard (and `top`) shows of `queen` now: made at most once per INTERVAL_S
    and shared by all who look (each running job's recent frames are decoded for it). Only
    shapes the queen checked go in: a hive's heartbeat is free-form, and one hive that sends
    an odd one is shown with what could be read of it."""
    now = trio.current_time()
    cached = _made.get(queen)
    if cached is not None and now - cached[0] < INTERVAL_S and cached[1] == most_hives:
        return cached[2]
    running = [job for job in queen.server.running_jobs if job.op.NAME != "top"]
    made = {
        "queen": {
            "name": queen.name,
            "uptime_s": round(time.time() - queen.started),
            "jobs_running": len(running),
            "queued": len(queen.queue),
            "hives": len(queen.hives.links),
        },
        "hives": [_hive(link) for link in queen.hives.links[:most_hives]],
        "jobs": [_job(job) for job in running[:MOST_JOBS]],
        "failures": [
            {k: _short(e.summary.get(k)) for k in ("id", "op", "error", "created")}
            for e in reversed(list(queen.server.history))
            if e.summary.get("error") and e.summary.get("state") != "cancelled"
        ][:FAILURES],
    }
    _made[queen] = (now, most_hives, made)
    return made


#: The last snapshot made of each queen: (when, how many hives it shows at most, it).
_made: weakref.WeakKeyDictionary[Queen, tuple[float, int, dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)


async def events(
    queen: Queen, allowed: Callable[[], bool], interval_s: float = INTERVAL_S
) -> AsyncIterator[str]:
    """Server-sent events: a snapshot whenever it changed (at most every `interval_s`), for as
    long as `allowed()` (the viewer's API key still valid)."""
    last, quiet_since = "", trio.current_time()
    while allowed():
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
            {
                "id": _short(d.get("id")), "name": _short(d.get("name")),
                "memory_total": _int(d.get("memory_total")),
                "memory_free": _int(d.get("memory_free")),
                "utilization": _fraction(d.get("utilization")),
            }
            for d in rows(state, "devices")[:MOST_DEVICES]
        ],
        "workers": [
            {
                "id": _short(w.get("id")), "model": _short(w.get("model")),
                "state": _short(w.get("state")), "device": _short(w.get("device")),
                "slots": _int(w.get("slots")), "busy": _int(w.get("busy")),
            }
            for w in rows(state, "workers")[:MOST_WORKERS]
        ],
        "workers_total": len(rows(state, "workers")),
        "models": link.model_count,
    }  # fmt: skip


def _job(job: ServerJob) -> dict[str, Any]:
    narration: list[str] = []
    text: list[str] = []
    record = job.record
    if record is not None:
        frames = [*record.head[-FRAMES_READ:], *list(record.tail)[-FRAMES_READ:]][-FRAMES_READ:]
        for kind, body in frames:
            for message in _messages(job.id, kind, body):
                if isinstance(message, Narration):
                    narration.append(f"[{message.actor}] {message.human}"[:SHORT])
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


def rows(state: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The maps of a list in a hive's (free-form) state; none where it is not a list."""
    rows = state.get(key)
    return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []


def _short(value: Any) -> str | None:
    return None if value is None else str(value)[:SHORT]


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _fraction(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1
    return float(value) if ok else None


def _messages(job_id: str, kind: Kind, body: bytes) -> list[Any]:
    """The messages of a recorded frame (a BATCH's, one by one); none if it does not decode."""
    if kind not in (Kind.NARRATION, Kind.TOKEN, Kind.BATCH):
        return []
    try:
        message = decode([HEADER, bytes([kind]), job_id.encode("ascii"), body])
    except ProtocolError:
        return []
    return list(message.messages) if isinstance(message, Batch) else [message]
