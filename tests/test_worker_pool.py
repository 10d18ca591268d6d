"""The hive's worker pool with real worker processes, a real tiny GGUF model and real sockets.

Nothing sleeps to synchronise: tests wait on the pool's `revision` (bumped on every change of a
worker's state) or on a pidfd, which becomes readable when a process exits (also a process that
is not our child), all under trio.fail_after.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgpack
import pytest
import trio

from rbee_mesh.actors.hive.worker_pool import WorkerPool, WorkerState, open_worker_pool
from rbee_mesh.actors.narration import JobContext, current_job
from rbee_mesh.actors.worker.worker import WorkerExit
from rbee_mesh.inference.gguf_file import write_tiny_gguf
from rbee_mesh.protocol import (
    Actor,
    ErrorCode,
    MeshError,
    Message,
    Narration,
    Ready,
    decode,
    encode,
)
from rbee_mesh.protocol.constants import SERVER_LOST_AFTER
from rbee_mesh.transport import EndpointError
from tests.keyed import NODE, open_connection

#: What a hive hands a worker it starts on its stdin: its key (this process's node's).
SECRET = NODE.keypair.secret.encode() + b"\n"
#: Short enough that liveness tests finish in about a second; real time throughout.
HEARTBEAT_S = 0.2


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # ipc:// paths are limited to 107 bytes; pytest's tmp_path for a long test name is not.
    path = Path(tempfile.mkdtemp(prefix="rbw-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def model(short_dir: Path) -> Path:
    return write_tiny_gguf(short_dir / "tiny.gguf")


@pytest.fixture
async def pool(short_dir: Path) -> AsyncIterator[WorkerPool]:
    async with open_worker_pool(
        f"ipc://{short_dir}/workers", heartbeat_s=HEARTBEAT_S, log_dir=short_dir / "logs"
    ) as p:
        yield p


def reaped(pid: int) -> bool:
    """True once `pid`, a child of this process, has exited and been reaped (not a zombie)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return not Path(f"/proc/{pid}").exists()
    return False


def children() -> set[int]:
    """Pids of this process's children, zombies included, whichever thread forked them."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        pids.update(int(pid) for pid in (task / "children").read_text().split())
    return pids


def running(pid: int) -> bool:
    """True if `pid` exists and is neither a zombie nor dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


async def wait_for_state(pool: WorkerPool, worker_id: str, state: WorkerState) -> None:
    await pool.revision.wait_value(lambda _: pool.get(worker_id).state is state)


async def wait_for_exit(pid: int) -> None:
    """Wait until process `pid` has exited, whoever its parent is (a pidfd works for any)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)


@pytest.mark.parametrize("sockets", ["files", "abstract"])
async def test_spawn_returns_once_the_worker_is_ready(
    sockets: str, model: Path, short_dir: Path
) -> None:
    prefix = f"ipc://{short_dir}/w" if sockets == "files" else f"ipc://@rbw-{short_dir.name}"
    async with open_worker_pool(prefix, heartbeat_s=HEARTBEAT_S) as pool:
        with trio.fail_after(20):
            record = await pool.spawn(model_id="tiny", model_path=model, device="cpu")
        assert record.state is WorkerState.READY
        assert record.id.startswith("w-") and len(record.id) == 10
        assert running(record.pid)
        assert record.info["pid"] == record.pid
        assert record.info["arch"] == "llama"
        assert record.info["params"] > 0
        assert record.model == "tiny" and record.device == "cpu"
        assert record.ready_at is not None and record.ready_at >= record.started
        assert [r.id for r in pool.list()] == [record.id]
        assert pool.workers_using("tiny") == [record.id]
        assert pool.workers_using("other") == []
        as_record = record.to_record()
        assert as_record["state"] == "ready"
        assert msgpack.unpackb(msgpack.packb(as_record)) == as_record
        # The worker serves its hive on a socket of its own, named by its id.
        assert (short_dir / f"w.{record.id}").exists() is (sockets == "files")


async def test_workers_serve_only_on_sockets_of_this_machine() -> None:
    with pytest.raises(EndpointError, match="not ipc://"):
        async with open_worker_pool("tcp://127.0.0.1:0"):
            pass


async def test_spawn_of_a_garbage_model_fails_with_the_workers_reason(
    pool: WorkerPool, short_dir: Path
) -> None:
    garbage = short_dir / "garbage.gguf"
    garbage.write_bytes(b"this is not a model\n" * 100)
    with trio.fail_after(20), pytest.raises(MeshError) as caught:
        await pool.spawn(model_id="garbage", model_path=garbage, device="cpu")
    error = caught.value
    assert error.code is ErrorCode.INVALID_REQUEST
    assert f"exited with code {int(WorkerExit.LOAD_FAILED)}" in error.message
    assert f"{garbage} is not a GGUF file" in error.message
    assert pool.list() == []


async def test_spawn_not_ready_in_time_is_killed_with_timeout(
    pool: WorkerPool, model: Path
) -> None:
    with trio.fail_after(20), pytest.raises(MeshError) as caught:
        await pool.spawn(model_id="tiny", model_path=model, device="cpu", ready_timeout_s=0.01)
    assert caught.value.code is ErrorCode.TIMEOUT
    assert "not ready within 0.01s" in caught.value.message
    pid = int(caught.value.message.split("(pid ")[1].split(")")[0])
    assert reaped(pid)
    assert pool.list() == []


async def test_cancelled_spawn_kills_and_reaps_the_worker(pool: WorkerPool, model: Path) -> None:
    before = children()
    # Cancelled while the worker is still starting (its imports alone take longer than this).
    with trio.move_on_after(0.05) as deadline:
        await pool.spawn(model_id="tiny", model_path=model, device="cpu")
    assert deadline.cancelled_caught
    assert pool.list() == []
    assert children() == before


async def test_spawn_and_delete_narrate_each_stage_into_the_job(
    pool: WorkerPool, model: Path
) -> None:
    emitted: list[Message] = []
    token = current_job.set(JobContext(job_id="job-1", actor="hive", emit=emitted.append))
    try:
        with trio.fail_after(20):
            record = await pool.spawn(model_id="tiny", model_path=model, device="cpu")
            await pool.delete(record.id)
    finally:
        current_job.reset(token)
    said = [(m.action, m.human) for m in emitted if isinstance(m, Narration)]
    assert [action for action, _ in said] == ["worker_spawn"] * 3 + ["worker_delete"] * 2
    assert said[0][1] == f"starting worker {record.id}: model tiny on cpu"
    assert f"started as pid {record.pid}; loading model tiny.gguf" in said[1][1]
    assert said[2][1].startswith(f"worker {record.id} ready in ")
    assert "sent DISCONNECT and SIGTERM" in said[3][1]
    assert said[4][1] == f"worker {record.id} stopped: deleted (exited with code 0)"


async def test_delete_stops_the_worker_and_reaps_it(pool: WorkerPool, model: Path) -> None:
    with trio.fail_after(20):
        record = await pool.spawn(model_id="tiny", model_path=model, device="cpu")
        final = await pool.delete(record.id)
    assert final.state is WorkerState.STOPPED
    assert final.exit_code == 0 and final.signal is None
    assert final.reason == "deleted (exited with code 0)"
    assert reaped(record.pid)
    assert pool.list() == []
    with pytest.raises(MeshError) as caught:
        pool.get(record.id)
    assert caught.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(MeshError) as caught:
        await pool.delete(record.id)
    assert caught.value.code is ErrorCode.NOT_FOUND


async def test_worker_killed_with_sigkill_is_marked_dead_with_the_signal(
    pool: WorkerPool, model: Path
) -> None:
    with trio.fail_after(20):
        record = await pool.spawn(model_id="tiny", model_path=model, device="cpu")
        os.kill(record.pid, signal.SIGKILL)
        await wait_for_state(pool, record.id, WorkerState.DEAD)
    dead = pool.get(record.id)
    assert dead.signal == "SIGKILL" and dead.exit_code is None
    assert dead.reason == "killed by SIGKILL"
    assert reaped(record.pid)
    assert pool.workers_using("tiny") == []
    # A dead worker stays listed (with its reason) until it is deleted.
    assert (await pool.delete(record.id)).state is WorkerState.DEAD
    assert pool.list() == []


async def test_exited_workers_are_listed_up_to_a_bound_the_oldest_forgotten_first(
    pool: WorkerPool, model: Path
) -> None:
    """A model that kills its worker on every job must not grow the list (and the heartbeat
    that carries it) without end."""
    pool.exited_kept = 1
    with trio.fail_after(30):
        older = await pool.spawn(model_id="tiny", model_path=model, device="cpu")
        newer = await pool.spawn(model_id="tiny", model_path=model, device="cpu")
        os.kill(older.pid, signal.SIGKILL)
        await wait_for_state(pool, older.id, WorkerState.DEAD)
        assert [w.id for w in pool.list()] == [older.id, newer.id]
        os.kill(newer.pid, signal.SIGKILL)
        await pool.revision.wait_value(lambda _: [w.id for w in pool.list()] == [newer.id])
    assert pool.get(newer.id).state is WorkerState.DEAD


async def test_worker_that_stops_heartbeating_is_declared_dead_and_killed(
    pool: WorkerPool, model: Path
) -> None:
    with trio.fail_after(20):
        record = await pool.spawn(model_id="tiny", model_path=model, device="cpu")
    # A stopped process sends nothing: exactly a hung worker, as far as the pool can tell.
    os.kill(record.pid, signal.SIGSTOP)
    with trio.fail_after(10 * HEARTBEAT_S + 5):
        await wait_for_state(pool, record.id, WorkerState.DEAD)
    dead = pool.get(record.id)
    # Lost after three silent intervals, or a check later on a loaded machine.
    lost = re.match(r"lost: it sent nothing for (\d+) heartbeat intervals", dead.reason)
    assert lost is not None and int(lost.group(1)) >= 3, dead.reason
    assert dead.signal == "SIGKILL"
    assert reaped(record.pid)


async def test_pool_exit_stops_and_reaps_every_worker(model: Path, short_dir: Path) -> None:
    async with open_worker_pool(f"ipc://{short_dir}/w", heartbeat_s=HEARTBEAT_S) as pool:
        with trio.fail_after(20):
            first = await pool.spawn(model_id="tiny", model_path=model, device="cpu")
            second = await pool.spawn(model_id="tiny", model_path=model, device="cpu")
    records = {r.id: r for r in pool.list()}
    for record in (first, second):
        final = records[record.id]
        assert final.state is WorkerState.STOPPED
        assert final.exit_code == 0
        assert final.reason == "the hive is stopping (exited with code 0)"
        assert reaped(record.pid)
    assert not {first.pid, second.pid} & children()
    # Each worker's socket went with it.
    assert not [name for name in os.listdir(short_dir) if name.startswith("w.")]


async def test_worker_exits_by_itself_when_no_hive_comes(model: Path, short_dir: Path) -> None:
    # No hive connects to this worker: it hears nothing, and must not linger.
    argv = [
        sys.executable,
        "-m",
        "rbee_mesh.actors.worker",
        "--listen",
        f"ipc://{short_dir}/nobody.sock",
        "--worker-id",
        "w-alone",
        "--model",
        str(model),
        "--device",
        "cpu",
        "--heartbeat-s",
        "0.1",
        "--patience-s",
        "0.25",
    ]
    with trio.fail_after(20):
        result = await trio.run_process(argv, stdin=SECRET, capture_stderr=True, check=False)
    assert result.returncode == WorkerExit.HIVE_LOST
    last_line = result.stderr.decode().strip().splitlines()[-1]
    silent = re.search(r"no hive came .* sent nothing for (\d+) heartbeat intervals", last_line)
    assert silent is not None and int(silent.group(1)) >= SERVER_LOST_AFTER, last_line


async def test_worker_exits_by_itself_when_its_hive_falls_silent(
    model: Path, short_dir: Path
) -> None:
    # A hive that said READY and then nothing more (hung): the worker gives up on it.
    endpoint = f"ipc://{short_dir}/quiet.sock"
    argv = [
        sys.executable, "-m", "rbee_mesh.actors.worker", "--listen", endpoint,
        "--worker-id", "w-quiet", "--model", str(model), "--device", "cpu",
        "--heartbeat-s", "0.1", "--patience-s", "0.25",
    ]  # fmt: skip
    async with trio.open_nursery() as nursery:
        done = trio.Event()
        results: list[subprocess.CompletedProcess[bytes]] = []

        async def run() -> None:
            done_process = await trio.run_process(
                argv, stdin=SECRET, capture_stderr=True, check=False
            )
            results.append(done_process)
            done.set()

        nursery.start_soon(run)
        async with await open_connection(endpoint) as connection:
            ready = Ready(job_id="", sender="h", role=Actor.HIVE, session="s1", ts=time.time())
            await connection.send(encode(ready))
            with trio.fail_after(20):
                assert isinstance(decode(await connection.receive()), Ready)
                await done.wait()
    [result] = results
    assert result.returncode == WorkerExit.HIVE_LOST
    last_line = result.stderr.decode().strip().splitlines()[-1]
    silent = re.search(r"it sent nothing for (\d+) heartbeat intervals", last_line)
    assert silent is not None and int(silent.group(1)) >= SERVER_LOST_AFTER, last_line


ORPHAN_PARENT = """
import sys
from pathlib import Path

import trio

from rbee_mesh.actors.hive.worker_pool import open_worker_pool


async def main(endpoint: str, model: str, logs: str) -> None:
    # A long heartbeat: the worker's own "hive is silent" exit cannot be what ends it here.
    async with open_worker_pool(endpoint, heartbeat_s=30.0, log_dir=Path(logs)) as pool:
        record = await pool.spawn(model_id="tiny", model_path=Path(model), device="cpu")
        print(record.pid, flush=True)
        await trio.sleep_forever()


trio.run(main, *sys.argv[1:])
"""


async def test_worker_dies_with_its_hive_when_the_hive_is_killed(
    model: Path, short_dir: Path
) -> None:
    parent = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-c",
            ORPHAN_PARENT,
            f"ipc://{short_dir}/w.sock",
            str(model),
            str(short_dir / "logs"),  # not the pool's own temporary one: kill -9 skips cleanup
        ],
        stdout=subprocess.PIPE,
    )
    worker_pid = 0
    try:
        assert parent.stdout is not None
        output = b""
        with trio.fail_after(30):
            while not output.endswith(b"\n"):
                chunk = await parent.stdout.receive_some()
                assert chunk, "the hive-like parent exited before printing its worker's pid"
                output += chunk
        worker_pid = int(output)
        assert running(worker_pid)
        parent.kill()  # SIGKILL: no cleanup code in the parent runs
        await parent.wait()
        # PR_SET_PDEATHSIG: the kernel SIGKILLs the worker at once, far inside its own 105 s
        # fallback (3.5 heartbeat intervals of 30 s).
        with trio.fail_after(3):
            await wait_for_exit(worker_pid)
        assert not running(worker_pid)
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        if worker_pid and running(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
