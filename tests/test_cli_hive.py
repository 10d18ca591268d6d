"""Hives from the command line: daemons, the integrated mode, models and workers, real processes."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbee_mesh.actors.keeper import systemd
from rbee_mesh.inference.gguf_file import write_tiny_gguf
from tests import hub as fake_hub
from tests.clitools import NARRATION_LINE, Mesh, free_port, json_events

hub = fake_hub.hub

pytestmark = pytest.mark.slow

MODEL_REPO = "rbee-test/tiny-llama-GGUF"
MODEL_ID = f"{MODEL_REPO}:tiny-llama.Q4_K_M.gguf"


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    return Mesh(tmp_path / "state")


@pytest.fixture
def tiny_model(hub: fake_hub.FakeHub, tmp_path: Path) -> None:
    data = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    hub.add_file(MODEL_REPO, "tiny-llama.Q4_K_M.gguf", data)


@pytest.fixture
def local_mesh(mesh: Mesh, tiny_model: None) -> Iterator[Mesh]:
    """A queen daemon with its hive in the same process (the integrated mode), whose hive
    downloads from the loopback hub (so the hub fixture must come first)."""
    started = mesh.run("queen", "start", "--bind", "tcp://127.0.0.1:0", "--integrated")
    assert started.returncode == 0, started.stderr
    try:
        yield mesh
    finally:
        mesh.run("queen", "stop")


def result(mesh: Mesh, *args: str) -> object:
    """Run a command with --json; return the DONE result (and fail on anything else)."""
    done = mesh.run("--json", *args)
    events = json_events(done.stdout)
    assert done.returncode == 0 and events[-1]["event"] == "done", (done.stdout, done.stderr)
    return events[-1]["result"]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_hive_daemon_starts_answers_and_stops(mesh: Mesh) -> None:
    started = mesh.run(
        "hive", "start", "--id", "box-1", "--bind", "tcp://127.0.0.1:0",
        "--heartbeat-bind", "tcp://127.0.0.1:0",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    info = json.loads((mesh.home / "hive.json").read_text())
    assert info["ident"] == "box-1"

    status = mesh.run("hive", "status")
    assert status.returncode == 0, status.stderr
    assert "hive box-1" in status.stdout and "cpu" in status.stdout

    stopped = mesh.run("hive", "stop")
    assert stopped.returncode == 0
    assert not alive(info["pid"])
    after = mesh.run("hive", "status")
    assert after.returncode == 3 and "no hive is running" in after.stderr


def test_a_systemd_unit_where_no_user_manager_runs_is_refused_and_auto_starts_a_daemon(
    mesh: Mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No user manager answers here: its socket would be in this (empty) runtime directory, and
    # no session bus leads to one.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    unit = systemd.unit_path("hive")
    was = unit.exists()
    ports = ("--bind", "tcp://127.0.0.1:0", "--heartbeat-bind", "tcp://127.0.0.1:0")
    refused = mesh.run("hive", "start", "--service", "systemd", *ports)
    assert refused.returncode == 3, refused.stderr
    assert "cannot run the hive as a systemd user unit" in refused.stderr
    assert not (mesh.home / "hive.json").exists() and unit.exists() == was
    both = mesh.run("hive", "start", "--foreground", "--service", "auto", *ports)
    assert both.returncode == 2 and "takes no --service" in both.stderr

    started = mesh.run("--json", "hive", "start", "--service", "auto", *ports)
    try:
        assert started.returncode == 0, started.stderr
        record = json_events(started.stdout)[-1]
        assert record["service"] == "daemon" and record["not_systemd_because"]
        assert alive(record["pid"]) and unit.exists() == was
    finally:
        assert mesh.run("hive", "stop").returncode == 0


@pytest.mark.parametrize("how", ["flag", "config"])
def test_queen_manages_a_hive_named_by_flag_or_config(mesh: Mesh, how: str) -> None:
    assert (
        mesh.run(
            "hive",
            "start",
            "--id",
            "box-2",
            "--bind",
            "tcp://127.0.0.1:0",
            "--heartbeat-bind",
            "tcp://127.0.0.1:0",
        ).returncode
        == 0
    )
    endpoint = json.loads((mesh.home / "hive.json").read_text())["endpoint"]
    peer = endpoint.removeprefix("tcp://")  # HOST:PORT
    try:
        if how == "config":
            (mesh.home / "config.toml").write_text(f'[queen]\npeers = ["{peer}"]\n')
            queen = mesh.run("queen", "start", "--bind", "tcp://127.0.0.1:0")
        else:
            queen = mesh.run("queen", "start", "--bind", "tcp://127.0.0.1:0", "--peer", peer)
        assert queen.returncode == 0, queen.stderr
        rows = result(mesh, "hive", "list")
        assert isinstance(rows, list)
        source = "static" if how == "flag" else "config"
        assert [(r["hive"], r["source"], r["endpoint"]) for r in rows] == [
            ("box-2", source, endpoint)
        ]
        assert rows[0]["liveness"] in ("live", "connecting")
    finally:
        mesh.run("queen", "stop")
        mesh.run("hive", "stop")


def test_a_hive_that_serves_already_joins_a_queen_and_goes_live(tmp_path: Path) -> None:
    """The queen connects as soon as it takes the join: the hive must trust it by then (its
    refusal would end libzmq's tries for good, and the queen would wait "connecting")."""
    queen, far = Mesh(tmp_path / "queen"), Mesh(tmp_path / "hive")
    hive_args = ("--id", "late", "--bind", f"tcp://127.0.0.1:{free_port()}",
                 "--heartbeat-bind", f"tcp://127.0.0.1:{free_port()}")  # fmt: skip
    assert queen.run("queen", "start", "--no-api", "--bind", "tcp://127.0.0.1:0").returncode == 0
    try:
        assert far.run("hive", "start", *hive_args).returncode == 0
        token = result(queen, "queen", "invite", "--address", "127.0.0.1")["token"]  # type: ignore[index]
        joined = subprocess.run(
            far.argv("hive", "start", *hive_args, "--join", "-"), input=f"{token}\n",
            env=far.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert joined.returncode == 0 and "already running" in joined.stdout, joined.stderr
        deadline = time.monotonic() + 30
        while (rows := result(queen, "hive", "list")) and rows[0]["liveness"] != "live":  # type: ignore[index]
            assert time.monotonic() < deadline, rows
            time.sleep(0.1)  # another process's state: polled, within a deadline
        trusted = json.loads((tmp_path / "hive" / "trust.json").read_text())
        assert [t["name"] for t in trusted if t["role"] == "queen"] != ["queen-being-joined"]
    finally:
        far.run("hive", "stop")
        queen.run("queen", "stop")


def test_a_malformed_peer_is_refused_before_the_queen_starts(mesh: Mesh) -> None:
    refused = mesh.run("queen", "start", "--peer", "box:99999")
    assert refused.returncode == 2 and "'box:99999'" in refused.stderr
    assert not (mesh.home / "queen.json").exists()


def test_integrated_mode_downloads_spawns_and_stops_without_leftovers(local_mesh: Mesh) -> None:
    rows = result(local_mesh, "hive", "list")
    assert isinstance(rows, list) and [(r["source"], r["liveness"]) for r in rows] == [
        ("integrated", "live")
    ]

    download = local_mesh.run("model", "download", MODEL_REPO)
    assert download.returncode == 0, download.stderr
    lines = [NARRATION_LINE.match(line) for line in download.stderr.splitlines()]
    assert any(m and m["action"].strip() == "download" for m in lines), download.stderr
    assert "available" in download.stdout

    spawned = result(local_mesh, "worker", "spawn", "-m", MODEL_ID)
    assert isinstance(spawned, dict) and spawned["state"] == "ready"
    assert alive(spawned["pid"])
    listed = local_mesh.run("worker", "list")
    assert spawned["id"] in listed.stdout and "ready" in listed.stdout

    refused = local_mesh.run("model", "delete", MODEL_ID)
    assert refused.returncode == 1 and spawned["id"] in refused.stderr

    local_mesh.run("queen", "stop")
    assert not alive(spawned["pid"])  # stopping the mesh stopped and reaped its worker


def test_hive_killed_takes_its_workers_with_it(local_mesh: Mesh) -> None:
    queen_pid = json.loads((local_mesh.home / "queen.json").read_text())["pid"]
    assert local_mesh.run("model", "download", MODEL_ID).returncode == 0
    spawned = result(local_mesh, "worker", "spawn", "-m", MODEL_ID)
    assert isinstance(spawned, dict)
    pidfd = os.pidfd_open(spawned["pid"])  # not our child: a pidfd is how to wait for it
    try:
        os.kill(queen_pid, signal.SIGKILL)
        ready, _, _ = select.select([pidfd], [], [], 10)
    finally:
        os.close(pidfd)
    assert ready, "the worker outlived its killed hive by 10 s"


def test_doctor_says_what_is_wrong_and_what_to_do(mesh: Mesh) -> None:
    no_queen = mesh.run("--json", "doctor", "--no-discovery")
    checks = {c["check"]: c for c in json_events(no_queen.stdout)}
    assert no_queen.returncode == 1
    assert not checks["queen"]["ok"] and "queen start" in str(checks["queen"]["advice"])

    assert mesh.run("queen", "start", "--bind", "tcp://127.0.0.1:0").returncode == 0
    try:
        lonely = mesh.run("--json", "doctor", "--no-discovery")
        checks = {c["check"]: c for c in json_events(lonely.stdout)}
        assert lonely.returncode == 1 and checks["queen"]["ok"]
        assert not checks["hives"]["ok"] and "--peer" in str(checks["hives"]["advice"])
        assert checks["mdns"]["message"].startswith("skipped")  # type: ignore[union-attr]
        human = mesh.run("doctor", "--no-discovery")
        assert "PROBLEM  hives" in human.stdout and "->" in human.stdout
    finally:
        mesh.run("queen", "stop")
