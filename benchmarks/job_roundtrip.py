"""Job round trip keeper -> queen -> keeper, per transport, measured side by side.

One job is SUBMIT -> ACCEPTED -> NARRATION -> DONE (a `ping` of one pong), timed from submit to
the terminal frame. Transports are interleaved round by round in one process, so machine noise
falls on all of them alike; ratios are to the integrated (in-memory) mode.

    .venv/bin/python benchmarks/job_roundtrip.py [--rounds 20] [--jobs 50] [--json]

Prints a table (or JSON with --json) and writes benchmarks/results/job_roundtrip.json.
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
from pathlib import Path
from typing import Any

import trio

from rbee_mesh.actors.keeper import Keeper, open_keeper
from rbee_mesh.mesh import running_queen
from rbee_mesh.protocol import Done, Ping
from rbee_mesh.transport import local_endpoint_for

RESULTS = Path(__file__).parent / "results" / "job_roundtrip.json"


async def one_job(keeper: Keeper) -> float:
    start = time.perf_counter()
    job = await keeper.submit(Ping(count=1))
    async for _ in job:
        pass
    assert isinstance(job.terminal, Done), job.terminal
    return time.perf_counter() - start


async def measure(rounds: int, jobs: int, tmp: str) -> dict[str, list[float]]:
    endpoints = {
        "integrated (mem)": f"mem://bench-{os.getpid()}",
        "localhost ipc": f"ipc://{tmp}/queen.sock",
        "localhost tcp": "tcp://127.0.0.1:0",
    }
    samples: dict[str, list[float]] = {mode: [] for mode in endpoints}
    async with AsyncExitStack() as stack:
        keepers = {}
        for mode, endpoint in endpoints.items():
            queen = await stack.enter_async_context(running_queen(endpoint))
            address = local_endpoint_for(queen.listener.endpoint)
            keepers[mode] = await stack.enter_async_context(open_keeper(address))
            for _ in range(20):  # warm up: first-use costs are not what we measure
                await one_job(keepers[mode])
        for _ in range(rounds):
            for mode, keeper in keepers.items():
                samples[mode] += [await one_job(keeper) for _ in range(jobs)]
    return samples


def summarise(samples: dict[str, list[float]]) -> list[dict[str, Any]]:
    base = statistics.median(samples["integrated (mem)"])
    rows = []
    for mode, values in samples.items():
        values = sorted(values)
        p50 = statistics.median(values)
        rows.append(
            {
                "mode": mode,
                "jobs": len(values),
                "p50_us": round(p50 * 1e6, 1),
                "p99_us": round(values[int(len(values) * 0.99) - 1] * 1e6, 1),
                "jobs_per_s": round(len(values) / sum(values), 1),
                "p50_vs_integrated": round(p50 / base, 2),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=50, help="jobs per transport per round")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        samples = trio.run(measure, args.rounds, args.jobs, tmp)
    rows = summarise(samples)
    report = {
        "benchmark": "job_roundtrip",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "results": rows,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{'mode':<18} {'jobs':>6} {'p50 us':>9} {'p99 us':>9} {'jobs/s':>9} {'x integrated':>13}"
    )
    for r in rows:
        print(
            f"{r['mode']:<18} {r['jobs']:>6} {r['p50_us']:>9} {r['p99_us']:>9} "
            f"{r['jobs_per_s']:>9} {r['p50_vs_integrated']:>13}"
        )
    print(f"(written to {RESULTS})")


if __name__ == "__main__":
    main()
