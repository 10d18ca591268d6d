"""`rbee-mesh infer` as a person uses it: real processes, a real model file, real signals."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.inference.gguf_file import write_tiny_gguf
from tests.clitools import NARRATION_LINE, Mesh, json_events

pytestmark = pytest.mark.slow

REPO = "rbee-test/tiny-GGUF"
MODEL = f"{REPO}:tiny.gguf"


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    m = Mesh(tmp_path / "state")
    catalog = Catalog(m.home / "hive" / "models")
    catalog.add_file(
        REPO, "tiny.gguf", write_tiny_gguf(tmp_path / "tiny.gguf", context_length=2048)
    )
    return m


@pytest.fixture
def queen_daemon(mesh: Mesh) -> Iterator[Mesh]:
    started = mesh.run("queen", "start", "--bind", "tcp://127.0.0.1:0", "--integrated")
    assert started.returncode == 0, started.stderr
    try:
        yield mesh
    finally:
        mesh.run("queen", "stop")


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line mentions `text` (a worker names its model's path)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_with_no_queen_infer_runs_a_mesh_of_its_own_and_leaves_nothing_behind(mesh: Mesh) -> None:
    result = mesh.run("infer", "-m", MODEL, "-n", "24", "--seed", "5", "Hello", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # the generated text, on stdout
    assert "no queen is running: starting one in this process" in result.stderr
    assert any(NARRATION_LINE.match(line) for line in result.stderr.splitlines())
    assert "24 tokens in" in result.stderr
    assert not (mesh.home / "queen.json").exists()
    assert processes_mentioning(str(mesh.home)) == []  # its worker stopped with it


def test_with_no_queen_read_only_commands_answer_from_this_machines_hive(mesh: Mesh) -> None:
    """As `infer` does: no 3 s wait for a queen that is not there, and no exit 3."""
    models = mesh.run("--json", "model", "list", timeout=60)
    assert models.returncode == 0, models.stderr
    rows = json_events(models.stdout)[-1]["result"]
    assert [r["id"] for r in rows] == [MODEL]  # type: ignore[index]
    status = mesh.run("status", timeout=60)
    assert status.returncode == 0, status.stderr
    assert "no queen is running: starting one in this process" in status.stderr
    assert "live" in status.stdout
    assert not (mesh.home / "queen.json").exists()


def test_infer_json_is_one_event_per_line_and_seeded_text_repeats(mesh: Mesh) -> None:
    runs = [
        mesh.run("--json", "infer", "-m", MODEL, "-n", "16", "--seed", "9", "Hi", timeout=120)
        for _ in range(2)
    ]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    events = [json_events(r.stdout) for r in runs]
    kinds = {e["event"] for e in events[0]}
    assert {"accepted", "narration", "token", "done"} <= kinds
    texts = ["".join(str(e["text"]) for e in ev if e["event"] == "token") for ev in events]
    assert texts[0] == texts[1] and texts[0]
    done = events[0][-1]
    assert done["event"] == "done" and done["result"]["text"] == texts[0]  # type: ignore[index]


def test_ctrl_c_stops_the_generation_and_the_worker_serves_the_next_job(queen_daemon: Mesh) -> None:
    proc = queen_daemon.popen("--json", "infer", "-m", MODEL, "-n", "1800", "-t", "0", "Hello")
    assert proc.stdout is not None
    for line in proc.stdout:
        if json.loads(line)["event"] == "token":
            break  # generating
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert json_events(out)[-1]["event"] == "cancelled"
    after = queen_daemon.run("infer", "-m", MODEL, "-n", "3", "Hi", timeout=60)
    assert after.returncode == 0, after.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["-t", "5", "hi"], "temperature must be"),
        (["--top-p", "0", "hi"], "top_p must be"),
        (["-n", "0", "hi"], "max_tokens must be"),
        ([""], "prompt must not be empty"),
    ],
)
def test_invalid_parameters_are_refused_before_any_work(
    mesh: Mesh, args: list[str], words: str
) -> None:
    result = mesh.run("infer", *args)
    assert result.returncode == 2
    assert words in result.stderr
