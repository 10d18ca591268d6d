"""Inference end to end: keeper -> queen (scheduling) -> hive -> worker process, and back.

The model is a tiny llama GGUF with random weights that the tests write; the workers are real
processes running a real backend. Every test runs in the integrated mode (one process, in-memory
transport) and with the hive over tcp.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from rbee_mesh.actors.hive.catalog import Catalog, ModelStatus
from rbee_mesh.actors.hive.hive import HiveConfig, running_hive
from rbee_mesh.actors.jobclient import ClientJob, JobClient
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.mesh import integrated_hive_config, memory_endpoint, running_queen
from rbee_mesh.actors.queen.queen import Queen
from rbee_mesh.inference.gguf_file import write_tiny_gguf
from rbee_mesh.protocol import (
    Done,
    Error,
    ErrorCode,
    Infer,
    Message,
    Narration,
    Submit,
    Token,
    WorkerDelete,
    WorkerList,
    WorkerSpawn,
    decode,
    encode,
)
from tests.conftest import FAST_KEEPER, FAST_QUEEN, bind_endpoint, infer_in_a_mesh, queen_address
from tests.keyed import open_connection
from tests.test_backends import without_byte_tokens

REPO = "rbee-test/tiny-GGUF"
FILE = "tiny.gguf"
MODEL = f"{REPO}:{FILE}"
ODD_REPO = "rbee-test/odd-GGUF"
#: Greedy on these weights, a generation runs to max_tokens: long enough to cancel mid-stream.
LONG = {"max_tokens": 1800, "temperature": 0.0}


@pytest.fixture(params=["integrated", "tcp"])
async def mesh(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Queen, JobClient]]:
    state = tmp_path / "state"
    catalog = Catalog(state / "hive" / "models")
    catalog.add_file(REPO, FILE, write_tiny_gguf(tmp_path / FILE, context_length=2048))
    # A file both backends refuse (the llama layout labelled gptj).
    catalog.add_file(ODD_REPO, "odd.gguf", write_tiny_gguf(tmp_path / "odd.gguf", arch="gptj"))
    with trio.fail_after(30):
        if request.param == "integrated":
            local = integrated_hive_config(state, FAST_QUEEN)
            async with (
                running_queen(
                    memory_endpoint("queen"), FAST_QUEEN, integrated_hive=local, max_queued=1
                ) as queen,
                open_keeper(queen_address(queen), FAST_KEEPER) as keeper,
            ):  # fmt: skip
                yield queen, keeper
            return
        config = HiveConfig(
            state_dir=state,
            hive_id="hive-t",
            control=bind_endpoint("tcp", tmp_path),
            heartbeats=bind_endpoint("tcp", tmp_path),
            server=FAST_QUEEN,
        )
        async with (
            running_hive(config) as hive,
            running_queen(
                bind_endpoint("tcp", tmp_path), FAST_QUEEN,
                hives=[hive.server.listener.endpoint], max_queued=1,
            ) as queen,
            open_keeper(queen_address(queen), FAST_KEEPER) as keeper,
        ):  # fmt: skip
            await queen.hives.links[0].heard.wait()
            yield queen, keeper


async def run(keeper: JobClient, op: Infer) -> tuple[ClientJob, list[Message]]:
    job = await keeper.submit(op)
    return job, [m async for m in job]


def text_of(events: list[Message]) -> str:
    return "".join(e.text for e in events if isinstance(e, Token))


async def test_first_job_spawns_a_worker_and_streams_tokens_in_order(
    mesh: tuple[Queen, JobClient],
) -> None:
    _, keeper = mesh
    with trio.fail_after(60):
        job, events = await run(keeper, Infer(prompt="Hello", model=MODEL, max_tokens=40, seed=3))
    assert isinstance(job.terminal, Done), job.terminal
    tokens = [e for e in events if isinstance(e, Token)]
    assert [t.seq for t in tokens] == [
        sum(t.count for t in tokens[:i]) for i in range(len(tokens))
    ]  # contiguous: none lost, none duplicated
    result = job.terminal.result
    assert text_of(events) == result["text"]
    assert result["usage"]["generated_tokens"] == 40 and result["finish_reason"] == "length"
    assert result["usage"]["prompt_tokens"] > 0 and result["usage"]["ttft_s"] > 0
    said = [e.human for e in events if isinstance(e, Narration) and e.action == "schedule"]
    assert any("spawning a worker" in s for s in said)
    assert any("is idle" in s for s in said)


async def test_the_next_job_reuses_the_idle_worker_and_same_seed_gives_same_text(
    mesh: tuple[Queen, JobClient],
) -> None:
    _, keeper = mesh
    op = Infer(prompt="Hello", model=MODEL, max_tokens=30, seed=11)
    with trio.fail_after(60):
        first, first_events = await run(keeper, op)
        second, second_events = await run(keeper, op)
        workers = await run(keeper, WorkerList())  # type: ignore[arg-type]
    assert isinstance(first.terminal, Done) and isinstance(second.terminal, Done)
    assert text_of(first_events) == text_of(second_events)
    assert first.terminal.result["worker"] == second.terminal.result["worker"]
    assert isinstance(workers[0].terminal, Done) and len(workers[0].terminal.result) == 1


async def test_a_parameter_out_of_range_is_refused_before_any_work(
    mesh: tuple[Queen, JobClient],
) -> None:
    queen, keeper = mesh
    frames = encode(Submit(job_id="", ref="r-1", op=Infer(prompt="x", model=MODEL)))
    frames[3] = frames[3].replace(b"\xcb?\xe9\x99\x99\x99\x99\x99\x9a", b"\xcb@\x14" + bytes(6))
    with trio.fail_after(10):
        async with await open_connection(queen_address(queen)) as conn:
            await conn.send(frames)  # temperature 0.8 -> 5.0
            reply = decode(await conn.receive())
        workers = await run(keeper, WorkerList())  # type: ignore[arg-type]
    assert isinstance(reply, Error) and reply.code is ErrorCode.INVALID_REQUEST
    assert "temperature" in reply.message
    assert isinstance(workers[0].terminal, Done) and workers[0].terminal.result == []


async def test_cancel_stops_the_generation_and_the_worker_takes_the_next_job(
    mesh: tuple[Queen, JobClient],
) -> None:
    _, keeper = mesh
    with trio.fail_after(60):
        job = await keeper.submit(Infer(prompt="Hello", model=MODEL, **LONG))
        async for message in job:
            if isinstance(message, Token):
                await job.cancel("enough")
        after, _ = await run(keeper, Infer(prompt="Hello", model=MODEL, max_tokens=5))
    assert job.terminal is not None and job.terminal.KIND.name == "CANCELLED"
    assert isinstance(after.terminal, Done)


async def test_jobs_for_a_busy_worker_queue_with_their_position_and_a_full_queue_is_busy(
    mesh: tuple[Queen, JobClient],
) -> None:
    _, keeper = mesh
    with trio.fail_after(60):
        spawned = await (await keeper.submit(WorkerSpawn(model=MODEL, slots=1))).end()
        assert isinstance(spawned, Done), spawned
        worker = spawned.result["id"]
        pinned = {"prompt": "Hello", "model": MODEL, "worker": worker}
        busy = await keeper.submit(Infer(**pinned, **LONG))  # type: ignore[arg-type]
        async for message in busy:
            if isinstance(message, Token):
                break  # the worker is now generating
        queued = await keeper.submit(Infer(**pinned, max_tokens=3))  # type: ignore[arg-type]
        async for message in queued:
            if isinstance(message, Narration) and message.action == "queued":
                break
        refused, _ = await run(keeper, Infer(**pinned, max_tokens=3))  # type: ignore[arg-type]
        await busy.cancel("make room")
        queued_events = [m async for m in queued]
    assert isinstance(message, Narration) and "position 1 of 1" in message.human
    assert isinstance(refused.terminal, Error) and refused.terminal.code is ErrorCode.BUSY
    assert "queue is full" in refused.terminal.message
    assert isinstance(queued.terminal, Done), queued.terminal
    assert text_of(queued_events)


async def test_a_worker_killed_mid_stream_ends_the_job_with_worker_lost(
    mesh: tuple[Queen, JobClient],
) -> None:
    _, keeper = mesh
    with trio.fail_after(60):
        warm, _ = await run(keeper, Infer(prompt="Hi", model=MODEL, max_tokens=2))
        assert isinstance(warm.terminal, Done)
        listing, _ = await run(keeper, WorkerList())  # type: ignore[arg-type]
        assert isinstance(listing.terminal, Done)
        pid = listing.terminal.result[0]["pid"]
        job = await keeper.submit(Infer(prompt="Hello", model=MODEL, **LONG))
        async for message in job:
            if isinstance(message, Token):
                os.kill(pid, signal.SIGKILL)
                break
        async for _ in job:
            pass
    assert isinstance(job.terminal, Error), job.terminal
    assert job.terminal.code is ErrorCode.WORKER_LOST
    assert "SIGKILL" in job.terminal.message


async def test_a_model_no_backend_can_load_fails_with_the_backends_reasons(
    mesh: tuple[Queen, JobClient],
) -> None:
    _, keeper = mesh
    with trio.fail_after(60):
        job, _ = await run(keeper, Infer(prompt="Hi", model=ODD_REPO, max_tokens=2))
    assert isinstance(job.terminal, Error)
    assert "llama-cpp" in job.terminal.message and "ctransformers" in job.terminal.message


async def test_a_deleted_worker_is_never_chosen_again(mesh: tuple[Queen, JobClient]) -> None:
    """Right after `worker delete`, before the hive's next heartbeat, a job for its model goes
    elsewhere (here: a new worker), never to the one deleted (it used to fail NOT_FOUND)."""
    _, keeper = mesh
    with trio.fail_after(60):
        spawned = await (await keeper.submit(WorkerSpawn(model=MODEL))).end()
        assert isinstance(spawned, Done), spawned
        deleted = await (await keeper.submit(WorkerDelete(worker=spawned.result["id"]))).end()
        assert isinstance(deleted, Done), deleted
        job, events = await run(keeper, Infer(prompt="Hi", model=MODEL, max_tokens=4, seed=1))
    assert isinstance(job.terminal, Done), job.terminal
    assert job.terminal.result["worker"] != spawned.result["id"]
    said = [e.human for e in events if isinstance(e, Narration)]
    assert not [m for m in said if "did not take the job" in m], said  # not even tried


async def test_time_to_first_token_counts_from_the_submission_with_the_wait_apart(
    mesh: tuple[Queen, JobClient],
) -> None:
    """The first job waits for a worker to be spawned: that wait is its `queue_s`, and its
    `ttft_s` counts from the submission, past the wait, not from the worker's accept."""
    _, keeper = mesh
    with trio.fail_after(60):
        first, _ = await run(keeper, Infer(prompt="Hi", model=MODEL, max_tokens=4, seed=1))
        warm, _ = await run(keeper, Infer(prompt="Hi", model=MODEL, max_tokens=4, seed=1))
    assert isinstance(first.terminal, Done) and isinstance(warm.terminal, Done)
    cold, hot = first.terminal.result["usage"], warm.terminal.result["usage"]
    assert cold["queue_s"] > 0.0 and cold["ttft_s"] > cold["queue_s"]
    assert cold["ttft_s"] >= cold["worker_ttft_s"]
    assert hot["queue_s"] < cold["queue_s"]  # a warm worker: no spawn to wait for
    assert hot["ttft_s"] >= hot["worker_ttft_s"]


async def test_a_generation_cut_by_the_context_says_so_apart_from_max_tokens(
    mesh: tuple[Queen, JobClient],
) -> None:
    _, keeper = mesh
    long_prompt = "Once upon a time " * 60  # a few hundred tokens of the 2,048
    with trio.fail_after(120):
        cut, _ = await run(keeper, Infer(prompt=long_prompt, model=MODEL, **LONG))
        short, _ = await run(keeper, Infer(prompt="Hi", model=MODEL, max_tokens=4, seed=1))
    assert isinstance(cut.terminal, Done) and isinstance(short.terminal, Done)
    full = cut.terminal.result
    assert full["finish_reason"] == "length" and full["cut_by"] == "context"
    used = full["usage"]["prompt_tokens"] + full["usage"]["generated_tokens"]
    assert used == full["context"] == 2048
    assert short.terminal.result["cut_by"] == "max_tokens"


# ---- a model file that does not load ----------------------------------------------------------


async def _infer_unloadable(state: Path, model: str) -> tuple[Error, str]:
    """Infer on `model` in a mesh of its own; its ERROR, and what was narrated."""
    with trio.fail_after(60):
        job, events = await infer_in_a_mesh(state, Infer(prompt="hi", model=model, max_tokens=2))
    assert isinstance(job.terminal, Error), job.terminal
    story = "\n".join(e.human for e in events if isinstance(e, Narration))
    return job.terminal, story


@pytest.mark.parametrize(
    ("make", "why", "a_worker_started"),
    [
        # Both backends refuse it by its metadata: no process starts for it.
        (lambda p: without_byte_tokens(write_tiny_gguf(p)), "no byte tokens", False),
        # ctransformers refuses the architecture; llama.cpp misses its tensors, in a worker.
        (lambda p: write_tiny_gguf(p, arch="gpt2"), "llama-cpp cannot load", True),
    ],
)
async def test_a_file_that_does_not_load_is_marked_and_not_tried_for_every_job(
    tmp_path: Path, make: Any, why: str, a_worker_started: bool
) -> None:
    state = tmp_path / "state"
    catalog = Catalog(state / "hive" / "models")
    catalog.add_file("rbee-test/broken", "broken.gguf", make(tmp_path / "broken.gguf"))
    model = "rbee-test/broken:broken.gguf"
    first, story = await _infer_unloadable(state, model)
    assert first.code is ErrorCode.INVALID_REQUEST and why in first.message, first.message
    assert ("starting worker" in story) is a_worker_started, story
    entry = catalog.get(model)
    assert entry.status is ModelStatus.UNLOADABLE and why in (entry.error or ""), entry
    # The next job (a new mesh: the mark is on disk) fails at once, spawning and fetching nothing.
    again, story = await _infer_unloadable(state, model)
    assert again.code is ErrorCode.INVALID_REQUEST
    assert "cannot be loaded" in again.message and "worker spawn -m" in again.message
    assert "worker" not in story.replace("worker spawn -m", ""), story
