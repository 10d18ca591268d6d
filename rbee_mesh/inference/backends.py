"""Inference backends: load a GGUF model and stream generated text, behind one interface.

Two libraries run GGUF models, and a worker uses one of them per model:

- **llama-cpp** (`llama-cpp-python`): current llama.cpp; loads current architectures (llama 3,
  qwen2, mistral, phi, gemma ...). It compiles llama.cpp when installed (minutes), so it is an
  extra: ``pip install 'rbee-mesh[llama]'``.
- **ctransformers** 0.2.27: a prebuilt wheel, installed with rbee-mesh. Unmaintained; its GGUF
  loader is a llama.cpp of September 2023, so it loads llama-architecture models with a
  SentencePiece vocabulary (and falcon with one, which real falcon files do not have) in the
  quantisations of that time.

`load_model(path, device, backend="auto")` tries llama-cpp first, then ctransformers, and says
which it chose and why. `backends_for(path)` says, from the file's metadata alone and without
loading a library, which may load it: a hive asks before it starts a worker. Everything here is
synchronous: a worker (or a hive) runs it in a thread.

One module per library (`llama_cpp_backend.py`, `ctransformers_backend.py`), on what both share
(`native.py`: the interface, GGUF metadata, memory, the generation loop).
"""

from __future__ import annotations

from pathlib import Path

from rbee_mesh.inference.ctransformers_backend import CtransformersBackend
from rbee_mesh.inference.llama_cpp_backend import LlamaCppBackend
from rbee_mesh.inference.native import (
    COMPUTE_OVERHEAD,
    Backend,
    GenerationParams,
    LoadedModel,
    available_memory,
    check_memory,
    gpu_index,
    memory_needed,
    metadata,
)
from rbee_mesh.protocol import ErrorCode, MeshError

__all__ = [
    "BACKENDS",
    "COMPUTE_OVERHEAD",
    "GenerationParams",
    "LoadedModel",
    "available_memory",
    "backends_for",
    "check_memory",
    "load_model",
    "memory_needed",
]

BACKENDS: dict[str, Backend] = {
    LlamaCppBackend.name: LlamaCppBackend(),
    CtransformersBackend.name: CtransformersBackend(),
}


def load_model(
    path: Path, device: str, backend: str = "auto", ctx: int | None = None, sequences: int = 1
) -> tuple[LoadedModel, str]:
    """Load the model at `path` with `backend` ("auto" tries each of BACKENDS in order), for up
    to `sequences` generations at once (llama-cpp batches them; ctransformers runs one), each
    with `ctx` tokens of context (None: the model's own, within a memory budget).

    Returns the model and one line saying which backend loads it and why that one.
    """
    if backend != "auto" and backend not in BACKENDS:
        choices = ", ".join(["auto", *BACKENDS])
        raise MeshError(ErrorCode.INVALID_REQUEST, f"unknown backend {backend!r}; use {choices}")
    gpu_index(device)
    info = metadata(path).info
    if backend != "auto":
        chosen = BACKENDS[backend]
        missing = chosen.unavailable()
        if missing:
            raise MeshError(ErrorCode.UNAVAILABLE, f"backend {backend} is unavailable: {missing}")
        refusal = chosen.refuses(info)
        if refusal:
            raise MeshError(
                ErrorCode.INVALID_REQUEST, f"{backend} cannot load {Path(path).name}: {refusal}"
            )
        model = chosen.load(Path(path), device, ctx, sequences)
        return model, f"{backend}: loads {info.architecture}; named"

    passed: list[str] = []
    #: Backends not installed here that the file's metadata does not rule out.
    missing_that_may: list[str] = []
    for name, candidate in BACKENDS.items():
        refusal = candidate.refuses(info)
        if refusal:
            passed.append(f"{name} cannot load {Path(path).name}: {refusal}")
            continue
        missing = candidate.unavailable()
        if missing:
            missing_that_may.append(name)
            passed.append(missing)
            continue
        try:
            model = candidate.load(Path(path), device, ctx, sequences)
        except MeshError as exc:
            if exc.code != ErrorCode.INVALID_REQUEST:
                raise
            passed.append(exc.message)
            continue
        why = "; ".join(passed) if passed else f"loads {info.architecture}; chosen first"
        return model, f"{name}: {why}"
    if missing_that_may:  # not the file's fault: this machine lacks what may load it
        raise MeshError(
            ErrorCode.UNAVAILABLE,
            f"{Path(path).name} needs {' or '.join(missing_that_may)}: " + "; ".join(passed),
        )
    raise MeshError(
        ErrorCode.INVALID_REQUEST,
        f"no backend can load {Path(path).name}: " + "; ".join(passed),
    )


def backends_for(path: Path, backend: str = "auto") -> tuple[list[str], list[str]]:
    """The backends that may load the GGUF file at `path`, as its metadata tells (no library is
    loaded), in the order `load_model` tries them; and why each of the others refuses it.

    Raises MeshError(INVALID_REQUEST) when none may (or `backend`, named, refuses it): the file
    cannot run here whatever is installed, and no worker need start to find that out.
    """
    info = metadata(path).info
    names = list(BACKENDS) if backend == "auto" else [backend]
    refusals = {n: r for n in names if (r := BACKENDS[n].refuses(info)) is not None}
    may = [n for n in names if n not in refusals]
    why = [f"{n} cannot load {Path(path).name}: {r}" for n, r in refusals.items()]
    if not may:
        raise MeshError(ErrorCode.INVALID_REQUEST, "; ".join(why))
    return may, why
