"""`rbee-mesh jobs watch` and `infer --detach` as a person uses them, and a queen daemon that
remembers its jobs across a SIGKILL: real processes, a real model file, the daemon's journal."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.actors.records import LOST_WITH_THE_QUEEN
from rbee_mesh.inference.gguf_file import write_tiny_gguf
from tests.clitools import Mesh, free_port, json_events

pytestmark = pytest.mark.slow

MODEL = "rbee-test/tiny-GGUF:tiny.gguf"
#: A job that runs for a second or two (a worker to spawn, then some 3,000 tokens a second): a
#: watcher started as soon as it is listed joins mid-way or just after its end, and must print
#: the same bytes either way (tests/test_watch.py joins a running job in one process, surely).
LONG = ["infer", "-m", MODEL, "-n", "3000", "-t", "0", "Once upon a time"]


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path / "state")
    catalog = Catalog(m.home / "hive" / "models")
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", context_length=4096)
    catalog.add_file("rbee-test/tiny-GGUF", "tiny.gguf", tiny)
    started = m.run("queen", "start", "--bind", "tcp://127.0.0.1:0", "--integrated")
    assert started.returncode == 0, started.stderr
    try:
        yield m
    finally:
        m.run("queen", "stop")


def running_job(mesh: Mesh, op: str, deadline_s: float = 60) -> str:
    """The id of a running job of `op` at the queen, as `jobs list` shows it (polled)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        listed = mesh.run("--json", "jobs", "list", "--running", timeout=30)
        rows = json_events(listed.stdout)[-1]["result"]
        ids = [r["id"] for r in rows if r["op"] == op]  # type: ignore[union-attr]
        if ids:
            return str(ids[0])
    raise AssertionError(f"no {op} job ran within {deadline_s}s")


def test_a_watcher_prints_byte_for_byte_what_the_submitter_printed(mesh: Mesh) -> None:
    submitter = mesh.popen(*LONG)
    try:
        job_id = running_job(mesh, "infer")
        live = mesh.run("jobs", "watch", job_id, timeout=120)
        out, err = submitter.communicate(timeout=120)
    finally:
        submitter.kill()
    replay = mesh.run("jobs", "watch", job_id, timeout=60)  # finished: the whole record
    assert submitter.returncode == 0, err
    assert len(out) > 1000
    assert (live.returncode, live.stdout) == (0, out)
    assert (replay.returncode, replay.stdout) == (0, out)
    assert "3000 tokens in" in live.stderr  # how it went, on stderr, as the submitter saw it


def test_infer_detach_prints_the_job_id_and_the_job_runs_on_to_be_watched(mesh: Mesh) -> None:
    alone = mesh.run("infer", "-m", MODEL, "-n", "200", "-t", "0", "Hi", timeout=120)
    detached = mesh.run("infer", "--detach", "-m", MODEL, "-n", "200", "-t", "0", "Hi")
    assert alone.returncode == 0 and detached.returncode == 0, detached.stderr
    job_id = detached.stdout.strip()
    assert job_id.startswith("job-") and f"jobs watch {job_id}" in detached.stderr
    watched = mesh.run("jobs", "watch", job_id, timeout=120)
    assert (watched.returncode, watched.stdout) == (0, alone.stdout)


def test_detach_without_a_queen_is_a_usage_error(tmp_path: Path) -> None:
    result = Mesh(tmp_path / "state").run("infer", "--detach", "Hi")
    assert result.returncode == 2
    assert "--detach needs a queen" in result.stderr


def test_a_watch_of_an_unknown_job_is_not_found(mesh: Mesh) -> None:
    result = mesh.run("jobs", "watch", "job-000000000000")
    assert result.returncode == 4
    assert "no job job-000000000000" in result.stderr


def test_a_queen_killed_and_started_again_remembers_its_jobs_and_ends_those_it_lost(
    tmp_path: Path,
) -> None:
    mesh = Mesh(tmp_path / "state")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    argv = ("queen", "start", "--foreground", "--bind", endpoint, "--no-api")
    queens = [mesh.popen(*argv)]
    keeper: subprocess.Popen[str] | None = None
    try:
        done = run_until_answered(mesh, endpoint, "--json", "ping", "-n", "3")
        finished = str(json_events(done.stdout)[0]["job_id"])
        keeper = mesh.popen("--queen", endpoint, "--json", "ping", "-n", "100000", "-i", "0.01")
        assert keeper.stdout is not None
        lost = str(json.loads(keeper.stdout.readline())["job_id"])  # its ACCEPTED
        queens[0].kill()
        queens[0].wait(timeout=30)
        assert keeper.wait(timeout=30) == 3  # the keeper saw its queen go: UNAVAILABLE
        queens.append(mesh.popen(*argv))
        listed = run_until_answered(mesh, endpoint, "--json", "jobs", "list")
        result = json_events(listed.stdout)[-1]["result"]
        rows = {r["id"]: r for r in result}  # type: ignore[union-attr]
        assert rows[finished]["state"] == "done"
        assert rows[lost]["state"] == "failed" and LOST_WITH_THE_QUEEN in rows[lost]["error"]
        again = mesh.run("--queen", endpoint, "jobs", "watch", finished)
        assert again.returncode == 0 and "3 pong(s) in" in again.stdout
        pongs = [line for line in again.stderr.splitlines() if ": pong " in line]
        assert pongs == [f"[queen     ] pong            : pong {n}/3" for n in (1, 2, 3)]
        gone = mesh.run("--queen", endpoint, "jobs", "watch", lost)
        assert gone.returncode == 3 and "the queen stopped (killed or crashed)" in gone.stderr
    finally:
        for proc in [*queens, *([keeper] if keeper else [])]:
            proc.kill()
            proc.wait()


def run_until_answered(mesh: Mesh, endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a command against the queen at `endpoint` once it answers (it is starting)."""
    end = time.monotonic() + 30
    while True:
        result = mesh.run("--queen", endpoint, *args, timeout=30)
        if result.returncode != 3 or time.monotonic() > end:
            assert result.returncode == 0, result.stderr
            return result
