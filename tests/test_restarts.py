"""Restarts of real daemons on loopback: a queen killed with SIGKILL and started again, a hive
killed mid-job and started again. Nothing is left running without an owner, nothing hangs, and
the mesh comes back by itself, with the same worker processes.

Each daemon is a `rbee-mesh ... start` as a person runs it, at the default heartbeat interval:
what is bounded here (3 s to find a killed hive) is what the mesh promises by default
(docs/reliability.md). No event crosses processes, so the tests poll the queen, or wait on a
pidfd, under a deadline.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.inference.gguf_file import write_tiny_gguf
from tests.clitools import Mesh, free_port, json_events

pytestmark = pytest.mark.slow

MODEL_REPO, MODEL_FILE = "rbee-test/tiny-GGUF", "tiny.gguf"
MODEL = f"{MODEL_REPO}:{MODEL_FILE}"
HIVE = "box"
#: Tokens of a job that runs for longer than any wait of these tests.
LONG = "4000"
#: A hive killed mid-job is found lost, and its job ended HIVE_LOST, within this (issue 14).
HIVE_LOST_WITHIN_S = 3.0


@dataclass
class Daemons:
    """A queen and a hive daemon on loopback: one state directory (the hive a static peer), or
    two (the hive joined the queen with a token)."""

    queen: Mesh
    hive: Mesh
    joined: bool
    queen_bind: str
    hive_bind: str
    heartbeat_bind: str

    def start_queen(self) -> None:
        peer = [] if self.joined else ["--peer", self.hive_bind.removeprefix("tcp://")]
        started = self.queen.run(
            "queen", "start", "--bind", self.queen_bind, "--no-discovery", "--no-api", *peer,
            timeout=60,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr

    def start_hive(self, *args: str) -> None:
        started = self.hive.run(
            "hive", "start", "--id", HIVE, "--bind", self.hive_bind,
            "--heartbeat-bind", self.heartbeat_bind, *args, timeout=60,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr

    def pid(self, what: str) -> int:
        home = self.queen.home if what == "queen" else self.hive.home
        return int(json.loads((home / f"{what}.json").read_text())["pid"])

    def result(self, *args: str, timeout: float = 60) -> Any:
        """`rbee-mesh --json ARGS` through the queen: the DONE event's result."""
        done = self.queen.run("--json", *args, timeout=timeout)
        events = json_events(done.stdout)
        assert done.returncode == 0 and events[-1]["event"] == "done", (done.stdout, done.stderr)
        return events[-1]["result"]

    def wait_live(self, timeout: float) -> None:
        """Poll `hive list` until the hive is live (a bounded number of times)."""
        deadline = time.monotonic() + timeout
        rows: Any = None
        while time.monotonic() < deadline:
            rows = self.result("hive", "list")
            if [r["liveness"] for r in rows if r["hive"] == HIVE] == ["live"]:
                return
            time.sleep(0.1)
        raise AssertionError(f"hive {HIVE} not live within {timeout} s: {rows}")


@pytest.fixture(params=["static", "joined"])
def daemons(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Daemons]:
    # Wide enough that LONG tokens take seconds (~15 s on this machine), past any wait here.
    gguf = write_tiny_gguf(
        tmp_path / MODEL_FILE, context_length=4096, embedding_length=256,
        feed_forward_length=1024, block_count=4, head_count=4, head_count_kv=4,
    )  # fmt: skip
    joined = request.param == "joined"
    queen = Mesh(tmp_path / "queen")
    hive = Mesh(tmp_path / "hive") if joined else queen
    Catalog(hive.home / "hive" / "models").add_file(MODEL_REPO, MODEL_FILE, gguf)
    d = Daemons(
        queen, hive, joined, f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}",
        f"tcp://127.0.0.1:{free_port()}",
    )  # fmt: skip
    try:
        d.start_queen()
        if joined:
            invite = d.result("queen", "invite", "--address", "127.0.0.1")
            d.start_hive("--join", invite["token"])
        else:
            d.start_hive()
        d.wait_live(timeout=30)
        yield d
    finally:
        for mesh, what in ((queen, "queen"), (hive, "hive")):
            mesh.run(what, "stop", timeout=30)


def wait_exit(pid: int, timeout: float) -> bool:
    """Whether process `pid` (not necessarily our child) exits within `timeout` seconds."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    return bool(ready)


def read_event(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The next --json event a keeper process prints, or fail after `timeout` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"the keeper printed nothing for {timeout} s"
    line = proc.stdout.readline()
    assert line, f"the keeper exited: {proc.stderr.read() if proc.stderr else ''}"
    return dict(json.loads(line))


def kill_queen(d: Daemons) -> None:
    pid = d.pid("queen")
    os.kill(pid, signal.SIGKILL)
    assert wait_exit(pid, 10)


def test_a_queen_killed_and_started_again_has_its_hive_live_with_the_same_workers(
    daemons: Daemons,
) -> None:
    d = daemons
    spawned = d.result("worker", "spawn", "-m", MODEL)
    first = d.result("infer", "-m", MODEL, "--max-tokens", "4", "Hello")
    assert first["worker"] == spawned["id"]

    kill_queen(d)
    restarted = time.monotonic()
    d.start_queen()  # the hive is linked again: named by --peer, or trusted since its join
    d.wait_live(timeout=10)
    print(f"\nhive live {time.monotonic() - restarted:.2f} s after `queen start`", end="")

    workers = d.result("worker", "list")
    after = d.result("infer", "-m", MODEL, "--max-tokens", "4", "Hello")
    assert [(w["id"], w["pid"], w["state"]) for w in workers] == [
        (spawned["id"], spawned["pid"], "ready")
    ]
    assert after["worker"] == spawned["id"]  # adopted: no new spawn
    assert [w["pid"] for w in d.result("worker", "list")] == [spawned["pid"]]


def test_a_job_running_on_a_hive_when_its_queen_died_ends_there_and_frees_its_slot(
    daemons: Daemons,
) -> None:
    d = daemons
    spawned = d.result("worker", "spawn", "-m", MODEL, "--slots", "1")
    keeper = d.queen.popen(
        "--json", "infer", "-m", MODEL, "--max-tokens", LONG, "--temperature", "0", "Hello"
    )
    try:
        while read_event(keeper, 60)["event"] != "token":
            pass  # it generates on the worker
        kill_queen(d)
        out, err = keeper.communicate(timeout=30)  # the keeper does not hang on a dead queen
    finally:
        keeper.kill()
        keeper.communicate()
    assert keeper.returncode != 0
    last = json_events(out)[-1]
    assert last["event"] == "error" and last["code"] == "UNAVAILABLE", (out, err)

    d.start_queen()
    d.wait_live(timeout=10)
    # The hive ended the job itself (its queen silent): nothing runs there for nobody.
    jobs = [j for j in d.result("hive", "status", HIVE)["jobs"] if j["id"] == last["job_id"]]
    # Its only slot is free: the next job on that worker runs to the end.
    after = d.result("infer", "-m", MODEL, "--max-tokens", "4", "--worker", spawned["id"], "Hi")
    assert [j["state"] for j in jobs] == ["cancelled"], jobs
    assert after["worker"] == spawned["id"] and after["usage"]["generated_tokens"] == 4


def test_a_hive_killed_mid_job_is_lost_within_3_s_takes_its_workers_and_rejoins(
    daemons: Daemons,
) -> None:
    d = daemons
    queen_pid = d.pid("queen")
    spawned = d.result("worker", "spawn", "-m", MODEL)
    keeper = d.queen.popen("--json", "ping", "--hive", HIVE, "-n", "100000", "-i", "0.01")
    try:
        while read_event(keeper, 60)["event"] != "narration":
            pass  # pongs stream from the hive
        hive_pid = d.pid("hive")
        os.kill(hive_pid, signal.SIGKILL)
        killed = time.monotonic()
        while (event := read_event(keeper, 30))["event"] == "narration":
            pass  # pongs already on their way
        lost_after = time.monotonic() - killed
        keeper.communicate(timeout=30)
    finally:
        keeper.kill()
        keeper.communicate()
    print(f"\njob ended {event.get('code')} {lost_after:.2f} s after the hive was killed", end="")
    assert event["event"] == "error" and event["code"] == "HIVE_LOST", event
    assert lost_after < HIVE_LOST_WITHIN_S
    assert wait_exit(hive_pid, 10)
    assert wait_exit(spawned["pid"], 10), "the worker outlived its killed hive"

    d.start_hive()  # the same queen, not restarted, links it again
    d.wait_live(timeout=10)
    pong = d.queen.run("ping", "--hive", HIVE, "-n", "2", timeout=30)
    assert pong.returncode == 0, pong.stderr
    assert d.pid("queen") == queen_pid and not wait_exit(queen_pid, 0)


#: A stall of the hive twice as long as its queen and its workers used to allow (3.5 and 2.5
#: intervals of 0.5 s): its queen finds it lost, its workers wait for it (WORKER_PATIENCE_S).
STALL_S = 4.0


def test_a_hive_stopped_for_seconds_comes_back_with_its_workers(daemons: Daemons) -> None:
    d = daemons
    spawned = d.result("worker", "spawn", "-m", MODEL)
    hive_pid = d.pid("hive")
    os.kill(hive_pid, signal.SIGSTOP)
    try:
        # The stall is the fault: it must last, and nothing else can make it.
        assert not wait_exit(spawned["pid"], STALL_S), "the worker left its stalled hive"
    finally:
        os.kill(hive_pid, signal.SIGCONT)
    d.wait_live(timeout=10)
    after = d.result("infer", "-m", MODEL, "--max-tokens", "4", "Hello")
    assert after["worker"] == spawned["id"]
    assert [(w["pid"], w["state"]) for w in d.result("worker", "list")] == [
        (spawned["pid"], "ready")
    ]
