"""The `rbee-mesh` command as a person uses it: real processes, a real daemon, real signals."""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clitools import NARRATION_LINE, Mesh, free_port, json_events


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    return Mesh(tmp_path / "state")


@pytest.fixture
def daemon_queen(mesh: Mesh) -> Iterator[Mesh]:
    started = mesh.run("queen", "start", "--bind", "tcp://127.0.0.1:0")
    assert started.returncode == 0, started.stderr
    try:
        yield mesh
    finally:
        mesh.run("queen", "stop")


@pytest.mark.slow
def test_queen_daemon_starts_answers_and_stops(mesh: Mesh) -> None:
    started = mesh.run("--json", "queen", "start", "--bind", "tcp://127.0.0.1:0")
    assert started.returncode == 0, started.stderr
    record = json.loads(started.stdout)
    assert record["started"] is True
    info = json.loads((mesh.home / "queen.json").read_text())
    assert info["pid"] == record["pid"] and info["endpoint"] == record["endpoint"]
    assert (mesh.home / "queen.log").exists()

    status = mesh.run("queen", "status")
    assert status.returncode == 0, status.stderr
    assert info["endpoint"] in status.stdout

    again = mesh.run("queen", "start")
    assert again.returncode == 0 and "already running" in again.stdout

    stopped = mesh.run("queen", "stop")
    assert stopped.returncode == 0 and f"pid {info['pid']}" in stopped.stdout
    assert not (mesh.home / "queen.json").exists()
    after = mesh.run("queen", "status")
    assert after.returncode == 3 and "no queen is running" in after.stderr


@pytest.mark.slow
def test_narration_renders_as_actor_action_message_lines(daemon_queen: Mesh) -> None:
    result = daemon_queen.run("ping", "-n", "3")
    assert result.returncode == 0, result.stderr
    lines = [NARRATION_LINE.match(line) for line in result.stderr.splitlines()]
    assert all(lines), result.stderr
    assert [(m["actor"].strip(), m["action"].strip(), m["human"]) for m in lines if m] == [
        ("queen", "pong", f"pong {i}/3") for i in (1, 2, 3)
    ]
    assert "3 pong(s)" in result.stdout


@pytest.mark.slow
def test_json_output_is_one_object_per_event(daemon_queen: Mesh) -> None:
    result = daemon_queen.run("--json", "ping", "-n", "2")
    assert result.returncode == 0, result.stderr
    events = json_events(result.stdout)
    assert [e["event"] for e in events] == ["accepted", "narration", "narration", "done"]
    assert len({e["job_id"] for e in events}) == 1


@pytest.mark.slow
def test_status_and_jobs_list_show_the_mesh(daemon_queen: Mesh) -> None:
    status = daemon_queen.run("status")
    assert status.returncode == 0 and "queen" in status.stdout and "hives" in status.stdout
    listing = daemon_queen.run("--json", "jobs", "list")
    assert listing.returncode == 0
    done = json_events(listing.stdout)[-1]
    assert done["event"] == "done"
    assert {"status", "job_list"} <= {row["op"] for row in done["result"]}  # type: ignore[union-attr]


@pytest.mark.slow
def test_ctrl_c_cancels_the_job_it_started(daemon_queen: Mesh) -> None:
    proc = daemon_queen.popen("--json", "ping", "-n", "10000", "-i", "0.01")
    assert proc.stdout is not None
    accepted = json.loads(proc.stdout.readline())
    first_pong = json.loads(proc.stdout.readline())  # the job is running
    assert (accepted["event"], first_pong["event"]) == ("accepted", "narration")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 130
    assert json_events(out)[-1]["event"] == "cancelled"
    listing = daemon_queen.run("--json", "jobs", "list")
    rows = json_events(listing.stdout)[-1]["result"]
    states = {r["id"]: r["state"] for r in rows}  # type: ignore[union-attr]
    assert states[accepted["job_id"]] == "cancelled"


@pytest.mark.slow
def test_jobs_cancel_ends_another_keepers_job(daemon_queen: Mesh) -> None:
    proc = daemon_queen.popen("--json", "ping", "-n", "10000", "-i", "0.01")
    assert proc.stdout is not None
    accepted = json.loads(proc.stdout.readline())
    cancel = daemon_queen.run("jobs", "cancel", str(accepted["job_id"]))
    assert cancel.returncode == 0, cancel.stderr
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 130
    assert json_events(out)[-1]["event"] == "cancelled"


@pytest.mark.slow
def test_unreachable_queen_is_reported_within_seconds(mesh: Mesh) -> None:
    start = time.monotonic()
    result = mesh.run("--queen", f"tcp://127.0.0.1:{free_port()}", "status")
    assert time.monotonic() - start < 10
    assert result.returncode == 3
    assert "no answer from the queen" in result.stderr


def test_queen_env_variable_names_the_queen(mesh: Mesh) -> None:
    env = {**mesh.env, "RBEE_MESH_QUEEN": "mem://nobody"}
    result = subprocess.run(
        mesh.argv("status"), env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 3 and "mem://nobody" in result.stderr


def test_invalid_parameter_is_a_usage_error(mesh: Mesh) -> None:
    result = mesh.run("ping", "-n", "0")
    assert result.returncode == 2
    assert "count must be between 1 and 100000" in result.stderr


def test_malformed_queen_endpoint_is_a_clear_error(mesh: Mesh) -> None:
    result = mesh.run("--queen", "http://example", "status")
    assert result.returncode == 3
    assert "http://example" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_queen_start_on_a_busy_port_fails_clearly(mesh: Mesh) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = mesh.run("queen", "start", "--bind", f"tcp://127.0.0.1:{port}")
    assert result.returncode == 3
    assert "exited with code" in result.stderr and str(port) in result.stderr
    assert not (mesh.home / "queen.json").exists()


@pytest.mark.slow
def test_queen_start_serves_the_api_and_says_where(mesh: Mesh) -> None:
    started = mesh.run("queen", "start", "--bind", "tcp://127.0.0.1:0")
    try:
        assert started.returncode == 0, started.stderr
        info = json.loads((mesh.home / "queen.json").read_text())
        assert f"OpenAI-compatible API at {info['api']}" in started.stdout
        with urllib.request.urlopen(info["api"].removesuffix("/v1") + "/health", timeout=10) as r:
            assert json.loads(r.read())["status"] == "ok"
        status = mesh.run("--json", "status")
        assert json_events(status.stdout)[-1]["result"]["queen"]["api"] == info["api"]
    finally:
        mesh.run("queen", "stop")
    quiet = mesh.run("queen", "start", "--bind", "tcp://127.0.0.1:0", "--no-api")
    try:
        assert quiet.returncode == 0 and "API" not in quiet.stdout, quiet.stdout
        assert json.loads((mesh.home / "queen.json").read_text())["api"] == ""
    finally:
        mesh.run("queen", "stop")


@pytest.mark.slow
def test_an_api_port_in_use_fails_the_start_clearly(mesh: Mesh) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = mesh.run(
            "queen", "start", "--bind", "tcp://127.0.0.1:0", "--api", f"127.0.0.1:{port}"
        )
    assert result.returncode == 3
    assert f"the API cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert not (mesh.home / "queen.json").exists()


def test_a_malformed_api_address_is_a_usage_error(mesh: Mesh) -> None:
    result = mesh.run("queen", "start", "--api", "7834")
    assert result.returncode == 2 and "HOST:PORT" in result.stderr, result.stderr


@pytest.mark.slow
def test_demo_runs_an_integrated_mesh_offline(mesh: Mesh) -> None:
    result = mesh.run("demo", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "integrated mesh" in result.stderr
    # No hub here (conftest): it says so, and runs on random weights.
    assert "RANDOM weights" in result.stderr and "could not be fetched" in result.stderr
    assert not any(mesh.home.glob("*"))  # nothing in the user's state directory
    assert sum(bool(NARRATION_LINE.match(line)) for line in result.stderr.splitlines()) >= 10


@pytest.mark.slow
def test_levels_are_coloured_on_a_terminal_and_plain_in_a_pipe(mesh: Mesh) -> None:
    piped = mesh.run("demo", timeout=60)
    assert "\x1b[" not in piped.stderr
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            mesh.argv("demo"),
            env=mesh.env,
            stdout=subprocess.DEVNULL,
            stderr=terminal,
            stdin=subprocess.DEVNULL,
        )
        os.close(terminal)  # read until the demo closes its end, so the pty buffer never fills
        output = b""
        while chunk := _read_pty(controller):
            output += chunk
        proc.wait(timeout=60)
    finally:
        os.close(controller)
    assert proc.returncode == 0
    assert b"\x1b[31m\x1b[1merror: ping did not finish" in output  # the TIMEOUT step, red
    assert b"\x1b[33mcancelled:" in output  # the cancelled step, yellow


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the other side is closed and everything was read
        return b""


@pytest.mark.parametrize(
    "command",
    [
        [], ["demo"], ["status"], ["ping"], ["infer"], ["doctor"],
        ["jobs"], ["jobs", "list"], ["jobs", "cancel"],
        ["queen"], ["queen", "start"], ["queen", "stop"], ["queen", "status"],
        ["hive"], ["hive", "start"], ["hive", "stop"], ["hive", "status"], ["hive", "list"],
        ["hive", "get"],
        ["worker"], ["worker", "spawn"], ["worker", "list"], ["worker", "get"],
        ["worker", "delete"],
        ["model"], ["model", "download"], ["model", "list"], ["model", "get"],
        ["model", "delete"],
    ],
)  # fmt: skip
def test_every_command_has_help(mesh: Mesh, command: list[str]) -> None:
    result = mesh.run(*command, "--help")
    assert result.returncode == 0
    assert "Usage: rbee-mesh" in result.stdout
