"""No job can stop an actor, and no frame either: each fault ends its own job with the truth.

- A job server (the one the queen, hives and workers share) whose handlers raise, return a
  result too large to send, or one that cannot be encoded: each job ends with its own ERROR,
  the server goes on serving, and the log says whose fault it was.
- Real hives with catalogs too large to list: heartbeats stay small and carry no path; a listing
  fails RESULT_TOO_LARGE through the queen, straight at the hive, and merged across hives; every
  actor still answers.
- Placement: a job refused by a worker that has just died is placed again; a hive that has gone
  silent is passed over.
- At most once: a SUBMIT past its `accept_by`, frames on a dropped connection, a superseded
  connection, a job whose deadline passed before a frozen hive answered: none runs afterwards.
- Ends that are never silent: a job that outlasts its server's grace, a client of a queen that
  crashed and came back, goodbyes of any length, a hive whose catalog vanished.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from rbee_mesh.actors.hive.catalog import Catalog, ModelEntry, ModelStatus, model_id
from rbee_mesh.actors.hive.hive import HiveConfig, running_hive
from rbee_mesh.actors.jobclient import ClientJob, JobClient
from rbee_mesh.actors.jobserver import JobServer, ServerConfig, ServerJob
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.mesh import integrated_hive_config, memory_endpoint, running_queen
from rbee_mesh.actors.queen.queen import Queen
from rbee_mesh.actors.trust import Trust
from rbee_mesh.inference.gguf_file import write_tiny_gguf
from rbee_mesh.protocol import (
    Actor,
    Disconnect,
    Done,
    Error,
    ErrorCode,
    Heartbeat,
    HiveStatus,
    Infer,
    Kind,
    Liveness,
    Message,
    ModelList,
    Narration,
    Ping,
    Ready,
    RemoteProtocolError,
    Status,
    Submit,
    WorkerGet,
    WorkerList,
    WorkerSpawn,
    decode,
    decode_heartbeat,
    decode_state,
    encode,
)
from rbee_mesh.protocol.codec import HEADER
from rbee_mesh.protocol.constants import (
    CLIENT_LOST_AFTER,
    MAX_BODY_VALUES,
    MAX_SENTENCE,
    SERVER_LOST_AFTER,
)
from tests import clitools
from tests.conftest import FAST_KEEPER, FAST_QUEEN, bind_endpoint
from tests.keyed import NODE, open_connection, open_listener, open_subscriber, pair

#: Values a catalog entry takes in a listing (its fields, and the map).
VALUES_PER_ENTRY = 12


async def finish(job: ClientJob) -> list[Message]:
    return [message async for message in job]


async def run(keeper: JobClient, op: Any, timeout_s: float | None = None) -> ClientJob:
    job = await keeper.submit(op, timeout_s=timeout_s)
    await finish(job)
    return job


def error_of(job: ClientJob) -> Error:
    assert isinstance(job.terminal, Error), job.terminal
    return job.terminal


async def assert_serving(keeper: JobClient) -> None:
    job = await run(keeper, Status())
    assert isinstance(job.terminal, Done), job.terminal


# ---- the job server: no handler can stop it ----------------------------------------------------


class _Handlers:
    """Handlers a test gives the job server, keyed by operations they stand for."""

    async def ok(self, job: ServerJob, op: Status) -> dict[str, Any]:
        return {"serving": True}

    async def raises(self, job: ServerJob, op: Ping) -> None:
        raise RuntimeError("the handler broke")

    async def too_large(self, job: ServerJob, op: WorkerList) -> list[int]:
        return list(range(MAX_BODY_VALUES + 1))

    async def too_many_bytes(self, job: ServerJob, op: ModelList) -> str:
        return "x" * (5 * 1024 * 1024)

    async def unsendable(self, job: ServerJob, op: WorkerGet) -> Any:
        return {"fine": 1, "broken": {1, 2, 3}}  # a set: no msgpack type

    async def not_finite(self, job: ServerJob, op: WorkerSpawn) -> Any:
        return {"rate": math.nan}


@pytest.fixture
async def server_keeper(transport: str, tmp_path: Path) -> AsyncIterator[JobClient]:
    h = _Handlers()
    handlers: Any = {
        Status: h.ok,
        Ping: h.raises,
        WorkerList: h.too_large,
        ModelList: h.too_many_bytes,
        WorkerGet: h.unsendable,
        WorkerSpawn: h.not_finite,
    }
    async with await open_listener(bind_endpoint(transport, tmp_path)) as listener:
        server = JobServer(
            listener, name="test-server", actor=Actor.QUEEN, handlers=handlers, config=FAST_QUEEN
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            endpoint = listener.endpoint.replace("0.0.0.0", "127.0.0.1")
            async with open_keeper(endpoint, FAST_KEEPER) as keeper:
                yield keeper
            await server.stop("the test is over")


async def test_a_handler_that_raises_ends_its_job_internal_and_the_server_serves_on(
    server_keeper: JobClient, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        job = await run(server_keeper, Ping())
        await assert_serving(server_keeper)
    error = error_of(job)
    assert error.code is ErrorCode.INTERNAL
    assert "RuntimeError: the handler broke" in error.message


@pytest.mark.parametrize(
    ("op", "words"),
    [(WorkerList(), f"more than {MAX_BODY_VALUES} values"), (ModelList(), "bytes; the limit")],
    ids=["values", "bytes"],
)
async def test_a_result_over_a_limit_ends_its_job_result_too_large_and_the_server_serves_on(
    server_keeper: JobClient, op: Any, words: str
) -> None:
    with trio.fail_after(10):
        job = await run(server_keeper, op)
        await assert_serving(server_keeper)
    error = error_of(job)
    assert error.code is ErrorCode.RESULT_TOO_LARGE
    assert words in error.message and error.message.startswith(f"the result of {op.NAME}")


@pytest.mark.parametrize("op", [WorkerGet(worker="w-1"), WorkerSpawn(model="m")], ids=str)
async def test_a_result_that_cannot_be_encoded_is_our_own_bug_and_ends_only_its_job(
    server_keeper: JobClient, op: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        job = await run(server_keeper, op)
        await assert_serving(server_keeper)
    error = error_of(job)
    assert error.code is ErrorCode.INTERNAL
    assert "cannot be sent (a bug)" in error.message
    local = [r for r in caplog.records if "(a bug)" in r.getMessage()]
    assert local and local[0].levelno == logging.ERROR


async def test_a_job_that_outlasts_the_servers_grace_still_gets_its_terminal_frame(
    tmp_path: Path,
) -> None:
    """Stopping cancels what is still running after `shutdown_grace_s`; a job in a section that
    cannot be cancelled (a shielded wait, a model's prefill in a thread) ends when it leaves it,
    with the server's reason, not with silence."""
    entered, release = trio.Event(), trio.Event()

    async def stubborn(job: ServerJob, op: Ping) -> dict[str, Any]:
        entered.set()
        with trio.CancelScope(shield=True):
            await release.wait()
        await trio.lowlevel.checkpoint()
        return {"finished": True}

    config = replace(FAST_QUEEN, shutdown_grace_s=0.05)
    with trio.fail_after(10):
        async with await open_listener(memory_endpoint("server")) as listener:
            server = JobServer(
                listener, name="stopping", actor=Actor.QUEEN, handlers={Ping: stubborn},
                config=config,
            )  # fmt: skip
            async with trio.open_nursery() as nursery:
                await nursery.start(server.run)
                async with open_keeper(listener.endpoint, FAST_KEEPER) as keeper:
                    job = await keeper.submit(Ping())
                    await entered.wait()
                    await server.stop("the test stops it")  # past its grace: cancelled
                    release.set()
                    events = await finish(job)
    assert [type(e) for e in events].count(Error) == 1
    ended = error_of(job)
    assert (ended.code, ended.message) == (ErrorCode.UNAVAILABLE, "the test stops it")


@pytest.mark.parametrize(("server_s", "client_s"), [(0.1, 0.4), (0.4, 0.1)])
async def test_a_server_gives_up_on_a_client_before_the_client_gives_up_on_it(
    server_s: float, client_s: float
) -> None:
    """The server drops a silent client after SERVER_LOST_AFTER of the client's intervals, the
    client gives up after CLIENT_LOST_AFTER of the server's: a client whose interval is longer
    than its server's beats at the server's, so the server always gives up first."""
    handlers: Any = {Status: _Handlers().ok}
    with trio.fail_after(10):
        async with await open_listener(memory_endpoint("server")) as listener:
            config = replace(FAST_QUEEN, heartbeat_s=server_s)
            server = JobServer(
                listener, name="paced", actor=Actor.QUEEN, handlers=handlers, config=config
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(server.run)
                client_config = replace(FAST_KEEPER, heartbeat_s=client_s)
                async with open_keeper(listener.endpoint, client_config) as keeper:
                    await assert_serving(keeper)  # after the READY answer
                    keeper.beat()  # a heartbeat at the pace it keeps now...
                    await assert_serving(keeper)  # ...handled before this job
                    assert keeper.liveness is not None
                    client_gives_up = (CLIENT_LOST_AFTER + 0.5) * keeper.liveness.interval_s
                    [peer] = server._peers.values()
                    server_gives_up = (SERVER_LOST_AFTER + 0.5) * peer.liveness.interval_s
                await server.stop("the test is over")
    assert server_gives_up < client_gives_up
    assert keeper.liveness.interval_s == server_s  # a lost server is found as soon as can be
    assert peer.liveness.interval_s == min(server_s, client_s)


async def test_a_peers_bad_frame_is_logged_as_their_fault_and_answered(
    server_keeper: JobClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rbee_mesh.jobs")
    with trio.fail_after(10):
        await server_keeper.send_frames([b"RBEE\x02", b"\x01", b"", b"\xc1"])
        await assert_serving(server_keeper)
    assert any("(their fault)" in r.getMessage() for r in caplog.records)


# ---- real hives whose catalogs are too large to list --------------------------------------------


def fill_catalog(state_dir: Path, count: int) -> None:
    """`count` available entries in the catalog of the hive whose state directory this is."""
    catalog = Catalog(state_dir / "hive" / "models")
    for n in range(count):
        repo, file = f"bulk/model-{n:05d}-GGUF", f"model-{n:05d}.Q4_K_M.gguf"
        entry = ModelEntry(
            id=model_id(repo, file), repo=repo, file=file, revision="main", size=1_000 + n,
            sha256=None, status=ModelStatus.AVAILABLE, error=None, added=0.0, last_used=0.0,
            path=catalog.model_path(repo, file),
        )  # fmt: skip
        catalog.put(entry)


def free_tcp() -> str:
    return bind_endpoint("tcp", Path()).replace(":0", f":{clitools.free_port()}")


class HiveProcess:
    """`rbee-mesh hive start --foreground` as a process of its own, on loopback tcp."""

    def __init__(self, state_dir: Path, hive_id: str, heartbeat_s: float = 0.5) -> None:
        self.state_dir = state_dir
        self.hive_id = hive_id
        self.control = free_tcp()
        self.heartbeats = free_tcp()
        argv = [
            sys.executable, "-m", "rbee_mesh", "hive", "start", "--foreground", "--id", hive_id,
            "--bind", self.control, "--heartbeat-bind", self.heartbeats,
            "--heartbeat", str(heartbeat_s),
        ]  # fmt: skip
        env = {**os.environ, "RBEE_MESH_HOME": str(state_dir)}
        state_dir.mkdir(parents=True, exist_ok=True)
        self.key = pair(state_dir)
        log = (state_dir / "hive-test.log").open("wb")
        self.process = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )

    def rss_bytes(self) -> int:
        return clitools.memory_of(self.process.pid)["VmRSS"]

    def close(self) -> None:
        clitools.stop_process(self.process)


@pytest.fixture
def hive_processes() -> Iterator[list[HiveProcess]]:
    started: list[HiveProcess] = []
    yield started
    for hive in started:
        hive.close()


@contextlib.asynccontextmanager
async def queen_of(hives: list[HiveProcess]) -> AsyncIterator[tuple[Queen, JobClient]]:
    """A queen linked to these hive processes (each has answered its READY), and a keeper."""
    async with (
        running_queen(
            "tcp://127.0.0.1:0", FAST_QUEEN, hives=[(h.control, h.key) for h in hives]
        ) as queen,
        open_keeper(queen.listener.endpoint, FAST_KEEPER) as keeper,
    ):
        with trio.fail_after(30):
            for link in queen.hives.links:
                await link.client.answered.wait()
        yield queen, keeper


def strings_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *strings_in(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return []


@pytest.mark.slow
async def test_a_huge_catalog_keeps_heartbeats_small_and_its_listing_fails_result_too_large(
    tmp_path: Path, hive_processes: list[HiveProcess]
) -> None:
    entries = MAX_BODY_VALUES // VALUES_PER_ENTRY + 300  # one listing cannot carry them
    fill_catalog(tmp_path / "big", entries)
    hive = HiveProcess(tmp_path / "big", "big")
    hive_processes.append(hive)
    async with (
        running_queen("tcp://127.0.0.1:0", FAST_QUEEN, hives=[(hive.control, hive.key)]) as queen,
        open_keeper(queen.listener.endpoint, FAST_KEEPER) as keeper,
        open_keeper(hive.control, FAST_KEEPER, server_key=hive.key) as straight,
        await open_subscriber() as heartbeats,
    ):
        await heartbeats.connect(hive.heartbeats, hive.key)
        with trio.fail_after(60):
            frames = await heartbeats.receive()
            await queen.hives.links[0].client.answered.wait()
            through_queen = await run(keeper, ModelList(hive="big"))
            at_the_hive = await run(straight, ModelList())
            await assert_serving(keeper)
            pong = await run(straight, Ping())
    _, packed = decode_heartbeat(frames)
    state = decode_state(packed)
    # Small whatever the catalog holds: its count and digest, not its entries.
    assert len(frames[3]) < 4096, len(frames[3])
    assert state["models"]["count"] == entries
    # Nothing of this machine's file system goes to a subscriber.
    assert not [s for s in strings_in(state) if s.startswith("/") or str(tmp_path) in s]
    for job in (through_queen, at_the_hive):
        error = error_of(job)
        assert error.code is ErrorCode.RESULT_TOO_LARGE, error
        assert "too large to send" in error.message
    assert isinstance(pong.terminal, Done)
    assert hive.process.poll() is None


async def test_a_hive_whose_catalog_vanished_beats_and_serves_on(tmp_path: Path) -> None:
    config = HiveConfig(
        state_dir=tmp_path / "state", hive_id="hive-c", control=memory_endpoint("hive"),
        heartbeats=memory_endpoint("beats"), server=FAST_QUEEN,
    )  # fmt: skip
    with trio.fail_after(20):
        async with (
            running_hive(config) as hive,
            running_queen(memory_endpoint("queen"), FAST_QUEEN, hives=[config.control]) as queen,
            open_keeper(queen.listener.endpoint, FAST_KEEPER) as keeper,
        ):
            [link] = queen.hives.links
            await link.heard.wait()
            model = write_tiny_gguf(tmp_path / "tiny.gguf")
            hive.catalog.add_file("rbee-test/tiny-GGUF", "tiny.gguf", model)  # read again next
            shutil.rmtree(hive.catalog.root)  # (by a person, or a failing disk)
            before = link.states.value
            await link.states.wait_value(lambda n: n > before)
            assert link.state["models"] == {"count": 0, "digest": ""}
            assert link.liveness is Liveness.LIVE
            await assert_serving(keeper)


@pytest.mark.slow
async def test_a_merged_listing_over_the_limit_fails_at_the_queen_which_serves_on(
    tmp_path: Path, hive_processes: list[HiveProcess]
) -> None:
    # Each hive's listing fits a frame; the two merged (each row tagged with its hive) do not.
    entries = int(MAX_BODY_VALUES / VALUES_PER_ENTRY * 0.6)
    for name in ("h1", "h2"):
        fill_catalog(tmp_path / name, entries)
        hive_processes.append(HiveProcess(tmp_path / name, name))
    async with queen_of(hive_processes) as (_, keeper):
        with trio.fail_after(60):
            merged = await run(keeper, ModelList())
            one = await run(keeper, ModelList(hive="h2"))
            await assert_serving(keeper)
    error = error_of(merged)
    assert error.code is ErrorCode.RESULT_TOO_LARGE
    assert isinstance(one.terminal, Done) and len(one.terminal.result) == entries
    assert all(hive.process.poll() is None for hive in hive_processes)


# ---- placement: live capacity only, and again what never started --------------------------------

MODEL_REPO = "rbee-test/tiny-GGUF"
MODEL_FILE = "tiny.gguf"
MODEL = model_id(MODEL_REPO, MODEL_FILE)
SHORT = Infer(prompt="Once upon a time", model=MODEL, max_tokens=8, temperature=0.0)


def seed_model(state_dir: Path, tiny: Path) -> None:
    Catalog(state_dir / "hive" / "models").add_file(MODEL_REPO, MODEL_FILE, tiny)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def said(messages: list[Message]) -> str:
    return "\n".join(m.human for m in messages if isinstance(m, Narration))


@pytest.mark.slow
async def test_a_job_refused_by_a_worker_that_just_died_is_placed_again(
    tmp_path: Path, tiny: Path
) -> None:
    seed_model(tmp_path / "state", tiny)
    # Heartbeats 5 s apart: the queen learns of the death no sooner than the job is refused.
    hive_config = replace(
        integrated_hive_config(tmp_path / "state"), server=ServerConfig(heartbeat_s=5.0)
    )
    async with (
        running_hive(hive_config) as hive,
        running_queen(memory_endpoint("queen"), FAST_QUEEN, hives=[hive_config.control]) as queen,
        open_keeper(queen.listener.endpoint, FAST_KEEPER) as keeper,
    ):
        link = queen.hives.links[0]
        with trio.fail_after(60):
            first = await done(keeper, WorkerSpawn(model=MODEL))
            second = await done(keeper, WorkerSpawn(model=MODEL))
            # A heartbeat that shows both ready: the queen's view until the next, 5 s later.
            await link.states.wait_value(
                lambda _: [w["state"] for w in link.workers] == ["ready", "ready"]
            )
            os.kill(first["pid"], signal.SIGKILL)
            await hive.pool.revision.wait_value(
                lambda _: hive.pool.get(first["id"]).state.value == "dead"
            )
            seen_before = link.states.value
            job = await keeper.submit(SHORT)
            messages = await finish(job)
            placed_before_a_heartbeat = link.states.value == seen_before
    assert isinstance(job.terminal, Done), job.terminal
    assert job.terminal.result["worker"] == second["id"]
    assert placed_before_a_heartbeat, "a heartbeat came first: the test proves nothing"
    story = said(messages)
    assert f"worker {first['id']} on hive {hive.id} did not take the job" in story, story
    assert "placing it again" in story


async def done(keeper: JobClient, op: Any) -> Any:
    job = await run(keeper, op)
    assert isinstance(job.terminal, Done), job.terminal
    return job.terminal.result


@pytest.mark.slow
async def test_a_hive_gone_silent_is_passed_over_for_a_live_one(
    tmp_path: Path, tiny: Path, hive_processes: list[HiveProcess]
) -> None:
    for name in ("quiet", "lively"):
        seed_model(tmp_path / name, tiny)
        hive_processes.append(HiveProcess(tmp_path / name, name))
    quiet = hive_processes[0]
    async with queen_of(hive_processes) as (queen, keeper):
        with trio.fail_after(60):
            for hive in hive_processes:
                await done(keeper, WorkerSpawn(model=MODEL, hive=hive.hive_id))
            quiet_link = queen.hives.get("quiet")
            quiet.process.send_signal(signal.SIGSTOP)
            try:
                await quiet_link.watch.wait_value(Liveness.SUSPECT)
                job = await keeper.submit(SHORT)
                messages = await finish(job)
            finally:
                quiet.process.send_signal(signal.SIGCONT)
    assert isinstance(job.terminal, Done), job.terminal
    assert "on hive lively" in said(messages)
    assert "on hive quiet" not in said(messages)


@pytest.mark.slow
async def test_a_job_that_ends_before_its_hive_answered_is_reported_only_once_it_cannot_run(
    tmp_path: Path, hive_processes: list[HiveProcess]
) -> None:
    """The queen forwards a job to a frozen hive, and the job's deadline passes while the hive
    has not answered. The keeper hears the end only once the hive can no longer start it: the
    thawed hive refuses the SUBMIT it finds (its `accept_by` has passed), and never runs it."""
    frozen = HiveProcess(tmp_path / "frozen", "frozen", heartbeat_s=5.0)  # not lost meanwhile
    hive_processes.append(frozen)
    async with queen_of(hive_processes) as (_, keeper):
        with trio.fail_after(60):
            frozen.process.send_signal(signal.SIGSTOP)
            try:
                job = await run(keeper, ModelList(hive="frozen"), timeout_s=0.5)
            finally:
                frozen.process.send_signal(signal.SIGCONT)
            status = await done(keeper, HiveStatus(hive="frozen"))  # sent after the SUBMIT
    assert [j for j in status["jobs"] if j["id"] == job.job_id] == []
    ended = error_of(job)
    assert ended.code is ErrorCode.UNAVAILABLE and "did not run model_list" in ended.message


@pytest.mark.slow
async def test_a_model_on_a_hive_that_cannot_list_its_catalog_is_unavailable_not_missing(
    tmp_path: Path, tiny: Path, hive_processes: list[HiveProcess]
) -> None:
    """The queen has not read a hive's catalog yet (it never needed it: jobs went to workers)
    when a job needs it, and the hive does not answer (frozen). The hive may hold the model:
    the job ends UNAVAILABLE saying so, not NOT_FOUND ("no hive holds it")."""
    seed_model(tmp_path / "frozen", tiny)
    frozen = HiveProcess(tmp_path / "frozen", "frozen", heartbeat_s=5.0)  # not lost meanwhile
    hive_processes.append(frozen)
    async with queen_of(hive_processes) as (_, keeper):
        with trio.fail_after(60):
            frozen.process.send_signal(signal.SIGSTOP)
            try:
                job = await run(keeper, replace(SHORT, download=False))
            finally:
                frozen.process.send_signal(signal.SIGCONT)
    ended = error_of(job)
    assert ended.code is ErrorCode.UNAVAILABLE, ended
    assert "hive frozen has not listed its models" in ended.message, ended.message


# ---- frames that cost the most to decode ---------------------------------------------------------


def _array(count: int) -> bytes:
    """A msgpack array32 header for `count` items."""
    return b"\xdd" + count.to_bytes(4, "big")


def worst_bodies() -> dict[str, bytes]:
    """Bodies within MAX_BODY_BYTES that would cost the most to decode without the value budget:
    millions of one-byte values (each becomes a Python object, then is checked). Built as bytes:
    as a peer would send them, without making the objects here."""
    result = b"\x81\xa6result"
    limit = 4 * 1024 * 1024 - 64
    outer = limit // 32_001
    return {
        name: result + _array(outer) + (_array(32_000) + item * 32_000) * outer
        for name, item in (
            ("empty arrays", b"\x90"),
            ("empty maps", b"\x80"),
            ("tiny ints", b"\x01"),
        )
    } | {
        "deep nesting": result + b"\x91" * (limit - 16) + b"\xc0",
        "one long string": result + b"\xdb" + (limit - 64).to_bytes(4, "big") + b"x" * (limit - 64),
    }


@pytest.mark.parametrize("name", list(worst_bodies()))
def test_the_worst_frames_a_peer_can_send_decode_in_bounded_time(name: str) -> None:
    body = worst_bodies()[name]
    assert len(body) <= 4 * 1024 * 1024
    frames = [HEADER, bytes([Kind.DONE]), b"job-1", body]
    gc.collect()  # no collection of this test's own garbage in the measurement
    # CPU time of this process: what decoding costs, whatever else the machine is doing.
    started = time.process_time()
    try:
        decode(frames)
    except RemoteProtocolError as exc:
        assert "values" in exc.message or "msgpack" in exc.message, exc.message
    spent = time.process_time() - started
    print(f"\n{name}: {len(body)} bytes decoded or refused in {spent * 1e3:.1f} ms CPU", end="")
    # Without the budget the worst of these took 0.3-0.6 s here (2 s on a loaded machine).
    assert spent < 0.1, spent


@pytest.mark.slow
async def test_decode_bombs_at_a_queen_a_hive_and_a_worker_leave_each_serving(
    tmp_path: Path, tiny: Path, hive_processes: list[HiveProcess]
) -> None:
    seed_model(tmp_path / "h", tiny)
    hive = HiveProcess(tmp_path / "h", "h")
    hive_processes.append(hive)
    async with queen_of(hive_processes) as (queen, keeper):
        link = queen.hives.links[0]
        with trio.fail_after(60):
            worker = await done(keeper, WorkerSpawn(model=MODEL))
            sockets = HiveConfig(state_dir=tmp_path / "h", hive_id="h").worker_sockets
            # Peers that passed the handshake: this test as the queen's node, as the hive's
            # queen, and (with the hive's own key, which it reads from the hive's directory)
            # as the hive at its worker.
            hive_node = Trust.load(tmp_path / "h")
            targets = [
                (queen.listener.endpoint, NODE, ""),
                (hive.control, NODE, hive.key),
                (f"{sockets}.{worker['id']}", hive_node, ""),
            ]
            for endpoint, node, key in targets:
                async with await open_connection(endpoint, node=node, server_key=key) as attacker:
                    for _ in range(3):
                        for body in worst_bodies().values():
                            await attacker.send([HEADER, bytes([Kind.SUBMIT]), b"", body])
                    # Each is answered (refused) in turn: all of them were decoded, or refused.
                    for _ in range(3 * len(worst_bodies())):
                        reply = decode(await attacker.receive())
                        while not isinstance(reply, Error):  # the server's heartbeats
                            reply = decode(await attacker.receive())
                        assert reply.code is ErrorCode.INVALID_REQUEST
            await assert_serving(keeper)
            result = await done(keeper, SHORT)
            seen = await done(keeper, WorkerGet(worker=worker["id"]))
    assert result["worker"] == worker["id"]
    assert seen["state"] == "ready" and link.liveness is Liveness.LIVE


# ---- subscriptions: only the one our subscribers make, small ------------------------------------


class RawSubscriber:
    """A subscriber that speaks ZMTP 3.0 itself over a plain TCP socket, as an attacker may:
    libzmq's own SUB keeps what it subscribes to in a trie, and a 12 MiB topic overflows the
    stack of the process that sends it. It offers the NULL mechanism (no keys): a hive's
    publisher, a CURVE server, hangs up on it at the handshake."""

    def __init__(self, endpoint: str) -> None:
        host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        mechanism = b"NULL".ljust(20, b"\0")
        self.sock.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + mechanism + b"\0" * 32)
        name, value = b"Socket-Type", b"SUB"
        ready = b"\x05READY" + bytes([len(name)]) + name + len(value).to_bytes(4, "big") + value
        self.sock.sendall(b"\x04" + bytes([len(ready)]) + ready)

    def subscribe(self, topic: bytes) -> None:
        """Send a subscription (ZMTP 3.0: a message of 0x01 and the topic)."""
        body = b"\x01" + topic
        if len(body) < 256:
            self.sock.sendall(b"\x00" + bytes([len(body)]) + body)
        else:
            self.sock.sendall(b"\x02" + len(body).to_bytes(8, "big") + body)

    def received(self) -> bytes:
        """Whatever has arrived so far."""
        data = b""
        self.sock.setblocking(False)
        # Nothing more for now, or the peer hung up.
        with contextlib.suppress(BlockingIOError, ConnectionResetError):
            while chunk := self.sock.recv(65536):
                data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


@pytest.mark.slow
async def test_huge_and_many_subscriptions_neither_grow_nor_stall_a_hive(
    tmp_path: Path, hive_processes: list[HiveProcess]
) -> None:
    hive = HiveProcess(tmp_path / "h", "h")
    hive_processes.append(hive)
    attackers: list[RawSubscriber] = []
    try:
        async with (
            running_queen(
                "tcp://127.0.0.1:0", FAST_QUEEN, hives=[(hive.control, hive.key)]
            ) as queen,
            await open_subscriber() as everything,
        ):
            link = queen.hives.links[0]
            with trio.fail_after(60):
                await link.states.wait_value(lambda seq: seq > 2)
                before = hive.rss_bytes()
                # One 12 MiB subscription (past MAX_SUBSCRIPTION_BYTES: its connection goes),
                # and from two more, 1,000 distinct ones each: read and dropped, never kept. (The
                # hive reads what its pipe holds per publish, PUBSUB_HWM: a flood slows only its
                # own connection.)
                attackers = [
                    await trio.to_thread.run_sync(RawSubscriber, hive.heartbeats) for _ in range(3)
                ]
                with contextlib.suppress(OSError):  # the hive may cut it off mid-send
                    await trio.to_thread.run_sync(attackers[0].subscribe, b"x" * (12 * 2**20))
                async with trio.open_nursery() as nursery:
                    for attacker in attackers[1:]:
                        nursery.start_soon(trio.to_thread.run_sync, flood, attacker)
                await everything.connect(hive.heartbeats, hive.key)
                heard = [await everything.receive() for _ in range(3)]
                seq = link.states.value
                await link.states.wait_value(lambda now: now >= seq + 3)
                after = hive.rss_bytes()
                # The hive published on through it all: the queen never found it silent.
                assert link.liveness is Liveness.LIVE
                got = [attacker.received() for attacker in attackers[1:]]
    finally:
        for attacker in attackers:
            attacker.close()
    assert all(decode(frames).KIND is Kind.HEARTBEAT for frames in heard)
    # What a peer subscribed to a topic got: the handshake, and no heartbeat.
    assert all(b"RBEE" not in data for data in got)
    print(f"\nhive RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB", end="")
    assert after - before < 32 * 2**20
    assert hive.process.poll() is None


def flood(attacker: RawSubscriber) -> None:
    """1,000 distinct subscriptions, then one to a topic of our frames' first bytes (until the
    hive hangs up on a peer that did not pass the CURVE handshake)."""
    with contextlib.suppress(OSError):
        for n in range(1_000):
            attacker.subscribe(b"%060d" % n)
        attacker.subscribe(b"RBEE")


# ---- at most once: what arrives too late never runs ---------------------------------------------


@pytest.fixture
async def mem_queen(tmp_path: Path) -> AsyncIterator[Queen]:
    # In memory, every connection's frames reach the queen through one queue, in the order they
    # were sent: a frame sent after another is handled after it, whichever connection it is on.
    async with running_queen(memory_endpoint("queen"), FAST_QUEEN) as queen:
        yield queen


async def raw_client(queen: Queen, session: str) -> Any:
    connection = await open_connection(queen.listener.endpoint)
    ready = Ready(job_id="", sender="raw", role=Actor.KEEPER, session=session, ts=time.time())
    await connection.send(encode(ready))
    assert isinstance(decode(await connection.receive()), Ready)
    return connection


def ran(queen: Queen, op: str) -> list[dict[str, Any]]:
    return [j for j in queen.server.job_summaries(include_finished=True) if j["op"] == op]


async def test_a_submit_that_arrives_after_its_accept_by_is_refused_and_never_runs(
    mem_queen: Queen,
) -> None:
    with trio.fail_after(10):
        connection = await raw_client(mem_queen, "s-late")
        late = Submit(job_id="", ref="late", op=Ping(count=3), accept_by=time.time() - 1.0)
        await connection.send(encode(late))
        reply = decode(await connection.receive())
        while not isinstance(reply, Error):  # the queen's heartbeats
            reply = decode(await connection.receive())
        await connection.aclose()
    assert (reply.ref, reply.code, reply.started) == ("late", ErrorCode.TIMEOUT, False)
    assert "after its sender stopped waiting for it" in reply.message
    assert ran(mem_queen, "ping") == []


async def test_what_a_dropped_connection_sends_afterwards_never_runs(mem_queen: Queen) -> None:
    with trio.fail_after(10):
        silent = await raw_client(mem_queen, "s-silent")
        await silent.send(
            encode(Submit(job_id="", ref="long", op=Ping(count=10_000, interval_s=0.1)))
        )
        await mem_queen.server.job_count.wait_value(1)
        # It sends no heartbeat: the queen gives up on it and cancels its job.
        await mem_queen.server.job_count.wait_value(0)
        await silent.send(encode(Submit(job_id="", ref="stale", op=Ping(count=1))))
        async with open_keeper(mem_queen.listener.endpoint, FAST_KEEPER) as keeper:
            await assert_serving(keeper)  # handled after the stale SUBMIT
        # ...and the client is told to connect again (after what the queen sent it before).
        told = decode(await silent.receive())
        while not isinstance(told, Disconnect):
            told = decode(await silent.receive())
        await silent.aclose()
    assert told.reason == "this connection was dropped"
    pings = ran(mem_queen, "ping")
    assert [p["state"] for p in pings] == ["cancelled"]
    assert "sent nothing for 2 heartbeat intervals" in pings[0]["error"]


async def test_a_goodbye_with_the_longest_reason_ends_its_jobs_and_the_server_serves_on(
    mem_queen: Queen,
) -> None:
    with trio.fail_after(10):
        leaving = await raw_client(mem_queen, "s-verbose")
        await leaving.send(encode(Submit(job_id="", ref="r", op=Ping(count=10_000))))
        await mem_queen.server.job_count.wait_value(1)
        goodbye = Disconnect(job_id="", sender="raw", reason="x" * MAX_SENTENCE)
        await leaving.send(encode(goodbye))
        await mem_queen.server.job_count.wait_value(0)
        async with open_keeper(mem_queen.listener.endpoint, FAST_KEEPER) as keeper:
            await assert_serving(keeper)
        await leaving.aclose()
    [ping] = ran(mem_queen, "ping")
    assert ping["state"] == "cancelled"
    assert len(ping["error"]) == MAX_SENTENCE and ping["error"].endswith("x…")


async def test_a_client_that_beats_without_greeting_is_told_to_connect_again(
    mem_queen: Queen,
) -> None:
    """What a client of a server that restarted sends: the new server never heard its READY."""
    with trio.fail_after(10):
        connection = await open_connection(mem_queen.listener.endpoint)
        beat = Heartbeat(job_id="", sender="raw", seq=7, interval_s=0.2, ts=time.time())
        await connection.send(encode(beat))
        told = decode(await connection.receive())
        await connection.aclose()
    assert isinstance(told, Disconnect) and told.reason == "this connection was dropped"
    assert mem_queen.server.peer_count == 0


async def test_a_deadline_bound_submit_without_a_greeting_is_refused_and_never_runs(
    mem_queen: Queen,
) -> None:
    """What a client of a restarted server may have queued: a SUBMIT whose `accept_by` cannot
    be judged here (nothing is known of its sender's clock). Refused as not started."""
    with trio.fail_after(10):
        connection = await open_connection(mem_queen.listener.endpoint)
        stale = Submit(job_id="", ref="queued", op=Ping(count=3), accept_by=time.time() + 60)
        await connection.send(encode(stale))
        refused, told = decode(await connection.receive()), decode(await connection.receive())
        await connection.aclose()
    assert isinstance(refused, Error), refused
    assert (refused.ref, refused.code, refused.started) == ("queued", ErrorCode.UNAVAILABLE, False)
    assert isinstance(told, Disconnect)
    assert ran(mem_queen, "ping") == []


@pytest.mark.slow
async def test_a_queen_that_crashed_and_came_back_ends_the_jobs_it_lost(tmp_path: Path) -> None:
    """The keeper's job ran on a queen that was SIGKILLed; a new queen on the same port answers
    its heartbeats before the keeper could find the silence: the job still ends, at once."""
    mesh = clitools.Mesh(tmp_path)
    endpoint = f"tcp://127.0.0.1:{clitools.free_port()}"
    # Slow heartbeats: the keeper would take 3.5 x 5 s to give up on a silent queen.
    argv = ("queen", "start", "--foreground", "--bind", endpoint, "--heartbeat", "5")
    patient = replace(FAST_KEEPER, heartbeat_s=5.0, accept_timeout_s=10.0)
    queens = [mesh.popen(*argv)]
    try:
        with trio.fail_after(60):
            async with open_keeper(endpoint, patient, Trust.load(mesh.home)) as keeper:
                job = await keeper.submit(Ping(count=100_000, interval_s=0.01))
                async for message in job:
                    if isinstance(message, Narration):
                        break
                queens[0].kill()
                await trio.to_thread.run_sync(queens[0].wait)
                queens.append(mesh.popen(*argv))
                with trio.fail_after(10):  # well inside the 17.5 s silence would take
                    await finish(job)
                lost = error_of(job)
                await assert_serving(keeper)  # connected again, to the new queen
    finally:
        for queen in queens:
            queen.kill()
            queen.wait()
    assert lost.code is ErrorCode.UNAVAILABLE
    assert "ended the connection: this connection was dropped" in lost.message


async def test_a_newer_connection_of_a_session_ends_the_jobs_of_the_older(
    mem_queen: Queen,
) -> None:
    with trio.fail_after(10):
        older = await raw_client(mem_queen, "s-moved")
        await older.send(encode(Submit(job_id="", ref="r", op=Ping(count=10_000, interval_s=0.1))))
        await mem_queen.server.job_count.wait_value(1)
        newer = await open_connection(mem_queen.listener.endpoint)
        again = Ready(job_id="", sender="raw", role=Actor.KEEPER, session="s-moved", epoch=1)
        await newer.send(encode(again))
        await mem_queen.server.job_count.wait_value(0)
        await older.aclose()
        await newer.aclose()
    [ping] = ran(mem_queen, "ping")
    assert ping["state"] == "cancelled" and "superseded" in ping["error"]
