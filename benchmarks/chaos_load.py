"""The chaos soak's load (benchmarks/chaos.py): one keeper on the queen's host that runs jobs of
every kind at once, and reports each job's end as one JSON line on stdout.

    python -m benchmarks.chaos_load SPEC_JSON

SPEC_JSON (`LoadSpec`) says how many jobs of each kind, how many run at once, the model to infer
with and the files to download. The jobs:

- infer: the seeded model, unpinned (the queen places it on any worker, spawning one where a
  worker was killed), a few tokens, greedy;
- control: `status`, `hive list`, `worker list` and `model list` in turn, paced; `hive list` and
  `worker list` are also the registry's state over time, from which the soak tells when a fault
  was seen;
- download: a file of the hub, each once, pinned to a hive (alternating).

Every stream goes on until each kind has run `jobs` times (downloads also stop when no file is
left), so that all kinds run side by side for the whole soak, whichever is quickest.

Per job the line says what the keeper saw: when it was submitted, accepted and ended, how many
terminal frames arrived (the job client stops reading a job at its terminal frame, so this is
one unless the job never ended), how it ended (DONE, ERROR with its code, CANCELLED, or `hung`
when it outlived its deadline and a margin), and what its result claims, for the soak to check.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from rbee_mesh.actors.jobclient import ClientConfig, JobClient
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.trust import Trust
from rbee_mesh.protocol import (
    Cancelled,
    Done,
    Error,
    HiveList,
    Infer,
    MeshError,
    ModelDownload,
    ModelList,
    Narration,
    Operation,
    Status,
    Token,
    WorkerList,
)

#: Narration kept of a job that did not end DONE (its last lines).
NARRATION_KEPT = 6
#: A job that has not ended this long after its deadline is reported `hung`.
HUNG_MARGIN_S = 15.0
#: Deadlines asked for (the SUBMIT's timeout_s), by kind.
DEADLINES_S = {"infer": 30.0, "control": 10.0, "download": 60.0}
#: The control streams, each the operations it runs in turn. `hive list` and `worker list` have
#: a stream of their own: each is how the soak sees the registry over time, and a `worker list`
#: waits for every hive (a frozen one too) where a `hive list` answers at once.
CONTROL_ROUNDS = ((HiveList,), (WorkerList,), (Status, ModelList))


@dataclass
class LoadSpec:
    queen: str
    jobs: int
    model: str
    #: (hive, OWNER/REPO:FILE) per download job; at least `jobs` of them.
    downloads: list[tuple[str, str]]
    max_tokens: int = 128
    infer_streams: int = 4
    download_streams: int = 2
    #: Pause between two control jobs of one stream: pacing, so that control does not crowd
    #: out the rest on a small machine.
    control_pause_s: float = 0.05
    #: Pause of an infer or download stream after a job that failed, as a client backs off:
    #: while no hive can serve, jobs fail at once, and would use up the soak in a moment.
    backoff_s: float = 0.2

    @classmethod
    def from_json(cls, text: str) -> LoadSpec:
        data = json.loads(text)
        data["downloads"] = [tuple(d) for d in data["downloads"]]
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class JobRecord:
    """One job as the keeper saw it; `claims` is what its result says (checked later)."""

    kind: str
    op: str
    n: int
    submitted: float
    hive: str | None = None
    #: What it infers with or downloads.
    model: str | None = None
    accepted: float | None = None
    ended: float | None = None
    job_id: str = ""
    terminals: int = 0
    frames: int = 0
    end: str = ""
    code: str | None = None
    message: str = ""
    started: bool | None = None
    claims: dict[str, Any] = field(default_factory=dict)
    #: The last narration of a job that did not end DONE: what the mesh said it was doing.
    narration: list[str] = field(default_factory=list)


def _claims(op: Operation, result: Any, streamed: str) -> dict[str, Any]:
    """What a DONE result claims, in the few fields the soak checks."""
    if isinstance(op, Infer):
        usage = result.get("usage", {})
        return {
            "worker": result.get("worker"),
            "tokens": usage.get("generated_tokens"),
            "same_text": result.get("text") == streamed,
        }
    if isinstance(op, ModelDownload):
        return {"status": result.get("status"), "size": result.get("size"), "id": result.get("id")}
    if isinstance(op, HiveList):
        return {"hives": {r["hive"]: r["liveness"] for r in result}}
    if isinstance(op, WorkerList):
        rows = result if isinstance(result, list) else []
        return {"workers": [[r.get("hive"), r["id"], r.get("pid"), r["state"]] for r in rows]}
    return {}


async def run_job(keeper: JobClient, kind: str, n: int, op: Operation) -> JobRecord:
    record = JobRecord(
        kind, op.NAME, n, time.time(), hive=op.hive_pin, model=getattr(op, "model", None)
    )
    deadline = DEADLINES_S[kind]
    streamed: list[str] = []
    said: deque[str] = deque(maxlen=NARRATION_KEPT)
    job = None
    with trio.move_on_after(deadline + HUNG_MARGIN_S) as bound:
        try:
            job = await keeper.submit(op, timeout_s=deadline)
        except MeshError as exc:  # no answer at all: the client's own conclusion, no frame
            record.ended, record.end = time.time(), "unanswered"
            record.code, record.message, record.started = str(exc.code), exc.message, exc.started
            return record
        if job.accepted is not None:
            record.accepted, record.job_id = time.time(), job.job_id
        async for message in job:
            record.frames += 1
            if isinstance(message, Token):
                streamed.append(message.text)
            elif isinstance(message, Narration):
                said.append(f"{message.actor} {message.action}: {message.human}")
            if not message.is_terminal:
                continue
            record.terminals += 1
            record.ended = time.time()
            record.job_id = record.job_id or message.job_id
            match message:
                case Done():
                    record.end = "done"
                    record.claims = _claims(op, message.result, "".join(streamed))
                case Error():
                    record.end, record.code = "error", str(message.code)
                    record.message, record.started = message.message, message.started
                case Cancelled():
                    record.end, record.message = "cancelled", message.reason
    if bound.cancelled_caught:
        record.end = "hung"
        if job is not None:
            await job.cancel("the chaos soak gave up on it")
    if record.end != "done":
        record.narration = list(said)
    return record


class Load:
    """The streams of jobs, and where their records go."""

    def __init__(self, spec: LoadSpec, out: Any) -> None:
        self.spec = spec
        self.out = out
        self.counts = {"infer": 0, "control": 0, "download": 0}

    def _next(self, kind: str) -> int | None:
        """The number of the next job of `kind`, or None once every kind ran `jobs` times."""
        if all(n >= self.spec.jobs for n in self.counts.values()):
            return None
        n = self.counts[kind]
        self.counts[kind] = n + 1
        return n

    def emit(self, record: JobRecord) -> None:
        print(json.dumps({"type": "job", **asdict(record)}), file=self.out, flush=True)

    async def emit_and_back_off(self, record: JobRecord) -> None:
        self.emit(record)
        if record.end != "done":
            await trio.sleep(self.spec.backoff_s)

    async def infer_stream(self, keeper: JobClient) -> None:
        while (n := self._next("infer")) is not None:
            op = Infer(
                prompt=f"Once upon a time {n}",
                model=self.spec.model,
                max_tokens=self.spec.max_tokens,
                temperature=0.0,
                download=False,
            )
            await self.emit_and_back_off(await run_job(keeper, "infer", n, op))

    async def download_stream(self, keeper: JobClient) -> None:
        while (n := self._next("download")) is not None and n < len(self.spec.downloads):
            hive, model = self.spec.downloads[n]
            op = ModelDownload(model=model, hive=hive)
            await self.emit_and_back_off(await run_job(keeper, "download", n, op))

    async def control_stream(self, keeper: JobClient, ops: tuple[type[Operation], ...]) -> None:
        turn = 0
        while (n := self._next("control")) is not None:
            op = ops[turn % len(ops)]()
            turn += 1
            self.emit(await run_job(keeper, "control", n, op))
            await trio.sleep(self.spec.control_pause_s)

    async def run(self, keeper: JobClient) -> None:
        async with trio.open_nursery() as nursery:
            for ops in CONTROL_ROUNDS:
                nursery.start_soon(self.control_stream, keeper, ops)
            for _ in range(self.spec.infer_streams):
                nursery.start_soon(self.infer_stream, keeper)
            for _ in range(self.spec.download_streams):
                nursery.start_soon(self.download_stream, keeper)


async def main(spec: LoadSpec) -> None:
    node = Trust.load(Path(os.environ["RBEE_MESH_HOME"]))  # the queen's own node
    config = ClientConfig(accept_timeout_s=5.0)
    async with open_keeper(spec.queen, config, trust=node, name="chaos-load") as keeper:
        await Load(spec, sys.stdout).run(keeper)
    print(json.dumps({"type": "end", "at": time.time()}), flush=True)


if __name__ == "__main__":
    trio.run(main, LoadSpec.from_json(sys.argv[1]))
