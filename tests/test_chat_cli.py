"""`rbee-mesh chat` as a person uses it: in a real terminal (a pseudo-terminal), with real
signals, over a mesh started inside the command (no queen running)."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.inference.gguf_file import write_tiny_gguf
from tests.clitools import Mesh

pytestmark = pytest.mark.slow

MODEL = "rbee-test/tiny:tiny.gguf"


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    m = Mesh(tmp_path / "state")
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", context_length=2048)
    Catalog(m.home / "hive" / "models").add_file("rbee-test/tiny", "tiny.gguf", tiny)
    return m


class Terminal:
    """A process on a pseudo-terminal: what it wrote so far, and typing into it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.seen = b""
        self.cursor = 0

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait_for(self, text: str, timeout: float = 60) -> None:
        """Read until `text` appears after what earlier waits consumed (bounded in time)."""
        deadline = time.monotonic() + timeout
        while (found := self.seen.find(text.encode(), self.cursor)) < 0:
            left = deadline - time.monotonic()
            shown = self.seen.decode(errors="replace")
            assert left > 0, f"{text!r} never came; the terminal shows:\n{shown}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:  # the process closed the terminal
                    raise AssertionError(f"{text!r} never came; it ended:\n{shown}") from None
        self.cursor = found + len(text)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self.master)


def test_a_chat_keeps_its_turns_ctrl_c_stops_an_answer_and_bye_ends_it(mesh: Mesh) -> None:
    argv = mesh.argv("chat", MODEL, "-n", "1900", "-t", "0")
    term = Terminal(argv, mesh.env)
    try:
        term.wait_for(">>> ")
        term.type("hello\n")
        term.wait_for("generating with")  # the answer streams
        term.proc.send_signal(signal.SIGINT)  # Ctrl-C: this answer stops, not the chat
        term.wait_for("cancelled")
        term.wait_for(">>> ")
        assert term.proc.poll() is None
        term.type("again\n")
        term.wait_for("finished:")  # a second turn, answered in full
        term.wait_for(">>> ")
        term.type("/bye\n")
        assert term.proc.wait(timeout=30) == 0
    finally:
        term.close()


def test_with_stdin_not_a_terminal_chat_answers_once(mesh: Mesh) -> None:
    done = subprocess.run(
        mesh.argv("chat", MODEL, "-n", "8", "--seed", "3"),
        input="What is 2 + 2?",
        env=mesh.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()  # the answer
    assert "a chat turn, rendered with ChatML" in done.stderr
