"""Hive operations end to end: keeper -> queen -> hive (-> worker processes) and back.

Every mode the queen reaches a hive in: integrated (one process, in-memory transport), and a hive
over ipc or tcp. Hives that must die for real are processes of their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from rbee_mesh.actors.hive.hive import Hive, HiveConfig, running_hive
from rbee_mesh.actors.jobclient import ClientJob, JobClient
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.mesh import integrated_hive_config, memory_endpoint, running_queen
from rbee_mesh.actors.queen.hives import HiveLink
from rbee_mesh.actors.queen.queen import Queen
from rbee_mesh.inference.gguf_file import write_tiny_gguf
from rbee_mesh.protocol import (
    Data,
    Done,
    Error,
    ErrorCode,
    HiveGet,
    HiveList,
    HiveStatus,
    Liveness,
    Message,
    ModelDelete,
    ModelDownload,
    ModelGet,
    ModelList,
    Narration,
    Operation,
    Ping,
    WorkerDelete,
    WorkerGet,
    WorkerList,
    WorkerSpawn,
)
from tests import hub as fake_hub
from tests.conftest import FAST_KEEPER, FAST_QUEEN, bind_endpoint, queen_address
from tests.keyed import pair

hub = fake_hub.hub

MODEL_REPO = "rbee-test/tiny-llama-GGUF"
MODEL_FILE = "tiny-llama.Q4_K_M.gguf"
MODEL_ID = f"{MODEL_REPO}:{MODEL_FILE}"


@dataclass
class HiveMesh:
    queen: Queen
    keeper: JobClient
    hive: Hive | None  # None in the integrated mode, where the queen owns it

    @property
    def link(self) -> HiveLink:
        return self.queen.hives.links[0]

    async def run(self, op: Operation, timeout_s: float | None = None) -> ClientJob:
        job = await self.keeper.submit(op, timeout_s=timeout_s)
        async for _ in job:
            pass
        return job

    async def result(self, op: Operation) -> Any:
        job = await self.run(op)
        assert isinstance(job.terminal, Done), job.terminal
        return job.terminal.result


def hive_config(transport: str, tmp_path: Path) -> HiveConfig:
    return HiveConfig(
        state_dir=tmp_path / "hive-state",
        hive_id="hive-a",
        control=bind_endpoint(transport, tmp_path),
        heartbeats=bind_endpoint(transport, tmp_path),
        server=FAST_QUEEN,
    )


@pytest.fixture(params=["integrated", "ipc", "tcp"])
async def mesh(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[HiveMesh]:
    mode = str(request.param)
    with trio.fail_after(20):
        if mode == "integrated":
            local = integrated_hive_config(tmp_path / "hive-state", FAST_QUEEN)
            async with (
                running_queen(memory_endpoint("queen"), FAST_QUEEN, integrated_hive=local) as queen,
                open_keeper(queen_address(queen), FAST_KEEPER) as keeper,
            ):
                yield HiveMesh(queen, keeper, None)
            return
        async with (
            running_hive(hive_config(mode, tmp_path)) as hive,
            running_queen(
                bind_endpoint(mode, tmp_path), FAST_QUEEN, hives=[hive.server.listener.endpoint]
            ) as queen,
            open_keeper(queen_address(queen), FAST_KEEPER) as keeper,
        ):
            await queen.hives.links[0].heard.wait()
            yield HiveMesh(queen, keeper, hive)


@pytest.fixture
def tiny_model(hub: fake_hub.FakeHub, tmp_path: Path) -> bytes:
    data = write_tiny_gguf(tmp_path / MODEL_FILE).read_bytes()
    hub.add_file(MODEL_REPO, MODEL_FILE, data)
    return data


async def test_hive_is_listed_live_with_its_cpu(mesh: HiveMesh) -> None:
    with trio.fail_after(10):
        rows = await mesh.result(HiveList())
        detail = await mesh.result(HiveGet(hive=mesh.link.name))
    assert [(r["hive"], r["liveness"]) for r in rows] == [(mesh.link.name, "live")]
    assert rows[0]["heartbeat_age_s"] is not None and rows[0]["heartbeat_age_s"] < 5
    assert "cpu" in rows[0]["devices"]
    cpu = next(d for d in detail["devices"] if d["id"] == "cpu")
    assert cpu["cores"] >= 1 and cpu["memory_total"] > cpu["memory_free"] > 0


async def test_hive_status_is_answered_by_the_hive_itself(mesh: HiveMesh) -> None:
    with trio.fail_after(10):
        job = await mesh.keeper.submit(HiveStatus(hive=mesh.link.name))
        events = [m async for m in job]
    assert isinstance(job.terminal, Done)
    assert job.terminal.result["hive"] == mesh.link.name
    assert {"devices", "workers", "models"} <= set(job.terminal.result)
    narration = [e for e in events if isinstance(e, Narration)]
    assert narration and all(n.actor == "hive" and n.hive_id == mesh.link.name for n in narration)


async def test_ping_pinned_to_a_hive_narrates_from_the_hive(mesh: HiveMesh) -> None:
    with trio.fail_after(10):
        job = await mesh.keeper.submit(Ping(count=3, hive=mesh.link.name))
        pongs = [m.human for m in [m async for m in job] if isinstance(m, Narration)]
    assert pongs == ["pong 1/3", "pong 2/3", "pong 3/3"]


async def test_unknown_hive_is_not_found(mesh: HiveMesh) -> None:
    with trio.fail_after(10):
        job = await mesh.run(Ping(hive="no-such-hive"))
    assert isinstance(job.terminal, Error) and job.terminal.code is ErrorCode.NOT_FOUND
    assert "no-such-hive" in job.terminal.message


async def test_model_download_streams_progress_and_lands_in_the_catalog(
    mesh: HiveMesh, tiny_model: bytes
) -> None:
    with trio.fail_after(30):
        job = await mesh.keeper.submit(ModelDownload(model=MODEL_REPO))
        events: list[Message] = [m async for m in job]
        listed = await mesh.result(ModelList())
        entry = await mesh.result(ModelGet(model=MODEL_ID))
    assert isinstance(job.terminal, Done), job.terminal
    assert job.terminal.result["status"] == "available"
    assert job.terminal.result["size"] == len(tiny_model)
    progress = [e.record for e in events if isinstance(e, Data)]
    assert progress and progress[-1]["bytes"] == len(tiny_model)
    assert any(isinstance(e, Narration) and "Q4_K_M" in e.human for e in events)
    assert [(r["hive"], r["id"], r["status"]) for r in listed] == [
        (mesh.link.name, MODEL_ID, "available")
    ]
    assert entry["sha256"] is not None


@pytest.mark.slow
async def test_worker_lifecycle_through_the_queen(mesh: HiveMesh, tiny_model: bytes) -> None:
    with trio.fail_after(60):
        await mesh.result(ModelDownload(model=MODEL_ID))
        spawn = await mesh.run(WorkerSpawn(model=MODEL_ID, device="cpu"))
        assert isinstance(spawn.terminal, Done), spawn.terminal
        worker = spawn.terminal.result
        listed = await mesh.result(WorkerList())
        got = await mesh.result(WorkerGet(worker=worker["id"]))
        refused = await mesh.run(ModelDelete(model=MODEL_ID))
        deleted = await mesh.result(WorkerDelete(worker=worker["id"]))
        after = await mesh.result(WorkerList())
        removed = await mesh.result(ModelDelete(model=MODEL_ID))
    assert worker["state"] == "ready" and worker["model"] == MODEL_ID
    assert [(r["hive"], r["id"], r["state"]) for r in listed] == [
        (mesh.link.name, worker["id"], "ready")
    ]
    assert got["pid"] == worker["pid"]
    assert isinstance(refused.terminal, Error) and refused.terminal.code is ErrorCode.CONFLICT
    assert worker["id"] in refused.terminal.message
    assert deleted["state"] == "stopped"
    assert not _alive(worker["pid"])
    assert after == []
    assert removed["deleted"] is True


@pytest.mark.slow
async def test_worker_that_dies_is_shown_dead_in_list_and_narration(
    mesh: HiveMesh, tiny_model: bytes
) -> None:
    with trio.fail_after(60):
        await mesh.result(ModelDownload(model=MODEL_ID))
        worker = await mesh.result(WorkerSpawn(model=MODEL_ID))
        pidfd = os.pidfd_open(worker["pid"])
        os.kill(worker["pid"], signal.SIGKILL)
        await trio.lowlevel.wait_readable(pidfd)  # the worker has exited
        os.close(pidfd)
        while True:  # the hive reaps it on its own schedule: ask until it says so
            job = await mesh.keeper.submit(WorkerList())
            events = [m async for m in job]
            assert isinstance(job.terminal, Done)
            if job.terminal.result[0]["state"] == "dead":
                break
            await trio.sleep(0.05)
    row = job.terminal.result[0]
    assert row["signal"] == "SIGKILL" or "SIGKILL" in str(row["reason"])
    warnings = [e.human for e in events if isinstance(e, Narration) and e.level == "warn"]
    assert any(worker["id"] in w and "SIGKILL" in w for w in warnings), warnings


async def test_worker_spawn_of_a_model_not_in_the_catalog_is_not_found(mesh: HiveMesh) -> None:
    with trio.fail_after(10):
        job = await mesh.run(WorkerSpawn(model="nobody/nothing:x.gguf"))
    assert isinstance(job.terminal, Error) and job.terminal.code is ErrorCode.NOT_FOUND


@pytest.mark.parametrize("mode", ["tcp"])
async def test_cancel_at_the_queen_cancels_the_job_on_the_hive(mode: str, tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with (
            running_hive(hive_config(mode, tmp_path)) as hive,
            running_queen(
                bind_endpoint(mode, tmp_path), FAST_QUEEN, hives=[hive.server.listener.endpoint]
            ) as queen,
            open_keeper(queen_address(queen), FAST_KEEPER) as keeper,
        ):
            await queen.hives.links[0].heard.wait()
            job = await keeper.submit(Ping(count=10_000, interval_s=0.01, hive=hive.id))
            async for message in job:
                if isinstance(message, Narration):
                    await job.cancel("enough")
            await hive.server.job_count.wait_value(0)
    assert job.terminal is not None and job.terminal.KIND.name == "CANCELLED"


async def test_two_hives_list_operations_merge_and_spawn_asks_to_choose(tmp_path: Path) -> None:
    configs = [
        HiveConfig(
            state_dir=tmp_path / name,
            hive_id=name,
            control=bind_endpoint("tcp", tmp_path),
            heartbeats=bind_endpoint("tcp", tmp_path),
            server=FAST_QUEEN,
        )
        for name in ("hive-a", "hive-b")
    ]
    with trio.fail_after(20):
        async with (
            running_hive(configs[0]) as a,
            running_hive(configs[1]) as b,
            running_queen(
                bind_endpoint("tcp", tmp_path),
                FAST_QUEEN,
                hives=[a.server.listener.endpoint, b.server.listener.endpoint],
            ) as queen,
            open_keeper(queen_address(queen), FAST_KEEPER) as keeper,
        ):
            for link in queen.hives.links:
                await link.heard.wait()
            mesh = HiveMesh(queen, keeper, None)
            rows = await mesh.result(HiveList())
            pongs = await mesh.run(WorkerList())
            spawn = await mesh.run(WorkerSpawn(model=MODEL_ID))
    assert sorted(r["hive"] for r in rows) == ["hive-a", "hive-b"]
    assert isinstance(pongs.terminal, Done) and pongs.terminal.result == []
    assert isinstance(spawn.terminal, Error) and spawn.terminal.code is ErrorCode.INVALID_REQUEST
    assert "choose one with --hive" in spawn.terminal.message


# ---- a hive that dies for real --------------------------------------------------------------


def start_hive_process(state: Path, control: str, heartbeats: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RBEE_MESH_HOME": str(state)}
    argv = [
        sys.executable,
        "-m",
        "rbee_mesh",
        "hive",
        "start",
        "--foreground",
        "--id",
        "hive-p",
        "--bind",
        control,
        "--heartbeat-bind",
        heartbeats,
        "--heartbeat",
        "0.5",  # margin for a loaded machine: a worker starting competes for the CPU
    ]
    return subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["ipc", "tcp"])
async def test_hive_killed_is_lost_its_jobs_end_hive_lost_and_it_comes_back(
    transport: str, tmp_path: Path, tiny_model: bytes
) -> None:
    """kill -9 a hive process: suspect, then lost; its running job ends with HIVE_LOST and its
    worker (killed with it) shows unreachable; a new hive on the same endpoints is live again."""
    control = bind_endpoint(transport, tmp_path).replace(":0", f":{_free_port()}")
    heartbeats = bind_endpoint(transport, tmp_path).replace(":0", f":{_free_port()}")
    key = pair(tmp_path / "state")  # the hive process obeys this test's queen
    process = start_hive_process(tmp_path / "state", control, heartbeats)
    try:
        linked = [(control, key)]
        async with (
            running_queen(bind_endpoint(transport, tmp_path), FAST_QUEEN, hives=linked) as queen,
            open_keeper(queen_address(queen), FAST_KEEPER) as keeper,
        ):
            mesh = HiveMesh(queen, keeper, None)
            link = mesh.link
            with trio.fail_after(30):
                await link.heard.wait()
                await mesh.result(ModelDownload(model=MODEL_ID))
                worker = await mesh.result(WorkerSpawn(model=MODEL_ID))
                await link.watch.wait_value(Liveness.LIVE)
                # The queen knows the hive's workers from its heartbeats: one after the spawn.
                await link.states.wait_value(lambda _: bool(link.workers))
                job = await keeper.submit(Ping(count=100_000, interval_s=0.01, hive="hive-p"))
                async for message in job:
                    if isinstance(message, Narration):
                        break
                process.send_signal(signal.SIGKILL)
                await link.watch.wait_value(Liveness.SUSPECT)
                await link.watch.wait_value(Liveness.LOST)
                async for _ in job:
                    pass
                seen = await mesh.result(HiveGet(hive="hive-p"))
                process.wait()
                process = start_hive_process(tmp_path / "state", control, heartbeats)
                await link.watch.wait_value(Liveness.LIVE)
                back = await mesh.result(HiveList())
    finally:
        process.kill()
        process.wait()
    assert isinstance(job.terminal, Error) and job.terminal.code is ErrorCode.HIVE_LOST
    assert seen["liveness"] == "lost"
    assert [w["state"] for w in seen["workers"]] == ["unreachable"]
    assert not _alive(worker["pid"])  # the worker died with its hive (PR_SET_PDEATHSIG)
    assert [r["liveness"] for r in back] == ["live"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
