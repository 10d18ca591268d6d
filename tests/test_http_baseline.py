"""The HTTP + SSE baseline of the benchmarks: real queen, hive and worker processes on loopback.

One queen and one hive serve the whole module (starting them is most of its time); each test
leaves the hive as it found it, without workers. Waits are bounded by trio.fail_after.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from benchmarks.http_baseline import HttpJobFailed, HttpKeeper, start_server, stop_server
from rbee_mesh.inference.gguf_file import write_tiny_gguf

REPO_ROOT = Path(__file__).resolve().parent.parent
HIVE_ID = "hive-a"


@dataclass(frozen=True)
class Baseline:
    queen_url: str
    hive_url: str


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models")
    write_tiny_gguf(models / "tiny.gguf", seed=7, context_length=2048)
    (models / "junk.gguf").write_bytes(b"GGUF but not really" * 100)
    return models


@pytest.fixture(scope="module")
def baseline(models: Path) -> Iterator[Baseline]:
    processes: list[subprocess.Popen[bytes]] = []
    try:
        hive, hive_url = start_server(
            "hive", "--port", "0", "--id", HIVE_ID, "--model-dir", str(models), cwd=REPO_ROOT
        )
        processes.append(hive)
        queen, queen_url = start_server("queen", "--port", "0", "--hive", hive_url, cwd=REPO_ROOT)
        processes.append(queen)
        yield Baseline(queen_url, hive_url)
    finally:
        for process in reversed(processes):
            stop_server(process)


def gone(pid: int) -> bool:
    """True once process `pid` (not our child: the hive's) has exited and been reaped."""
    return not Path(f"/proc/{pid}").exists()


async def test_worker_list_of_a_new_hive_is_empty(baseline: Baseline) -> None:
    seen: list[tuple[str, Any]] = []
    with trio.fail_after(10):
        async with HttpKeeper(baseline.queen_url) as keeper:
            result, events = await keeper.run(
                {"op": "worker_list"}, on_event=lambda e, data: seen.append((e, json.loads(data)))
            )
    assert result == []
    assert events == 1
    [(event, narration)] = seen
    assert event == "narration"
    assert narration["actor"] == "hive"
    assert narration["human"] == f"0 worker(s) on hive {HIVE_ID}"


async def test_ping_relays_every_pong_in_order_then_done(baseline: Baseline) -> None:
    pongs: list[str] = []
    with trio.fail_after(10):
        async with HttpKeeper(baseline.queen_url) as keeper:
            result, events = await keeper.run(
                {"op": "ping", "count": 1000},
                on_event=lambda e, data: pongs.append(json.loads(data)["human"]),
            )
    assert result["count"] == 1000
    assert events == 1000
    assert pongs == [f"pong {i}/1000" for i in range(1, 1001)]


async def test_unknown_operation_is_refused_as_invalid(baseline: Baseline) -> None:
    with trio.fail_after(10):
        async with HttpKeeper(baseline.queen_url) as keeper:
            with pytest.raises(HttpJobFailed) as failed:
                await keeper.run({"op": "launch_rockets"})
            assert failed.value.code == "INVALID_REQUEST"
            assert "launch_rockets" in failed.value.message
            with pytest.raises(HttpJobFailed) as failed:
                await keeper.run({"op": "ping", "count": "many"})
            assert failed.value.code == "INVALID_REQUEST"


async def test_job_failures_arrive_as_error_events(baseline: Baseline) -> None:
    with trio.fail_after(10):
        async with HttpKeeper(baseline.queen_url) as keeper:
            with pytest.raises(HttpJobFailed) as failed:
                await keeper.run({"op": "infer", "prompt": "hello", "max_tokens": 4})
            assert failed.value.code == "UNAVAILABLE"
            assert "no idle worker" in failed.value.message
            with pytest.raises(HttpJobFailed) as failed:
                await keeper.run({"op": "worker_spawn", "model": "missing.gguf"})
            assert failed.value.code == "NOT_FOUND"
            with pytest.raises(HttpJobFailed) as failed:
                await keeper.run({"op": "ping", "hive": "hive-b"})
            assert failed.value.code == "NOT_FOUND"


async def test_events_emitted_before_the_stream_is_opened_are_kept(baseline: Baseline) -> None:
    with trio.fail_after(10):
        async with httpx2.AsyncClient(base_url=baseline.hive_url, trust_env=False) as client:
            accepted = await client.post("/v1/jobs", json={"op": "ping", "count": 3})
            assert accepted.status_code == 202
            stream_url = accepted.json()["sse_url"]
            # Another whole job runs first: the ping has long ended when its stream is opened.
            async with HttpKeeper(baseline.hive_url) as keeper:
                await keeper.run({"op": "worker_list"})
            response = await client.get(stream_url)
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [block.split("\n")[0] for block in response.text.split("\n\n") if block]
            assert events == ["event: narration"] * 3 + ["event: done"]
            # The job is forgotten once its stream has been taken.
            again = await client.get(stream_url)
            assert again.status_code == 404
            assert again.json()["code"] == "NOT_FOUND"


@pytest.mark.slow
async def test_worker_spawn_list_infer_delete(baseline: Baseline) -> None:
    tokens: list[dict[str, Any]] = []
    with trio.fail_after(60):
        async with HttpKeeper(baseline.queen_url) as keeper:
            worker, _ = await keeper.run({"op": "worker_spawn", "model": "tiny.gguf"})
            try:
                assert worker["state"] == "ready"
                assert worker["model"] == "tiny.gguf"
                listed, _ = await keeper.run({"op": "worker_list"})
                assert [(w["id"], w["pid"], w["state"]) for w in listed] == [
                    (worker["id"], worker["pid"], "ready")
                ]

                op = {"op": "infer", "prompt": "Once upon a time", "max_tokens": 32, "seed": 1}
                result, events = await keeper.run(
                    op, on_event=lambda e, data: tokens.append({"event": e, **json.loads(data)})
                )
                generated = [t for t in tokens if t["event"] == "token"]
                assert 1 <= len(generated) <= 32
                assert [t["seq"] for t in generated] == list(range(len(generated)))
                assert result["usage"]["generated_tokens"] == len(generated)
                assert result["text"] == "".join(t["text"] for t in generated)
                assert result["worker"] == worker["id"]
                assert events == len(tokens)

                # The same seed gives the same text.
                again, _ = await keeper.run(op)
                assert again["text"] == result["text"]
            finally:
                deleted, _ = await keeper.run({"op": "worker_delete", "worker": worker["id"]})
            assert deleted["state"] == "dead"
            assert gone(worker["pid"])
            listed, _ = await keeper.run({"op": "worker_list"})
            assert listed == []


def test_start_server_reports_a_server_that_exits_before_listening() -> None:
    # No --id nor --model-dir: argparse refuses (exit code 2).
    with pytest.raises(RuntimeError, match="exited with code 2 before listening"):
        start_server("hive", "--port", "0", cwd=REPO_ROOT)


@pytest.mark.slow
async def test_a_worker_that_cannot_load_its_model_fails_the_spawn(baseline: Baseline) -> None:
    with trio.fail_after(60):
        async with HttpKeeper(baseline.queen_url) as keeper:
            with pytest.raises(HttpJobFailed) as failed:
                await keeper.run({"op": "worker_spawn", "model": "junk.gguf"})
            assert failed.value.code == "UNAVAILABLE"
            assert "cannot load junk.gguf" in failed.value.message
            listed, _ = await keeper.run({"op": "worker_list"})
            assert listed == []


@pytest.mark.slow
async def test_a_stopping_hive_stops_its_workers(models: Path) -> None:
    hive, hive_url = start_server(
        "hive", "--port", "0", "--id", "hive-b", "--model-dir", str(models), cwd=REPO_ROOT
    )
    try:
        with trio.fail_after(60):
            async with HttpKeeper(hive_url) as keeper:
                worker, _ = await keeper.run({"op": "worker_spawn", "model": "tiny.gguf"})
    finally:
        stop_server(hive)
    assert hive.returncode == -signal.SIGTERM
    assert gone(worker["pid"])
