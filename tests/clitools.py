"""Running `rbee-mesh` in subprocesses, as a person would, for the CLI tests."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

NARRATION_LINE = re.compile(r"^\[(?P<actor>.{10})\] (?P<action>.{15}) : (?P<human>.*)$")


class Mesh:
    """Runs `rbee-mesh` in subprocesses that share one state directory."""

    def __init__(self, home: Path) -> None:
        self.home = home

    @property
    def env(self) -> dict[str, str]:
        """This process's environment as it is now (fixtures may have set HF_ENDPOINT)."""
        # The demo keeps its state in the cache: the test's own, not the user's.
        cache = str(self.home.parent / "cache")
        env = {**os.environ, "RBEE_MESH_HOME": str(self.home), "XDG_CACHE_HOME": cache}
        env.pop("RBEE_MESH_QUEEN", None)
        return env

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "rbee_mesh", *args]

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def json_events(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines()]


def stop_process(process: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """SIGTERM (after SIGCONT: it may have been stopped), then SIGKILL if it is not gone in 15 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def memory_of(pid: int) -> dict[str, int]:
    """A process's resident memory now (VmRSS) and at its most (VmHWM), in bytes, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def open_files(pid: int) -> int:
    """How many file descriptors a process holds, from /proc."""
    return len(os.listdir(f"/proc/{pid}/fd"))
