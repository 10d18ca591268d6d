"""A job's narration and data records go in BATCH frames when they come faster than COALESCE_S
apart: in order, none lost, none held past the job's next frame or its end, and a lone one never
held at all (docs/protocol.md, "Coalescing").

A real job server on a tcp socket, handlers that narrate in known patterns, and a client that
takes the job's streamed frames unopened (`relay`), as a queen does, to see them as they came.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from rbee_mesh.actors.jobclient import ClientJob, JobClient
from rbee_mesh.actors.jobserver import JobServer, ServerJob
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.narration import emit_record, narrate
from rbee_mesh.protocol import (
    Actor,
    Batch,
    Cancelled,
    Data,
    Done,
    Kind,
    Message,
    Narration,
    Ping,
    Token,
    decode,
)
from rbee_mesh.protocol.constants import BATCH_BYTES, MAX_BATCH
from tests.conftest import FAST_KEEPER, FAST_QUEEN
from tests.keyed import open_listener

Handler = Callable[[ServerJob, Ping], Any]


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[JobClient]:
    """A keeper of a job server whose `ping` runs `handler`."""
    async with await open_listener("tcp://127.0.0.1:0") as listener:
        server = JobServer(
            listener, name="coalescing", actor=Actor.QUEEN, handlers={Ping: handler},
            config=FAST_QUEEN,
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            endpoint = listener.endpoint.replace("0.0.0.0", "127.0.0.1")
            async with open_keeper(endpoint, FAST_KEEPER) as keeper:
                yield keeper
            await server.stop("the test is over")


async def streamed(
    handler: Handler,
    op: Ping = Ping(),  # noqa: B008 - frozen, never changed
    during: Callable[[ClientJob, Frames], Awaitable[None]] | None = None,
) -> tuple[Frames, ClientJob]:
    """Run `op` on a server whose `ping` is `handler`, its frames taken as they came (and
    `during` run while the job runs); the frames and the ended job."""
    frames = Frames()
    with trio.fail_after(20):
        async with serving(handler) as keeper:
            job = await keeper.submit(op, relay=frames)
            if during is not None:
                await during(job, frames)
            await job.end()
    return frames, job


class Frames:
    """A job's streamed frames as they arrived (decoded), and an event per frame."""

    def __init__(self) -> None:
        self.frames: list[Message] = []
        self.arrived = trio.Event()

    def __call__(self, frames: Sequence[bytes], kind: Kind) -> None:
        self.frames.append(decode(frames))
        self.arrived.set()
        self.arrived = trio.Event()

    async def wait_for(self, count: int) -> None:
        while len(self.frames) < count:
            await self.arrived.wait()

    @property
    def messages(self) -> list[Message]:
        """Every streamed message, BATCHes opened."""
        out: list[Message] = []
        for frame in self.frames:
            out += frame.messages if isinstance(frame, Batch) else [frame]
        return out


async def test_a_burst_goes_in_batches_in_order_and_whole() -> None:
    async def burst(job: ServerJob, op: Ping) -> dict[str, Any]:
        for i in range(op.count):  # no checkpoint: every one comes before any can be sent
            narrate("pong", f"pong {i}")
            if i % 100 == 0:
                emit_record({"i": i})
        return {"count": op.count}

    frames, job = await streamed(burst, Ping(count=1_000))
    assert isinstance(job.terminal, Done)
    said = [(m.human if isinstance(m, Narration) else m.record["i"]) for m in frames.messages]
    expected: list[Any] = []
    for i in range(1_000):
        expected += [f"pong {i}", i] if i % 100 == 0 else [f"pong {i}"]
    assert said == expected
    batches = [f for f in frames.frames if isinstance(f, Batch)]
    assert len(batches) >= len(expected) // MAX_BATCH and len(frames.frames) < 50
    assert isinstance(frames.frames[0], Narration)  # the first was not held: nothing came before
    for batch in batches:
        assert len(batch.messages) <= MAX_BATCH
        assert sum(len(m.human) for m in batch.messages if isinstance(m, Narration)) < BATCH_BYTES


async def test_a_held_frame_goes_while_the_job_is_quiet() -> None:
    go_on = trio.Event()

    async def pause(job: ServerJob, op: Ping) -> None:
        narrate("first", "sent at once")
        narrate("second", "held, then sent though nothing follows it")
        await go_on.wait()

    async def release(job: ClientJob, frames: Frames) -> None:
        await frames.wait_for(2)  # while the job waits on this test
        go_on.set()

    frames, job = await streamed(pause, during=release)
    assert [m.action for m in frames.messages if isinstance(m, Narration)] == ["first", "second"]
    assert isinstance(job.terminal, Done)


async def test_a_lone_frame_is_never_held() -> None:
    async def apart(job: ServerJob, op: Ping) -> None:
        for i in range(3):
            narrate("pong", f"pong {i}")
            await trio.sleep(0.05)  # far more than COALESCE_S apart: the pace under test

    frames, _ = await streamed(apart)
    assert [type(f) for f in frames.frames] == [Narration] * 3


async def test_held_frames_go_before_a_token_and_before_a_cancellation() -> None:
    async def then_wait(job: ServerJob, op: Ping) -> None:
        narrate("one", "sent at once")
        narrate("two", "held")
        job.emit(Token(job_id=job.id, seq=0, text="x"))
        narrate("three", "held")
        narrate("four", "held")
        await trio.sleep_forever()

    async def cancel(job: ClientJob, frames: Frames) -> None:
        await frames.wait_for(3)
        await job.cancel("the test cancels it")

    frames, job = await streamed(then_wait, during=cancel)
    kinds = [type(m).__name__ for m in frames.messages]
    assert kinds == ["Narration", "Narration", "Token", "Narration", "Narration"]
    assert isinstance(job.terminal, Cancelled)


async def test_a_record_too_big_for_a_batch_goes_alone_after_those_held() -> None:
    big = {"blob": "x" * (BATCH_BYTES + 1)}

    async def mixed(job: ServerJob, op: Ping) -> None:
        narrate("one", "sent at once")
        narrate("two", "held")
        emit_record(big)
        narrate("three", "held again")

    frames, _ = await streamed(mixed)
    assert [type(f) for f in frames.frames] == [Narration, Narration, Data, Narration]
    assert isinstance(frames.frames[2], Data) and frames.frames[2].record == big
