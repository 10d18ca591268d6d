"""The queen's job lifecycle over every transport: accept, narrate, end exactly once."""

from __future__ import annotations

import random
import socket

import pytest
import trio

from rbee_mesh.actors.jobclient import ClientJob, JobClient, ServerUnreachable
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.queen.queen import Queen
from rbee_mesh.protocol import (
    HEADER,
    Accepted,
    Actor,
    Cancelled,
    Done,
    Error,
    ErrorCode,
    Heartbeat,
    JobCancel,
    JobList,
    Message,
    Narration,
    Ping,
    Ready,
    Status,
    Submit,
    WorkerList,
    decode,
    encode,
)
from rbee_mesh.protocol.constants import MAX_DEADLINE_S
from tests.conftest import FAST_KEEPER, FAST_QUEEN, queen_address
from tests.keyed import open_connection


async def collect(job: ClientJob) -> list[Message]:
    return [message async for message in job]


async def test_submit_is_accepted_narrated_then_done_exactly_once(keeper: JobClient) -> None:
    with trio.fail_after(10):
        job = await keeper.submit(Ping(count=3))
        events = await collect(job)
    assert isinstance(job.accepted, Accepted) and job.job_id.startswith("job-")
    assert [type(e) for e in events] == [Accepted, Narration, Narration, Narration, Done]
    assert [e.human for e in events if isinstance(e, Narration)] == [
        "pong 1/3",
        "pong 2/3",
        "pong 3/3",
    ]
    assert all(e.job_id == job.job_id for e in events)
    assert job.terminal is events[-1]


async def test_status_reports_the_queen_and_its_endpoint(queen: Queen, keeper: JobClient) -> None:
    with trio.fail_after(10):
        job = await keeper.submit(Status())
        await collect(job)
    assert isinstance(job.terminal, Done)
    assert job.terminal.result["queen"]["endpoint"] == queen.listener.endpoint
    assert job.terminal.result["queen"]["jobs_running"] == 1  # the status job itself


async def test_submitter_cancel_ends_job_cancelled(queen: Queen, keeper: JobClient) -> None:
    with trio.fail_after(10):
        job = await keeper.submit(Ping(count=10_000, interval_s=0.01))
        async for message in job:
            if isinstance(message, Narration):
                await job.cancel("test says stop")
        await queen.server.job_count.wait_value(0)
    assert isinstance(job.terminal, Cancelled)
    assert job.terminal.reason == "test says stop"


async def test_deadline_ends_job_with_timeout(keeper: JobClient) -> None:
    with trio.fail_after(10):
        job = await keeper.submit(Ping(count=1_000, interval_s=0.05), timeout_s=0.3)
        await collect(job)
    assert isinstance(job.terminal, Error)
    assert job.terminal.code is ErrorCode.TIMEOUT
    assert "0.3s" in job.terminal.message


async def test_a_job_whose_own_deadline_is_past_the_longest_gets_the_longest(
    keeper: JobClient,
) -> None:
    """A ping of 100,000 pongs 10 s apart would take 11 days: it runs with a week's deadline
    (it stopped the queen's job server once, whose ACCEPTED could not say 11 days)."""
    with trio.fail_after(10):
        job = await keeper.submit(Ping(count=100_000, interval_s=10.0))
        await job.cancel()
        await collect(job)
    assert job.accepted is not None and job.accepted.deadline_s == MAX_DEADLINE_S
    assert isinstance(job.terminal, Cancelled)


async def test_job_cancel_from_another_keeper(queen: Queen, keeper: JobClient) -> None:
    with trio.fail_after(10):
        victim = await keeper.submit(Ping(count=10_000, interval_s=0.01))
        async with open_keeper(queen_address(queen), FAST_KEEPER) as other:
            canceller = await other.submit(JobCancel(job=victim.job_id))
            await collect(canceller)
        await collect(victim)
    assert isinstance(canceller.terminal, Done)
    assert isinstance(victim.terminal, Cancelled)
    assert "cancelled by keeper-" in victim.terminal.reason


@pytest.mark.parametrize(("job_id", "code"), [("job-000000000000", ErrorCode.NOT_FOUND)])
async def test_job_cancel_of_unknown_job_is_not_found(
    keeper: JobClient, job_id: str, code: ErrorCode
) -> None:
    with trio.fail_after(10):
        job = await keeper.submit(JobCancel(job=job_id))
        await collect(job)
    assert isinstance(job.terminal, Error) and job.terminal.code is code


async def test_job_cancel_of_finished_job_is_a_conflict(keeper: JobClient) -> None:
    with trio.fail_after(10):
        done = await keeper.submit(Ping())
        await collect(done)
        job = await keeper.submit(JobCancel(job=done.job_id))
        await collect(job)
    assert isinstance(job.terminal, Error) and job.terminal.code is ErrorCode.CONFLICT
    assert "already ended (done)" in job.terminal.message


async def test_job_list_shows_running_and_finished_jobs(keeper: JobClient) -> None:
    with trio.fail_after(10):
        finished = await keeper.submit(Ping())
        await collect(finished)
        listing = await keeper.submit(JobList())
        await collect(listing)
    assert isinstance(listing.terminal, Done)
    states = {row["id"]: row["state"] for row in listing.terminal.result}
    assert states[finished.job_id] == "done"
    assert states[listing.job_id] == "running"


async def test_hive_operation_without_hives_is_unavailable(keeper: JobClient) -> None:
    with trio.fail_after(10):
        job = await keeper.submit(WorkerList())
        await collect(job)
    assert isinstance(job.terminal, Error)
    assert job.terminal.code is ErrorCode.UNAVAILABLE
    assert "no hive is live" in job.terminal.message


async def test_several_keepers_each_get_their_own_stream(queen: Queen) -> None:
    results: dict[int, list[str]] = {}

    async def one_keeper(n: int) -> None:
        async with open_keeper(queen_address(queen), FAST_KEEPER) as k:
            job = await k.submit(Ping(count=20))
            results[n] = [e.human for e in await collect(job) if isinstance(e, Narration)]

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for n in range(8):
                nursery.start_soon(one_keeper, n)
    assert results == {n: [f"pong {i}/20" for i in range(1, 21)] for n in range(8)}


async def test_queen_stop_ends_running_jobs_with_unavailable(
    queen: Queen, keeper: JobClient
) -> None:
    with trio.fail_after(10):
        job = await keeper.submit(Ping(count=10_000, interval_s=0.01))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queen.stop)
            await collect(job)
    assert isinstance(job.terminal, Error)
    assert job.terminal.code is ErrorCode.UNAVAILABLE


# ---- bad input never stops the queen -----------------------------------------------------


async def raw_exchange(queen: Queen, frames: list[bytes]) -> Message:
    async with await open_connection(queen_address(queen)) as conn:
        await conn.send(frames)
        return decode(await conn.receive())


async def assert_still_serving(keeper: JobClient) -> None:
    job = await keeper.submit(Status())
    await collect(job)
    assert isinstance(job.terminal, Done)


@pytest.mark.parametrize(
    ("frames", "code", "words"),
    [
        ([b"hello"], ErrorCode.INVALID_REQUEST, "expected 4 frames"),
        ([b"GET / HTTP/1.1", b"\x01", b"", b""], ErrorCode.INVALID_REQUEST, "bad magic"),
        ([b"RBEE\x09", b"\x01", b"", b"\x80"], ErrorCode.UNSUPPORTED_VERSION, "version 9"),
        ([HEADER, b"\x63", b"", b"\x80"], ErrorCode.INVALID_REQUEST, "unknown message kind"),
        ([HEADER, b"\x01", b"", b"\xc1\xc1"], ErrorCode.INVALID_REQUEST, "not valid msgpack"),
    ],
)
async def test_malformed_frames_get_a_clear_rejection_and_queen_keeps_serving(
    queen: Queen, keeper: JobClient, frames: list[bytes], code: ErrorCode, words: str
) -> None:
    with trio.fail_after(10):
        reply = await raw_exchange(queen, frames)
        await assert_still_serving(keeper)
    assert isinstance(reply, Error) and reply.job_id == ""
    assert reply.code is code
    assert words in reply.message


async def test_invalid_operation_argument_is_refused_with_the_submitters_ref(
    queen: Queen, keeper: JobClient
) -> None:
    body = encode(Submit(job_id="", ref="r-7", op=Ping(count=2)))
    body[3] = body[3].replace(b"\x02", b"\x00")  # count 2 -> count 0, out of range
    with trio.fail_after(10):
        reply = await raw_exchange(queen, body)
        await assert_still_serving(keeper)
    assert isinstance(reply, Error) and reply.ref == "r-7"
    assert "count must be between 1 and 100000" in reply.message


async def test_frames_the_queen_does_not_take_are_refused(queen: Queen) -> None:
    with trio.fail_after(10):
        reply = await raw_exchange(queen, encode(Done(job_id="job-x", result=None)))
    assert isinstance(reply, Error) and reply.code is ErrorCode.INVALID_REQUEST
    assert "does not take DONE" in reply.message


async def test_random_bytes_never_stop_the_queen(queen: Queen, keeper: JobClient) -> None:
    rng = random.Random(7)
    with trio.fail_after(20):
        async with await open_connection(queen_address(queen)) as conn:
            for _ in range(200):
                frames = [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(1, 6))]
                await conn.send(frames)
                reply = decode(await conn.receive())
                while isinstance(reply, Heartbeat):  # the queen's beat, at its own pace
                    reply = decode(await conn.receive())
                assert isinstance(reply, Error) and reply.job_id == "", reply
        await assert_still_serving(keeper)


@pytest.mark.parametrize("transport", ["tcp"])
async def test_raw_tcp_garbage_on_the_queen_port_does_not_stop_it(
    queen: Queen, keeper: JobClient
) -> None:
    port = int(queen.listener.endpoint.rsplit(":", 1)[1])
    with trio.fail_after(10):
        for payload in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes(range(256)) * 4, b"\xff" * 64):
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", port))
            await sock.send(payload)
            sock.close()
        await assert_still_serving(keeper)


# ---- vanished, slow and unreachable peers ------------------------------------------------


async def test_keeper_that_disconnects_mid_job_leaves_no_job_behind(queen: Queen) -> None:
    with trio.fail_after(10):
        async with open_keeper(queen_address(queen), FAST_KEEPER) as k:
            job = await k.submit(Ping(count=10_000, interval_s=0.01))
            async for message in job:
                if isinstance(message, Narration):
                    break
        await queen.server.job_count.wait_value(0)
    assert queen.server.running_jobs == []


async def test_keeper_that_vanishes_silently_has_its_jobs_cancelled(queen: Queen) -> None:
    """No DISCONNECT, no more heartbeats: three silent intervals and its jobs are gone."""
    conn = await open_connection(queen_address(queen))
    with trio.fail_after(10):
        hello = Ready(job_id="", sender="ghost", role=Actor.KEEPER, interval_s=0.1)
        await conn.send(encode(hello))
        assert isinstance(decode(await conn.receive()), Ready)
        await conn.send(encode(Submit(job_id="", ref="r1", op=Ping(count=10_000, interval_s=0.01))))
        accepted = decode(await conn.receive())
        assert isinstance(accepted, Accepted)
        await conn.aclose()
        await queen.server.job_count.wait_value(0)
    assert queen.server.running_jobs == []


async def test_slow_keeper_neither_stalls_others_nor_leaks_its_job(queen: Queen) -> None:
    """A keeper that stops reading fills only its own outbox, then is dropped."""
    conn = await open_connection(queen_address(queen))
    with trio.fail_after(60):
        await conn.send(encode(Ready(job_id="", sender="slow", role=Actor.KEEPER, interval_s=60)))
        await conn.send(encode(Submit(job_id="", ref="r1", op=Ping(count=100_000))))
        async with open_keeper(queen_address(queen), FAST_KEEPER) as other:
            for _ in range(5):
                job = await other.submit(Ping(count=10))
                await collect(job)
                assert isinstance(job.terminal, Done)
            await queen.server.job_count.wait_value(0)
    await conn.aclose()
    assert queen.server.running_jobs == []


async def test_keeper_notices_a_queen_that_dies_mid_job(transport: str, tmp_path) -> None:
    from rbee_mesh.actors.mesh import running_queen
    from tests.conftest import bind_endpoint

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            queen_scope = trio.CancelScope()
            started = trio.Event()
            box: list[Queen] = []

            async def doomed_queen() -> None:
                with queen_scope:
                    async with running_queen(bind_endpoint(transport, tmp_path), FAST_QUEEN) as q:
                        box.append(q)
                        started.set()
                        await trio.sleep_forever()

            nursery.start_soon(doomed_queen)
            await started.wait()
            async with open_keeper(queen_address(box[0]), FAST_KEEPER) as k:
                job = await k.submit(Ping(count=10_000, interval_s=0.01))
                async for message in job:
                    if isinstance(message, Narration):
                        queen_scope.cancel()
    assert isinstance(job.terminal, Error)
    assert job.terminal.code is ErrorCode.UNAVAILABLE


@pytest.mark.parametrize(
    "endpoint", ["tcp://127.0.0.1:{port}", "ipc://{tmp}/nobody.sock", "mem://nobody-here"]
)
async def test_unreachable_queen_is_reported_within_the_accept_timeout(
    endpoint: str, tmp_path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nobody listens there
    address = endpoint.format(port=port, tmp=tmp_path)
    with trio.fail_after(FAST_KEEPER.accept_timeout_s + 3), pytest.raises(ServerUnreachable):
        async with open_keeper(address, FAST_KEEPER) as k:
            await k.submit(Status())
