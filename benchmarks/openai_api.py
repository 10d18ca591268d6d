"""Inference on a real model: llama-cpp-python in this process, against the same generation
through the mesh's `infer` and through the queen's OpenAI-compatible API, in one run.

The model is SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), the real model of the tests
(tests/real_model.py fetches it into `~/.cache/rbee-mesh-tests`); `--model PATH` takes another.
Paths, interleaved round by round in a new random order each round, each warmed up once first:

- llama-cpp-python: `Llama.generate`, its bare token loop, in this process (the floor);
- rbee backend: the worker's own backend, `load_model(path, "cpu", "llama-cpp").generate`, in
  this process;
- mesh infer: a JobClient submitting `Infer` to a queen whose hive is in this process (the
  integrated mode); the worker is a process of its own, as always;
- OpenAI API: the official `openai` client, a streamed text completion from the same queen's
  API (hypercorn on loopback), the synchronous client in a thread.

All four generate the same text (the report says so per path): the same raw prompt (no chat
template), greedy (temperature 0, no repeat penalty: what the API asks of the worker), the same
max_tokens, a prompt the model does not end early, the worker's threads (`threads_for`) and
context (the backend's). Reported per path, as medians over the rounds: the time to first token
(from the call, the submission or the request) and the decode rate, tokens after the first over
the time from the first to the last (the mesh's frames may carry more than one token; the first
frame's extra tokens count as decoded at its arrival, a slight advantage to the mesh, bounded by
one frame); each path's rate as a share of llama-cpp-python's and of the rbee backend's, and the
time to first token it adds to llama-cpp-python's. The target: the mesh keeps at least 95% of
the direct tokens per second. The JSON also has, per path, the CPU time this process spent per
generation (the model's in process; the queen's, hive's, API's and clients' for the mesh's
paths), and for mesh infer the worker's own decode rate (from its DONE result).

    .venv/bin/python -m benchmarks.openai_api [--model PATH] [--quick] [--rounds N] [--json]

Prints a table (or JSON with --json) and writes benchmarks/results/openai_api.json. `rbee-mesh
bench` runs it too, after its token measurements, when the model file is there.
"""

from __future__ import annotations

import argparse
import codecs
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.actors.jobclient import JobClient
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.mesh import integrated_mesh
from rbee_mesh.actors.queen.api import serving_api
from rbee_mesh.protocol import Done, Infer, Token

RESULTS = Path(__file__).parent / "results"
#: The tests' real model, where tests/real_model.py caches it.
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = "local/smollm2"
#: A raw completion that SmolLM2 continues for well over 128 tokens at temperature 0.
PROMPT = "The history of the printing press begins"
MODES = ("llama-cpp", "backend", "infer", "api")
LABELS = {
    "llama-cpp": "llama-cpp-python",
    "backend": "rbee backend",
    "infer": "mesh infer",
    "api": "OpenAI API",
}
WHERE = {
    "llama-cpp": "Llama.generate(), in process",
    "backend": "load_model().generate(), in process",
    "infer": "JobClient -> queen -> hive -> worker process",
    "api": "openai client -> HTTP -> queen -> hive -> worker process",
}
#: The goal for the mesh's paths: decode tokens/s as a share of llama-cpp-python's.
GOAL = 0.97


def cache_dir() -> Path:
    """Where tests/real_model.py keeps the model (`$RBEE_MESH_TEST_CACHE` overrides it)."""
    default = Path.home() / ".cache" / "rbee-mesh-tests"
    return Path(os.environ.get("RBEE_MESH_TEST_CACHE", default))


def default_model() -> Path:
    return cache_dir() / MODEL_FILE


def unavailable(model: Path) -> str | None:
    """Why this benchmark cannot run here with `model`, or None."""
    if not model.is_file():
        return (
            f"no model at {model} (the real-model tests fetch it: tests/test_real_model.py; "
            "or name another GGUF file)"
        )
    missing = [m for m in ("llama_cpp", "openai") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (the test extra: bin/setup test)"
    return None


def plan(quick: bool) -> tuple[int, int]:
    """(rounds, max_tokens per generation)."""
    return (3, 64) if quick else (10, 128)


@dataclass
class Run:
    """One generation as its caller saw it."""

    ttft_s: float
    tokens: int
    #: Arrivals: pieces of text (in process), TOKEN frames (infer) or stream chunks (API).
    frames: int
    decode_tps: float
    total_s: float
    text: str
    #: The worker's own times (infer only): its decode rate, from its first token to its last.
    worker_decode_tps: float | None = None
    #: CPU time of this process during the run, all threads: the model's (in process), or the
    #: mesh's (queen, hive, job client, API server) and the openai client's.
    cpu_s: float = 0.0


class Clock:
    """Times of the arrivals of one generation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first = self.last = self.start
        self.frames = 0
        self.parts: list[str] = []

    def arrived(self, text: str) -> None:
        self.last = time.perf_counter()
        if self.frames == 0:
            self.first = self.last
        self.frames += 1
        self.parts.append(text)

    def run(self, tokens: int, worker_decode_tps: float | None = None) -> Run:
        span = self.last - self.first
        return Run(
            ttft_s=self.first - self.start,
            tokens=tokens,
            frames=self.frames,
            decode_tps=(tokens - 1) / span if span > 0 else 0.0,
            total_s=self.last - self.start,
            text="".join(self.parts),
            worker_decode_tps=worker_decode_tps,
        )


def infer_op(max_tokens: int) -> Infer:
    """The generation every path makes, as the API makes it of a text completion request."""
    return Infer(
        prompt=PROMPT,
        model=f"{REPO}:{MODEL_FILE}",
        max_tokens=max_tokens,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        repeat_penalty=1.0,
        seed=1,
        download=False,
    )


# ---- the paths -------------------------------------------------------------------------------


def llama_cpp_run(llama: Any, op: Infer) -> Run:
    """llama-cpp-python's own token loop, as bare as it gets: tokenize, `Llama.generate`, each
    token's bytes decoded as they come (what `create_completion` does, without its per-token
    bookkeeping for stop sequences and logprobs)."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    clock = Clock()
    prompt = llama.tokenize(op.prompt.encode(), add_bos=True, special=True)
    llama.reset()  # the whole prompt evaluated every time, as the worker's backend does
    tokens = 0
    for token in llama.generate(
        prompt, top_k=op.top_k, top_p=op.top_p, temp=op.temperature,
        repeat_penalty=op.repeat_penalty, reset=True,
    ):  # fmt: skip
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        clock.arrived(decoder.decode(llama.detokenize([token])))
        tokens += 1
        if tokens == op.max_tokens:
            break
    return clock.run(tokens)


def backend_run(model: Any, op: Infer) -> Run:
    from rbee_mesh.inference.backends import GenerationParams

    clock = Clock()
    for text in model.generate(op.prompt, GenerationParams.from_op(op)):
        clock.arrived(text)
    return clock.run(clock.frames)


async def infer_run(keeper: JobClient, op: Infer) -> Run:
    clock = Clock()
    tokens = 0
    job = await keeper.submit(op)
    async for message in job:
        if isinstance(message, Token):
            clock.arrived(message.text)
            tokens += message.count
    assert isinstance(job.terminal, Done), job.terminal
    usage = job.terminal.result["usage"]
    worker_span = usage["duration_s"] - usage["worker_ttft_s"]
    worker_tps = (usage["generated_tokens"] - 1) / worker_span if worker_span > 0 else 0.0
    return clock.run(tokens, worker_tps)


def api_run(client: Any, op: Infer) -> Run:
    clock = Clock()
    tokens = 0
    stream = client.completions.create(
        model=op.model, prompt=op.prompt, max_tokens=op.max_tokens, temperature=op.temperature,
        seed=op.seed, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            clock.arrived(chunk.choices[0].text)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return clock.run(tokens)


# ---- measuring -------------------------------------------------------------------------------


async def measure(
    model: Path,
    rounds: int,
    max_tokens: int,
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Each path warmed up once, then `rounds` runs of each, interleaved; summarised as rows."""
    import llama_cpp
    import openai

    from rbee_mesh.inference.backends import load_model
    from rbee_mesh.inference.native import metadata, threads_for

    op = infer_op(max_tokens)
    runs: dict[str, list[Run]] = {mode: [] for mode in MODES}
    async with AsyncExitStack() as stack:
        # The worker's backend, loaded as a worker loads it; llama-cpp-python with its context
        # and threads.
        backend, _ = load_model(model, "cpu", "llama-cpp")
        stack.callback(backend.close)
        threads = threads_for(metadata(model).info)
        llama = llama_cpp.Llama(
            model_path=str(model), n_ctx=backend.n_ctx, n_threads=threads,
            n_threads_batch=threads, verbose=False,
            flash_attn=True,  # as the worker: llama.cpp's default (auto) turns it on here
        )  # fmt: skip
        stack.callback(llama.close)
        progress(
            f"real model: {model.name}, context {backend.n_ctx}, {threads} thread(s), "
            f"{max_tokens} tokens a run"
        )
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="rbee-openai-api-"))
        state = Path(tmp) / "state"
        Catalog(state / "hive" / "models").add_file(REPO, MODEL_FILE, model)
        queen = await stack.enter_async_context(integrated_mesh(state))
        url = await stack.enter_async_context(serving_api(queen, "127.0.0.1:0"))
        keeper = await stack.enter_async_context(open_keeper(queen.listener.endpoint))
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        stack.callback(client.close)

        async def once(mode: str) -> Run:
            cpu = time.process_time()
            # In-process paths run in a thread too, so that the mesh keeps its heartbeats.
            if mode == "llama-cpp":
                run = await trio.to_thread.run_sync(llama_cpp_run, llama, op)
            elif mode == "backend":
                run = await trio.to_thread.run_sync(backend_run, backend, op)
            elif mode == "infer":
                run = await infer_run(keeper, op)
            else:
                run = await trio.to_thread.run_sync(api_run, client, op)
            run.cpu_s = time.process_time() - cpu
            return run

        progress("real model: warming up (the first job spawns the worker)")
        for mode in MODES:
            await once(mode)
        for n in range(rounds):
            progress(f"real model: round {n + 1} of {rounds}")
            for mode in random.sample(MODES, len(MODES)):
                runs[mode].append(await once(mode))
    return summarise(runs)


def summarise(runs: dict[str, list[Run]]) -> list[dict[str, Any]]:
    """A row per path: medians, the rate as a share of llama-cpp-python's (and of the rbee
    backend's), and the time to first token added to llama-cpp-python's."""
    p50 = {
        mode: {
            "ttft": statistics.median(r.ttft_s for r in values),
            "tps": statistics.median(r.decode_tps for r in values),
        }
        for mode, values in runs.items()
    }
    floor, backend = p50["llama-cpp"], p50.get("backend")
    reference = runs["llama-cpp"][0].text
    rows = []
    for mode, values in runs.items():
        ttft, tps = p50[mode]["ttft"], p50[mode]["tps"]
        worker = [r.worker_decode_tps for r in values if r.worker_decode_tps is not None]
        rows.append(
            {
                "mode": mode,
                "label": LABELS.get(mode, mode),
                "path": WHERE.get(mode, ""),
                "runs": len(values),
                "tokens": statistics.median_low(r.tokens for r in values),
                "frames": statistics.median_low(r.frames for r in values),
                "ttft_ms_p50": round(ttft * 1e3, 2),
                "total_ms_p50": round(statistics.median(r.total_s for r in values) * 1e3, 1),
                "decode_tps_p50": round(tps, 1),
                "worker_decode_tps_p50": round(statistics.median(worker), 1) if worker else None,
                "cpu_ms_p50": round(statistics.median(r.cpu_s for r in values) * 1e3, 1),
                "tps_vs_direct": round(tps / floor["tps"], 3),
                "tps_vs_backend": round(tps / backend["tps"], 3) if backend else None,
                "ttft_added_ms": round((ttft - floor["ttft"]) * 1e3, 2),
                "same_text": all(r.text == reference for r in values),
            }
        )
    return rows


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The mesh's paths keep at least 95% of llama-cpp-python's decode rate."""
    return [
        {
            "target": f"real model: {r['label']} tok/s vs llama-cpp-python",
            "value": r["tps_vs_direct"],
            "goal": f">= {GOAL:g}x",
            "met": r["tps_vs_direct"] >= GOAL,
        }
        for r in rows
        if r["mode"] in ("infer", "api")
    ]


def table(rows: list[dict[str, Any]]) -> str:
    head = ("real model", "runs", "tokens", "TTFT ms", "+TTFT ms", "decode tok/s", "x direct",
            "x backend")  # fmt: skip
    lines = ["{:<18} {:>5} {:>7} {:>9} {:>9} {:>13} {:>9} {:>10}".format(*head)]
    for r in rows:
        same = "" if r["same_text"] else "  (different text)"
        backend = "-" if r["tps_vs_backend"] is None else f"{r['tps_vs_backend']:.3f}"
        lines.append(
            f"{r['label']:<18} {r['runs']:>5} {r['tokens']:>7} {r['ttft_ms_p50']:>9.1f} "
            f"{r['ttft_added_ms']:>+9.1f} {r['decode_tps_p50']:>13.1f} "
            f"{r['tps_vs_direct']:>9.3f} {backend:>10}{same}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench import write_report

    parser = argparse.ArgumentParser(
        prog="benchmarks.openai_api", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--model", type=Path, default=None,
        help=f"the GGUF file (default: {default_model()}, which the real-model tests fetch)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="3 rounds of 64 tokens")
    parser.add_argument("--rounds", type=int, help="rounds (default: 10; 3 with --quick)")
    parser.add_argument("--tokens", type=int, help="max_tokens (default: 128; 64 with --quick)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    model = args.model or default_model()
    reason = unavailable(model)
    if reason is not None:
        print(f"benchmarks.openai_api: cannot run: {reason}", file=sys.stderr)
        return 2
    rounds, tokens = plan(args.quick)
    rounds, tokens = args.rounds or rounds, args.tokens or tokens
    started = time.time()

    def progress(text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)

    rows = trio.run(measure, model, rounds, tokens, progress)
    report = write_report(
        "openai_api", RESULTS, quick=args.quick, started=started, rows=rows,
        found=targets(rows), model=str(model), prompt=PROMPT,
        plan={"rounds": rounds, "max_tokens": tokens},
    )  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(table(rows))
    for t in report["targets"]:
        print(f"target: {t['target']}: {t['value']:g} (goal {t['goal']}): "
              f"{'met' if t['met'] else 'MISSED'}")  # fmt: skip
    print(f"written: {RESULTS / 'openai_api.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
