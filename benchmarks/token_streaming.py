"""Token streaming: a backend called directly vs the same model through the mesh.

Modes, interleaved round by round in one run so machine noise falls on all of them alike:

- direct: `load_model` + `generate` in this process, no mesh at all;
- integrated: keeper, queen and hive in this process (in-memory transport), the worker a process;
- tcp: keeper -> queen -> hive over loopback tcp (queen and hive in this process), the worker a
  process.

Every mode generates the same text (same model, prompt, parameters and seed). Reported per mode:
time to first token (from the request) and decode rate, tokens after the first over the time from
the first to the last token, as the medians over the runs, and the ratio of each to direct.
The issue's target: the mesh keeps at least 95% of direct tokens per second.

    .venv/bin/python benchmarks/token_streaming.py [--model tiny|small] [--rounds 10] [--json]

Two random-weight llama models: `tiny` (~270 KB, thousands of tokens/s: the worst case for the
mesh, whose per-token cost is then a large share) and `small` (~40 MB, hundreds of tokens/s, the
rate of real models on a CPU).

Prints a table (or JSON with --json) and writes benchmarks/results/token_streaming.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from rbee_mesh.actors.hive.catalog import Catalog, ModelEntry
from rbee_mesh.actors.hive.hive import HiveConfig, running_hive
from rbee_mesh.actors.jobclient import JobClient
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.mesh import integrated_mesh, running_queen
from rbee_mesh.inference.backends import GenerationParams, load_model
from rbee_mesh.inference.gguf_file import write_tiny_gguf
from rbee_mesh.protocol import Done, Infer, Token
from rbee_mesh.transport import local_endpoint_for

RESULTS = Path(__file__).parent / "results"
PROMPT = "Once upon a time"
REPO, FILE = "rbee-bench/random-llama", "model.gguf"
MODEL = f"{REPO}:{FILE}"
MODELS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "small": {
        "embedding_length": 512,
        "block_count": 8,
        "head_count": 8,
        "head_count_kv": 8,
        "feed_forward_length": 1024,
    },
}


@dataclass
class Run:
    ttft_s: float
    tokens: int
    decode_tps: float


def direct_run(model: Any, op: Infer) -> Run:
    start = time.perf_counter()
    first = last = start
    tokens = 0
    for _ in model.generate(op.prompt, GenerationParams.from_op(op)):
        last = time.perf_counter()
        if tokens == 0:
            first = last
        tokens += 1
    return Run(first - start, tokens, (tokens - 1) / (last - first) if tokens > 1 else 0.0)


async def mesh_run(keeper: JobClient, op: Infer) -> Run:
    start = time.perf_counter()
    first = last = start
    tokens = 0
    job = await keeper.submit(op)
    async for message in job:
        if isinstance(message, Token):
            last = time.perf_counter()
            if tokens == 0:
                first = last
            tokens += message.count
    assert isinstance(job.terminal, Done), job.terminal
    # Tokens coalesced into one frame arrive together: count the first frame's extra tokens as
    # decoded at its arrival (a slight advantage to the mesh, bounded by one frame).
    return Run(first - start, tokens, (tokens - 1) / (last - first) if last > first else 0.0)


def install(state: Path, size: str, tmp: Path) -> ModelEntry:
    source = write_tiny_gguf(tmp / f"{size}.gguf", seed=7, context_length=2048, **MODELS[size])
    return Catalog(state / "hive" / "models").add_file(REPO, FILE, source)


async def measure(rounds: int, op: Infer, size: str, tmp: Path) -> tuple[dict[str, list[Run]], str]:
    state = tmp / "state"
    entry = install(state, size, tmp)
    model, why = load_model(entry.path, "cpu")
    runs: dict[str, list[Run]] = {"direct": [], "integrated": [], "tcp": []}
    async with AsyncExitStack() as stack:
        queen = await stack.enter_async_context(integrated_mesh(state))
        integrated = await stack.enter_async_context(open_keeper(queen.listener.endpoint))
        tcp_state = tmp / "tcp-state"
        install(tcp_state, size, tmp)
        hive = await stack.enter_async_context(
            running_hive(
                HiveConfig(
                    state_dir=tcp_state,
                    hive_id="bench-hive",
                    control="tcp://127.0.0.1:0",
                    heartbeats="tcp://127.0.0.1:0",
                )
            )
        )
        tcp_queen = await stack.enter_async_context(
            running_queen("tcp://127.0.0.1:0", hives=[hive.server.listener.endpoint])
        )
        await tcp_queen.hives.links[0].heard.wait()
        tcp = await stack.enter_async_context(
            open_keeper(local_endpoint_for(tcp_queen.listener.endpoint))
        )
        for keeper in (integrated, tcp):  # the first job spawns the worker: not measured
            await mesh_run(keeper, op)
        # Direct runs in a thread too, so that the mesh in this process keeps its heartbeats.
        await trio.to_thread.run_sync(direct_run, model, op)
        for _ in range(rounds):
            runs["direct"].append(await trio.to_thread.run_sync(direct_run, model, op))
            runs["integrated"].append(await mesh_run(integrated, op))
            runs["tcp"].append(await mesh_run(tcp, op))
    model.close()
    return runs, why


def summarise(runs: dict[str, list[Run]]) -> list[dict[str, Any]]:
    base_tps = statistics.median(r.decode_tps for r in runs["direct"])
    base_ttft = statistics.median(r.ttft_s for r in runs["direct"])
    rows = []
    for mode, values in runs.items():
        tps = statistics.median(r.decode_tps for r in values)
        ttft = statistics.median(r.ttft_s for r in values)
        rows.append(
            {
                "mode": mode,
                "runs": len(values),
                "tokens": values[0].tokens,
                "ttft_ms_p50": round(ttft * 1e3, 2),
                "decode_tps_p50": round(tps, 1),
                "tps_vs_direct": round(tps / base_tps, 3),
                "ttft_vs_direct": round(ttft / base_ttft, 2),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=200, help="max_tokens per job")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    op = Infer(prompt=PROMPT, model=MODEL, max_tokens=args.tokens, seed=1, temperature=0.8)
    with tempfile.TemporaryDirectory(prefix="rbee-bench-") as tmp:
        runs, why = trio.run(measure, args.rounds, op, args.model, Path(tmp))
    rows = summarise(runs)
    report = {
        "benchmark": "token_streaming",
        "model": f"{args.model} random-weight llama ({MODELS[args.model] or 'defaults'})",
        "backend": why,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "target": "mesh decode tokens/s >= 95% of direct",
        "results": rows,
    }
    out = RESULTS / f"token_streaming_{args.model}.json"
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"backend: {why}")
    head = ("mode", "runs", "tokens", "ttft ms", "decode tok/s", "x direct tok/s", "x direct ttft")
    print("{:<11} {:>5} {:>7} {:>9} {:>13} {:>15} {:>14}".format(*head))
    for r in rows:
        print(
            f"{r['mode']:<11} {r['runs']:>5} {r['tokens']:>7} {r['ttft_ms_p50']:>9} "
            f"{r['decode_tps_p50']:>13} {r['tps_vs_direct']:>15} {r['ttft_vs_direct']:>14}"
        )
    print(f"(written to {out})")


if __name__ == "__main__":
    main()
