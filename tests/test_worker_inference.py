"""Workers running inference jobs: real worker processes, real backends, tiny GGUF models.

Two ways in: through the hive's `WorkerPool` (`run_job`, as the hive uses it), and straight to
one worker process from a connection that plays its hive, for what the pool never sends
(garbage, a second job for a full worker) and for what the pool hides (each HEARTBEAT, each
TOKEN frame after a CANCEL). Nothing sleeps to synchronise: tests wait for frames, for the pool's
`revision`, or for a process to exit, all under trio.fail_after.

The tiny models have random weights. At temperature 0 they never sample end-of-sequence, so a
greedy job runs to max_tokens: a long, predictable stream to cancel, kill or watch.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_util import periodic

from rbee_mesh.actors.hive.worker_pool import WorkerPool, WorkerState, open_worker_pool
from rbee_mesh.actors.worker.worker import WorkerExit
from rbee_mesh.inference.backends import BACKENDS, GenerationParams, load_model
from rbee_mesh.inference.gguf_file import write_tiny_gguf
from rbee_mesh.protocol import (
    HEADER,
    Accepted,
    Actor,
    Cancel,
    Cancelled,
    Done,
    Error,
    ErrorCode,
    Heartbeat,
    Infer,
    Kind,
    MeshError,
    Message,
    Narration,
    Ping,
    Ready,
    Submit,
    Token,
    decode,
    encode,
)
from rbee_mesh.protocol.constants import DEFAULT_SLOTS
from rbee_mesh.transport import Connection
from tests.keyed import NODE, open_connection
from tests.skips import needs

HEARTBEAT_S = 0.2
PROMPT = "Once upon a time"
#: Greedy: runs to max_tokens on these models (2000 tokens: ~0.3 s tiny, ~1.2 s mid).
LONG = Infer(prompt=PROMPT, max_tokens=2000, temperature=0.0)
SHORT = Infer(prompt=PROMPT, max_tokens=40, temperature=0.0)


def backend_available(name: str) -> bool:
    return BACKENDS[name].unavailable() is None


BACKEND_PARAMS = [
    pytest.param(
        name,
        marks=needs(backend_available(name), f"{name} is not installed here"),
    )
    for name in ("llama-cpp", "ctransformers")
]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # ipc:// paths are limited to 107 bytes; pytest's tmp_path for a long test name is not.
    path = Path(tempfile.mkdtemp(prefix="rbi-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def model(short_dir: Path) -> Path:
    return write_tiny_gguf(short_dir / "tiny.gguf", context_length=2048)


@pytest.fixture
def mid_model(short_dir: Path) -> Path:
    """~9 MB, ~0.6 ms a token: slow enough that a generation spans many heartbeats."""
    return write_tiny_gguf(
        short_dir / "mid.gguf",
        context_length=2048,
        embedding_length=256,
        block_count=4,
        feed_forward_length=1024,
        head_count=4,
        head_count_kv=4,
    )


@pytest.fixture
async def pool(short_dir: Path) -> AsyncIterator[WorkerPool]:
    async with open_worker_pool(
        f"ipc://{short_dir}/workers.sock", heartbeat_s=HEARTBEAT_S, log_dir=short_dir / "logs"
    ) as p:
        yield p


@dataclass
class Relayed:
    """What `run_job` relayed, decoded (the pool itself never decodes these)."""

    messages: list[Message] = field(default_factory=list)
    first_token: trio.Event = field(default_factory=trio.Event)

    def __call__(self, frames: Sequence[bytes], kind: Kind) -> None:
        message = decode(frames)
        assert message.KIND is kind
        self.messages.append(message)
        if isinstance(message, Token):
            self.first_token.set()

    @property
    def tokens(self) -> list[Token]:
        return [m for m in self.messages if isinstance(m, Token)]

    @property
    def narration(self) -> list[Narration]:
        return [m for m in self.messages if isinstance(m, Narration)]


def check_stream(tokens: Sequence[Token]) -> str:
    """The text of a TOKEN stream, after checking that it is contiguous: nothing lost, nothing
    repeated, in order."""
    seq = 0
    for token in tokens:
        assert token.seq == seq, f"expected seq {seq}, got {token.seq}"
        assert token.count >= 1
        seq += token.count
    return "".join(token.text for token in tokens)


def stop_distance(narration: Sequence[Narration]) -> int:
    """Tokens the backend sampled after the stop request, as the worker narrated it."""
    said = [n.human for n in narration if "generation stopped" in n.human]
    assert len(said) == 1, said
    found = re.search(r"generation stopped (\d+) token\(s\) after the request", said[0])
    assert found is not None, said[0]
    return int(found.group(1))


# ---- straight to one worker process --------------------------------------------------------


@dataclass
class DirectWorker:
    """One worker process and the connection that plays its hive."""

    connection: Connection
    process: trio.Process
    ready: Ready
    #: Every HEARTBEAT the worker sent, with the trio time it arrived.
    heartbeats: list[tuple[float, Heartbeat]] = field(default_factory=list)

    async def send(self, message: Message) -> None:
        await self.connection.send(encode(message))

    async def send_frames(self, frames: Sequence[bytes]) -> None:
        await self.connection.send(frames)

    async def receive(self) -> Message:
        """The next frame from the worker that is not a HEARTBEAT (those are recorded)."""
        while True:
            frames = await self.connection.receive()
            message = decode(frames)
            if isinstance(message, Heartbeat):
                self.heartbeats.append((trio.current_time(), message))
                continue
            return message

    async def run(self, job_id: str, op: Infer) -> tuple[list[Message], Message]:
        """Submit a job and collect its frames up to its terminal one."""
        await self.send(Submit(job_id=job_id, ref=job_id, op=op))
        frames: list[Message] = []
        while True:
            message = await self.receive()
            if message.job_id != job_id:
                continue
            if message.is_terminal:
                return frames, message
            frames.append(message)

    async def stop(self) -> int:
        """SIGTERM, and the exit code."""
        self.process.terminate()
        return await self.process.wait()


@asynccontextmanager
async def direct_worker(
    model: Path, short_dir: Path, *, heartbeat_s: float = 5.0, slots: int = 1
) -> AsyncIterator[DirectWorker]:
    """A worker process, and a connection of the test's own that says READY as its hive and
    heartbeats to it."""
    endpoint = f"ipc://{short_dir}/direct.sock"
    argv = [
        sys.executable, "-m", "rbee_mesh.actors.worker", "--listen", endpoint,
        "--worker-id", "w-direct", "--model", str(model), "--device", "cpu",
        "--slots", str(slots), "--heartbeat-s", repr(heartbeat_s),
    ]  # fmt: skip
    with (short_dir / "direct.log").open("wb") as log:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.PIPE, stdout=log, stderr=log
        )
    assert process.stdin is not None
    await process.stdin.send_all(NODE.keypair.secret.encode() + b"\n")  # its hive's key
    await process.stdin.aclose()
    try:
        async with await open_connection(endpoint) as connection:
            hello = Ready(job_id="", sender="h", role=Actor.HIVE, session="s", ts=time.time())
            await connection.send(encode(hello))
            with trio.fail_after(30):
                ready = decode(await connection.receive())
            assert isinstance(ready, Ready)
            worker = DirectWorker(connection, process, ready)
            async with trio.open_nursery() as nursery:

                async def beat() -> None:
                    seq = 0
                    async for _ in periodic(heartbeat_s):
                        beat = Heartbeat(job_id="", sender="h", seq=seq, interval_s=heartbeat_s)
                        await worker.send(beat)
                        seq += 1

                nursery.start_soon(beat)
                yield worker
                nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


# ---- streaming, results ---------------------------------------------------------------------


async def test_run_job_streams_tokens_in_order_and_the_text_is_their_concatenation(
    pool: WorkerPool, model: Path
) -> None:
    with trio.fail_after(30):
        record = await pool.spawn(model_id="tiny", model_path=model, device="cpu")
        relayed = Relayed()
        op = Infer(prompt=PROMPT, max_tokens=300, temperature=0.0)
        result = await pool.run_job(record.id, "job-stream", op, relayed, timeout_s=30)
    assert check_stream(relayed.tokens) == result["text"]
    assert sum(t.count for t in relayed.tokens) > 0
    assert {m.job_id for m in relayed.messages} == {"job-stream"}
    # Coalesced: at most one frame per millisecond of generation (and one at the end).
    assert len(relayed.tokens) <= result["usage"]["duration_s"] * 1000 + 2
    assert result["worker"] == record.id
    assert result["backend"] == record.info["backend"]
    assert result["finish_reason"] == "length"
    first, last = relayed.narration[0], relayed.narration[-1]
    assert (first.actor, first.worker_id, first.hive_id) == ("worker", record.id, "hive")
    assert re.fullmatch(rf"generating with {result['backend']}, prompt \d+ tokens", first.human)
    assert re.fullmatch(r"300 tokens in [0-9.]+ s \([0-9.]+ tok/s\)", last.human)
    # The slot is free again, and the pool says so.
    after = pool.get(record.id)
    assert (after.state, after.busy, after.slots) == (WorkerState.READY, 0, DEFAULT_SLOTS)


async def test_same_seed_gives_the_same_text_and_another_seed_another(
    pool: WorkerPool, model: Path
) -> None:
    with trio.fail_after(30):
        record = await pool.spawn(model_id="tiny", model_path=model, device="cpu")
        texts = []
        for number, seed in enumerate((7, 7, 8)):
            op = Infer(prompt=PROMPT, max_tokens=60, temperature=0.9, seed=seed)
            result = await pool.run_job(record.id, f"job-{number}", op, Relayed(), timeout_s=30)
            texts.append(result["text"])
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


async def test_usage_reports_prompt_and_generated_tokens_and_sane_timings(
    pool: WorkerPool, model: Path
) -> None:
    with trio.fail_after(30):
        record = await pool.spawn(model_id="tiny", model_path=model, device="cpu")
        started = time.perf_counter()
        result = await pool.run_job(record.id, "job-usage", SHORT, Relayed(), timeout_s=30)
        wall = time.perf_counter() - started
    local, _ = load_model(model, "cpu", record.info["backend"])
    try:
        prompt_tokens = local.count_tokens(PROMPT)
    finally:
        local.close()
    usage = result["usage"]
    assert set(usage) == {
        "prompt_tokens",
        "generated_tokens",
        "ttft_s",
        "tokens_per_s",
        "duration_s",
    }
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["generated_tokens"] == SHORT.max_tokens
    assert 0 < usage["ttft_s"] <= usage["duration_s"] < wall
    assert usage["tokens_per_s"] == pytest.approx(
        usage["generated_tokens"] / usage["duration_s"], rel=0.01
    )


async def test_finish_reason_says_eos_for_a_generation_that_ended_by_itself(
    pool: WorkerPool, model: Path
) -> None:
    with trio.fail_after(60):
        record = await pool.spawn(model_id="tiny", model_path=model, device="cpu")
        reasons = set()
        # Sampled, these models meet end-of-sequence after some hundreds of tokens.
        for seed in range(8):
            op = Infer(prompt=PROMPT, max_tokens=2000, temperature=0.8, seed=seed)
            result = await pool.run_job(record.id, f"job-{seed}", op, Relayed(), timeout_s=30)
            generated = result["usage"]["generated_tokens"]
            assert result["finish_reason"] == ("length" if generated == 2000 else "eos")
            reasons.add(result["finish_reason"])
            # With a stop sequence, ending early may be either: the worker cannot tell.
            with_stop = replace(op, stop=("e",))
            stopped = await pool.run_job(record.id, f"job-e-{seed}", with_stop, Relayed(), 30)
            assert "e" not in stopped["text"]
            assert stopped["finish_reason"] in ("end", "length")
    assert "eos" in reasons


async def test_a_generation_error_ends_the_job_with_the_backends_reason(
    pool: WorkerPool, short_dir: Path
) -> None:
    small = write_tiny_gguf(short_dir / "small.gguf", context_length=64)
    with trio.fail_after(30):
        record = await pool.spawn(model_id="small", model_path=small, device="cpu")
        with pytest.raises(MeshError) as caught:
            op = Infer(prompt="word " * 200, max_tokens=10)
            await pool.run_job(record.id, "job-too-long", op, Relayed(), timeout_s=30)
        # The worker lives on, its slot free.
        result = await pool.run_job(record.id, "job-next", SHORT, Relayed(), timeout_s=30)
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert caught.value.message.endswith("leaving no room to generate")
    assert result["usage"]["generated_tokens"] == SHORT.max_tokens


async def test_a_job_past_its_deadline_ends_with_timeout(pool: WorkerPool, model: Path) -> None:
    with trio.fail_after(30):
        record = await pool.spawn(model_id="tiny", model_path=model, device="cpu")
        with pytest.raises(MeshError) as caught:
            await pool.run_job(record.id, "job-slow", LONG, Relayed(), timeout_s=0.05)
        await pool.revision.wait_value(lambda _: pool.get(record.id).busy == 0)
    assert caught.value.code is ErrorCode.TIMEOUT
    assert caught.value.message == "infer did not finish within 0.05s"


# ---- cancelling ------------------------------------------------------------------------------


async def test_cancel_stops_generation_within_a_token_and_the_slot_takes_the_next_job_at_once(
    mid_model: Path, short_dir: Path
) -> None:
    async with direct_worker(mid_model, short_dir) as worker:
        with trio.fail_after(30):
            await worker.send(Submit(job_id="job-a", ref="a", op=LONG))
            assert isinstance(await worker.receive(), Accepted)
            message = await worker.receive()
            while not isinstance(message, Token):
                message = await worker.receive()
            await worker.send(Cancel(job_id="job-a", reason="enough"))
            cancelled_at = trio.current_time()
            after_cancel: list[Message] = []
            while not (message := await worker.receive()).is_terminal:
                after_cancel.append(message)
            latency = trio.current_time() - cancelled_at
            # At once: the slot is free when CANCELLED arrives.
            _, terminal = await worker.run("job-b", SHORT)
    assert message == Cancelled(job_id="job-a", reason="enough")
    narration = [m for m in after_cancel if isinstance(m, Narration)]
    # The flag is checked after every sampled token: at most the one being computed when the
    # CANCEL arrived is finished.
    assert stop_distance(narration) <= 1
    # Only TOKEN frames already on their way when the CANCEL arrived: a few of 2000.
    late = sum(m.count for m in after_cancel if isinstance(m, Token))
    assert late <= 50
    assert latency < 1.0
    assert isinstance(terminal, Done)
    assert terminal.result["usage"]["generated_tokens"] == SHORT.max_tokens


async def test_cancelled_run_job_cancels_on_the_worker_which_then_takes_the_next_job(
    pool: WorkerPool, model: Path
) -> None:
    with trio.fail_after(30):
        record = await pool.spawn(model_id="tiny", model_path=model, device="cpu")
        relayed = Relayed()
        async with trio.open_nursery() as nursery:

            async def job() -> None:
                await pool.run_job(record.id, "job-a", LONG, relayed, timeout_s=30)

            nursery.start_soon(job)
            await relayed.first_token.wait()
            nursery.cancel_scope.cancel()
        cancelled_at = trio.current_time()
        # The slot stays taken until the worker confirms, within a token and a round trip.
        await pool.revision.wait_value(lambda _: pool.get(record.id).busy == 0)
        freed_after = trio.current_time() - cancelled_at
        result = await pool.run_job(record.id, "job-b", SHORT, Relayed(), timeout_s=30)
    assert freed_after < 1.0
    assert result["usage"]["generated_tokens"] == SHORT.max_tokens
    assert pool.get(record.id).state is WorkerState.READY


async def test_deleting_a_worker_mid_job_cancels_the_job_and_the_worker_stops_cleanly(
    pool: WorkerPool, model: Path
) -> None:
    with trio.fail_after(30):
        record = await pool.spawn(model_id="tiny", model_path=model, device="cpu")
        relayed = Relayed()
        outcome: list[MeshError] = []
        async with trio.open_nursery() as nursery:

            async def job() -> None:
                with pytest.raises(MeshError) as caught:
                    await pool.run_job(record.id, "job-a", LONG, relayed, timeout_s=30)
                outcome.append(caught.value)

            nursery.start_soon(job)
            await relayed.first_token.wait()
            final = await pool.delete(record.id)
    assert final.exit_code == WorkerExit.STOPPED
    [error] = outcome
    # The worker's CANCELLED (for the DISCONNECT or the SIGTERM that follows it, whichever it
    # took first), or its exit if it had no time to send that.
    assert error.code in (ErrorCode.CANCELLED, ErrorCode.WORKER_LOST)
    assert re.search("disconnected|SIGTERM|deleted", error.message), error.message


# ---- slots -----------------------------------------------------------------------------------


async def test_worker_refuses_a_job_with_busy_when_every_slot_is_taken(
    model: Path, short_dir: Path
) -> None:
    async with direct_worker(model, short_dir) as worker:
        with trio.fail_after(30):
            await worker.send(Submit(job_id="job-a", ref="a", op=LONG))
            assert isinstance(await worker.receive(), Accepted)
            await worker.send(Submit(job_id="job-b", ref="b", op=SHORT))
            message = await worker.receive()
            while message.job_id == "job-a":
                assert not message.is_terminal, "job-a ended before job-b was refused"
                message = await worker.receive()
            await worker.send(Cancel(job_id="job-a"))
    # docs/protocol.md rule 1: a refused SUBMIT gets an ERROR with an empty job id and its ref.
    assert isinstance(message, Error)
    assert (message.job_id, message.code, message.ref) == ("", ErrorCode.BUSY, "b")
    assert message.message == "worker w-direct is busy: 1 of 1 jobs run"


async def test_pool_refuses_a_job_for_a_full_worker_and_lists_only_workers_with_a_free_slot(
    pool: WorkerPool, model: Path
) -> None:
    with trio.fail_after(30):
        record = await pool.spawn(model_id="tiny", model_path=model, device="cpu", slots=1)
        assert [w.id for w in pool.idle_workers("tiny")] == [record.id]
        assert [w.id for w in pool.idle_workers()] == [record.id]
        assert pool.idle_workers("other") == []
        relayed = Relayed()
        async with trio.open_nursery() as nursery:

            async def job() -> None:
                await pool.run_job(record.id, "job-a", LONG, relayed, timeout_s=30)

            nursery.start_soon(job)
            await relayed.first_token.wait()
            busy = pool.get(record.id)
            idle_while_busy = pool.idle_workers("tiny")
            with pytest.raises(MeshError) as caught:
                await pool.run_job(record.id, "job-b", SHORT, Relayed(), timeout_s=30)
            nursery.cancel_scope.cancel()
        await pool.revision.wait_value(lambda _: pool.get(record.id).busy == 0)
    assert (busy.state, busy.busy, busy.slots) == (WorkerState.BUSY, 1, 1)
    assert busy.to_record()["state"] == "busy"
    assert idle_while_busy == []
    assert caught.value.code is ErrorCode.BUSY
    assert [w.id for w in pool.idle_workers("tiny")] == [record.id]


async def test_a_worker_with_two_slots_runs_two_jobs_at_once(pool: WorkerPool, model: Path) -> None:
    events: list[str] = []
    with trio.fail_after(60):
        record = await pool.spawn(model_id="tiny", model_path=model, device="cpu", slots=2)
        assert (record.slots, record.info["slots"]) == (2, 2)
        results: dict[str, Any] = {}
        started = trio.Event()
        async with trio.open_nursery() as nursery:

            async def job(job_id: str) -> None:
                def relay(frames: Sequence[bytes], kind: Kind) -> None:
                    if isinstance(decode(frames), Token) and f"{job_id} token" not in events:
                        events.append(f"{job_id} token")
                        if {"job-a token", "job-b token"} <= set(events):
                            started.set()

                op = Infer(prompt=PROMPT, max_tokens=600, temperature=0.0)
                results[job_id] = await pool.run_job(record.id, job_id, op, relay, timeout_s=60)
                events.append(f"{job_id} done")

            nursery.start_soon(job, "job-a")
            nursery.start_soon(job, "job-b")
            await started.wait()
            both = pool.get(record.id)
    # Both streamed before either ended.
    assert sorted(events[:2]) == ["job-a token", "job-b token"]
    assert (both.state, both.busy) == (WorkerState.BUSY, 2)
    # Each slot has its own context: two greedy runs of one prompt give one text.
    assert results["job-a"]["text"] == results["job-b"]["text"]
    assert pool.get(record.id).busy == 0


# ---- liveness during generation ------------------------------------------------------------


@pytest.mark.slow
async def test_heartbeats_keep_flowing_during_a_long_generation(
    mid_model: Path, short_dir: Path
) -> None:
    interval = 0.1
    async with direct_worker(mid_model, short_dir, heartbeat_s=interval) as worker:
        with trio.fail_after(60):
            _, terminal = await worker.run("job-long", LONG)
    assert isinstance(terminal, Done)
    duration = terminal.result["usage"]["duration_s"]
    assert duration > 5 * interval, "the generation was too short to tell"
    during = [t for t, beat in worker.heartbeats if beat.state["jobs"] == 1]
    assert len(during) >= duration / interval - 2
    gaps = [later - earlier for earlier, later in itertools.pairwise(during)]
    assert max(gaps) < 2 * interval


@pytest.mark.slow
async def test_pool_sees_a_generating_worker_as_live_throughout(
    mid_model: Path, short_dir: Path
) -> None:
    interval = 0.1
    async with open_worker_pool(f"ipc://{short_dir}/w.sock", heartbeat_s=interval) as pool:
        with trio.fail_after(60):
            record = await pool.spawn(model_id="mid", model_path=mid_model, device="cpu")
            ages: list[float] = []
            async with trio.open_nursery() as nursery:

                async def sample() -> None:
                    async for _ in periodic(interval / 4):
                        age = pool.get(record.id).last_heartbeat_age_s
                        assert age is not None
                        ages.append(age)

                nursery.start_soon(sample)
                result = await pool.run_job(record.id, "job-long", LONG, Relayed(), 30)
                nursery.cancel_scope.cancel()
    assert result["usage"]["duration_s"] > 5 * interval
    assert len(ages) > 10
    assert max(ages) < 2 * interval


# ---- the worker lost mid-job ---------------------------------------------------------------


async def test_worker_killed_mid_stream_ends_the_job_with_worker_lost_at_once(
    model: Path, short_dir: Path
) -> None:
    # A long heartbeat: only the exit itself can end the job this fast.
    async with open_worker_pool(f"ipc://{short_dir}/w.sock", heartbeat_s=2.0) as pool:
        with trio.fail_after(30):
            record = await pool.spawn(model_id="tiny", model_path=model, device="cpu")
            relayed = Relayed()
            outcome: list[tuple[MeshError, float]] = []
            async with trio.open_nursery() as nursery:

                async def job() -> None:
                    with pytest.raises(MeshError) as caught:
                        await pool.run_job(record.id, "job-a", LONG, relayed, timeout_s=30)
                    outcome.append((caught.value, trio.current_time()))

                nursery.start_soon(job)
                await relayed.first_token.wait()
                os.kill(record.pid, signal.SIGKILL)
                killed_at = trio.current_time()
            with pytest.raises(MeshError) as refused:
                await pool.run_job(record.id, "job-b", SHORT, Relayed(), timeout_s=30)
    [(error, ended_at)] = outcome
    assert error.code is ErrorCode.WORKER_LOST
    assert error.message == f"worker {record.id} died: killed by SIGKILL"
    assert ended_at - killed_at < 1.0  # the liveness window is 7 s
    assert refused.value.code is ErrorCode.UNAVAILABLE
    assert "is dead: killed by SIGKILL" in refused.value.message


async def test_worker_that_stops_answering_mid_job_ends_it_with_worker_lost(
    pool: WorkerPool, model: Path
) -> None:
    with trio.fail_after(30):
        record = await pool.spawn(model_id="tiny", model_path=model, device="cpu")
        relayed = Relayed()
        frozen_at: list[float] = []
        async with trio.open_nursery() as nursery:

            async def freeze_at_first_token() -> None:
                await relayed.first_token.wait()
                os.kill(record.pid, signal.SIGSTOP)  # a hung worker, as far as the pool sees
                frozen_at.append(trio.current_time())

            nursery.start_soon(freeze_at_first_token)
            with pytest.raises(MeshError) as caught:
                await pool.run_job(record.id, "job-a", LONG, relayed, timeout_s=30)
            ended_after = trio.current_time() - frozen_at[0]
        await pool.revision.wait_value(lambda _: pool.get(record.id).state is WorkerState.DEAD)
    assert caught.value.code is ErrorCode.WORKER_LOST
    silent = re.fullmatch(
        rf"worker {record.id} stopped answering: nothing heard for (\d+) heartbeat intervals",
        caught.value.message,
    )
    assert silent is not None and int(silent.group(1)) >= 3, caught.value.message
    # Never before 3.5 silent intervals (that would be a false alarm); promptly after, with room
    # for a loaded machine.
    assert 3.5 * HEARTBEAT_S <= ended_after < 20 * HEARTBEAT_S
    assert pool.get(record.id).signal == "SIGKILL"


# ---- robustness -------------------------------------------------------------------------------


async def test_malformed_frames_are_refused_and_the_worker_keeps_serving(
    model: Path, short_dir: Path
) -> None:
    ping = Submit(job_id="job-ping", ref="p", op=Ping())
    valid_body = encode(Submit(job_id="job-x", ref="x", op=SHORT))[3]
    garbage: list[list[bytes]] = [
        [b"hello"],  # one frame
        [b"NOPE\x01", bytes([Kind.SUBMIT]), b"job-x", valid_body],  # not rbee-mesh
        [b"RBEE\x09", bytes([Kind.SUBMIT]), b"job-x", valid_body],  # another version
        [HEADER, bytes([99]), b"job-x", valid_body],  # unknown kind
        [HEADER, bytes([Kind.SUBMIT]), b"job x!", valid_body],  # bad job id
        [HEADER, bytes([Kind.SUBMIT]), b"job-x", b"\xc1\xff\x00"],  # not msgpack
        [HEADER, bytes([Kind.SUBMIT]), b"job-x", b"\x81\xa3ref\xa1x"],  # no op
        encode(ping),  # not an infer job
    ]
    out_of_range = encode(Submit(job_id="job-x", ref="range", op=SHORT))
    # max_tokens 0, past the Infer operation's range, in an otherwise valid SUBMIT.
    out_of_range[3] = out_of_range[3].replace(b"\xaamax_tokens(", b"\xaamax_tokens\x00")
    garbage.append(out_of_range)
    async with direct_worker(model, short_dir) as worker:
        with trio.fail_after(30):
            for frames in garbage:
                await worker.send_frames(frames)
            # Not for a job it runs: ignored, as the protocol says (no second terminal frame).
            await worker.send(Cancel(job_id="job-nobody"))
            await worker.send(Token(job_id="job-nobody", seq=0, text="x"))
            refusals = [await worker.receive() for _ in garbage]
            _, terminal = await worker.run("job-fine", SHORT)
            code = await worker.stop()
    assert all(isinstance(m, Error) and m.job_id == "" for m in refusals)
    codes = [m.code for m in refusals if isinstance(m, Error)]
    assert codes.count(ErrorCode.UNSUPPORTED_VERSION) == 1
    assert codes.count(ErrorCode.INVALID_REQUEST) == len(garbage) - 1
    refs = [m.ref for m in refusals if isinstance(m, Error)]
    assert refs[-2:] == ["p", "range"]
    assert isinstance(terminal, Done)
    assert code == WorkerExit.STOPPED


# ---- backends ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
async def test_each_backend_runs_jobs_through_a_worker_as_it_does_in_process(
    backend: str, pool: WorkerPool, model: Path
) -> None:
    op = Infer(prompt=PROMPT, max_tokens=80, temperature=0.7, seed=42)
    with trio.fail_after(30):
        record = await pool.spawn(model_id="tiny", model_path=model, device="cpu", backend=backend)
        relayed = Relayed()
        result = await pool.run_job(record.id, "job-backend", op, relayed, timeout_s=30)
    assert record.info["backend"] == backend
    assert record.info["backend_reason"].startswith(f"{backend}: ")
    assert record.info["load_s"] > 0
    assert result["backend"] == backend
    assert check_stream(relayed.tokens) == result["text"]
    local, _ = load_model(model, "cpu", backend)
    try:
        direct = "".join(local.generate(PROMPT, GenerationParams.from_op(op)))
    finally:
        local.close()
    assert result["text"] == direct


async def test_a_worker_that_cannot_load_its_backend_exits_with_the_reason(
    pool: WorkerPool, short_dir: Path
) -> None:
    # Llama tensors in a file that says gpt2: ctransformers refuses the architecture.
    odd = write_tiny_gguf(short_dir / "odd.gguf", arch="gpt2")
    with trio.fail_after(30), pytest.raises(MeshError) as caught:
        await pool.spawn(model_id="odd", model_path=odd, device="cpu", backend="ctransformers")
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert f"exited with code {int(WorkerExit.LOAD_FAILED)}" in caught.value.message
    assert "ctransformers cannot load odd.gguf" in caught.value.message


def test_worker_rejects_an_unknown_backend_and_a_bad_slot_count() -> None:
    for flag, value in (("--backend", "tensorrt"), ("--slots", "0")):
        argv = [sys.executable, "-m", "rbee_mesh.actors.worker", "--hive", "ipc:///nowhere"]
        argv += ["--worker-id", "w-x", "--model", "/nowhere", "--device", "cpu", flag, value]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2
        assert flag in done.stderr
