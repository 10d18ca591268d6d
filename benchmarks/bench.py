"""`rbee-mesh bench`: the same operations in every transport mode, side by side in one run.

Modes (each a real deployment of that mode; workers are always processes of their own):

- integrated: keeper, queen and hive in one process, over the in-memory transport;
- localhost ipc / localhost tcp: keeper, queen daemon and hive daemon as three processes;
- remote tcp: the same three on three hosts (network namespaces on one bridge; needs root);
- HTTP + SSE: the pattern rbee used (POST /v1/jobs, then GET the job's event stream, at every
  hop) on uvicorn + starlette with keep-alive clients, as three processes
  (benchmarks/http_baseline.py).

Operations, all through both hops (keeper -> queen -> hive, and on to a worker for tokens):

- control: worker list of the hive, the light control operation;
- narration: a stream of 1,000 narration events (ping of 1,000 pongs, narrated by the hive);
- tokens: an inference of 64 tokens on a real worker (a random-weight tiny llama);
- spawn: starting a worker process and loading the model (then deleting it, not timed).

With the tokens: the same generation on a real model (SmolLM2-135M-Instruct, where the real-model
tests cache it, or --real-model PATH) by llama-cpp-python in process, the mesh's infer and the
queen's OpenAI-compatible API (benchmarks/openai_api.py); left out, with the reason, when the
model file is not there.

Each mode's keeper side is an agent process (benchmarks/agent.py). The driver interleaves
them: every round runs a batch of each operation in each mode, in a new random order, so that
machine noise falls on all modes alike. Reported per mode and operation: p50, p99, the rate
(operations, events or tokens per second) and the p50 as a ratio to the HTTP baseline and to the
integrated mode. With the control operation, the floors under it are measured in the same run:
the trio floor (two tcp hops with nothing in them, benchmarks/zmq_floor.py) and the job
protocol alone (its frames and task steps, in one process and over tcp,
benchmarks/protocol_floor.py); each control goal then says the best the protocol allows.

`--serve` runs another benchmark instead: concurrent requests served by llama-cpp-python and by
rbee-mesh (benchmarks/serving.py); `--detection` how long failures take to notice
(benchmarks/detection.py); `--chaos` the chaos soak (benchmarks/chaos.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import random
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import trio

from benchmarks import cli_startup, curve, openai_api, protocol_floor, zmq_floor
from benchmarks.agent import MODEL_FILE, MODEL_REPO, NARRATION_EVENTS, TOKENS
from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.inference.gguf_file import write_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

MODES = ("integrated", "ipc", "tcp", "remote", "http")
MODE_LABELS = {
    "integrated": "integrated (one process)",
    "ipc": "localhost ipc",
    "tcp": "localhost tcp",
    "remote": "remote tcp (netns)",
    "http": "HTTP + SSE baseline",
}
OPS = ("control", "narration", "tokens", "spawn")
#: How a report's note begins when the real model's inference was not measured.
REAL_MODEL_LEFT_OUT = "real-model inference (benchmarks/openai_api.py) left out"
RATE_UNITS = {"control": "ops/s", "narration": "events/s", "tokens": "tokens/s", "spawn": "ops/s"}


@dataclass(frozen=True)
class Plan:
    """How much to measure: runs per batch for each operation, and rounds of batches."""

    rounds: int
    batch: dict[str, int]

    @classmethod
    def of(cls, quick: bool) -> Plan:
        if quick:
            return cls(rounds=3, batch={"control": 100, "narration": 2, "tokens": 2, "spawn": 1})
        return cls(rounds=10, batch={"control": 200, "narration": 5, "tokens": 5, "spawn": 1})


class BenchError(RuntimeError):
    """A mode could not be set up or failed while measured."""


# ---- the agents ------------------------------------------------------------------------------


@dataclass
class Agent:
    """One mode's keeper-side process (benchmarks/agent.py)."""

    mode: str
    proc: subprocess.Popen[str]
    log: Path

    @classmethod
    def start(
        cls, mode: str, argv: Sequence[str], setup: Setup, prefix: Sequence[str] = ()
    ) -> Agent:
        log = setup.workdir / f"agent-{mode}.log"
        with log.open("w") as stderr:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "benchmarks.agent", *argv],
                cwd=ROOT,
                env=_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        agent = cls(mode, proc, log)
        setup.later(agent.close)
        agent._answer(timeout_s=120)  # {"ready": true}: connected and warmed up
        return agent

    def run(self, op: str, n: int) -> tuple[list[float], list[int]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "n": n}) + "\n")
        self.proc.stdin.flush()
        answer = self._answer(timeout_s=300)
        return answer["samples"], answer["events"]

    def _answer(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = _readline(self.proc.stdout, timeout_s)
        answer = json.loads(line) if line.strip() else {}
        if "error" in answer or not answer:
            self.proc.wait(timeout=10)
            detail = answer.get("error") or f"exited with {self.proc.returncode}"
            stderr = self.log.read_text(errors="replace")[-2000:]
            raise BenchError(f"{MODE_LABELS[self.mode]}: {detail}\n{stderr}")
        return dict(answer)

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _readline(stream: IO[str], timeout_s: float) -> str:
    """A line from a child's pipe, or BenchError when none comes in time."""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            raise BenchError(f"no answer within {timeout_s:g}s")
    return stream.readline()


def _env(home: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "RBEE_MESH_DISCOVERY": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RBEE_MESH_QUEEN", None)
    if home is not None:
        env["RBEE_MESH_HOME"] = str(home)
    return env


# ---- the modes -------------------------------------------------------------------------------


@dataclass
class Setup:
    """What one mode runs while measured; torn down by `close`."""

    workdir: Path
    model: Path
    notes: list[str] = field(default_factory=list)
    _cleanups: list[Callable[[], object]] = field(default_factory=list)

    def later(self, cleanup: Callable[[], object]) -> None:
        self._cleanups.append(cleanup)

    def close(self) -> None:
        while self._cleanups:
            with contextlib.suppress(Exception):
                self._cleanups.pop()()

    def home(self, name: str) -> Path:
        """A state directory with the benchmark model in its hive's catalog."""
        home = self.workdir / name
        Catalog(home / "hive" / "models").add_file(MODEL_REPO, MODEL_FILE, self.model)
        return home

    def cli(self, home: Path, *args: str, prefix: Sequence[str] = ()) -> dict[str, Any]:
        """Run `rbee-mesh --json ARGS` with this state directory; its last JSON line."""
        argv = [*prefix, sys.executable, "-m", "rbee_mesh", "--json", *args]
        done = subprocess.run(
            argv, cwd=ROOT, env=_env(home), capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise BenchError(f"`rbee-mesh {' '.join(args)}` failed: {done.stderr.strip()}")
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    def daemons(self, home: Path, hive: Sequence[str], queen: Sequence[str]) -> str:
        """Start a hive and a queen daemon (stopped at close); the queen's endpoint."""
        started = self.cli(home, "hive", "start", "--id", "bench-hive", *hive)
        self.later(lambda: self.cli(home, "hive", "stop"))
        peer = ["--peer", str(started["endpoint"])]
        # No HTTP API: it would take the same default port in every mode's queen.
        started = self.cli(home, "queen", "start", "--no-discovery", "--no-api", *queen, *peer)
        self.later(lambda: self.cli(home, "queen", "stop"))
        return str(started["endpoint"])


def start_mode(mode: str, setup: Setup) -> Agent:
    if mode == "integrated":
        return Agent.start(mode, ["integrated", str(setup.home("integrated"))], setup)
    if mode == "ipc":
        home = setup.home("ipc")
        sock = f"ipc://{home}"
        queen = setup.daemons(
            home,
            hive=["--bind", f"{sock}/hive.sock", "--heartbeat-bind", f"{sock}/hive-hb.sock"],
            queen=["--bind", f"{sock}/queen.sock"],
        )
        return Agent.start(mode, ["mesh", queen, str(home)], setup)
    if mode == "tcp":
        any_port = "tcp://127.0.0.1:0"
        home = setup.home("tcp")
        queen = setup.daemons(
            home,
            hive=["--bind", any_port, "--heartbeat-bind", any_port],
            queen=["--bind", any_port],
        )
        return Agent.start(mode, ["mesh", queen, str(home)], setup)
    if mode == "remote":
        return _start_remote(setup)
    if mode == "http":
        return _start_http(setup)
    raise BenchError(f"unknown mode {mode!r}")


def _start_remote(setup: Setup) -> Agent:
    """JobClient, queen and hive on three hosts of one bridge (tests/netns.py)."""
    from tests.netns import LanUnavailable, open_lan

    stack = contextlib.ExitStack()
    try:
        lan = stack.enter_context(open_lan(["keeper", "queen", "hive"]))
    except LanUnavailable as exc:
        raise ModeUnavailable(str(exc)) from None
    setup.later(stack.close)
    hive, queen = lan["hive"], lan["queen"]
    hive_home, queen_home = setup.home("remote-hive"), setup.workdir / "remote-queen"
    # Each host its own node: the hive joins the queen with a token, as on a real LAN; the
    # keeper shares the queen's state directory (its owner).
    setup.cli(queen_home, "queen", "start", "--no-discovery", prefix=queen.argv([]))
    invite = ("queen", "invite", "--address", queen.address)
    token = setup.cli(queen_home, *invite, prefix=queen.argv([]))["result"]["token"]
    join = ("hive", "start", "--id", "bench-hive", "--join", token)
    setup.cli(hive_home, *join, prefix=hive.argv([]))
    # Stopped with the LAN: closing it kills every process in its namespaces.
    target = f"tcp://{queen.address}:7833"
    argv = ["mesh", target, str(queen_home)]
    return Agent.start("remote", argv, setup, prefix=lan["keeper"].argv([]))


class ModeUnavailable(BenchError):
    """This machine cannot make the mode (e.g. no network namespaces): it is left out."""


def _start_http(setup: Setup) -> Agent:
    from benchmarks.http_baseline import start_server, stop_server

    models = setup.workdir / "http-models"
    models.mkdir()
    (models / MODEL_FILE).write_bytes(setup.model.read_bytes())
    hive, hive_url = start_server(
        "hive", "--port", "0", "--id", "bench-hive", "--model-dir", str(models), cwd=ROOT
    )
    setup.later(lambda: stop_server(hive))
    queen, queen_url = start_server("queen", "--port", "0", "--hive", hive_url, cwd=ROOT)
    setup.later(lambda: stop_server(queen))
    return Agent.start("http", ["http", queen_url], setup)


# ---- measuring -------------------------------------------------------------------------------


def measure(
    modes: Sequence[str],
    ops: Sequence[str],
    plan: Plan,
    workdir: Path,
    progress: Callable[[str], None],
) -> tuple[dict[tuple[str, str], tuple[list[float], list[int]]], list[str]]:
    """Samples per (mode, op), interleaved round by round; and notes (modes left out)."""
    model = write_tiny_gguf(workdir / "model.gguf", seed=7, context_length=2048)
    setup = Setup(workdir, model)
    agents: dict[str, Agent] = {}
    notes: list[str] = []
    try:
        for mode in modes:
            progress(f"starting {MODE_LABELS[mode]}")
            try:
                agents[mode] = start_mode(mode, setup)
            except ModeUnavailable as exc:
                notes.append(f"{MODE_LABELS[mode]} left out: {exc}")
                progress(notes[-1])
        samples: dict[tuple[str, str], tuple[list[float], list[int]]] = {
            (mode, op): ([], []) for mode in agents for op in ops
        }
        order = list(agents)
        for round_ in range(1, plan.rounds + 1):
            for op in ops:
                random.shuffle(order)
                progress(f"round {round_}/{plan.rounds}: {op}")
                for mode in order:
                    times, events = agents[mode].run(op, plan.batch[op])
                    samples[(mode, op)][0].extend(times)
                    samples[(mode, op)][1].extend(events)
        return samples, notes
    finally:
        setup.close()


def summarise(
    samples: dict[tuple[str, str], tuple[list[float], list[int]]],
) -> list[dict[str, Any]]:
    rows = []
    p50s = {key: statistics.median(times) for key, (times, _) in samples.items()}
    for (mode, op), (times, events) in samples.items():
        p50 = p50s[(mode, op)]
        p99 = nearest_rank(sorted(times), 0.99)
        counted = sum(events) if op in ("narration", "tokens") else len(times)
        http, integrated = p50s.get(("http", op)), p50s.get(("integrated", op))
        rows.append(
            {
                "mode": mode,
                "label": MODE_LABELS[mode],
                "op": op,
                "runs": len(times),
                "p50_us": round(p50 * 1e6, 1),
                "p99_us": round(p99 * 1e6, 1),
                "rate": round(counted / sum(times), 1),
                "rate_unit": RATE_UNITS[op],
                "p50_vs_http": round(p50 / http, 3) if http else None,
                "p50_vs_integrated": round(p50 / integrated, 3) if integrated else None,
            }
        )
    order = {mode: i for i, mode in enumerate(MODES)}
    return sorted(rows, key=lambda r: (OPS.index(r["op"]), order[r["mode"]]))


def nearest_rank(ordered: Sequence[float], q: float) -> float:
    """The `q` quantile (0 to 1) of sorted samples, by nearest rank."""
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


#: Issue 15's goals: an operation's p50 in a mode as a speed-up over HTTP + SSE, measured in the
#: same run (ratios: the machine's noise falls on both).
SPEEDUP_GOALS = {
    ("control", "tcp"): 3.0,
    ("narration", "tcp"): 2.0,
    ("tokens", "tcp"): 1.5,
    ("control", "integrated"): 30.0,
}
#: And the control operation over localhost tcp within this factor of the trio floor: the same
#: two hops through three processes with nothing in them (benchmarks/zmq_floor.py).
FLOOR_GOAL = 1.6
#: The goals under which the run measures the job protocol's own floor in the same mode
#: (benchmarks/protocol_floor.py; `floors["protocol_" + mode]`).
PROTOCOL_FLOORS = {("control", "tcp"), ("control", "integrated")}


def targets(rows: Sequence[dict[str, Any]], floors: dict[str, float]) -> list[dict[str, Any]]:
    """The issue's targets for the transport modes, each met or missed; a control goal also
    with `bound`, the best the job protocol alone allows in this run (its frames and task
    steps with nothing else: `floors`), and whether the goal lies within it (`reachable`)."""
    by = {(r["op"], r["mode"]): r for r in rows}
    found = []
    for (op, mode), goal in SPEEDUP_GOALS.items():
        row = by.get((op, mode))
        if row is None or not row["p50_vs_http"]:
            continue
        speedup = round(1 / row["p50_vs_http"], 2)
        target = {
            "target": f"{op} p50, {MODE_LABELS[mode]} vs HTTP + SSE",
            "value": speedup,
            "goal": f">= {goal:g}x faster",
            "met": speedup >= goal,
        }
        floor = floors.get(f"protocol_{mode}") if (op, mode) in PROTOCOL_FLOORS else None
        if floor and (op, "http") in by:
            bound = round(by[op, "http"]["p50_us"] / floor, 2)
            target.update(bound=bound, reachable=bound >= goal)
        found.append(target)
    trio_floor = floors.get("trio_tcp")
    if trio_floor and ("control", "tcp") in by:
        ratio = round(by["control", "tcp"]["p50_us"] / trio_floor, 2)
        target = _target("control p50, localhost tcp vs the trio floor", ratio, FLOOR_GOAL, "x")
        if "protocol_tcp" in floors:
            bound = round(floors["protocol_tcp"] / trio_floor, 2)
            target.update(bound=bound, reachable=bound <= FLOOR_GOAL)
        found.append(target)
    return found


def measure_floors(quick: bool) -> dict[str, float]:
    """The p50s under the control goals, in us: the trio floor over two tcp hops
    (benchmarks/zmq_floor.py), and the job protocol alone over tcp and in one process, as the
    mesh lays its actors out and in the leanest layout (benchmarks/protocol_floor.py)."""
    runs = 1_000 if quick else 3_000
    rows = zmq_floor.measure(runs, drivers=("trio",), schemes=("tcp",))
    protocol = protocol_floor.measure(runs)
    return {
        "trio_tcp": float(next(r["p50_us"] for r in rows if r["hops"] == 2)),
        "protocol_tcp": protocol["tcp"]["p50_us"],
        "protocol_integrated": protocol["integrated"]["p50_us"],
        "protocol_integrated_lean": protocol["integrated_lean"]["p50_us"],
    }


def curve_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """CURVE cheap enough never to be the reason to turn it off: a control exchange at most
    1.5x its plaintext time per hop, a handshake (once per connection) within 5 ms."""
    by = {(r["op"], r["mode"]): r for r in rows}
    return [
        _target("CURVE control vs plaintext, one tcp hop", by["control", "curve"]["vs_plaintext"],
                1.5, "x"),
        _target("CURVE handshake p50, one tcp hop", by["handshake", "curve"]["p50_us"], 5000,
                "us"),
    ]  # fmt: skip


def _target(name: str, value: float, limit: float, unit: str) -> dict[str, Any]:
    return {"target": name, "value": value, "goal": f"<= {limit:g} {unit}", "met": value <= limit}


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }


# ---- output ----------------------------------------------------------------------------------


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("op", "mode", "runs", "p50 us", "p99 us", "rate", "", "x HTTP", "x integrated")
    lines = ["{:<10} {:<25} {:>5} {:>10} {:>10} {:>10} {:<9} {:>7} {:>12}".format(*head)]
    for r in rows:
        lines.append(
            "{:<10} {:<25} {:>5} {:>10,.0f} {:>10,.0f} {:>10,.0f} {:<9} {:>7} {:>12}".format(
                r["op"],
                r["label"],
                r["runs"],
                r["p50_us"],
                r["p99_us"],
                r["rate"],
                r["rate_unit"],
                _ratio(r["p50_vs_http"]),
                _ratio(r["p50_vs_integrated"]),
            )
        )
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def chart(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """One panel per operation: p50 per mode as bars from zero, p99 as a whisker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    columns = min(2, len(ops))
    rows_ = -(-len(ops) // columns)
    fig, axes = plt.subplots(rows_, columns, figsize=(6 * columns, 4 * rows_), squeeze=False)
    for ax in axes.flat[len(ops) :]:
        ax.set_visible(False)
    for ax, op in zip(axes.flat, ops, strict=False):
        mine = [r for r in rows if r["op"] == op]
        labels = [r["label"].replace(" (", "\n(").replace(" + SSE ", " + SSE\n") for r in mine]
        p50 = [r["p50_us"] / 1000 for r in mine]
        p99 = [r["p99_us"] / 1000 for r in mine]
        colors = ["#b0b0b0" if r["mode"] == "http" else "#3b7dd8" for r in mine]
        ax.bar(range(len(mine)), p50, color=colors)
        ax.errorbar(
            range(len(mine)),
            p50,
            yerr=[[0] * len(mine), [b - a for a, b in zip(p50, p99, strict=True)]],
            fmt="none",
            ecolor="black",
            capsize=3,
        )
        ax.set_xticks(range(len(mine)), labels, fontsize=7)
        ax.set_title(f"{op}: p50, whisker to p99", fontsize=9)
        ax.set_ylabel("ms")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the command ---------------------------------------------------------------------------


def run(
    *,
    quick: bool,
    modes: Sequence[str] = MODES,
    ops: Sequence[str] = OPS,
    out_dir: Path = RESULTS,
    real_model: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Measure, write `modes.json` and `modes.png` into `out_dir`, and return the report.

    With the tokens operation, also the real model's inference (benchmarks/openai_api.py) with
    `real_model` (default: where the real-model tests cache theirs), or a note why not."""
    plan = Plan.of(quick)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="rbee-bench-") as tmp:
        samples, notes = measure(modes, ops, plan, Path(tmp), progress)
    rows = summarise(samples)
    floors: dict[str, float] = {}
    if "control" in ops:
        progress("the floors: trio, and the job protocol alone, with nothing else in them")
        floors = measure_floors(quick)
    curve_rounds, curve_batch = curve.plan(quick)
    curve_rows = trio.run(curve.measure, curve_rounds, curve_batch, progress)
    real_rows: list[dict[str, Any]] = []
    if "tokens" in ops:
        model = real_model or openai_api.default_model()
        reason = openai_api.unavailable(model)
        if reason is None:
            rounds, max_tokens = openai_api.plan(quick)
            real_rows = trio.run(openai_api.measure, model, rounds, max_tokens, progress)
        else:
            notes.append(f"{REAL_MODEL_LEFT_OUT}: {reason}")
            progress(notes[-1])
    report = write_report(
        "modes",
        out_dir,
        quick=quick,
        started=started,
        rows=rows,
        found=targets(rows, floors) + curve_targets(curve_rows) + openai_api.targets(real_rows),
        notes=notes,
        plan={"rounds": plan.rounds, "runs_per_batch": plan.batch},
        workload={"narration_events": NARRATION_EVENTS, "tokens": TOKENS},
        floors_us=floors,
        curve=curve_rows,
        real_model=real_rows,
    )
    chart(rows, out_dir / "modes.png", f"rbee-mesh transport modes ({machine()['cpus']} CPUs)")
    return report


def command(
    quick: bool,
    modes: Sequence[str],
    ops: Sequence[str],
    scale: str | None,
    out: Path | None,
    as_json: bool,
    real_model: Path | None = None,
    startup: bool = False,
) -> int:
    """`rbee-mesh bench`: run, print the table (or JSON), and return the exit code."""

    def progress(text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)

    def refuse(text: str) -> int:
        print(f"rbee-mesh bench: {text}", file=sys.stderr)
        return 2

    for given, known, what in ((modes, MODES, "mode"), (ops, OPS, "operation")):
        unknown = sorted(set(given) - set(known))
        if unknown:
            return refuse(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    missing = [m for m in ("matplotlib", "starlette", "uvicorn") if not _importable(m)]
    if missing and not startup:
        return refuse(
            f"{', '.join(missing)} not installed: the benchmark needs the bench extra "
            "(bin/setup bench)"
        )
    if real_model is not None and (reason := openai_api.unavailable(real_model)) is not None:
        return refuse(f"--real-model: {reason}")
    out_dir = out or RESULTS
    try:
        if startup:
            report = run_startup_report(quick=quick, out_dir=out_dir, progress=progress)
        elif scale is not None:
            try:
                counts = [int(n) for n in scale.split(",")]
            except ValueError:
                return refuse(f"--scale takes hive counts like 10,100,1000, not {scale!r}")
            if not counts or min(counts) < 1:
                return refuse("--scale needs at least one hive count of 1 or more")
            report = run_scale_report(counts, quick=quick, out_dir=out_dir, progress=progress)
        else:
            report = run(
                quick=quick,
                modes=[m for m in MODES if not modes or m in modes],
                ops=[o for o in OPS if not ops or o in ops],
                out_dir=out_dir,
                real_model=real_model,
                progress=progress,
            )
    except BenchError as exc:
        print(f"rbee-mesh bench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rbee-mesh bench: interrupted", file=sys.stderr)
        return 130
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    if startup:
        print(cli_startup.table(report["results"]))
    elif scale is not None:
        from benchmarks.scale import print_table

        print_table(report["results"])
    else:
        print(table(report["results"]))
        print()
        print(curve.table(report["curve"]))
        if report["real_model"]:
            print()
            print(openai_api.table(report["real_model"]))
    for t in report["targets"]:
        verdict = "met" if t["met"] else "MISSED"
        bound = ""
        if "bound" in t:
            bound = f"; the job protocol alone: {t['bound']:g}x" + (
                "" if t["reachable"] else ", out of its reach"
            )
        print(f"target: {t['target']}: {t['value']:g} (goal {t['goal']}): {verdict}{bound}")
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"written: {out_dir / (report['benchmark'] + '.json')}", file=sys.stderr)
    return 0


def run_scale_report(
    counts: Sequence[int], *, quick: bool, out_dir: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    """The scale run (benchmarks/scale.py) as a report like `run`'s, written to scale.json."""
    from benchmarks.scale import run_scale

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="rbee-scale-") as tmp:
        rows = run_scale(counts, window_s=3 if quick else 10, workdir=Path(tmp), progress=progress)
    # Open loop (jobs at a steady rate, whatever the earlier ones do) is the honest latency.
    steady = {r["hives"]: r for r in rows if r["op"] == "worker_list" and r["mode"] == "open-loop"}
    found = [
        _target(f"control p99 with {n} simulated hives", r["p99_us"], 5000, "us")
        for n, r in sorted(steady.items())
        if n >= 1000
    ]
    return write_report("scale", out_dir, quick=quick, started=started, rows=rows, found=found)


def run_startup_report(
    *, quick: bool, out_dir: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    """The CLI start-up run (benchmarks/cli_startup.py), written to cli_startup.json."""
    started = time.time()
    rows = cli_startup.measure(cli_startup.plan(quick), progress)
    return write_report(
        "cli_startup",
        out_dir,
        quick=quick,
        started=started,
        rows=rows,
        found=cli_startup.targets(rows),
    )


def write_report(
    name: str,
    out_dir: Path,
    *,
    quick: bool,
    started: float,
    rows: list[dict[str, Any]],
    found: list[dict[str, Any]],
    notes: Sequence[str] = (),
    **extra: Any,
) -> dict[str, Any]:
    """The report of a run, also written to `out_dir/NAME.json`."""
    report = {
        "benchmark": name,
        "quick": quick,
        "started": started,
        "duration_s": round(time.time() - started, 1),
        "machine": machine(),
        **extra,
        "notes": list(notes),
        "results": rows,
        "targets": found,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


#: Benchmarks of their own, run instead of this one: `rbee-mesh bench FLAG [their options]`.
_OTHER_BENCHMARKS = {"--serve": "serving", "--detection": "detection", "--chaos": "chaos"}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m benchmarks.bench` (what `rbee-mesh bench` runs)."""
    args_ = list(sys.argv[1:] if argv is None else argv)
    for flag, module in _OTHER_BENCHMARKS.items():  # each with its own options
        if flag in args_:
            args_.remove(flag)
            other = importlib.import_module(f"benchmarks.{module}")
            code: int = other.main(args_, prog=f"rbee-mesh bench {flag}")
            return code
    parser = argparse.ArgumentParser(
        prog="rbee-mesh bench",
        description="Measure the transport modes side by side, next to an HTTP + SSE baseline: "
        "a light control operation (worker list), 1,000 narration events, token streaming from "
        "a real worker and worker spawn, all through keeper -> queen -> hive, in each mode: "
        "integrated (one process), localhost ipc, localhost tcp, remote tcp (network namespaces) "
        "and HTTP + SSE (uvicorn + starlette), interleaved round by round; with the tokens, "
        "inference on a real model by llama-cpp-python in process, the mesh's infer and the "
        "OpenAI-compatible API, when the model file is there (--real-model); with the control "
        "operation, the floors under it (trio alone, and the job protocol alone), and beside each "
        "control goal the best the protocol allows. Prints a table (or JSON) and writes "
        "modes.json and modes.png (or scale.json, cli_startup.json).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds and runs: done within a minute"
    )
    parser.add_argument(
        "--mode",
        dest="modes",
        action="append",
        default=[],
        metavar="MODE",
        help=f"only this mode ({', '.join(MODES)}; repeatable); default: all (a mode this machine "
        "cannot make, such as remote without root, is left out with the reason)",
    )
    parser.add_argument(
        "--op",
        dest="ops",
        action="append",
        default=[],
        metavar="OP",
        help=f"only this operation ({', '.join(OPS)}; repeatable)",
    )
    instead = parser.add_mutually_exclusive_group()
    instead.add_argument(
        "--scale",
        metavar="N,N,...",
        help="instead: the scale run, one queen with N simulated hives (8 workers each) for each "
        "N, e.g. 10,100,1000",
    )
    instead.add_argument(
        "--startup",
        action="store_true",
        help="instead: the command line's start-up (--version, --help, status up to its first "
        "frame) next to python's own and to importing zmq, trio and msgpack "
        "(benchmarks/cli_startup.py); needs no bench extra",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="instead: the serving benchmark, concurrent requests to llama-cpp-python (direct "
        "and its OpenAI server) and to rbee-mesh (API and CLI) on the real model "
        "(benchmarks/serving.py; its options: rbee-mesh bench --serve --help)",
    )
    parser.add_argument(
        "--detection",
        action="store_true",
        help="instead: how long the mesh takes to notice a worker killed, a hive killed, frozen "
        "or cut off and the queen killed, each mid-job, in network namespaces "
        "(benchmarks/detection.py; its options: rbee-mesh bench --detection --help)",
    )
    parser.add_argument(
        "--chaos",
        action="store_true",
        help="instead: the chaos soak, jobs of every kind on a queen and two hives in network "
        "namespaces while workers are killed, hives frozen and links cut (needs root; "
        "benchmarks/chaos.py; its options: rbee-mesh bench --chaos --help)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where to write the JSON and the chart (default: benchmarks/results/)",
    )
    parser.add_argument(
        "--real-model",
        type=Path,
        metavar="PATH",
        help="the GGUF file for the real-model inference measured with the tokens "
        "(llama-cpp-python vs the mesh's infer vs the OpenAI API; benchmarks/openai_api.py); "
        f"default: {openai_api.default_model()} if it is there (the real-model tests fetch "
        "it), else that part is left out with a note",
    )
    parser.add_argument("--json", dest="as_json", action="store_true", help="the report as JSON")
    args = parser.parse_args(argv)
    return command(
        args.quick,
        args.modes,
        args.ops,
        args.scale,
        args.out,
        args.as_json,
        args.real_model,
        args.startup,
    )


if __name__ == "__main__":
    sys.exit(main())
