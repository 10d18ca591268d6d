"""`rbee-mesh demo`: the whole path, offline, in one process.

It makes a throwaway state directory, writes a tiny demo model into that hive's catalog (a llama
GGUF with random weights: it babbles, and the demo says so), starts an integrated mesh (queen and
local hive in this process; the worker is a real process), and runs a few jobs through it with
their narration and tokens streamed live, then a timing summary. Nothing is downloaded and the
user's own catalog is not touched.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from rbee_mesh.actors.hive.catalog import Catalog, ModelEntry, model_id
from rbee_mesh.actors.hive.hive import default_hive_id
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.keeper.render import Renderer, format_table
from rbee_mesh.actors.mesh import integrated_mesh
from rbee_mesh.protocol import (
    Cancelled,
    Done,
    Error,
    HiveList,
    HiveStatus,
    Infer,
    JobList,
    Message,
    ModelList,
    Operation,
    Ping,
    Status,
    Token,
)

DEMO_REPO = "rbee-mesh/demo-tiny-llama"
DEMO_FILE = "tiny-llama-random.gguf"
DEMO_MODEL = model_id(DEMO_REPO, DEMO_FILE)


def install_demo_model(catalog: Catalog) -> ModelEntry:
    """Write the demo model into `catalog` as an available entry."""
    from rbee_mesh.inference.gguf_file import write_tiny_gguf  # numpy and gguf: only for this

    with tempfile.TemporaryDirectory() as tmp:
        source = write_tiny_gguf(Path(tmp) / DEMO_FILE, seed=7)
        return catalog.add_file(DEMO_REPO, DEMO_FILE, source)


@dataclass(frozen=True)
class Step:
    title: str
    op: Operation
    expected: type[Message] = Done
    timeout_s: float | None = None
    cancel_after_frames: int = 0


STORY = "Once upon a time, in a mesh of small machines,"


def steps() -> list[Step]:
    return [
        Step("the state of the mesh", Status()),
        Step("the hives the queen knows", HiveList()),
        Step("the local hive, asked through the queen", HiveStatus(hive=default_hive_id())),
        Step("the models in the hive's catalog", ModelList()),
        Step(
            "inference: no worker holds the model yet, so the queen has one spawned",
            Infer(prompt=STORY, model=DEMO_MODEL, max_tokens=32, seed=42, temperature=0.8),
        ),
        Step(
            "inference again: the worker is idle and is reused",
            Infer(prompt=STORY, model=DEMO_MODEL, max_tokens=64, seed=7),
        ),
        Step(
            "a job cancelled midway (as Ctrl-C does)",
            Ping(count=50, interval_s=0.1),
            expected=Cancelled,
            cancel_after_frames=3,
        ),
        Step("a job that overruns its 0.5 s deadline", Ping(count=50, interval_s=0.1), Error, 0.5),
        Step("every job so far, each ended by exactly one terminal frame", JobList()),
    ]


async def run_demo(renderer: Renderer) -> bool:
    """Run the demo; True when every job ended the way it should."""
    with tempfile.TemporaryDirectory(prefix="rbee-mesh-demo-") as state:
        state_dir = Path(state)
        entry = install_demo_model(Catalog(state_dir / "hive" / "models"))
        renderer.note(
            f"demo model: {entry.id}, {entry.size // 1024} KiB of RANDOM weights (it babbles; "
            "real models come from `rbee-mesh model download`)"
        )
        rows = await _run_steps(renderer, state_dir)
    renderer.note("\n" + format_table(rows))
    return all(r["as_expected"] for r in rows)


async def _run_steps(renderer: Renderer, state_dir: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async with integrated_mesh(state_dir) as queen, open_keeper(queen.listener.endpoint) as keeper:
        renderer.note(
            f"integrated mesh: queen on {queen.listener.endpoint} and hive "
            f"{queen.hives.links[0].name} in this process; workers are processes of their own"
        )
        for step in steps():
            renderer.note(f"\n== {step.title}: {step.op.NAME}")
            start = trio.current_time()
            job = await keeper.submit(step.op, timeout_s=step.timeout_s)
            frames = tokens = 0
            first_token: float | None = None
            async for message in job:
                frames += 1
                if isinstance(message, Token):
                    tokens += message.count
                    first_token = first_token or trio.current_time()
                renderer.event(message)
                if frames == step.cancel_after_frames:
                    await job.cancel("cancelled by the demo after 3 frames")
            end = trio.current_time()
            rows.append(
                {
                    "job": job.job_id,
                    "op": step.op.NAME,
                    "ended": job.terminal.KIND.name if job.terminal else "?",
                    "as_expected": isinstance(job.terminal, step.expected),
                    "frames": frames,
                    "tokens": tokens,
                    "first_token_ms": round((first_token - start) * 1e3, 1) if first_token else "",
                    "total_ms": round((end - start) * 1e3, 1),
                }
            )
    return rows
