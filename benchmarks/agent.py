"""The keeper's side of one benchmark mode, as a process of its own, driven over stdin/stdout.

`benchmarks.bench` starts one agent per mode and asks each, in turn, to run a batch of one
operation; the agent times every run and answers with the samples. Keeping each mode's client
in its own process keeps the modes from sharing one event loop (the integrated mesh's tasks
would otherwise run inside every other mode's measurement), and lets the remote mode's client
run on a host of its own (a network namespace).

    python -m benchmarks.agent integrated STATE_DIR
    python -m benchmarks.agent mesh ENDPOINT HOME    # a queen (ipc://, tcp://), as HOME's node
    python -m benchmarks.agent http URL              # the HTTP + SSE baseline's queen

Protocol, one JSON object per line: the agent first says ``{"ready": true}`` (or
``{"error": ...}``), then answers each ``{"op": NAME, "n": N}`` with ``{"samples": [seconds,
...], "events": [per run]}`` and exits at end of input. Operations (benchmarks/bench.py):
``control``, ``narration``, ``tokens``, ``spawn``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from rbee_mesh.actors.jobclient import JobClient
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.mesh import integrated_mesh
from rbee_mesh.actors.trust import Trust
from rbee_mesh.protocol import (
    Done,
    HiveList,
    Infer,
    Narration,
    Operation,
    Ping,
    Token,
    WorkerDelete,
    WorkerList,
    WorkerSpawn,
)

#: The model every mode serves: a catalog id (mesh) and a file name (HTTP baseline).
MODEL_REPO, MODEL_FILE = "rbee-bench/random-llama", "model.gguf"
MODEL = f"{MODEL_REPO}:{MODEL_FILE}"
NARRATION_EVENTS = 1_000
TOKENS = 64
PROMPT = "Once upon a time"

#: One run of an operation: returns how many events (narration or tokens) it streamed.
Run = Callable[[], Awaitable[int]]


class MeshClient:
    """The four operations over a keeper, all pinned to the mesh's one hive."""

    def __init__(self, keeper: JobClient, hive: str) -> None:
        self.keeper = keeper
        self.hive = hive

    async def job(self, op: Operation) -> tuple[Any, int]:
        job = await self.keeper.submit(op)
        events = 0
        async for message in job:
            if isinstance(message, Token):
                events += message.count
            elif isinstance(message, Narration):
                events += 1
        if not isinstance(job.terminal, Done):
            raise RuntimeError(f"{op.NAME} ended with {job.terminal!r:.300}")
        return job.terminal.result, events

    async def control(self) -> int:
        rows, _ = await self.job(WorkerList(hive=self.hive))
        return len(rows)

    async def narration(self) -> int:
        _, events = await self.job(Ping(count=NARRATION_EVENTS, hive=self.hive))
        if events < NARRATION_EVENTS:
            raise RuntimeError(f"ping narrated {events} of {NARRATION_EVENTS} pongs")
        return events

    async def tokens(self) -> int:
        op = Infer(prompt=PROMPT, model=MODEL, max_tokens=TOKENS, seed=1, hive=self.hive)
        _, events = await self.job(op)
        return events

    async def spawn(self) -> int:
        record, _ = await self.job(WorkerSpawn(model=MODEL, hive=self.hive))
        await self.job(WorkerDelete(worker=record["id"], hive=self.hive))  # not timed
        return 0

    async def warm_up(self) -> None:
        await self.tokens()  # the first inference spawns the worker the token runs use


class HttpClient:
    """The same four operations against the HTTP + SSE baseline."""

    def __init__(self, keeper: Any, hive: str) -> None:
        self.keeper = keeper
        self.hive = hive

    async def control(self) -> int:
        rows, _ = await self.keeper.run({"op": "worker_list", "hive": self.hive})
        return len(rows)

    async def narration(self) -> int:
        op = {"op": "ping", "count": NARRATION_EVENTS, "hive": self.hive}
        _, events = await self.keeper.run(op)
        if events < NARRATION_EVENTS:
            raise RuntimeError(f"ping narrated {events} of {NARRATION_EVENTS} pongs")
        return int(events)

    async def tokens(self) -> int:
        op = {"op": "infer", "prompt": PROMPT, "max_tokens": TOKENS, "seed": 1}
        _, events = await self.keeper.run({**op, "temperature": 0.8, "hive": self.hive})
        return int(events)

    async def spawn(self) -> int:
        record, _ = await self.keeper.run(
            {"op": "worker_spawn", "model": MODEL_FILE, "hive": self.hive}
        )
        await self.keeper.run({"op": "worker_delete", "worker": record["id"], "hive": self.hive})
        return 0

    async def warm_up(self) -> None:
        # The baseline has no scheduler: the worker the token runs use is spawned by hand.
        await self.keeper.run({"op": "worker_spawn", "model": MODEL_FILE, "hive": self.hive})
        await self.tokens()


@asynccontextmanager
async def mesh_client(kind: str, target: str) -> AsyncIterator[Any]:
    if kind == "http":
        from benchmarks.http_baseline import HttpKeeper

        async with HttpKeeper(target) as keeper:
            yield HttpClient(keeper, "bench-hive")
        return
    if kind == "integrated":
        async with (
            integrated_mesh(Path(target)) as queen,
            open_keeper(queen.listener.endpoint) as keeper,
        ):
            yield MeshClient(keeper, queen.hives.links[0].name)
        return
    endpoint, home = target.split(" ", 1)
    async with open_keeper(endpoint, trust=Trust.load(Path(home))) as keeper:
        client = MeshClient(keeper, "")
        with trio.fail_after(30):  # the queen links its hive within a heartbeat or two
            while not client.hive:
                hives, _ = await client.job(HiveList())
                live = [h["hive"] for h in hives if h["liveness"] == "live"]
                if live:
                    client.hive = live[0]
                else:
                    await trio.sleep(0.05)  # polling another process: no event to wait on
        yield client


async def serve(kind: str, target: str) -> None:
    stdin = trio.wrap_file(sys.stdin)
    async with mesh_client(kind, target) as client:
        await client.warm_up()
        say({"ready": True})
        async for line in stdin:
            request = json.loads(line)
            run: Run = getattr(client, request["op"])
            samples, events = [], []
            for _ in range(int(request["n"])):
                start = time.perf_counter()
                events.append(await run())
                samples.append(time.perf_counter() - start)
            say({"samples": samples, "events": events})


def say(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def main() -> None:
    kind, target = sys.argv[1], " ".join(sys.argv[2:])
    try:
        trio.run(serve, kind, target)
    except Exception as exc:
        say({"error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
