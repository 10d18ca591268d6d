"""`rbee-mesh hive install HOST`, `hive uninstall HOST` and `hive start/stop/status --ssh HOST`,
as a person runs them, against a real sshd on loopback for a user of its own (tests/sshd.py):
rbee-mesh installed there from this checkout, upgraded in place, its hive started and joined to
this queen, running a job, stopped, removed; and each failure with its own exit code."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rbee_mesh import __version__
from rbee_mesh.actors.keeper.exits import (
    EXIT_HOST_KEY,
    EXIT_HOST_UNREACHABLE,
    EXIT_INSTALL_FAILED,
    EXIT_NO_PYTHON,
    EXIT_NOT_FOUND,
    EXIT_PORT_IN_USE,
    EXIT_SSH_REFUSED,
    EXIT_UNAVAILABLE,
)
from rbee_mesh.inference.gguf_file import write_tiny_gguf
from tests import hub as fake_hub
from tests.clitools import Mesh, free_port
from tests.sshd import Sshd, make_key, running_sshd, user_manager

pytestmark = pytest.mark.slow

hub = fake_hub.hub
REPO = "rbee-test/tiny-llama-GGUF"


@pytest.fixture(scope="module")
def box() -> Iterator[Sshd]:
    with running_sshd() as sshd:
        yield sshd


def rbee(tmp_path: Path, box: Sshd, *args: str, config: Path | None = None, timeout: float = 600):
    mesh = Mesh(tmp_path / "state")
    return mesh.run(*args, "--ssh-config", str(config or box.config), timeout=timeout)


def installed(box: Sshd) -> Path:
    return box.home / ".local" / "share" / "rbee-mesh"


def test_install_runs_there_upgrades_in_place_and_uninstall_removes_it(
    box: Sshd, tmp_path: Path
) -> None:
    first = rbee(tmp_path, box, "--json", "hive", "install", "testbox", "--offline")
    assert first.returncode == 0, first.stderr
    events = [json.loads(line) for line in first.stdout.splitlines()]
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == ["connect", "python", "build", "download", "copy", "venv", "install", "verify"]
    assert events[-1]["version"] == f"rbee-mesh, version {__version__}"
    venv = installed(box) / "venv"
    assert events[-1]["path"] == str(installed(box))
    assert venv.stat().st_uid == (box.home / ".ssh").stat().st_uid  # the user's, not root's
    [package] = venv.glob("lib/python3*/site-packages/rbee_mesh/__init__.py")
    before = (venv / "pyvenv.cfg").stat().st_ino, package.stat().st_ino

    again = rbee(tmp_path, box, "hive", "install", "testbox", "--offline")
    assert again.returncode == 0, again.stderr
    assert f"installed on testbox in {installed(box)}" in again.stdout
    [package] = venv.glob("lib/python3*/site-packages/rbee_mesh/__init__.py")
    after = (venv / "pyvenv.cfg").stat().st_ino, package.stat().st_ino
    assert after[0] == before[0] and after[1] != before[1]  # same venv, rbee-mesh replaced

    removed = rbee(tmp_path, box, "--json", "hive", "uninstall", "testbox")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout.splitlines()[-1])["removed"] is True
    assert not installed(box).exists() and (box.home / ".ssh").is_dir()
    nothing = rbee(tmp_path, box, "hive", "uninstall", "testbox")
    assert nothing.returncode == 0 and "was not installed" in nothing.stdout


def test_install_takes_the_dependencies_from_the_remotes_package_index(
    box: Sshd, tmp_path: Path
) -> None:
    """Without --offline pip there reads its own index: here one on loopback over real HTTP
    (a directory of the wheels, as PEP 503 lays it out), and no pip config of the machine's."""
    with (
        package_index(tmp_path / "index") as index,
        box.environment(PIP_INDEX_URL=index, PIP_CONFIG_FILE="/dev/null"),
    ):
        done = rbee(tmp_path, box, "--json", "hive", "install", "testbox")
    try:
        assert done.returncode == 0, done.stderr
        steps = [json.loads(line).get("step") for line in done.stdout.splitlines()]
        assert "download" not in steps and "install" in steps
        assert json.loads(done.stdout.splitlines()[-1])["version"].endswith(__version__)
    finally:
        rbee(tmp_path, box, "hive", "uninstall", "testbox")


@contextlib.contextmanager
def package_index(root: Path) -> Iterator[str]:
    """A package index of rbee-mesh's dependencies, served on 127.0.0.1: its URL."""
    wheels = root / "wheels"
    here = Path(__file__).resolve().parents[1]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(here)], check=True)
    [ours] = wheels.glob("rbee_mesh-*.whl")
    subprocess.run([*pip, "download", "--only-binary=:all:", "-d", str(wheels), str(ours)],
                   check=True)  # fmt: skip
    for wheel in wheels.glob("*.whl"):
        project = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        (root / "simple" / project).mkdir(parents=True, exist_ok=True)
        shutil.copy(wheel, root / "simple" / project / wheel.name)
    handler = functools.partial(_QuietFiles, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # pip's requests are not the test's output


def test_an_unreachable_host_exits_10(box: Sshd, tmp_path: Path) -> None:
    done = rbee(tmp_path, box, "hive", "install", f"{box.user}@127.0.0.1:{free_port()}")
    assert done.returncode == EXIT_HOST_UNREACHABLE
    assert "cannot reach" in done.stderr and "[unreachable]" in done.stderr


def test_a_refused_key_exits_11(box: Sshd, tmp_path: Path) -> None:
    config = box.client_config(tmp_path, key=make_key(tmp_path / "k"), known_hosts=box.known_hosts)
    done = rbee(tmp_path, box, "hive", "install", "testbox", config=config)
    assert done.returncode == EXIT_SSH_REFUSED
    assert "refused every key" in done.stderr


def test_an_unknown_host_key_exits_12_naming_it(box: Sshd, tmp_path: Path) -> None:
    (tmp_path / "known_hosts").write_text("")
    config = box.client_config(tmp_path, key=box.key, known_hosts=tmp_path / "known_hosts")
    done = rbee(tmp_path, box, "--json", "hive", "install", "testbox", config=config)
    assert done.returncode == EXIT_HOST_KEY
    error = json.loads(done.stdout.splitlines()[-1])
    assert error["code"] == "host-key-unknown" and box.fingerprint() in error["message"]


def test_no_python3_there_exits_13(box: Sshd, tmp_path: Path) -> None:
    with box.environment(PATH="/nonexistent"):
        done = rbee(tmp_path, box, "hive", "install", "testbox")
    assert done.returncode == EXIT_NO_PYTHON
    assert "has no python3" in done.stderr and "3.11" in done.stderr


def test_a_failed_install_exits_14_with_what_pip_said(box: Sshd, tmp_path: Path) -> None:
    # An index that refuses at once, and no pip config of the machine's: nothing leaves it.
    unreachable = {"PIP_INDEX_URL": f"http://127.0.0.1:{free_port()}/simple",
                   "PIP_CONFIG_FILE": "/dev/null", "PIP_RETRIES": "0"}  # fmt: skip
    with box.environment(**unreachable):
        done = rbee(tmp_path, box, "hive", "install", "testbox")
    assert done.returncode == EXIT_INSTALL_FAILED
    assert "pip install failed on testbox" in done.stderr
    assert "No matching distribution" in done.stderr or "Could not find" in done.stderr


def test_a_hive_started_over_ssh_joins_this_queen_runs_a_job_and_stops_leaving_no_process(
    box: Sshd, tmp_path: Path, hub: fake_hub.FakeHub
) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    hub.add_file(REPO, "tiny-llama.Q8_0.gguf", (tmp_path / "tiny.gguf").read_bytes())
    mesh = Mesh(tmp_path / "state")
    queen = mesh.run("queen", "start", "--no-discovery", "--no-api", "--bind",
                     f"tcp://127.0.0.1:{free_port()}")  # fmt: skip
    assert queen.returncode == 0, queen.stderr
    try:
        ssh = ("--ssh-config", str(box.config))
        assert (
            mesh.run("hive", "install", "testbox", "--offline", *ssh, timeout=600).returncode == 0
        )
        hive = ("--bind", f"tcp://127.0.0.1:{free_port()}",
                "--heartbeat-bind", f"tcp://127.0.0.1:{free_port()}")  # fmt: skip
        # The hive there looks for no queen on the LAN, and for models on the test's hub.
        there = {"RBEE_MESH_DISCOVERY": "0", "HF_ENDPOINT": hub.endpoint,
                 "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
        with box.environment(**there):
            started = mesh.run("--json", "hive", "start", "--ssh", "testbox", "--id", "far-hive",
                               *hive, *ssh, timeout=120)  # fmt: skip
        assert started.returncode == 0, started.stderr
        record = json.loads(started.stdout.splitlines()[-1])
        assert (record["hive"], record["queen_address"]) == ("far-hive", "127.0.0.1")
        assert record["service"] == "daemon"  # (no systemd user manager there; one is tested below)
        assert "no systemd user manager" in record["not_systemd_because"]
        wait_until_live(mesh, "far-hive")
        pulled = mesh.run("model", "download", REPO, "--hive", "far-hive", timeout=120)
        assert pulled.returncode == 0, pulled.stderr
        inferred = mesh.run("--json", "infer", "-m", REPO, "--hive", "far-hive", "-n", "8",
                            "--seed", "1", "Once upon a time", timeout=120)  # fmt: skip
        assert inferred.returncode == 0, inferred.stderr
        done = json.loads(inferred.stdout.splitlines()[-1])["result"]
        assert done["usage"]["generated_tokens"] > 0 and done["worker"]
        assert (box.home / ".local" / "state" / "rbee-mesh" / "hive").is_dir()  # the user's

        running = mesh.run("--json", "hive", "status", "--ssh", "testbox", *ssh)
        assert running.returncode == 0, running.stderr
        said = json.loads(running.stdout.splitlines()[-1])
        assert said["version"] == f"rbee-mesh, version {__version__}" and said["running"]

        stopped = mesh.run("hive", "stop", "--ssh", "testbox", *ssh)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
        assert live_processes(box.user) == []
        assert mesh.run("hive", "status", "--ssh", "testbox", *ssh).returncode == EXIT_UNAVAILABLE

        # Uninstalling stops a hive that runs from it first.
        with box.environment(**there):
            again = mesh.run("hive", "start", "--ssh", "testbox", *hive, *ssh, timeout=120)
        assert again.returncode == 0, again.stderr
        assert live_processes(box.user) != []
        assert mesh.run("hive", "uninstall", "testbox", *ssh).returncode == 0
        assert live_processes(box.user) == [] and not installed(box).exists()
    finally:
        mesh.run("queen", "stop")
        mesh.run("hive", "uninstall", "testbox", "--ssh-config", str(box.config))


def test_where_a_systemd_user_manager_runs_the_hive_is_a_unit_that_restarts_it_and_stop_removes(
    box: Sshd, tmp_path: Path
) -> None:
    mesh = Mesh(tmp_path / "state")
    ssh = ("--ssh-config", str(box.config))
    queen = mesh.run("queen", "start", "--no-discovery", "--no-api", "--bind",
                     f"tcp://127.0.0.1:{free_port()}")  # fmt: skip
    assert queen.returncode == 0, queen.stderr
    unit = box.home / ".config" / "systemd" / "user" / "rbee-mesh-hive.service"
    state = box.home / ".local" / "state" / "rbee-mesh"
    try:
        assert (
            mesh.run("hive", "install", "testbox", "--offline", *ssh, timeout=600).returncode == 0
        )
        with user_manager(box) as session, box.environment(RBEE_MESH_DISCOVERY="0", **session):
            started = mesh.run("--json", "hive", "start", "--ssh", "testbox", "--id", "unit-hive",
                               "--bind", f"tcp://127.0.0.1:{free_port()}", "--heartbeat-bind",
                               f"tcp://127.0.0.1:{free_port()}", *ssh, timeout=120)  # fmt: skip
            assert started.returncode == 0, started.stderr
            record = json.loads(started.stdout.splitlines()[-1])
            assert (record["service"], record["not_systemd_because"]) == ("systemd", None)
            assert unit.stat().st_mode & 0o077 == 0  # the user's alone
            assert '"RBEE_MESH_DISCOVERY=0"' in unit.read_text()  # the shell's settings
            assert hive_pids(box.user) == [record["pid"]]
            wait_until_live(mesh, "unit-hive")

            os.kill(record["pid"], signal.SIGKILL)  # systemd starts it again
            deadline = time.monotonic() + 60
            while hive_pids(box.user) in ([], [record["pid"]]) and time.monotonic() < deadline:
                time.sleep(0.1)  # (systemd's restart: another process, a bounded poll)
            assert len(hive_pids(box.user)) == 1 and hive_pids(box.user) != [record["pid"]]
            wait_until_live(mesh, "unit-hive")

            stopped = mesh.run("--json", "hive", "stop", "--ssh", "testbox", *ssh)
            assert stopped.returncode == 0, stopped.stderr
            assert hive_pids(box.user) == [] and not unit.exists()
            assert not (state / "hive.json").exists()
    finally:
        mesh.run("queen", "stop")
        mesh.run("hive", "uninstall", "testbox", *ssh)


def hive_pids(user: str) -> list[int]:
    """The live rbee-mesh processes of `user`."""
    return [pid for pid, args in live_processes(user) if "rbee_mesh" in args or "rbee-mesh" in args]


def test_a_port_in_use_there_exits_15_and_a_box_without_rbee_mesh_4(
    box: Sshd, tmp_path: Path
) -> None:
    mesh = Mesh(tmp_path / "state")
    ssh = ("--ssh-config", str(box.config))
    assert mesh.run("hive", "uninstall", "testbox", *ssh).returncode == 0  # whatever ran before
    absent = mesh.run("hive", "status", "--ssh", "testbox", *ssh)
    assert absent.returncode == EXIT_NOT_FOUND and "not installed" in absent.stdout
    queen = mesh.run("queen", "start", "--no-discovery", "--no-api", "--bind",
                     f"tcp://127.0.0.1:{free_port()}")  # fmt: skip
    assert queen.returncode == 0, queen.stderr
    try:
        not_there = mesh.run("hive", "start", "--ssh", "testbox", *ssh)
        assert not_there.returncode == EXIT_NOT_FOUND and "hive install testbox" in not_there.stderr
        assert (
            mesh.run("hive", "install", "testbox", "--offline", *ssh, timeout=600).returncode == 0
        )
        with socket.socket() as taken, box.environment(RBEE_MESH_DISCOVERY="0"):
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            done = mesh.run("hive", "start", "--ssh", "testbox", "--bind",
                            f"tcp://127.0.0.1:{port}", *ssh, timeout=120)  # fmt: skip
        assert done.returncode == EXIT_PORT_IN_USE, done.stderr
        assert "in use" in done.stderr
        listed = mesh.run("--json", "hive", "list")  # it never joined: nothing is left of it
        assert [json.loads(line) for line in listed.stdout.splitlines()][-1]["result"] == []
    finally:
        mesh.run("queen", "stop")
        mesh.run("hive", "uninstall", "testbox", *ssh)


def live_processes(user: str) -> list[tuple[int, str]]:
    """The processes of `user` that run (not the exited ones that wait to be reaped: where PID
    1 is not an init, they do, and they are no process of the hive's any more): (pid, args)."""
    ps = subprocess.run(["ps", "-u", user, "-o", "pid=,stat=,args="], capture_output=True,
                        text=True)  # fmt: skip
    rows = [[*line.split(None, 2), ""][:3] for line in ps.stdout.splitlines()]
    return [(int(pid), args) for pid, stat, args in rows if not stat.startswith("Z")]


def wait_until_live(mesh: Mesh, hive: str, timeout_s: float = 60) -> None:
    """Until the queen lists `hive` live (other processes: a bounded poll, no event to wait on)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = mesh.run("--json", "hive", "list")
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        result = next((r["result"] for r in rows if "result" in r), [])
        if any(row["hive"] == hive and row["liveness"] == "live" for row in result):
            return
        time.sleep(0.2)
    raise AssertionError(f"{hive} was not live within {timeout_s:g}s: {listed.stdout[-500:]}")
