"""How soon `rbee-mesh` answers: its start-up next to the interpreter's own, in one run.

Issue 21 asks that `--version` and `--help` answer within 3x a bare `python -c pass`, and that a
command that talks to the queen spend, before its first frame leaves, at most 1.3x the time to
import what it needs (`python -c "import zmq, trio, msgpack"`). Five measures, each a new process
of this interpreter, timed from its start:

- python: `python -c pass`, the interpreter's bare start (with its site-packages);
- imports: `python -c "import zmq, trio, msgpack"`, what talking to a queen cannot do without,
  to the end of its imports: it leaves by `os._exit` (an interpreter's teardown with zmq and trio
  loaded, ~20 ms here, is no part of importing them, and `status` is timed before its own);
- --version, --help: `rbee-mesh --version` (and `--help`), to its exit; `rbee-mesh` is what its
  console script runs, with this interpreter and this checkout;
- status: `rbee-mesh --queen ENDPOINT status`, to its first frame arriving at ENDPOINT:
  a ROUTER socket of this process with the CURVE key of the command's state directory (the key
  the command pins for a queen of its own machine), which answers nothing; the command is then
  killed.

Every round runs the five in a new random order, so that machine noise falls on all of them
alike; a ratio is taken within each round (a measure over the same round's baseline), and the
median over the rounds is reported with the median times. The goals are judged on wall time,
what a person waits for; CPU time (user and system, all threads, as the process is reaped) is
reported beside it: the work, whatever else the machine runs (on a busy machine a short process
waits for a core, and its wall time with it). Every process reads and writes its bytecode under
one temporary PYTHONPYCACHEPREFIX (an installed package has its modules compiled; measuring
without would time Python's compiler), written by a first round that is not counted.

`rbee-mesh bench --startup` runs it and writes benchmarks/results/cli_startup.json.
"""

from __future__ import annotations

import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from rbee_mesh.actors.trust import Trust

ROOT = Path(__file__).resolve().parent.parent

MEASURES = ("python", "imports", "version", "help", "status")
LABELS = {
    "python": "python -c pass",
    "imports": "import zmq, trio, msgpack",
    "version": "rbee-mesh --version",
    "help": "rbee-mesh --help",
    "status": "rbee-mesh status, first frame",
}
#: measure -> (the baseline it is held against, the most it may take as a multiple of it).
GOALS = {"version": ("python", 3.0), "help": ("python", 3.0), "status": ("imports", 1.3)}
#: How long any one process may take before the run fails.
TIMEOUT_S = 30.0


def plan(quick: bool) -> int:
    """Rounds."""
    return 10 if quick else 40


def measure(rounds: int, progress: Callable[[str], None] = lambda _: None) -> list[dict[str, Any]]:
    """Samples of the five measures, interleaved round by round; summarised as rows."""
    wall: dict[str, list[float]] = {m: [] for m in MEASURES}
    cpu: dict[str, list[float]] = {m: [] for m in MEASURES}
    with tempfile.TemporaryDirectory(prefix="rbee-startup-") as tmp, zmq.Context() as ctx:
        home = Path(tmp) / "state"
        queen = ctx.socket(zmq.ROUTER)
        queen.curve_server = True
        keys = Trust.load(home).keypair
        queen.curve_secretkey = keys.secret.encode("ascii")
        queen.curve_publickey = keys.public.encode("ascii")
        endpoint = f"tcp://127.0.0.1:{queen.bind_to_random_port('tcp://127.0.0.1')}"
        env = _env(home, Path(tmp) / "pycache")
        argv = _commands(endpoint)
        seen: set[bytes] = set()
        try:
            for n in range(rounds + 1):  # the first writes the bytecode, and is not counted
                progress(f"CLI start-up: round {n} of {rounds}" if n else "CLI start-up: warm-up")
                for name in random.sample(MEASURES, len(MEASURES)):
                    waited, worked = _run(
                        argv[name], env, queen if name == "status" else None, seen
                    )
                    if n:
                        wall[name].append(waited)
                        cpu[name].append(worked)
        finally:
            queen.close(linger=0)
    return summarise(wall, cpu)


def _commands(endpoint: str) -> dict[str, list[str]]:
    python = [sys.executable]
    mesh = _console_script()
    return {
        "python": [*python, "-c", "pass"],
        "imports": [*python, "-c", "import zmq, trio, msgpack; import os; os._exit(0)"],
        "version": [*mesh, "--version"],
        "help": [*mesh, "--help"],
        "status": [*mesh, "--queen", endpoint, "status"],
    }


def _console_script() -> list[str]:
    """`rbee-mesh` as its console script runs it (pyproject.toml's [project.scripts]), with this
    interpreter and this checkout."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    module, function = pyproject["project"]["scripts"]["rbee-mesh"].split(":")
    return [
        sys.executable,
        "-c",
        f"import sys; from {module} import {function}; sys.exit({function}())",
    ]


def _env(home: Path, pycache: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RBEE_MESH_HOME": str(home)}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("RBEE_MESH_QUEEN", None)
    return env


def _run(
    argv: list[str], env: dict[str, str], queen: zmq.Socket[bytes] | None, seen: set[bytes]
) -> tuple[float, float]:
    """Seconds of one run of `argv`: wall, from its start to its exit (with `queen`: to its first
    frame there, then it is killed), and its CPU time, user and system, as this process's
    children's grow when it is reaped (to compare work on a machine that is busy elsewhere)."""
    before = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Waits block, and so wake the moment the process ends (Popen.wait with a timeout polls, in
    # sleeps growing to 50 ms, which would round every time up); one that hangs is killed.
    deadline = threading.Timer(TIMEOUT_S, proc.kill)
    deadline.start()
    try:
        if queen is not None:
            waited = _first_frame(queen, seen, argv) - start
        elif proc.wait() == 0:
            waited = time.perf_counter() - start
        else:
            raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}")
    finally:
        deadline.cancel()
        proc.kill()
        proc.wait()
    return waited, _children_cpu() - before


def _first_frame(queen: zmq.Socket[bytes], seen: set[bytes], argv: list[str]) -> float:
    """When the first frame of a new peer arrived at `queen` (perf_counter). A frame left over
    from an earlier run (from a routing id in `seen`) is passed over."""
    while True:
        if not queen.poll(int(TIMEOUT_S * 1000)):
            raise RuntimeError(f"{' '.join(argv)} sent nothing within {TIMEOUT_S:g}s")
        arrived = time.perf_counter()
        peer = queen.recv_multipart()[0]
        if peer not in seen:
            seen.add(peer)
            return arrived


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def summarise(wall: dict[str, list[float]], cpu: dict[str, list[float]]) -> list[dict[str, Any]]:
    """A row per measure: its wall time (median, min, max) and CPU time (median) in ms, and
    the medians of its ratios to the two baselines, round by round, of each."""
    rows = []
    for name in MEASURES:
        row: dict[str, Any] = {"measure": name, "label": LABELS[name], "runs": len(wall[name])}
        row.update(
            {
                "median_ms": _ms(statistics.median(wall[name])),
                "min_ms": _ms(min(wall[name])),
                "max_ms": _ms(max(wall[name])),
                "cpu_ms": _ms(statistics.median(cpu[name])),
            }
        )
        for base in ("python", "imports"):
            row[f"vs_{base}"] = _ratio(wall[name], wall[base])
            row[f"cpu_vs_{base}"] = _ratio(cpu[name], cpu[base])
        rows.append(row)
    return rows


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _ratio(values: list[float], bases: list[float]) -> float:
    """The median of the ratios, round by round."""
    return round(statistics.median(v / b for v, b in zip(values, bases, strict=True)), 2)


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each measure with a goal, as a multiple of its baseline."""
    by = {r["measure"]: r for r in rows}
    found = []
    for name, (base, limit) in GOALS.items():
        value = by[name][f"vs_{base}"]
        found.append(
            {
                "target": f"{LABELS[name]} vs {LABELS[base]}",
                "value": value,
                "goal": f"<= {limit:g}x",
                "met": value <= limit,
            }
        )
    return found


def table(rows: list[dict[str, Any]]) -> str:
    head = ("CLI start-up", "runs", "wall ms", "min", "max", "x python", "x imports", "cpu ms",
            "x python", "x imports")  # fmt: skip
    lines = ["{:<29} {:>4} {:>7} {:>5} {:>5} {:>8} {:>9} {:>6} {:>8} {:>9}".format(*head)]
    for r in rows:
        lines.append(
            f"{r['label']:<29} {r['runs']:>4} {r['median_ms']:>7.1f} {r['min_ms']:>5.0f} "
            f"{r['max_ms']:>5.0f} {r['vs_python']:>8.2f} {r['vs_imports']:>9.2f} "
            f"{r['cpu_ms']:>6.1f} {r['cpu_vs_python']:>8.2f} {r['cpu_vs_imports']:>9.2f}"
        )
    return "\n".join(lines)
