"""`rbee-mesh demo`: the whole path in one process, with a real model when it can.

It starts an integrated mesh (queen and local hive in this process; the worker is a real
process) over a state directory of its own (`$XDG_CACHE_HOME/rbee-mesh/demo`, so the user's own
is not touched, and what the demo fetched is there for its next run), and runs a few jobs
through it with their narration and tokens streamed live, then a timing summary.

The model is a real small instruct model when there is one: SmolLM2-135M-Instruct (Apache-2.0,
about 100 MB) fetched before, or a small instruct model of the user's own catalog (copied in),
or else downloaded from the hub, with its progress. Offline, the demo says so plainly and writes
a tiny model with random weights (it babbles) instead.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from rbee_mesh.actors.hive.catalog import Catalog, ModelEntry, ModelStatus, model_id
from rbee_mesh.actors.hive.hive import default_hive_id
from rbee_mesh.actors.jobclient import JobClient
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
    MeshError,
    Message,
    ModelDownload,
    ModelList,
    Operation,
    Ping,
    Status,
    Token,
)

DEMO_REPO = "rbee-mesh/demo-tiny-llama"
DEMO_FILE = "tiny-llama-random.gguf"
DEMO_MODEL = model_id(DEMO_REPO, DEMO_FILE)
#: The real model the demo uses when it can: small, an instruct model, Apache-2.0.
REAL_MODEL = "bartowski/SmolLM2-135M-Instruct-GGUF:SmolLM2-135M-Instruct-Q4_K_M.gguf"
#: A model of the user's own catalog the demo may borrow (copy): an instruct one, this small.
BORROW_MAX_BYTES = 256 * 1024 * 1024


def demo_dir() -> Path:
    """The demo's own state directory: its catalog, kept between runs."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "rbee-mesh" / "demo"


def install_demo_model(catalog: Catalog) -> ModelEntry:
    """Write the random-weight demo model into `catalog` as an available entry."""
    from rbee_mesh.inference.gguf_file import write_tiny_gguf  # numpy and gguf: only for this

    with tempfile.TemporaryDirectory() as tmp:
        source = write_tiny_gguf(Path(tmp) / DEMO_FILE, seed=7)
        return catalog.add_file(DEMO_REPO, DEMO_FILE, source)


def real_model(catalog: Catalog, user_models: Path) -> ModelEntry | None:
    """A real instruct model for the demo's `catalog`: one it has from an earlier run, else a
    small one of the user's catalog (at `user_models`), copied in; None if neither has one."""
    own = _small_instruct(catalog)
    if own is not None:
        return own
    lent = _small_instruct(Catalog(user_models)) if user_models.is_dir() else None
    if lent is None:
        return None
    return catalog.add_file(lent.repo, lent.file, lent.path, gguf=lent.gguf)


def _small_instruct(catalog: Catalog) -> ModelEntry | None:
    """The catalog's small instruct model that a backend here loads (REAL_MODEL first, else
    the smallest), if any."""
    fits = [
        e
        for e in catalog.listing().entries
        if e.status is ModelStatus.AVAILABLE
        and (e.gguf or {}).get("chat_template")
        and e.size <= BORROW_MAX_BYTES
    ]
    # The file's metadata is read (slow for a large vocabulary) only until one runs here.
    ranked = sorted(fits, key=lambda e: (e.id != REAL_MODEL, e.size))
    return next((e for e in ranked if _runs_here(e.path)), None)


def _runs_here(path: Path) -> bool:
    """Whether a backend installed here may load the file (by its metadata)."""
    from rbee_mesh.inference.backends import BACKENDS, backends_for

    try:
        may, _ = backends_for(path)
    except MeshError:
        return False
    return any(BACKENDS[name].unavailable() is None for name in may)


def _no_llama_cpp() -> str | None:
    """Why REAL_MODEL (a byte-level BPE vocabulary: llama-cpp only) cannot run here, if so."""
    from rbee_mesh.inference.backends import BACKENDS

    return BACKENDS["llama-cpp"].unavailable()


@dataclass(frozen=True)
class Step:
    title: str
    op: Operation
    expected: type[Message] = Done
    timeout_s: float | None = None
    cancel_after_frames: int = 0


STORY = "Once upon a time, in a mesh of small machines,"
QUESTION = "What is the capital of France? Answer in one word."


def steps(model: str, real: bool) -> list[Step]:
    """The demo's jobs on `model`: chat turns for a real instruct model, raw text otherwise."""
    if real:
        inference = [
            Step(
                "a chat turn: no worker holds the model yet, so the queen has one spawned",
                Infer(prompt=QUESTION, model=model, chat=True, max_tokens=16, temperature=0),
            ),
            Step(
                "another turn: the worker is idle and is reused",
                Infer(
                    prompt="Tell a two-sentence story about computers that help each other.",
                    model=model,
                    chat=True,
                    max_tokens=96,
                    seed=42,
                    temperature=0.7,
                ),
            ),
        ]
    else:
        inference = [
            Step(
                "inference: no worker holds the model yet, so the queen has one spawned",
                Infer(prompt=STORY, model=model, max_tokens=32, seed=42, temperature=0.8),
            ),
            Step(
                "inference again: the worker is idle and is reused",
                Infer(prompt=STORY, model=model, max_tokens=64, seed=7),
            ),
        ]
    return [
        Step("the state of the mesh", Status()),
        Step("the hives the queen knows", HiveList()),
        Step("the local hive, asked through the queen", HiveStatus(hive=default_hive_id())),
        Step("the models in the hive's catalog", ModelList()),
        *inference,
        Step(
            "a job cancelled midway (as Ctrl-C does)",
            Ping(count=50, interval_s=0.1),
            expected=Cancelled,
            cancel_after_frames=3,
        ),
        Step("a job that overruns its 0.5 s deadline", Ping(count=50, interval_s=0.1), Error, 0.5),
        Step("every job so far, each ended by exactly one terminal frame", JobList()),
    ]


async def run_demo(renderer: Renderer, user_state: Path) -> bool:
    """Run the demo; True when every job ended the way it should. `user_state`: the user's
    state directory, whose catalog may lend a model (it is not changed)."""
    state_dir = demo_dir()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    catalog = Catalog(state_dir / "hive" / "models")
    if catalog.lookup(DEMO_MODEL) is None:  # the fallback, there before the hive starts
        install_demo_model(catalog)
    entry = real_model(catalog, user_state / "hive" / "models")
    async with integrated_mesh(state_dir) as queen, open_keeper(queen.listener.endpoint) as keeper:
        renderer.note(
            f"integrated mesh: queen on {queen.listener.endpoint} and hive "
            f"{queen.hives.links[0].name} in this process; workers are processes of their own; "
            f"state in {state_dir}"
        )
        missing = _no_llama_cpp() if entry is None else None
        if entry is None and missing is None:
            entry = await _download(renderer, keeper, catalog)
        if entry is not None:
            renderer.note(f"demo model: {entry.id}, a real instruct model")
            model = entry.id
        else:
            why = (
                f"{REAL_MODEL} could not be fetched (offline?); `rbee-mesh model download` or "
                "`model import` gives a real one"
                if missing is None
                else f"{REAL_MODEL} needs the llama-cpp backend: {missing}"
            )
            renderer.note(f"demo model: {DEMO_MODEL}, RANDOM weights (it babbles): {why}")
            model = DEMO_MODEL
        rows = await _run_steps(renderer, keeper, steps(model, model != DEMO_MODEL))
    renderer.note("\n" + format_table(rows))
    return all(r["as_expected"] for r in rows)


async def _download(renderer: Renderer, keeper: JobClient, catalog: Catalog) -> ModelEntry | None:
    """Fetch REAL_MODEL into the demo's hive, narrated with its progress; None if it cannot."""
    renderer.note(f"\n== fetching a real model, once: {REAL_MODEL} (about 100 MB)")
    job = await keeper.submit(ModelDownload(model=REAL_MODEL))
    async for message in job:
        renderer.event(message)
    if not isinstance(job.terminal, Done):
        return None
    return catalog.get(REAL_MODEL)


async def _run_steps(
    renderer: Renderer, keeper: JobClient, story: list[Step]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for step in story:
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
