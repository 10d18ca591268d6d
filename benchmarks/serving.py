"""Serving concurrent requests: the same workload against llama-cpp-python called directly,
llama-cpp-python's own OpenAI server, and rbee-mesh through its OpenAI-compatible API and its
CLI, in one run (issue 21).

The workload, the same for every system: N requests at once (N = 1, 2, 4, 8; `--concurrency`),
each a streamed text completion of `--max-tokens` (64) tokens, greedy (temperature 0, no repeat
penalty), request i with the i-th of eight raw prompts (no chat template) that the model
(SmolLM2-135M-Instruct Q4_1, where the real-model tests cache it; `--model PATH` for another)
continues well past 128 tokens. Every system uses the worker's threads (`threads_for`) and
context. The systems:

- llama-cpp-python, direct: `Llama.generate` in this process, the bare token loop of
  benchmarks/openai_api.py. A `Llama` serves one generation at a time, so N requests are N
  generations queued at once and served in turn: the floor for one request, the baseline for
  many;
- llama-cpp-python server: `python -m llama_cpp.server` (its `[server]` dependencies: the bench
  extra) with the same model, threads and context, `--interrupt_requests false` so that every
  request gets all its tokens (queued behind its server's one lock);
- llama-cpp-python server, defaults: the same server as it starts by default, which ends a
  streamed completion as soon as another request waits: the requests it cut short show in the
  tokens column;
- rbee-mesh API: a queen daemon on loopback with this machine's hive in its process
  (`rbee-mesh queen start --integrated`), placing and spawning workers as it does by default;
  the official `openai` client, as for the servers;
- rbee-mesh CLI: N `rbee-mesh --json infer` processes at once against that same queen.

The HTTP systems get one synchronous `openai` client per concurrent request, each in a thread
of this process, kept across rounds (keep-alive connections). The two llama-cpp-python servers
are left out, with the reason, when their dependencies are not installed.

Each system is warmed up first with one batch at the largest N (model loaded, the mesh's
workers spawned, references taken: each prompt's direct text). Then `--rounds` rounds (3;
1 with `--quick`): in each, for each N, every system runs one batch, the systems in a new
random order each time, so that machine noise falls on all alike. Reported per system and N:
aggregate tokens/s (a batch's tokens over the time from its first request sent to its last
response ended; median over rounds), time to first token p50 (each request from its own send),
latency p50, p99 (nearest rank) and max, the tokens of each request (min and max: a system that
generated fewer shows it) and whether its text is the direct text for that prompt; the
aggregate as a ratio to llama-cpp-python's server and to llama-cpp-python direct. Tokens are
the systems' own counts (the worker's usage, the CLI's result), or for llama-cpp-python's
server, which streams no usage, one per text chunk (one token each, but for a character split
over tokens: the same text as direct means the same tokens). The targets (issue 21): at 4
concurrent requests the mesh's aggregate at least 2x the server's; a lone request at least 97%
of llama-cpp-python direct.

    .venv/bin/python -m benchmarks.serving [--quick] [--rounds N] [--concurrency 1,2,4,8]
        [--max-tokens 64] [--system NAME ...] [--model PATH] [--out DIR] [--json]
    bin/rbee-mesh bench --serve [the same options]

Prints a table (or JSON with --json) and writes serving.json and serving.png (aggregate
tokens/s and latency against N, per system) into benchmarks/results/ (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from benchmarks import openai_api
from benchmarks.bench import (
    ROOT,
    BenchError,
    Setup,
    _env,
    machine,
    nearest_rank,
    write_report,
)
from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.protocol import Infer

RESULTS = ROOT / "benchmarks" / "results"
SYSTEMS = ("direct", "server", "server-default", "api", "cli")
LABELS = {
    "direct": "llama-cpp-python, direct",
    "server": "llama-cpp-python server",
    "server-default": "llama-cpp-python server, defaults",
    "api": "rbee-mesh API",
    "cli": "rbee-mesh CLI",
}
WHERE = {
    "direct": "Llama.generate() in this process, one request at a time",
    "server": "openai client -> python -m llama_cpp.server --interrupt_requests false",
    "server-default": "openai client -> python -m llama_cpp.server (it interrupts)",
    "api": "openai client -> HTTP -> queen daemon (integrated hive) -> worker process",
    "cli": "rbee-mesh --json infer processes -> queen daemon -> worker process",
}
CONCURRENCY = (1, 2, 4, 8)
#: Request i's prompt is PROMPTS[i % 8]; SmolLM2 continues each past 256 tokens, greedy.
PROMPTS = (
    openai_api.PROMPT,
    *(
        f"The history of the {subject} begins"
        for subject in (
            "steam engine", "telescope", "compass", "telephone", "railway", "clock", "radio",
        )
    ),
)  # fmt: skip
MODEL_ID = f"{openai_api.REPO}:{openai_api.MODEL_FILE}"
#: What llama-cpp-python's server needs beyond llama_cpp itself (its `[server]` extra).
SERVER_MODULES = ("fastapi", "sse_starlette", "starlette_context", "pydantic_settings", "yaml")
#: The goals (issue 21): mesh / server aggregate tokens/s at 4 concurrent; lone mesh / direct.
GOAL_CONCURRENT, GOAL_LONE = 2.0, 0.97


@dataclass(frozen=True)
class Plan:
    rounds: int
    concurrency: tuple[int, ...]
    max_tokens: int

    @classmethod
    def of(
        cls,
        quick: bool,
        rounds: int | None = None,
        concurrency: Sequence[int] = CONCURRENCY,
        max_tokens: int = 64,
    ) -> Plan:
        return cls(rounds or (1 if quick else 3), tuple(sorted(set(concurrency))), max_tokens)


@dataclass
class Request:
    """One request as its client saw it; times are `time.perf_counter()` readings."""

    prompt: int
    sent: float
    ended: float
    #: When its first text arrived; None if none did.
    first: float | None
    tokens: int
    text: str
    error: str = ""


class System(Protocol):
    def run(self, n: int) -> list[Request]:
        """N requests at once (request i with prompt i % len(PROMPTS)), each as it ended."""
        ...


def ops(max_tokens: int) -> list[Infer]:
    """The generation of each prompt, as the API asks it of a worker (openai_api.infer_op)."""
    op = openai_api.infer_op(max_tokens)
    return [dataclasses.replace(op, prompt=prompt) for prompt in PROMPTS]


def _at_once(n: int, one: Callable[[int, threading.Barrier], Request]) -> list[Request]:
    """`one(i, barrier)` for i < n, each in a thread; they send when all are ready."""
    barrier = threading.Barrier(n)
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda i: one(i, barrier), range(n)))


# ---- the systems -------------------------------------------------------------------------------


class Direct:
    """llama-cpp-python in this process: N requests queued at once, generated in turn."""

    def __init__(self, llama: Any, max_tokens: int) -> None:
        self.llama = llama
        self.ops = ops(max_tokens)

    def run(self, n: int) -> list[Request]:
        sent = time.perf_counter()
        done = []
        for i in range(n):
            prompt = i % len(PROMPTS)
            start = time.perf_counter()
            run = openai_api.llama_cpp_run(self.llama, self.ops[prompt])
            first = start + run.ttft_s if run.frames else None
            done.append(Request(prompt, sent, start + run.total_s, first, run.tokens, run.text))
        return done


class OpenAIServer:
    """An OpenAI-compatible server, one synchronous `openai` client per concurrent request."""

    def __init__(
        self, url: str, max_tokens: int, clients: int, extra_body: dict[str, Any] | None = None
    ) -> None:
        import openai

        self.max_tokens = max_tokens
        self.extra_body = extra_body
        self.clients = [
            openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
            for _ in range(clients)
        ]

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def run(self, n: int) -> list[Request]:
        return _at_once(n, self._one)

    def _one(self, i: int, barrier: threading.Barrier) -> Request:
        prompt = i % len(PROMPTS)
        client = self.clients[i]
        barrier.wait()
        sent = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        usage: int | None = None
        try:
            stream = client.completions.create(
                model=MODEL_ID, prompt=PROMPTS[prompt], max_tokens=self.max_tokens,
                temperature=0.0, seed=1, stream=True, stream_options={"include_usage": True},
                extra_body=self.extra_body,
            )  # fmt: skip
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    if first is None:
                        first = time.perf_counter()
                    parts.append(chunk.choices[0].text)
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
        except Exception as exc:  # a failed request is reported, not fatal to the run
            error = f"{type(exc).__name__}: {exc}"
        else:
            error = ""
        tokens = len(parts) if usage is None else usage
        return Request(prompt, sent, time.perf_counter(), first, tokens, "".join(parts), error)


class Cli:
    """`rbee-mesh --json infer` processes against the queen of a state directory."""

    def __init__(self, home: Path, op: Infer) -> None:
        self.env = _env(home)
        self.op = op

    def run(self, n: int) -> list[Request]:
        return _at_once(n, self._one)

    def argv(self, prompt: str) -> list[str]:
        op = self.op
        return [
            sys.executable, "-m", "rbee_mesh", "--json", "infer", "-m", MODEL_ID,
            "-n", str(op.max_tokens), "-t", str(op.temperature), "--top-p", str(op.top_p),
            "--top-k", str(op.top_k), "--repeat-penalty", str(op.repeat_penalty),
            "--seed", str(op.seed), "--no-download", prompt,
        ]  # fmt: skip

    def _one(self, i: int, barrier: threading.Barrier) -> Request:
        prompt = i % len(PROMPTS)
        argv = self.argv(PROMPTS[prompt])
        with tempfile.TemporaryFile("w+") as stderr:
            barrier.wait()
            sent = time.perf_counter()
            proc = subprocess.Popen(
                argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=stderr, text=True,
            )  # fmt: skip
            first, result = _read_events(proc.stdout)
            code = proc.wait()
            ended = time.perf_counter()
            stderr.seek(0)
            said = stderr.read().strip()
        usage = result.get("usage", {})
        error = "" if code == 0 else f"exit {code}: {said[-300:]}"
        return Request(
            prompt, sent, ended, first, int(usage.get("generated_tokens", 0)),
            str(result.get("text", "")), error,
        )  # fmt: skip


def _read_events(stdout: IO[str] | None) -> tuple[float | None, dict[str, Any]]:
    """From `infer --json`'s events: when the first token came, and the job's result."""
    assert stdout is not None
    first: float | None = None
    result: dict[str, Any] = {}
    for line in stdout:
        event = json.loads(line)
        if event.get("event") == "token" and first is None:
            first = time.perf_counter()
        elif event.get("event") == "done":
            result = dict(event.get("result") or {})
    return first, result


# ---- starting the servers --------------------------------------------------------------------


def server_unavailable() -> str | None:
    """Why llama-cpp-python's OpenAI server cannot run here, or None."""
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return (
            f"{', '.join(missing)} not installed (llama-cpp-python's server extra; the bench "
            "extra has it: bin/setup bench)"
        )
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_llama_server(
    setup: Setup, model: Path, threads: int, n_ctx: int, *, interrupt: bool
) -> str:
    """`python -m llama_cpp.server` on a free loopback port, stopped at close: its base URL."""
    port = _free_port()
    argv = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias",
        MODEL_ID, "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx",
        str(n_ctx), "--flash_attn", "true", "--host", "127.0.0.1", "--port", str(port),
        *([] if interrupt else ["--interrupt_requests", "false"]),
    ]  # fmt: skip
    log = setup.workdir / f"llama-server-{port}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    setup.later(stop)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise BenchError(f"llama-cpp-python's server exited with {proc.returncode}:\n{tail}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/models", timeout=2) as answer,
        ):
            if answer.status == 200:
                return url
        time.sleep(0.2)
    raise BenchError("llama-cpp-python's server did not answer within 120 s")


def start_mesh(setup: Setup, model: Path) -> tuple[Path, str]:
    """A queen daemon with this machine's hive in its process, on loopback, holding `model`:
    its state directory and its API's base URL."""
    home = setup.workdir / "mesh"
    Catalog(home / "hive" / "models").add_file(openai_api.REPO, openai_api.MODEL_FILE, model)
    started = setup.cli(
        home, "queen", "start", "--integrated", "--no-discovery",
        "--bind", "tcp://127.0.0.1:0", "--api", "127.0.0.1:0",
    )  # fmt: skip
    setup.later(lambda: setup.cli(home, "queen", "stop"))
    return home, str(started["api"])


# ---- measuring ---------------------------------------------------------------------------------


def measure(
    model: Path,
    plan: Plan,
    systems: Sequence[str],
    workdir: Path,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[dict[tuple[str, int], list[list[Request]]], dict[str, Any]]:
    """Batches per (system, N), interleaved round by round; and what the run found on the way
    (the systems left out and why, the mesh's workers, the references)."""
    import llama_cpp

    from rbee_mesh.inference.backends import load_model
    from rbee_mesh.inference.native import metadata, threads_for

    setup = Setup(workdir, model)
    found: dict[str, Any] = {"notes": [], "references": {}}
    try:
        # The context a worker loads this model with, and its threads.
        backend, _ = load_model(model, "cpu", "llama-cpp")
        n_ctx = backend.n_ctx
        backend.close()
        threads = threads_for(metadata(model).info)
        found["threads"], found["n_ctx"] = threads, n_ctx
        progress(f"serving: {model.name}, context {n_ctx}, {threads} thread(s), "
                 f"{plan.max_tokens} tokens a request")  # fmt: skip
        running: dict[str, System] = {}
        widest = max(plan.concurrency)
        for name in systems:
            progress(f"serving: starting {LABELS[name]}")
            if name == "direct":
                llama = llama_cpp.Llama(
                    model_path=str(model), n_ctx=n_ctx, n_threads=threads,
                    n_threads_batch=threads, verbose=False,
                    flash_attn=True,  # as the worker: llama.cpp's default (auto) turns it on
                )  # fmt: skip
                setup.later(llama.close)
                running[name] = Direct(llama, plan.max_tokens)
            elif name in ("server", "server-default"):
                reason = server_unavailable()
                if reason is not None:
                    found["notes"].append(f"{LABELS[name]} left out: {reason}")
                    progress(found["notes"][-1])
                    continue
                url = start_llama_server(
                    setup, model, threads, n_ctx, interrupt=name == "server-default"
                )
                # What the mesh's API asks of its worker for temperature 0: no repeat penalty.
                server = OpenAIServer(url, plan.max_tokens, widest, {"repeat_penalty": 1.0})
                setup.later(server.close)
                running[name] = server
            else:
                if "mesh" not in found:  # one mesh for its API and its CLI
                    found["mesh"] = start_mesh(setup, model)
                home, url = found["mesh"]
                if name == "api":
                    api = OpenAIServer(url, plan.max_tokens, widest)
                    setup.later(api.close)
                    running[name] = api
                else:
                    running[name] = Cli(home, openai_api.infer_op(plan.max_tokens))
        for name, system in running.items():
            progress(f"serving: warming up {LABELS[name]} ({widest} at once)")
            warm = system.run(widest)
            failed = [r.error for r in warm if r.error]
            if failed:
                raise BenchError(f"{LABELS[name]}: {failed[0]}")
            if name == "direct":
                found["references"] = {r.prompt: r.text for r in warm}
        batches: dict[tuple[str, int], list[list[Request]]] = {
            (name, n): [] for name in running for n in plan.concurrency
        }
        order = list(running)
        for round_ in range(1, plan.rounds + 1):
            for n in plan.concurrency:
                random.shuffle(order)
                progress(f"serving: round {round_} of {plan.rounds}, {n} at once")
                for name in order:
                    batches[(name, n)].append(running[name].run(n))
        if "mesh" in found:
            home, _ = found.pop("mesh")
            workers = setup.cli(home, "worker", "list")["result"]
            found["mesh_workers"] = [
                {k: w.get(k) for k in ("id", "state", "slots", "device")} for w in workers
            ]
        return batches, found
    finally:
        setup.close()


def aggregate_tps(batch: Sequence[Request]) -> float:
    """A batch's tokens over the time from its first request sent to its last response ended."""
    wall = max(r.ended for r in batch) - min(r.sent for r in batch)
    return sum(r.tokens for r in batch) / wall if wall > 0 else 0.0


def summarise(
    batches: dict[tuple[str, int], list[list[Request]]],
    max_tokens: int,
    references: dict[int, str] | None = None,
) -> list[dict[str, Any]]:
    """A row per system and N: medians and percentiles over every request of every round, and
    the aggregate against llama-cpp-python's server and llama-cpp-python direct at that N."""
    agg = {key: statistics.median(aggregate_tps(b) for b in runs) for key, runs in batches.items()}
    rows = []
    for (name, n), runs in batches.items():
        requests = [r for b in runs for r in b]
        latency = sorted(r.ended - r.sent for r in requests)
        ttft = [r.first - r.sent for r in requests if r.first is not None]
        tokens = [r.tokens for r in requests]
        server, direct = agg.get(("server", n)), agg.get(("direct", n))
        rows.append(
            {
                "system": name,
                "label": LABELS.get(name, name),
                "path": WHERE.get(name, ""),
                "concurrency": n,
                "rounds": len(runs),
                "requests": len(requests),
                "errors": sum(1 for r in requests if r.error),
                "tokens_min": min(tokens),
                "tokens_max": max(tokens),
                "short": sum(1 for t in tokens if t < max_tokens),
                "agg_tps": round(agg[(name, n)], 1),
                "ttft_ms_p50": round(statistics.median(ttft) * 1e3, 1) if ttft else None,
                "latency_ms_p50": round(statistics.median(latency) * 1e3, 1),
                "latency_ms_p99": round(nearest_rank(latency, 0.99) * 1e3, 1),
                "latency_ms_max": round(latency[-1] * 1e3, 1),
                "vs_server": round(agg[(name, n)] / server, 3) if server else None,
                "vs_direct": round(agg[(name, n)] / direct, 3) if direct else None,
                "same_text": (
                    all(_same_text(r, references, max_tokens) for r in requests)
                    if references
                    else None
                ),
            }
        )
    order = {name: i for i, name in enumerate(SYSTEMS)}
    return sorted(rows, key=lambda r: (r["concurrency"], order.get(r["system"], len(order))))


def _same_text(request: Request, references: dict[int, str], max_tokens: int) -> bool:
    """Whether `request` generated its prompt's direct text: all of it, or as far as it went
    when it was cut short (fewer tokens than asked for)."""
    reference = references.get(request.prompt)
    if reference is None:
        return False
    if request.tokens < max_tokens:
        return reference.startswith(request.text)
    return request.text == reference


def targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 21's goals, for the mesh's API (and the CLI at 4 at once), where measured."""
    by = {(r["system"], r["concurrency"]): r for r in rows}
    found = []
    for name in ("api", "cli"):
        four = by.get((name, 4))
        if four is not None and four["vs_server"] is not None:
            found.append(
                {
                    "target": f"4 at once: {LABELS[name]} aggregate tok/s vs "
                    "llama-cpp-python server",
                    "value": four["vs_server"],
                    "goal": f">= {GOAL_CONCURRENT:g}x",
                    "met": four["vs_server"] >= GOAL_CONCURRENT,
                }
            )
    lone = by.get(("api", 1))
    if lone is not None and lone["vs_direct"] is not None:
        found.append(
            {
                "target": "a lone request: rbee-mesh API tok/s vs llama-cpp-python direct",
                "value": lone["vs_direct"],
                "goal": f">= {GOAL_LONE:g}x",
                "met": lone["vs_direct"] >= GOAL_LONE,
            }
        )
    return found


# ---- output ------------------------------------------------------------------------------------


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("system", "N", "reqs", "tok/req", "agg tok/s", "x server", "x direct", "TTFT p50",
            "lat p50", "lat p99", "lat max")  # fmt: skip
    lines = ["{:<34} {:>2} {:>5} {:>8} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}".format(*head)]
    for r in rows:
        low, high = r["tokens_min"], r["tokens_max"]
        tokens = str(low) if low == high else f"{low}-{high}"
        flags = []
        if r["short"]:
            flags.append(f"{r['short']} cut short")
        if r["same_text"] is False:
            flags.append("different text")
        if r["errors"]:
            flags.append(f"{r['errors']} failed")
        lines.append(
            f"{r['label']:<34} {r['concurrency']:>2} {r['requests']:>5} {tokens:>8} "
            f"{r['agg_tps']:>10.1f} {_ratio(r['vs_server']):>9} {_ratio(r['vs_direct']):>9} "
            f"{_ms(r['ttft_ms_p50']):>9} {_ms(r['latency_ms_p50']):>9} "
            f"{_ms(r['latency_ms_p99']):>9} {_ms(r['latency_ms_max']):>9}"
            + (f"  ({', '.join(flags)})" if flags else "")
        )
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}ms"


def chart(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Aggregate tokens/s and latency p50 (whisker to p99) against N, a line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tps, lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {
        "direct": ("#404040", "o", "-"),
        "server": ("#d9822b", "s", "-"),
        "server-default": ("#d9822b", "s", ":"),
        "api": ("#3b7dd8", "D", "-"),
        "cli": ("#3b7dd8", "^", "--"),
    }
    names = [name for name in SYSTEMS if any(r["system"] == name for r in rows)]
    for name in names:
        mine = sorted((r for r in rows if r["system"] == name), key=lambda r: r["concurrency"])
        ns = [r["concurrency"] for r in mine]
        color, marker, line = styles[name]
        label = LABELS[name]
        short = sum(r["short"] for r in mine)
        if short:  # its rate and latency are of fewer tokens than asked for
            label += f" ({short} of {sum(r['requests'] for r in mine)} requests cut short)"
        style = {"color": color, "marker": marker, "linestyle": line, "label": label}
        tps.plot(ns, [r["agg_tps"] for r in mine], **style)
        p50 = [r["latency_ms_p50"] / 1000 for r in mine]
        p99 = [r["latency_ms_p99"] / 1000 for r in mine]
        lat.errorbar(ns, p50, yerr=[[0] * len(ns), [b - a for a, b in zip(p50, p99, strict=True)]],
                     capsize=3, **style)  # fmt: skip
    ticks = sorted({r["concurrency"] for r in rows})
    for ax in (tps, lat):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.set_xlabel("concurrent requests")
        ax.grid(alpha=0.3)
    tps.set_ylim(bottom=0)
    tps.set_ylabel("aggregate tokens/s")
    tps.set_title("aggregate tokens/s (median over rounds)", fontsize=9)
    lat.set_ylim(bottom=0)
    lat.set_ylabel("s")
    lat.set_title("latency per request: p50, whisker to p99", fontsize=9)
    tps.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the command ---------------------------------------------------------------------------


def run(
    model: Path,
    plan: Plan,
    *,
    quick: bool = False,
    systems: Sequence[str] = SYSTEMS,
    out_dir: Path = RESULTS,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Measure, write `serving.json` and `serving.png` into `out_dir`, return the report."""
    started = time.time()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="rbee-serving-") as tmp:
        batches, found = measure(model, plan, systems, Path(tmp), progress)
    load_after = os.getloadavg()
    references = found["references"]
    rows = summarise(batches, plan.max_tokens, references)
    notes = list(found["notes"])
    notes.append(
        "load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}; after: {:.2f} {:.2f} {:.2f}"
        .format(*load_before, *load_after)
    )  # fmt: skip
    if "mesh_workers" in found:
        workers = found["mesh_workers"]
        slots = ", ".join(str(w["slots"]) for w in workers)
        notes.append(f"the mesh ran {len(workers)} worker(s) at the end, slots: {slots or '-'}")
    if not references:
        notes.append("llama-cpp-python direct was not run: texts not compared")
    report = write_report(
        "serving", out_dir, quick=quick, started=started, rows=rows, found=targets(rows),
        notes=notes, model=str(model), prompts=list(PROMPTS),
        plan={"rounds": plan.rounds, "concurrency": list(plan.concurrency),
              "max_tokens": plan.max_tokens},
        threads=found.get("threads"), n_ctx=found.get("n_ctx"),
        mesh_workers=found.get("mesh_workers", []),
        load_average={"before": list(load_before), "after": list(load_after)},
    )  # fmt: skip
    title = (
        f"Serving {model.name}, {plan.max_tokens} tokens a request "
        f"({machine()['cpus']} CPUs, {time.strftime('%Y-%m-%d', time.localtime(started))})"
    )
    chart(rows, out_dir / "serving.png", title)
    return report


def _concurrency(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes counts like 1,2,4,8, not {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("needs counts of 1 or more")
    return counts


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number of 1 or more, not {text!r}")
    return value


def main(argv: Sequence[str] | None = None, prog: str = "python -m benchmarks.serving") -> int:
    """`python -m benchmarks.serving`, also `rbee-mesh bench --serve`."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the same concurrent streamed completions with llama-cpp-python "
        "called directly, llama-cpp-python's OpenAI server and rbee-mesh (its API and its "
        "CLI), interleaved round by round: aggregate tokens/s, time to first token and "
        "latency per number of concurrent requests. Prints a table (or JSON) and writes "
        "serving.json and serving.png. docs/benchmarks.md explains the method.",
    )
    parser.add_argument("--quick", action="store_true", help="one round (default: 3)")
    parser.add_argument("--rounds", type=_positive, help="rounds of every system at every N")
    parser.add_argument(
        "--concurrency", type=_concurrency, default=CONCURRENCY, metavar="N,N,...",
        help="concurrent requests to measure (default: 1,2,4,8)",
    )  # fmt: skip
    parser.add_argument(
        "--max-tokens", type=_positive, default=64, help="tokens a request (default: 64)"
    )
    parser.add_argument(
        "--system", dest="systems", action="append", default=[], metavar="NAME",
        choices=SYSTEMS, help=f"only this system ({', '.join(SYSTEMS)}; repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--model", "--real-model", type=Path, metavar="PATH",
        help=f"the GGUF file (default: {openai_api.default_model()}, which the real-model "
        "tests fetch)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, help="where to write the JSON and the chart (default: "
        "benchmarks/results/)",
    )  # fmt: skip
    parser.add_argument("--json", dest="as_json", action="store_true", help="the report as JSON")
    args = parser.parse_args(argv)
    model = args.model or openai_api.default_model()
    reason = openai_api.unavailable(model)
    if reason is None and importlib.util.find_spec("matplotlib") is None:
        reason = "matplotlib not installed (the bench extra: bin/setup bench)"
    if reason is not None:
        print(f"{prog}: cannot run: {reason}", file=sys.stderr)
        return 2
    plan = Plan.of(args.quick, args.rounds, args.concurrency, args.max_tokens)
    systems = [s for s in SYSTEMS if not args.systems or s in args.systems]
    out_dir = args.out or RESULTS

    def progress(text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)

    try:
        report = run(
            model, plan, quick=args.quick, systems=systems, out_dir=out_dir, progress=progress
        )
    except BenchError as exc:
        print(f"{prog} failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    if args.as_json:
        print(json.dumps(report, indent=2))
        return 0
    print(table(report["results"]))
    for t in report["targets"]:
        verdict = "met" if t["met"] else "MISSED"
        print(f"target: {t['target']}: {t['value']:g} (goal {t['goal']}): {verdict}")
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"written: {out_dir / 'serving.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
