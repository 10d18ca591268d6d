"""Several clients on one job: `jobs watch` replays a job from its start and follows it live,
the queen keeps a bounded record of each job, and a job submitted with `keep` outlives its
submitter. In one process, over the in-memory transport (the queen's code is the same on every
transport); the daemons' journal and the command line are in test_watch_cli.py."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest
import trio

from rbee_mesh.actors.jobclient import ClientJob, JobClient
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.mesh import memory_endpoint, running_queen
from rbee_mesh.actors.queen.queen import Queen
from rbee_mesh.actors.records import LOST_WITH_THE_QUEEN, JobHistory, JobRecord, RecordBudget
from rbee_mesh.protocol import (
    Accepted,
    Cancelled,
    Data,
    Done,
    Error,
    ErrorCode,
    JobCancel,
    JobWatch,
    Kind,
    Message,
    Narration,
    Ping,
    encode,
)
from rbee_mesh.protocol.constants import JOB_RECORD_BYTES, JOB_RECORD_HEAD_BYTES
from tests.conftest import FAST_KEEPER, FAST_QUEEN


@pytest.fixture
async def mem_queen() -> AsyncIterator[Queen]:
    async with running_queen(memory_endpoint("queen"), FAST_QUEEN) as queen:
        yield queen


def keeper(queen: Queen) -> AsyncIterator[JobClient]:
    return open_keeper(queen.listener.endpoint, FAST_KEEPER)  # type: ignore[return-value]


async def collect(job: ClientJob) -> list[Message]:
    return [message async for message in job]


def as_watched(watch: list[Message]) -> tuple[dict[str, object], list[Message]]:
    """A watch's header, and the frames it streamed as the watched job's (its id put back)."""
    assert isinstance(watch[0], Accepted) and watch[0].op == "job_watch"
    header = watch[1]
    assert isinstance(header, Data) and header.record["kind"] == "watch", header
    job_id = str(header.record["job"])
    return header.record, [replace(m, job_id=job_id) for m in watch[2:]]


async def test_a_watcher_that_joins_a_running_job_sees_it_from_its_start_as_its_submitter_did(
    mem_queen: Queen,
) -> None:
    with trio.fail_after(20):
        async with keeper(mem_queen) as submitter, keeper(mem_queen) as watcher:
            job = await submitter.submit(Ping(count=30, interval_s=0.02))
            seen = [await job.__anext__(), await job.__anext__()]  # ACCEPTED, the first pong
            assert isinstance(seen[1], Narration)
            watch = await watcher.submit(JobWatch(job=job.job_id))
            seen += await collect(job)
            watched = await collect(watch)
    header, frames = as_watched(watched)
    assert header["op"] == "ping" and header["ref"] == job.ref
    assert frames == seen[1:]  # every frame, in order, the same bytes; and the same end
    assert isinstance(watch.terminal, Done) and isinstance(job.terminal, Done)
    assert watch.terminal.result == job.terminal.result


async def test_a_finished_job_is_replayed_whole_and_ends_as_it_ended(mem_queen: Queen) -> None:
    with trio.fail_after(20):
        async with keeper(mem_queen) as submitter, keeper(mem_queen) as watcher:
            job = await submitter.submit(Ping(count=100_000, interval_s=0.01))
            seen = [await job.__anext__(), await job.__anext__(), await job.__anext__()]
            cancel = await watcher.submit(JobCancel(job=job.job_id))
            await collect(cancel)
            seen += await collect(job)
            replayed = await collect(await watcher.submit(JobWatch(job=job.job_id)))
    _, frames = as_watched(replayed)
    assert isinstance(seen[-1], Cancelled)
    assert frames == seen[1:]  # ending with the same CANCELLED, with the same reason


async def test_a_watcher_that_leaves_changes_nothing_for_the_job(mem_queen: Queen) -> None:
    with trio.fail_after(20):
        async with keeper(mem_queen) as submitter:
            job = await submitter.submit(Ping(count=20, interval_s=0.02))
            async with keeper(mem_queen) as watcher:
                watch = await watcher.submit(JobWatch(job=job.job_id))
                await watch.__anext__()
                await watch.__anext__()
            seen = await collect(job)  # the watcher left (DISCONNECT) before the end
    assert isinstance(job.terminal, Done), job.terminal
    assert sum(isinstance(m, Narration) for m in seen) == 20


@pytest.mark.parametrize("keep", [False, True])
async def test_a_submitter_that_leaves_cancels_its_job_unless_it_asked_to_keep_it(
    mem_queen: Queen, keep: bool
) -> None:
    with trio.fail_after(20):
        async with keeper(mem_queen) as submitter:
            job = await submitter.submit(Ping(count=15, interval_s=0.02), keep=keep)
            await job.__anext__()
        async with keeper(mem_queen) as watcher:
            watched = await collect(await watcher.submit(JobWatch(job=job.job_id)))
    _, frames = as_watched(watched)
    if keep:
        assert isinstance(frames[-1], Done) and frames[-1].result["count"] == 15
        assert sum(isinstance(m, Narration) for m in frames) == 15
    else:
        assert isinstance(frames[-1], Cancelled) and "is gone" in frames[-1].reason


async def test_watching_a_job_the_queen_does_not_know_is_not_found(
    mem_queen: Queen,
) -> None:
    with trio.fail_after(20):
        async with keeper(mem_queen) as watcher:
            unknown = await watcher.submit(JobWatch(job="job-000000000000"))
            await collect(unknown)
    assert isinstance(unknown.terminal, Error) and unknown.terminal.code is ErrorCode.NOT_FOUND


async def test_a_long_stream_keeps_its_head_and_its_end_and_the_replay_says_what_was_dropped(
    mem_queen: Queen,
) -> None:
    pongs = 40_000  # ~50 bytes a frame: twice what one job's record keeps
    with trio.fail_after(60):
        async with keeper(mem_queen) as submitter, keeper(mem_queen) as watcher:
            job = await submitter.submit(Ping(count=pongs))
            seen = await collect(job)
            replayed = await collect(await watcher.submit(JobWatch(job=job.job_id)))
    [ended] = [j for j in mem_queen.server.history if j.summary["id"] == job.job_id]
    assert ended.record is not None
    assert JOB_RECORD_BYTES * 0.9 < ended.record.size <= JOB_RECORD_BYTES
    assert ended.record.end_frame == (Kind.DONE, encode(seen[-1])[3])  # its end, as sent
    _, frames = as_watched(replayed)
    gaps = [m for m in frames if isinstance(m, Narration) and m.action == "watch"]
    assert len(gaps) == 1
    dropped = int(gaps[0].human.split()[0])
    at = frames.index(gaps[0])
    pongs_seen = seen[1:-1]
    assert frames[:at] == pongs_seen[:at]  # the head, whole
    assert frames[at + 1 : -1] == pongs_seen[at + dropped :]  # then the most recent, whole
    assert at > 0 and dropped > 0
    assert frames[-1] == seen[-1]


def record_of(job_id: str, frames: int, body: bytes = b"x" * 100) -> JobRecord:
    record = JobRecord(Accepted(job_id=job_id, ref="r", op="ping", deadline_s=10.0))
    for _ in range(frames):
        record.append(Kind.NARRATION, body)
    record.end(Kind.DONE, encode(Done(job_id=job_id, result={"ok": True}))[3])
    return record


def summary(job_id: str) -> dict[str, object]:
    return {"id": job_id, "op": "ping", "state": "done", "keeper": "k", "created": 1.0,
            "duration_s": 0.5, "error": ""}  # fmt: skip


def test_one_record_is_bounded_head_first_then_the_most_recent() -> None:
    record = record_of("job-a", 3 * JOB_RECORD_BYTES // 100)
    assert record.head_bytes <= JOB_RECORD_HEAD_BYTES < record.head_bytes + 100
    assert record.size <= JOB_RECORD_BYTES
    kept = list(record.frames_from(0))
    gap = [after for after, frame in kept if frame is None]
    assert gap == [record.count - len(record.tail)]
    assert kept[-1][0] == record.count


def test_all_records_share_one_budget_past_which_running_jobs_drop_their_newest_frames() -> None:
    budget = RecordBudget(limit=3 * JOB_RECORD_HEAD_BYTES)
    records = [
        JobRecord(Accepted(job_id=f"job-{n}", ref="r", op="ping", deadline_s=10.0), budget)
        for n in range(4)
    ]
    for _ in range(JOB_RECORD_BYTES // 1000):  # each would keep 1 MiB alone
        for record in records:
            record.append(Kind.NARRATION, b"x" * 1000)
    assert sum(r.size for r in records) == budget.used <= budget.limit
    assert budget.used > budget.limit - 4 * 1000  # the room is used: by their heads
    assert all(r.head and not r.tail for r in records)  # the newest frames are what is dropped
    assert all(r.count == JOB_RECORD_BYTES // 1000 for r in records)  # counted, if not kept
    for record in records:
        record.forget_frames()
    assert budget.used == 0


def test_the_history_forgets_the_oldest_jobs_and_frames_past_its_limits() -> None:
    history = JobHistory(limit=5, records=True, records_bytes=3 * 10_000)
    for n in range(8):
        history.ended(summary(f"job-{n}"), record_of(f"job-{n}", 100))  # 10,000 bytes each
    kept = list(history)
    assert [e.summary["id"] for e in kept] == [f"job-{n}" for n in range(3, 8)]
    assert [e.record.forgotten for e in kept if e.record] == [True, True, False, False, False]
    assert sum(e.record.size for e in kept if e.record) == 3 * 10_000


def test_the_history_keeps_each_result_encoded_not_as_objects_for_the_collector() -> None:
    # A queen remembers its last jobs; a `status` of 1,000 hives is a result of thousands of
    # objects, which, kept decoded, every full garbage collection would walk (45-250 ms each
    # at 1,000 simulated hives).
    history = JobHistory(limit=20, records=True)
    gc.collect()
    before = len(gc.get_objects())
    for n in range(20):
        result = [{"hive": f"h{i}", "workers": [{"id": f"w{k}"} for k in range(3)]}
                  for i in range(1_000)]  # fmt: skip
        record = JobRecord(Accepted(job_id=f"job-{n}", ref="r", op="status", deadline_s=10.0))
        record.end(Kind.DONE, encode(Done(job_id=f"job-{n}", result=result))[3])
        history.ended(summary(f"job-{n}"), record)
    del result
    gc.collect()
    assert len(gc.get_objects()) - before < 20 * 100  # decoded: 2,000 tracked objects a result
    remembered = history.get("job-19")
    assert remembered is not None and remembered.record is not None
    assert isinstance(remembered.record.terminal, Done)
    assert remembered.record.terminal.result[999]["workers"][2] == {"id": "w2"}


def test_the_journal_brings_back_what_ended_and_ends_what_ran_when_the_queen_died(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "jobs.journal"
    before = JobHistory(limit=10, journal=journal)
    record = record_of("job-done", 50)
    before.ended(summary("job-done"), record)
    before.started({**summary("job-running"), "state": "running", "ref": "r7", "deadline_s": 9.0})
    # Killed here: nothing closed. What it had written is in the file.
    after = JobHistory(limit=10, journal=journal)
    done, lost = after.get("job-done"), after.get("job-running")
    assert done is not None and done.record is not None
    assert list(done.record.frames_from(0)) == list(record.frames_from(0))
    assert done.record.terminal == record.terminal
    assert lost is not None and lost.record is not None
    assert lost.summary["state"] == "failed" and LOST_WITH_THE_QUEEN in lost.summary["error"]
    assert isinstance(lost.record.terminal, Error)
    assert lost.record.terminal.code is ErrorCode.UNAVAILABLE
    assert lost.record.accepted.ref == "r7" and lost.record.forgotten
    before.close()
    after.close()


@pytest.mark.parametrize(
    "terminal",
    [[int(Kind.NARRATION), b"\x80"], [int(Kind.DONE)], [99, b"\x80"], "done"],
    ids=["not-a-terminal-kind", "no-body", "unknown-kind", "not-a-list"],
)
def test_a_journal_record_whose_end_cannot_be_read_loses_that_record_only(
    tmp_path: Path, terminal: object
) -> None:
    journal = tmp_path / "jobs.journal"
    first = JobHistory(limit=10, journal=journal)
    first.ended(summary("job-one"), record_of("job-one", 1))
    first.close()
    damaged = record_of("job-two", 1).to_journal()
    damaged["terminal"] = terminal
    with journal.open("ab") as f:
        f.write(msgpack.packb({"end": {"summary": summary("job-two"), "record": damaged}}))
        f.write(msgpack.packb({"end": {"summary": summary("job-three"), "record": None}}))
    again = JobHistory(limit=10, journal=journal)
    assert [e.summary["id"] for e in again] == ["job-one", "job-two", "job-three"]
    two = again.get("job-two")
    assert two is not None and two.record is None  # the summary is kept, the record is not
    again.close()


def test_a_journal_torn_mid_line_keeps_what_came_before(tmp_path: Path) -> None:
    journal = tmp_path / "jobs.journal"
    first = JobHistory(limit=10, journal=journal)
    first.ended(summary("job-one"), record_of("job-one", 5))
    first.close()
    torn = msgpack.packb({"end": {"summary": summary("job-two"), "record": None}})
    with journal.open("ab") as f:
        f.write(torn[: len(torn) // 2])  # a crash in the middle of a write
    again = JobHistory(limit=10, journal=journal)
    assert [e.summary["id"] for e in again] == ["job-one"]
    again.ended(summary("job-three"), None)  # and it goes on writing after what it kept
    again.close()
    assert [e.summary["id"] for e in JobHistory(limit=10, journal=journal)] == [
        "job-one",
        "job-three",
    ]
