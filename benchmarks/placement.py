"""Concurrent jobs on a CPU hive: placement by cores against placement by memory alone.

Two jobs of the same model at once, on a real model (SmolLM2-135M-Instruct, 98 MB: its worker
generates on every core), in the integrated mode, round by round in turn:

- by cores (the scheduler as it is): the second job waits for the first's worker, whose threads
  take the cores, and runs on it next;
- by memory alone (the scheduler before it counted cores, `HiveView.can_compute` always true):
  a second worker is spawned, and both generate at once on the same cores.

Reported per policy, as medians: the wall time for both jobs, the tokens per second of both
together, and the workers the hive ran. The workers are warm (one job first, and the second
policy's extra worker is spawned in its first round and kept), so spawn time is not measured.

    .venv/bin/python -m benchmarks.placement [--model PATH] [--rounds N] [--json]

Prints a table (or JSON) and writes benchmarks/results/placement.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from benchmarks import openai_api
from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.mesh import integrated_mesh
from rbee_mesh.actors.queen import scheduler
from rbee_mesh.protocol import Done, Infer

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("by cores", "by memory alone")
TOKENS = 64


@contextmanager
def policy(name: str) -> Iterator[None]:
    """Place by `name`: the scheduler as it is, or as it was before it counted cores."""
    original = scheduler.HiveView.can_compute
    if name == "by memory alone":
        scheduler.HiveView.can_compute = lambda self, model, inflight: True  # type: ignore[method-assign]
    try:
        yield
    finally:
        scheduler.HiveView.can_compute = original  # type: ignore[method-assign]


async def measure(model: Path, rounds: int) -> list[dict[str, Any]]:
    """Rows per policy: medians of the wall time of two concurrent jobs, and their rate."""
    samples: dict[str, list[tuple[float, int, int]]] = {p: [] for p in POLICIES}
    for name in POLICIES:
        with tempfile.TemporaryDirectory(prefix="rbee-placement-") as tmp, policy(name):
            state = Path(tmp) / "state"
            Catalog(state / "hive" / "models").add_file("local/bench", model.name, model)
            op = Infer(
                prompt="Once upon a time", model=f"local/bench:{model.name}",
                max_tokens=TOKENS, temperature=0.0, repeat_penalty=1.0,
            )  # fmt: skip
            async with (
                integrated_mesh(state) as queen,
                open_keeper(queen.listener.endpoint) as keeper,
            ):
                await (await keeper.submit(op)).end()  # a warm worker
                for _ in range(rounds + 1):  # the first round warms the second worker, if any
                    generated: list[int] = []

                    async def one() -> None:
                        end = await (await keeper.submit(op)).end()  # noqa: B023
                        assert isinstance(end, Done), end
                        generated.append(int(end.result["usage"]["generated_tokens"]))  # noqa: B023

                    start = time.perf_counter()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(one)
                        nursery.start_soon(one)
                    wall = time.perf_counter() - start
                    samples[name].append((wall, sum(generated), len(queen.hives.links[0].workers)))
                del samples[name][0]
    rows: list[dict[str, Any]] = []
    for name in POLICIES:
        wall = statistics.median(s[0] for s in samples[name])
        tokens = statistics.median(s[1] for s in samples[name])
        rows.append(
            {
                "policy": name, "rounds": len(samples[name]), "wall_s": round(wall, 3),
                "tokens": tokens, "tok_s": round(tokens / wall, 1),
                "workers": max(s[2] for s in samples[name]),
            }
        )  # fmt: skip
    base = float(rows[0]["tok_s"])
    for row in rows:
        row["x_by_cores"] = round(float(row["tok_s"]) / base, 3)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'placement':16} {'rounds':>6} {'workers':>7} {'wall s':>8} {'tok/s':>8} {'x':>7}"]
    for r in rows:
        lines.append(
            f"{r['policy']:16} {r['rounds']:>6} {r['workers']:>7} {r['wall_s']:>8.3f} "
            f"{r['tok_s']:>8.1f} {r['x_by_cores']:>7.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.placement", description=__doc__)
    parser.add_argument("--model", type=Path, default=openai_api.default_model())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", dest="as_json", action="store_true")
    args = parser.parse_args(argv)
    reason = openai_api.unavailable(args.model)
    if reason is not None:
        print(f"placement: {reason}", file=sys.stderr)
        return 2
    rows = trio.run(measure, args.model, args.rounds)
    RESULTS.mkdir(exist_ok=True)
    report = {"benchmark": "placement", "tokens_per_job": TOKENS, "rows": rows}
    (RESULTS / "placement.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1) if args.as_json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
