"""The ctransformers backend: ctransformers 0.2.27, a prebuilt wheel installed with rbee-mesh.

Unmaintained; its GGUF loader is a llama.cpp of September 2023, so it loads llama-architecture
models with a SentencePiece vocabulary (and falcon with one, which real falcon files do not have)
in the quantisations of that time.

ctransformers defects and what this module does about each:

- Its ``tokenize()`` allocates ``len(text) + 1`` ints, but SentencePiece needs up to one token per
  UTF-8 byte plus a leading space and BOS: an emoji prompt overflows the heap and crashes the
  process. `CtransformersModel` calls the C tokenizer itself with a buffer sized for the worst
  case, and never calls the library's ``tokenize()``, ``__call__`` or ``generate()``.
- It runs py-cpuinfo on every load to pick a build (about 1.1 s). We read the flags from
  /proc/cpuinfo once and name the build (``lib="avx2"``: about 1 ms).
- A vocabulary without byte tokens (``<0x0A>``), an architecture or quantisation it predates:
  its load fails with "Failed to create LLM" and no reason, or crashes. `refuses()` reads the
  GGUF metadata first and says which.
- Its sampler re-seeds its random generator with the given seed before *every* token (so every
  token of a request used the same random draw) and takes a negative seed to mean
  ``time(NULL)``, the same for every request within a second. We pass a different seed per
  token, derived from the request's seed.
- ``top_k=0`` means greedy to it, "no limit" to llama.cpp and to the Infer operation; and
  temperature 0 divides by zero. We pass the vocabulary size and top_k=1 respectively.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import gguf

from rbee_mesh.inference.gguf_file import GgufInfo
from rbee_mesh.inference.native import (
    PENALTY_WINDOW,
    GenerationParams,
    NativeModel,
    load_guarded,
    loadable,
    mix_seed,
    threads_for,
    tokenizer_model,
)
from rbee_mesh.protocol import ErrorCode, MeshError

#: The architectures its GGUF loader builds (gpt2, gptj, gptneox and mpt only as old GGML files).
CTRANSFORMERS_ARCHITECTURES = frozenset({"llama", "falcon"})
#: Quantisations newer than its llama.cpp (September 2023): everything after MOSTLY_Q6_K.
_CTRANSFORMERS_NEWER_FILE_TYPES = frozenset(
    t.name for t in gguf.LlamaFileType if gguf.LlamaFileType.MOSTLY_Q6_K < t < 1024
)


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def ctransformers_lib(device: str) -> str:
    """The prebuilt ctransformers library for `device` and this CPU, chosen as it would (cuda,
    avx2, avx with f16c, else basic) but from /proc/cpuinfo instead of a ~1.1 s py-cpuinfo run.
    """
    if device != "cpu":
        return "cuda"
    flags = _cpu_flags()
    if "avx2" in flags:
        return "avx2"
    if {"avx", "f16c"} <= flags:
        return "avx"
    return "basic"


class CtransformersBackend:
    name = "ctransformers"

    def unavailable(self) -> str | None:
        try:
            import ctransformers  # noqa: F401
        except ImportError:
            return "ctransformers is not installed (pip install ctransformers)"
        except Exception as exc:  # a broken install fails in any way: OSError, AttributeError
            return f"ctransformers does not import: {type(exc).__name__}: {exc}"
        return None

    def refuses(self, info: GgufInfo) -> str | None:
        if info.architecture not in CTRANSFORMERS_ARCHITECTURES:
            return (
                f"the {info.architecture} architecture is not supported "
                f"(GGUF: {', '.join(sorted(CTRANSFORMERS_ARCHITECTURES))} only)"
            )
        if info.version not in (2, 3):
            return f"GGUF version {info.version} is not supported (2 and 3 only)"
        tokenizer = tokenizer_model(info)
        if tokenizer not in (None, "llama"):
            return (
                f"its {tokenizer} vocabulary is not supported: ctransformers 0.2.27 fails to "
                "load or crashes on any but a SentencePiece (llama) one"
            )
        if info.byte_tokens == 0:
            return (
                "the vocabulary has no byte tokens (<0x0A> ...); ctransformers 0.2.27 needs a "
                "SentencePiece vocabulary with them"
            )
        if info.file_type in _CTRANSFORMERS_NEWER_FILE_TYPES:
            return f"the {info.file_type} quantisation is newer than ctransformers 0.2.27"
        return None

    def load(
        self, path: Path, device: str, ctx: int | None = None, sequences: int = 1
    ) -> CtransformersModel:
        # One sequence, whatever was asked: its C API evaluates one context.
        gpu, info, n_ctx = loadable(self, path, device, ctx, 1)
        if gpu is not None and gpu > 0:
            raise MeshError(
                ErrorCode.UNAVAILABLE,
                f"ctransformers cannot choose a GPU (asked for {device}); use llama-cpp",
            )
        if gpu == 0:
            os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        from ctransformers import LLM, Config

        config = Config(
            context_length=n_ctx,
            gpu_layers=0 if gpu is None else 1_000_000,
            batch_size=512,
            threads=threads_for(info),
        )

        def load() -> Any:
            try:
                return LLM(str(path), config=config, lib=ctransformers_lib(device))
            except OSError as exc:  # its prebuilt library or the CUDA runtime will not load
                raise MeshError(
                    ErrorCode.UNAVAILABLE, f"ctransformers cannot run on {device} here: {exc}"
                ) from None
            except RuntimeError:
                raise MeshError(
                    ErrorCode.INVALID_REQUEST,
                    f"ctransformers cannot load {path.name} (it gives no reason)",
                ) from None

        llm = load_guarded(path, info, device, n_ctx, load)
        return CtransformersModel(llm, info, config.threads)


class CtransformersModel(NativeModel):
    """A model loaded by ctransformers, driven through its C functions: one generation at a
    time (its C API has one context and no sequences)."""

    backend = "ctransformers"

    def __init__(self, llm: Any, info: GgufInfo, threads: int) -> None:
        n_ctx = int(llm.context_length)
        super().__init__(info, n_ctx, sequences=1, cache_positions=n_ctx)
        self._llm: Any = llm
        self._threads = threads
        self._vocab_size = int(llm.vocab_size)
        # What its own tokenize() does: only llama vocabularies start a prompt with BOS.
        self._add_bos = llm.model_type == "llama"

    def _tokenize(self, text: str) -> list[int]:
        data = text.encode()
        if b"\0" in data:
            raise MeshError(
                ErrorCode.INVALID_REQUEST, "ctransformers cannot take text with a NUL character"
            )
        # SentencePiece gives at most one token per byte, after it prefixes a space and spells
        # each space as "▁" (3 bytes, so 3 byte tokens if "▁" is not a piece); then BOS.
        capacity = 3 * (len(data) + 1) + 1
        buffer = (ctypes.c_int * capacity)()
        count = int(self._llm.ctransformers_llm_tokenize(data, self._add_bos, buffer))
        if count > capacity:  # the bound above is wrong and the heap is already overwritten
            os.abort()
        return buffer[:count]

    def _start(
        self, tokens: list[int], params: GenerationParams, budget: int
    ) -> tuple[Generator[bytes, None, None], Callable[[], None]]:
        # Its one context is rewritten from the prompt on by the next generation's first step.
        return self._pieces(tokens, params, budget), lambda: None

    def _pieces(
        self, tokens: list[int], params: GenerationParams, budget: int
    ) -> Generator[bytes, None, None]:
        if params.presence_penalty or params.frequency_penalty:
            raise MeshError(
                ErrorCode.INVALID_REQUEST,
                "the ctransformers backend has no presence or frequency penalty (its sampler "
                "applies repeat_penalty only); leave them at 0 or load the model with llama-cpp",
            )
        llm = self._llm
        assert params.seed is not None
        top_k = params.top_k or self._vocab_size
        temperature = params.temperature
        if temperature == 0:
            top_k, temperature = 1, 1.0
        history = list(tokens)
        for step in range(budget):
            with self._lock:
                self._check_open()
                fresh = history if step == 0 else history[-1:]
                n_past = len(history) - len(fresh)
                batch = (ctypes.c_int * len(fresh))(*fresh)
                if not llm.ctransformers_llm_batch_eval(
                    batch, len(fresh), n_past, 512, self._threads
                ):
                    raise MeshError(ErrorCode.INTERNAL, "ctransformers failed to evaluate tokens")
                recent = history[-PENALTY_WINDOW:]
                token = int(
                    llm.ctransformers_llm_sample(
                        (ctypes.c_int * len(recent))(*recent),
                        len(recent),
                        top_k,
                        params.top_p,
                        temperature,
                        params.repeat_penalty,
                        # A non-negative int32, different for every token (see the module doc).
                        mix_seed(params.seed, step) >> 33,
                    )
                )
                if llm.ctransformers_llm_is_eos_token(token):
                    return
                piece = bytes(llm.ctransformers_llm_detokenize(token))
                history.append(token)
            yield piece

    def _free(self) -> None:
        # The LLM object frees the native model when its last reference goes.
        self._llm = None
