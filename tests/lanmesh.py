"""A mesh across the machines of a test LAN (tests/netns.py): a queen on host q, hives joined
to it on the others, the keeper CLI on q, each host with a state directory of its own.

Shared by the multi-host tests (tests/test_multihost.py) and the chaos soak (benchmarks/chaos.py),
so, like tests/netns.py, it needs nothing but the standard library and rbee_mesh.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.inference.gguf_file import write_tiny_gguf
from tests import netns
from tests.clitools import json_events

REPO_ROOT = Path(__file__).resolve().parents[1]
QUEEN = "tcp://127.0.0.1:7833"  # the queen's default bind, on the loopback of its namespace
HEARTBEAT_S = 0.2  # the hives': suspect after 0.3 s of silence, lost after 0.7 s

#: In every hive's catalog before it starts (`seed_catalogs`).
SEEDED_REPO = "rbee-test/tiny-GGUF"
SEEDED = f"{SEEDED_REPO}:tiny.gguf"


def seed_catalogs(root: Path, hives: Sequence[str]) -> Path:
    """Write a tiny random-weight model to ROOT/tiny.gguf and add it, as SEEDED, to the catalog
    of each hive's state directory (ROOT/HIVE); returns its path."""
    gguf = write_tiny_gguf(root / "tiny.gguf", context_length=2048)
    for host in hives:
        Catalog(root / host / "hive" / "models").add_file(SEEDED_REPO, "tiny.gguf", gguf)
    return gguf


#: Asks the queen for `hive list` every 20 ms for argv[2] seconds, one JSON line per answer.
#: The CLI would do, but each `rbee-mesh hive list` is a Python start (~0.4 s of CPU, on a
#: two-core box), longer than the 0.4 s suspect window being measured, and a burst of them would
#: starve the very daemons under test. So one keeper process asks the same operation in a loop.
POLLER_SCRIPT = """
import json, sys, time
import os, pathlib
import trio
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.trust import Trust
from rbee_mesh.protocol import Done, HiveList

async def main(endpoint: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    node = Trust.load(pathlib.Path(os.environ["RBEE_MESH_HOME"]))  # the queen's own node
    async with open_keeper(endpoint, trust=node) as keeper:
        while time.monotonic() < deadline:
            asked = time.time()
            job = await keeper.submit(HiveList())
            rows = [m.result async for m in job if isinstance(m, Done)]
            line = {"asked": asked, "answered": time.time(), "rows": rows[0] if rows else None}
            print(json.dumps(line), flush=True)
            await trio.sleep(0.02)

trio.run(main, sys.argv[1], float(sys.argv[2]))
"""


class Poller:
    """POLLER_SCRIPT running on the queen's host."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def answers(self, timeout: float) -> Iterator[tuple[float, dict[str, dict[str, Any]]]]:
        """(when answered, {hive: row}) per answer, for at most `timeout` seconds."""
        deadline = time.time() + timeout
        while (left := deadline - time.time()) > 0:
            line = read_line(self.proc, left)
            assert line, f"the poller ended: {self.proc.stderr.read() if self.proc.stderr else ''}"
            answer = json.loads(line)
            yield answer["answered"], {r["hive"]: r for r in answer["rows"] or []}
        raise AssertionError(f"polling for {timeout} s did not see what the test waits for")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.communicate(timeout=10)


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The process's next stdout line, or fail after `timeout` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output for {timeout} s"
    return proc.stdout.readline()


@dataclass
class MultiHost:
    """A queen on host q, hives h1 and h2; the keeper CLI runs on q."""

    lan: netns.Lan
    root: Path
    hub_endpoint: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def home(self, host: str) -> Path:
        return self.root / host

    def env(self, host: str, **extra: str) -> dict[str, str]:
        env = {**os.environ, "RBEE_MESH_HOME": str(self.home(host)), **extra}
        env.pop("RBEE_MESH_QUEEN", None)
        return env

    def rbee(self, host: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`rbee-mesh ARGS` on a host, with that host's state directory."""
        return self.lan[host].run(
            [sys.executable, "-m", "rbee_mesh", *args],
            env=self.env(host),
            cwd=REPO_ROOT,
            timeout=timeout,
        )

    def keeper(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.rbee("q", "--queen", QUEEN, *args, timeout=timeout)

    def keeper_popen(self, *args: str) -> subprocess.Popen[str]:
        return self.lan["q"].popen(
            [sys.executable, "-m", "rbee_mesh", "--queen", QUEEN, *args],
            env=self.env("q"),
            cwd=REPO_ROOT,
        )

    def result(self, *args: str, timeout: float = 60) -> Any:
        """`--json ARGS`: the DONE event's result (fails on anything else)."""
        done = self.keeper("--json", *args, timeout=timeout)
        events = json_events(done.stdout)
        assert done.returncode == 0 and events and events[-1]["event"] == "done", (
            done.stdout,
            done.stderr,
        )
        return events[-1]["result"]

    def liveness(self) -> dict[str, str]:
        """Each hive's liveness as `rbee-mesh --json hive list` shows it now."""
        return {row["hive"]: row["liveness"] for row in self.result("hive", "list", timeout=20)}

    def wait_liveness(self, hive: str, wanted: str, timeout: float) -> float:
        """Poll `hive list` until `hive` is `wanted`; returns when (time.monotonic())."""
        # No event crosses processes: ask the queen again, a bounded number of times.
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            seen = self.liveness().get(hive)
            if seen == wanted:
                return time.monotonic()
            time.sleep(0.05)
        raise AssertionError(f"hive {hive} still {seen!r}, not {wanted!r}, after {timeout} s")

    def poll_hives(self, seconds: float) -> Poller:
        return Poller(
            self.lan["q"].popen(
                [sys.executable, "-c", POLLER_SCRIPT, QUEEN, str(seconds)],
                env=self.env("q"),
                cwd=REPO_ROOT,
            )
        )

    def invite(self) -> str:
        """A join token of the queen on q, for a hive."""
        token = self.result("queen", "invite", "--address", self.lan["q"].address)["token"]
        return str(token)

    def start_hive(self, host: str, *args: str, **env: str) -> subprocess.Popen[str]:
        """`hive start` on `host` (its defaults: the LAN, announced), with `args` (--join)."""
        return self.lan[host].popen(
            [sys.executable, "-m", "rbee_mesh", "hive", "start", "--id", host,
             "--heartbeat", str(HEARTBEAT_S), *args],
            env=self.env(host, **env),
            cwd=REPO_ROOT,
        )  # fmt: skip

    def start_hub(
        self, host: str, files: Path, *, bind: str = "127.0.0.1", rate_bps: int | None = None
    ) -> tuple[subprocess.Popen[str], str]:
        """A fake hub (tests/hub.py) on `host`, bound to `bind`, serving the files under `files`
        (FILES/OWNER/REPO/NAME); returns it and its endpoint. It serves until its stdin closes."""
        argv = [sys.executable, "-m", "tests.hub", str(files), "--host", bind]
        if rate_bps is not None:
            argv += ["--rate-bps", str(rate_bps)]
        proc = self.lan[host].popen(argv, env=self.env(host), cwd=REPO_ROOT, stdin=subprocess.PIPE)
        endpoint = read_line(proc, 30).strip()
        assert endpoint.startswith("http://"), endpoint
        return proc, endpoint
