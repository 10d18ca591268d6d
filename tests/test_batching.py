"""Continuous batching with a real model: several jobs in one worker, one batch, each its own.

SmolLM2-135M-Instruct (tests/real_model.py) in a whole mesh of this process (a queen, a hive, a
worker process of 4 slots, as the queen spawns them): jobs placed at once share the worker, and
each gets the text it gets alone (its own prompt, sampling, seed, stop strings and max tokens),
whatever runs beside it; cancelling one leaves the others streaming; killing the worker ends
every one of its jobs with one terminal frame.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import trio

from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.actors.jobclient import ClientJob, JobClient
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.protocol import Cancelled, Done, Error, ErrorCode, Infer, Message, Token
from rbee_mesh.protocol.constants import DEFAULT_SLOTS
from tests.conftest import FAST_KEEPER, Served, serving_a_mesh
from tests.real_model import FILE, smollm2

#: Real-model jobs one after another, then at once: ~10 s each on a quiet 2-core machine, and
#: many times that when other work stalls ggml's spinning threads (docs/notes.md).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
BOUND_S = 540

MODEL = f"local/smollm2:{FILE}"


def greedy(prompt: str, max_tokens: int = 32) -> Infer:
    return Infer(
        prompt=prompt, model=MODEL, temperature=0.0, repeat_penalty=1.0, max_tokens=max_tokens
    )


@pytest.fixture(scope="module")
def model() -> Path:
    return smollm2()


@dataclass
class Mesh:
    served: Served
    keeper: JobClient

    def workers(self) -> list[str]:
        return [w.id for w in self.served.hive.pool.list() if w.exit_code is None]


@asynccontextmanager
async def a_mesh(tmp_path: Path, model: Path) -> AsyncIterator[Mesh]:
    state = tmp_path / "state"
    Catalog(state / "hive" / "models").add_file("local/smollm2", FILE, model)
    async with (
        serving_a_mesh(state) as served,
        open_keeper(served.queen.listener.endpoint, FAST_KEEPER) as keeper,
    ):
        yield Mesh(served, keeper)


@dataclass
class Run:
    """One job's frames, with the trio time each arrived."""

    job: ClientJob
    frames: list[tuple[float, Message]] = field(default_factory=list)
    first_token: trio.Event = field(default_factory=trio.Event)

    @property
    def text(self) -> str:
        return "".join(m.text for _, m in self.frames if isinstance(m, Token))

    @property
    def terminals(self) -> list[Message]:
        return [m for _, m in self.frames if m.is_terminal]

    def done(self) -> Done:
        [end] = self.terminals
        assert isinstance(end, Done), end
        return end

    def token_times(self) -> list[float]:
        return [at for at, m in self.frames if isinstance(m, Token)]

    def ended_at(self) -> float:
        return next(at for at, m in self.frames if m.is_terminal)


async def follow(run: Run) -> None:
    async for message in run.job:
        run.frames.append((trio.current_time(), message))
        if isinstance(message, Token):
            run.first_token.set()


async def alone(mesh: Mesh, op: Infer) -> Done:
    run = Run(await mesh.keeper.submit(op))
    await follow(run)
    return run.done()


async def together(mesh: Mesh, ops: list[Infer]) -> list[Run]:
    runs = [Run(await mesh.keeper.submit(op)) for op in ops]
    async with trio.open_nursery() as nursery:
        for run in runs:
            nursery.start_soon(follow, run)
    return runs


async def test_jobs_placed_at_once_share_one_worker_and_each_gets_its_text_from_alone(
    tmp_path: Path, model: Path
) -> None:
    sampled = replace(greedy("Once upon a time"), temperature=1.0, top_k=40, seed=7)
    short = greedy("def fibonacci(n):", max_tokens=5)
    colours = greedy("The three primary colors are")
    with trio.fail_after(BOUND_S):
        async with a_mesh(tmp_path, model) as mesh:
            whole = (await alone(mesh, colours)).result["text"]
            # A stop string from the middle of its own text: the job must end just before it.
            stop = whole.split()[len(whole.split()) // 2]
            france = greedy("The capital of France is")
            ops = [france, sampled, replace(colours, stop=[stop]), short]
            expected = [(await alone(mesh, op)).result for op in ops]
            another_seed = (await alone(mesh, replace(sampled, seed=8))).result["text"]
            [worker] = mesh.workers()
            runs = await together(mesh, ops)
            assert mesh.workers() == [worker]
    assert mesh.served.hive.pool.get(worker).slots == DEFAULT_SLOTS
    results = [run.done().result for run in runs]
    assert {r["worker"] for r in results} == {worker}
    # Each job, batched with the others, produced what it produced alone: no token of one
    # reached another, and each sampled with its own parameters and seed.
    assert [r["text"] for r in results] == [e["text"] for e in expected]
    assert [run.text for run in runs] == [e["text"] for e in expected]
    assert len({r["text"] for r in results}) == len(ops)
    assert another_seed != expected[1]["text"]
    assert expected[2]["text"] == whole[: whole.index(stop)]
    assert (results[3]["usage"]["generated_tokens"], results[3]["finish_reason"]) == (5, "length")
    # They ran at once: each long job streamed before any of them ended.
    long_runs = runs[:3]
    first_end = min(run.ended_at() for run in long_runs)
    assert all(run.token_times()[0] < first_end for run in long_runs)


async def test_cancelling_one_sequence_leaves_the_others_streaming_to_their_end(
    tmp_path: Path, model: Path
) -> None:
    ops = [
        greedy("The capital of France is", 64),
        greedy("Once upon a time", 64),
        greedy("The three primary colors are", 64),
    ]
    with trio.fail_after(BOUND_S):
        async with a_mesh(tmp_path, model) as mesh:
            expected = [(await alone(mesh, op)).result["text"] for op in ops]
            runs = [Run(await mesh.keeper.submit(op)) for op in ops]
            async with trio.open_nursery() as nursery:
                for run in runs:
                    nursery.start_soon(follow, run)
                for run in runs:
                    await run.first_token.wait()
                await runs[1].job.cancel("the test cancels it")
                cancelled_at = trio.current_time()
    [ended] = runs[1].terminals
    assert isinstance(ended, Cancelled), ended
    for index in (0, 2):
        done = runs[index].done()
        assert done.result["text"] == runs[index].text == expected[index]
        assert done.result["usage"]["generated_tokens"] == 64
        # It kept streaming after its neighbour was cancelled.
        assert runs[index].token_times()[-1] > cancelled_at


async def test_a_worker_killed_mid_batch_ends_each_of_its_jobs_with_one_terminal_frame(
    tmp_path: Path, model: Path
) -> None:
    prompts = ["The capital of France is", "Once upon a time", "The three primary colors are"]
    with trio.fail_after(BOUND_S):
        async with a_mesh(tmp_path, model) as mesh:
            runs = [Run(await mesh.keeper.submit(greedy(p, 2000))) for p in prompts]
            async with trio.open_nursery() as nursery:
                for run in runs:
                    nursery.start_soon(follow, run)
                for run in runs:
                    await run.first_token.wait()
                [worker] = mesh.workers()
                os.kill(mesh.served.hive.pool.get(worker).pid, signal.SIGKILL)
    for run in runs:
        [end] = run.terminals
        assert isinstance(end, Error) and end.code is ErrorCode.WORKER_LOST, end
        assert run.frames[-1][1] is end  # nothing after it
