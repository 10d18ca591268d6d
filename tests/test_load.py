"""Load cannot sink the queen (issue 14, item 3): a burst of jobs is run or refused BUSY, a
client that stops reading is cut off at a named limit, and connections that come and go leave
its memory and file descriptors where they were.

The queen is the daemon (`queen start --foreground`, a process of its own, over tcp with CURVE),
so that its resident memory and open files can be read from /proc; or, where a limit is not one
the daemon can be given, a queen of this process over tcp with CURVE, which is the same code.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import zmq

from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.actors.hive.hive import HiveConfig, running_hive
from rbee_mesh.actors.jobclient import ClientConfig, JobClient
from rbee_mesh.actors.jobserver import ServerConfig
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.mesh import memory_endpoint, running_queen
from rbee_mesh.actors.queen.api import serving_api
from rbee_mesh.actors.trust import Trust
from rbee_mesh.inference.gguf_file import write_tiny_gguf
from rbee_mesh.protocol import (
    PROTOCOL_VERSION,
    Accepted,
    Actor,
    Cancel,
    Cancelled,
    Disconnect,
    Done,
    Error,
    ErrorCode,
    Heartbeat,
    HiveList,
    Infer,
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
from rbee_mesh.protocol.constants import DEFAULT_SLOTS, MAX_ANNOUNCED_HIVES, MAX_JOBS_PER_KEEPER
from rbee_mesh.transport import Connection, SocketOptions
from rbee_mesh.transport.curve import ClientKeys, Keypair
from rbee_mesh.transport.discovery import HiveAnnouncement
from rbee_mesh.transport.factory import make_socket
from rbee_mesh.transport.zmq_trio import TrioSocket
from tests import clitools
from tests.keyed import open_connection

#: A keeper of these tests: patient, since the machine is busy with other work.
KEEPER = ClientConfig(accept_timeout_s=10.0)
#: A ping that runs until it is cancelled, as far as a test can tell (its deadline is days).
ENDLESS = Ping(count=100_000, interval_s=10.0)


# ---- the queen daemon, and what /proc says of it ---------------------------------------------


class QueenProcess:
    """`rbee-mesh queen start --foreground` on a free loopback port, as the daemon runs."""

    def __init__(self, home: Path) -> None:
        self.mesh = clitools.Mesh(home)
        # Made here, before the daemon reads it: the test is this node's owner.
        self.trust = Trust.load(home)
        self.endpoint = f"tcp://127.0.0.1:{clitools.free_port()}"
        log = (home / "queen-test.log").open("wb")
        argv = self.mesh.argv("queen", "start", "--foreground", "--bind", self.endpoint)
        self.process = subprocess.Popen(
            argv, env=self.mesh.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )

    async def started(self) -> None:
        """Return once it has recorded itself (it serves by then)."""
        info = self.mesh.home / "queen.json"
        while not info.exists():
            assert self.process.poll() is None, "the queen exited"
            await trio.sleep(0.05)
        assert json.loads(info.read_text())["pid"] == self.process.pid

    def rss_bytes(self) -> int:
        return clitools.memory_of(self.process.pid)["VmRSS"]

    def peak_rss_bytes(self) -> int:
        """The most memory it has held resident since it started (the kernel's high-water)."""
        return clitools.memory_of(self.process.pid)["VmHWM"]

    def open_files(self) -> int:
        return clitools.open_files(self.process.pid)

    def close(self) -> None:
        clitools.stop_process(self.process)


@pytest.fixture
async def queen_daemon(tmp_path: Path) -> AsyncIterator[QueenProcess]:
    queen = QueenProcess(tmp_path / "q")
    try:
        with trio.fail_after(60):
            await queen.started()
        yield queen
    finally:
        queen.close()


@asynccontextmanager
async def keeper_of(queen: QueenProcess) -> AsyncIterator[JobClient]:
    async with open_keeper(queen.endpoint, KEEPER, queen.trust) as keeper:
        yield keeper


async def run(keeper: JobClient, op: Any) -> Message:
    job = await keeper.submit(op)
    return await job.end()


# ---- a keeper that speaks frames itself, to count what comes on the wire ----------------------


@dataclass
class Submission:
    """What the queen answered one SUBMIT, and every frame of its job after that."""

    answer: Message | None = None
    terminals: list[Message] = field(default_factory=list)
    after_end: list[Message] = field(default_factory=list)


class RawKeeper:
    """A keeper connection without the job client: every frame the queen sends is kept, by the
    SUBMIT it answers (its `ref`) or the job it belongs to."""

    def __init__(self, conn: Connection, name: str) -> None:
        self.conn = conn
        self.name = name
        self.submissions: dict[str, Submission] = {}
        self._by_job: dict[str, Submission] = {}
        self._refs = 0

    @classmethod
    @asynccontextmanager
    async def open(
        cls, endpoint: str, node: Trust, name: str, server_key: str = ""
    ) -> AsyncIterator[RawKeeper]:
        async with await open_connection(endpoint, node=node, server_key=server_key) as conn:
            keeper = cls(conn, name)
            # Silent for up to two minutes before the queen gives up on it (it never beats).
            ready = Ready(job_id="", sender=name, role=Actor.KEEPER, interval_s=60.0)
            await conn.send(encode(ready))
            while not isinstance(decode(await conn.receive()), Ready):
                pass
            yield keeper

    async def submit_all(self, ops: Sequence[Any]) -> list[str]:
        """Send a SUBMIT for each of `ops` at once, not waiting for any answer; their refs."""
        refs = []
        for op in ops:
            self._refs += 1
            ref = f"{self.name}-{self._refs}"
            self.submissions[ref] = Submission()
            await self.conn.send(encode(Submit(job_id="", ref=ref, op=op)))
            refs.append(ref)
        return refs

    def _take(self, message: Message) -> None:
        if isinstance(message, Accepted | Error) and message.ref in self.submissions:
            submission = self.submissions[message.ref]
            if submission.answer is None:
                submission.answer = message
                if isinstance(message, Accepted):
                    self._by_job[message.job_id] = submission
                return
        submission_of_job = self._by_job.get(message.job_id)
        if submission_of_job is None:
            return  # heartbeats
        if submission_of_job.terminals:
            submission_of_job.after_end.append(message)
        elif message.is_terminal:
            submission_of_job.terminals.append(message)

    async def read_until(self, done: Any) -> None:
        while not done():
            self._take(decode(await self.conn.receive()))

    def answered(self) -> bool:
        return all(s.answer is not None for s in self.submissions.values())

    def ended(self) -> bool:
        return self.answered() and all(
            s.terminals for s in self.submissions.values() if isinstance(s.answer, Accepted)
        )

    def accepted(self) -> list[Accepted]:
        return [s.answer for s in self.submissions.values() if isinstance(s.answer, Accepted)]

    def refused(self) -> list[Error]:
        return [s.answer for s in self.submissions.values() if isinstance(s.answer, Error)]

    async def cancel_all(self) -> None:
        for accepted in self.accepted():
            await self.conn.send(encode(Cancel(job_id=accepted.job_id, reason="the test")))

    async def settle(self) -> None:
        """Run one more job and read until its end: a frame the queen sent on this connection
        before that (a second terminal frame of an earlier job) has been read by then."""
        [ref] = await self.submit_all([Ping(count=1)])
        await self.read_until(lambda: bool(self.submissions[ref].terminals))
        del self.submissions[ref]  # not one of the test's


def assert_each_ended_once(keepers: Sequence[RawKeeper], *kinds: type[Message]) -> None:
    """Each accepted job got exactly one terminal frame, of one of `kinds`, and nothing after."""
    for keeper in keepers:
        for ref, submission in keeper.submissions.items():
            if isinstance(submission.answer, Accepted):
                assert len(submission.terminals) == 1, (ref, submission)
                assert isinstance(submission.terminals[0], kinds), (ref, submission)
                assert submission.after_end == [], (ref, submission)


def assert_busy(refusal: Error) -> None:
    """A refusal a client may retry: BUSY, before the job began, saying why."""
    assert (refusal.code, refusal.started) == (ErrorCode.BUSY, False), refusal
    assert "try again" in refusal.message or "busy" in refusal.message, refusal


# ---- 1,000 jobs at once ----------------------------------------------------------------------


@pytest.mark.slow
async def test_a_thousand_jobs_at_once_from_one_keeper_run_and_the_rest_are_refused_busy(
    queen_daemon: QueenProcess,
) -> None:
    over = 200
    async with RawKeeper.open(queen_daemon.endpoint, queen_daemon.trust, "burst") as burst:
        with trio.fail_after(120):
            await burst.submit_all([ENDLESS] * (MAX_JOBS_PER_KEEPER + over))
            await burst.read_until(burst.answered)
            # While its 1,000 run, the queen serves anyone else.
            async with keeper_of(queen_daemon) as fresh:
                served = await run(fresh, Ping(count=3))
            await burst.cancel_all()
            await burst.read_until(burst.ended)
            await burst.settle()
    assert len(burst.accepted()) == MAX_JOBS_PER_KEEPER
    # The ones past the keeper's share, and none before it: SUBMITs are answered in order.
    answers = [s.answer for s in burst.submissions.values()]
    assert all(isinstance(a, Accepted) for a in answers[:MAX_JOBS_PER_KEEPER])
    assert len(burst.refused()) == over
    for refusal in burst.refused():
        assert_busy(refusal)
        assert f"runs {MAX_JOBS_PER_KEEPER} jobs" in refusal.message
    assert_each_ended_once([burst], Cancelled)
    assert isinstance(served, Done)


@pytest.mark.slow
async def test_a_thousand_jobs_at_once_from_several_keepers_each_end_once_by_themselves(
    queen_daemon: QueenProcess,
) -> None:
    trust = queen_daemon.trust
    async with (
        RawKeeper.open(queen_daemon.endpoint, trust, "a") as a,
        RawKeeper.open(queen_daemon.endpoint, trust, "b") as b,
        RawKeeper.open(queen_daemon.endpoint, trust, "c") as c,
        RawKeeper.open(queen_daemon.endpoint, trust, "d") as d,
    ):
        keepers = [a, b, c, d]
        with trio.fail_after(180):
            async with trio.open_nursery() as nursery:
                for keeper in keepers:
                    await keeper.submit_all([Ping(count=3, interval_s=0.5)] * 250)
                for keeper in keepers:
                    nursery.start_soon(keeper.read_until, keeper.ended)
            for keeper in keepers:
                await keeper.settle()
            async with keeper_of(queen_daemon) as fresh:
                served = await run(fresh, Ping(count=3))
    assert sum(len(k.accepted()) for k in keepers) == 1_000
    assert_each_ended_once(keepers, Done)
    assert isinstance(served, Done)


async def test_past_the_queens_own_limit_several_keepers_are_refused_busy(
    tmp_path: Path,
) -> None:
    """The queen's limit on running jobs (its config's; the daemon's is 10,000), shared by its
    keepers: first come, first run; the rest are told BUSY, and a fresh keeper is served."""
    limit = 1_000
    config = ServerConfig(max_running_jobs=limit)
    async with running_queen("tcp://127.0.0.1:0", config) as queen:
        endpoint, node = queen.listener.endpoint, queen.trust
        async with (
            RawKeeper.open(endpoint, node, "a") as a,
            RawKeeper.open(endpoint, node, "b") as b,
            RawKeeper.open(endpoint, node, "c") as c,
            RawKeeper.open(endpoint, node, "d") as d,
        ):
            keepers = [a, b, c, d]
            with trio.fail_after(120):
                for keeper in keepers:
                    await keeper.submit_all([ENDLESS] * 300)
                async with trio.open_nursery() as nursery:
                    for keeper in keepers:
                        nursery.start_soon(keeper.read_until, keeper.answered)
                running = len(queen.server.running_jobs)
                async with open_keeper(endpoint, KEEPER) as fresh:
                    refused_fresh = await run(fresh, Ping(count=1))
                for keeper in keepers:
                    await keeper.cancel_all()
                async with trio.open_nursery() as nursery:
                    for keeper in keepers:
                        nursery.start_soon(keeper.read_until, keeper.ended)
                for keeper in keepers:
                    await keeper.settle()
                async with open_keeper(endpoint, KEEPER) as fresh:
                    served = await run(fresh, Ping(count=1))
    assert running == limit
    assert sum(len(k.accepted()) for k in keepers) == limit
    refusals = [r for k in keepers for r in k.refused()]
    assert len(refusals) == 4 * 300 - limit
    for refusal in refusals:
        assert_busy(refusal)
        assert f"{limit} of {limit} jobs run" in refusal.message
    assert_each_ended_once(keepers, Cancelled)
    # While the queen was full, a newcomer too was told BUSY; once it was not, it was served.
    assert isinstance(refused_fresh, Error)
    assert_busy(refused_fresh)
    assert isinstance(served, Done)


# ---- the HTTP API ----------------------------------------------------------------------------


async def http(url: str, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send a whole HTTP/1.1 request (which asks to close) to the API at `url`; its status and
    JSON body."""
    host, _, port = url.removeprefix("http://").partition("/")[0].rpartition(":")
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(request)
        answer = b""
        while chunk := await stream.receive_some():
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()


#: A completion request whose body never comes whole: it holds its place in the API.
HELD = (
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 100\r\n\r\n{"
)


async def api_requests(url: str, requests: int) -> None:
    """Wait until the API serves `requests` requests (its health says)."""
    while True:  # polled: the count is the API's, over HTTP
        _, health = await http(url, get("/health"))
        if health["requests"] == requests:
            return
        await trio.sleep(0.05)


async def test_the_api_serves_its_limit_of_requests_at_once_and_refuses_more_busy() -> None:
    limit = 8
    async with (
        running_queen(memory_endpoint("queen")) as queen,
        serving_api(queen, "127.0.0.1:0", max_requests=limit) as url,
    ):
        host, _, port = url.removeprefix("http://").partition("/")[0].rpartition(":")
        with trio.fail_after(30):
            held = [await trio.open_tcp_stream(host, int(port)) for _ in range(limit)]
            for stream in held:
                await stream.send_all(HELD)
            await api_requests(url, limit)
            refused = await http(url, get("/v1/models"))
            for stream in held:
                await stream.aclose()
            await api_requests(url, 0)
            served = await http(url, get("/v1/models"))
    status, body = refused
    assert status == 429, refused
    assert body["error"]["code"] == "busy"
    assert body["error"]["message"] == (
        f"the API serves {limit} requests at once; try again when one ends"
    )
    # Served: run as a job, which found no hive to list models on.
    assert served[0] == 503 and served[1]["error"]["code"] == "unavailable", served


# ---- announcements on the LAN ----------------------------------------------------------------


async def test_hives_announced_on_the_lan_are_remembered_up_to_a_limit_the_newest_kept() -> None:
    """mDNS announcements are not authenticated: a LAN peer announcing thousands of made-up
    hives leaves the queen with the MAX_ANNOUNCED_HIVES announced last, pending, listed."""
    made_up = MAX_ANNOUNCED_HIVES + 100
    async with (
        running_queen(memory_endpoint("queen")) as queen,
        open_keeper(queen.listener.endpoint, KEEPER) as keeper,
    ):
        with trio.fail_after(60):
            for n in range(made_up):
                key = Keypair.generate().public
                await queen._found(
                    HiveAnnouncement(f"h{n}", PROTOCOL_VERSION, "10.0.0.1", 1, 2, key, "0")
                )
            listed = await run(keeper, HiveList())
    assert isinstance(listed, Done)
    assert [row["hive"] for row in listed.result] == [f"h{n}" for n in range(100, made_up)]
    assert {row["liveness"] for row in listed.result} == {"pending"}


@pytest.mark.slow
async def test_a_thousand_inferences_at_once_wait_in_the_queue_or_are_refused_busy(
    tmp_path: Path,
) -> None:
    """One worker of DEFAULT_SLOTS (this process on one core: the queen spawns no second), a
    queue of 64: a thousand inferences at once from one keeper are each accepted, then run (at
    once or after their wait in the queue) or end BUSY, not started, as the queue is full."""
    state = tmp_path / "state"
    model = write_tiny_gguf(tmp_path / "tiny.gguf", context_length=2048)
    Catalog(state / "hive" / "models").add_file("rbee-test/tiny", "tiny.gguf", model)
    hive_config = HiveConfig(
        state_dir=state, hive_id="h", control="tcp://127.0.0.1:0",
        heartbeats="tcp://127.0.0.1:0",
    )  # fmt: skip
    max_queued = 64
    infer = Infer(prompt="Once", model="rbee-test/tiny:tiny.gguf", max_tokens=64, seed=1)
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        async with (
            running_hive(hive_config) as hive,
            running_queen(
                "tcp://127.0.0.1:0", hives=[hive.server.listener.endpoint], max_queued=max_queued
            ) as queen,
        ):
            endpoint, node = queen.listener.endpoint, queen.trust
            with trio.fail_after(300):
                await queen.hives.links[0].heard.wait()
                async with open_keeper(endpoint, KEEPER) as first:  # its worker, spawned
                    spawned = await run(first, infer)
                async with RawKeeper.open(endpoint, node, "burst") as burst:
                    await burst.submit_all([infer] * MAX_JOBS_PER_KEEPER)
                    await burst.read_until(burst.ended)
                    await burst.settle()
                async with open_keeper(endpoint, KEEPER) as fresh:
                    served = await run(fresh, infer)
                    workers = await run(fresh, WorkerList())
    finally:
        os.sched_setaffinity(0, cores)
    assert isinstance(spawned, Done) and isinstance(served, Done)
    assert isinstance(workers, Done) and len(workers.result) == 1
    assert len(burst.accepted()) == MAX_JOBS_PER_KEEPER
    ends = [s.terminals[0] for s in burst.submissions.values()]
    done = [m for m in ends if isinstance(m, Done)]
    busy = [m for m in ends if isinstance(m, Error)]
    print(f"\n{len(done)} ran, {len(busy)} refused busy", end="")
    assert len(done) + len(busy) == MAX_JOBS_PER_KEEPER
    # The worker's slots and the queue filled, and each that got a place ran to its end.
    assert len(done) >= DEFAULT_SLOTS + max_queued and busy
    for refusal in busy:
        assert_busy(refusal)
        assert "(the queue is full); try again later" in refusal.message
    assert_each_ended_once([burst], Done, Error)


# ---- a client that stops reading -------------------------------------------------------------


@pytest.mark.slow
async def test_a_keeper_that_stops_reading_is_cut_off_while_others_stream_on(
    queen_daemon: QueenProcess,
) -> None:
    """20 fast streams (2,000,000 frames) to a keeper that reads none of them: the queen holds
    at most its outbox (ServerConfig.peer_backlog) and the socket's high-water mark, then drops
    it and ends its jobs; another keeper's stream is whole meanwhile."""
    streams, frames_each = 20, 100_000
    before = queen_daemon.rss_bytes()
    async with (
        keeper_of(queen_daemon) as reader,
        RawKeeper.open(queen_daemon.endpoint, queen_daemon.trust, "stuck") as stuck,
    ):
        with trio.fail_after(300):
            await stuck.submit_all([Ping(count=frames_each)] * streams)
            job = await reader.submit(Ping(count=20_000))
            pongs = [m for m in [m async for m in job] if isinstance(m, Narration)]
            # The stuck keeper's jobs end (the queen's job list says how) without it reading.
            while True:
                listed = await run(reader, JobList(include_finished=True))
                assert isinstance(listed, Done)
                its = [j for j in listed.result if j["keeper"] == "stuck" and j["op"] == "ping"]
                if len(its) == streams and all(j["state"] != "running" for j in its):
                    break
                await trio.sleep(0.2)
    peak = queen_daemon.peak_rss_bytes()
    after = queen_daemon.rss_bytes()
    print(
        f"\nqueen RSS {before / 2**20:.1f} MiB before, peak {peak / 2**20:.1f}, "
        f"{after / 2**20:.1f} after",
        end="",
    )
    assert [p.human for p in pongs] == [f"pong {i}/20000" for i in range(1, 20_001)]
    assert isinstance(job.terminal, Done)
    assert {j["state"] for j in its} == {"cancelled"}
    reasons = {j["error"] for j in its}
    assert all("frames unread" in r or "read nothing for" in r for r in reasons), reasons
    # 2,000,000 frames held would take hundreds of MiB; what is held is bounded by the limits.
    assert peak - before < 96 * 2**20


# ---- connections that come and go -----------------------------------------------------------


async def greet_and_leave(endpoint: str, node: Trust) -> None:
    """Greet, be answered, say goodbye."""
    async with await open_connection(endpoint, node=node) as conn:
        await conn.send(encode(Ready(job_id="", sender="polite", role=Actor.KEEPER)))
        while not isinstance(decode(await conn.receive()), Ready):
            pass
        await conn.send(encode(Disconnect(job_id="", sender="polite", reason="done")))


async def greet_and_vanish(endpoint: str, node: Trust) -> None:
    """Greet with the shortest interval, be answered, go without a word (dropped for silence)."""
    async with await open_connection(endpoint, node=node) as conn:
        ready = Ready(job_id="", sender="ghost", role=Actor.KEEPER, interval_s=0.05)
        await conn.send(encode(ready))
        while not isinstance(decode(await conn.receive()), Ready):
            pass


async def beat_without_greeting(endpoint: str, node: Trust) -> None:
    """Speak without greeting: told to connect again (DISCONNECT), then go."""
    async with await open_connection(endpoint, node=node) as conn:
        beat = Heartbeat(job_id="", sender="stranger", seq=1, interval_s=1.0)
        await conn.send(encode(beat))
        while not isinstance(decode(await conn.receive()), Disconnect):
            pass


async def connect_and_close(endpoint: str, node: Trust) -> None:
    """Connect, say nothing, close at once (the handshake may not even finish)."""
    async with await open_connection(endpoint, node=node):
        await trio.lowlevel.checkpoint()


async def refused_at_the_handshake(endpoint: str, node: Trust) -> None:
    """A key the queen does not trust: wait until the handshake is refused, then go. (The socket
    is made here, to be watched from before it connects.)"""
    keys = ClientKeys(Keypair.generate(), node.public)
    sock = make_socket(zmq.DEALER, options=SocketOptions(curve=keys))
    monitor = TrioSocket(sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH))
    try:
        sock.connect(endpoint)
        await monitor.recv_multipart()
    finally:
        sock.disable_monitor()
        await monitor.aclose()
        sock.close()


KINDS = [
    greet_and_leave,
    greet_and_vanish,
    beat_without_greeting,
    connect_and_close,
    refused_at_the_handshake,
]


async def come_and_go(endpoint: str, node: Trust, connections: int, at_once: int = 50) -> None:
    """Open and close `connections` connections, of each kind in turn, `at_once` at a time."""
    for start in range(0, connections, at_once):
        async with trio.open_nursery() as nursery:
            for n in range(start, min(start + at_once, connections)):
                nursery.start_soon(KINDS[n % len(KINDS)], endpoint, node)


async def queen_status(keeper: JobClient) -> dict[str, Any]:
    status = await run(keeper, Status())
    assert isinstance(status, Done)
    return dict(status.result["queen"])


async def settled(queen: QueenProcess, keeper: JobClient, keepers: int) -> dict[str, Any]:
    """The queen's status once it holds `keepers` connections (those that vanished dropped)."""
    while True:  # polled: the queen is another process
        status = await queen_status(keeper)
        if status["keepers"] == keepers:
            return status
        await trio.sleep(0.1)


@pytest.mark.slow
async def test_ten_thousand_connections_leave_the_queens_memory_and_files_where_they_were(
    queen_daemon: QueenProcess,
) -> None:
    endpoint, node = queen_daemon.endpoint, queen_daemon.trust
    async with keeper_of(queen_daemon) as keeper:
        with trio.fail_after(600):
            keepers = (await queen_status(keeper))["keepers"]  # this one, and the API's
            # Warm-up: the allocator's pools, libzmq's and the ZAP handler's are made once, and
            # what the queen remembers of the connections gone fills up to its bounds (4,096
            # fenced connections, 1,024 refused keys), past which it forgets the oldest.
            await come_and_go(endpoint, node, 8_000)
            warm = await settled(queen_daemon, keeper, keepers)
            rss_before, files_before = queen_daemon.rss_bytes(), queen_daemon.open_files()
            await come_and_go(endpoint, node, 10_000)
            status = await settled(queen_daemon, keeper, keepers)
            rss_after, files_after = queen_daemon.rss_bytes(), queen_daemon.open_files()
            served = await run(keeper, Ping(count=3))
    print(
        f"\nqueen RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB, "
        f"open files {files_before} -> {files_after}, "
        f"refused handshakes {warm['refused_handshakes']} -> {status['refused_handshakes']}",
        end="",
    )
    assert status["refused_handshakes"] >= warm["refused_handshakes"] + 10_000 // len(KINDS)
    assert files_after == files_before
    assert rss_after - rss_before < 4 * 2**20
    assert isinstance(served, Done)
