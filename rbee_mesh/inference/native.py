"""What both inference backends share: the interface (`GenerationParams`, `LoadedModel`,
`Backend`), the GGUF metadata they decide by, memory checks, and the one generation loop.

Both backends share one generation loop (`stream_text`): a backend yields the bytes of each
sampled token; the loop decodes UTF-8 incrementally (a character split across tokens is held
until it is whole), cuts the text at the first stop sequence and holds back text that may be the
start of one. Sampling is seeded per request, so the same seed, parameters and prompt give the
same text in every process on the same machine and library build.

Threads: `sizing.threads_for` (one for a small model, else one per core).
"""

from __future__ import annotations

import abc
import codecs
import dataclasses
import functools
import os
import secrets
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import gguf

from rbee_mesh.inference import sizing
from rbee_mesh.inference.gguf_file import GgufInfo, open_gguf
from rbee_mesh.protocol import ErrorCode, MeshError, ProtocolError
from rbee_mesh.protocol.operations import WORKER_DEVICE, Infer
from rbee_mesh.units import human_bytes

#: The context of a model whose file does not say its own.
FALLBACK_CONTEXT = 2048
#: The smallest context a model is loaded with (unless it was trained on less).
MIN_CONTEXT = 512
#: What a model's KV cache may take by default: this, or the weights' size if larger (a model
#: worth its memory is worth a context of the same size). `--ctx` asks for more or less.
KV_BUDGET_BYTES = 1024 * 1024 * 1024
#: How many recent tokens the repeat penalty looks at (llama.cpp's default).
PENALTY_WINDOW = 64
#: Working memory beyond the weights and the KV cache: llama.cpp's compute buffers.
COMPUTE_OVERHEAD = 64 * 1024 * 1024

_MASK64 = (1 << 64) - 1


# ---- the interface ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationParams:
    """How to sample: the generation arguments of an Infer operation."""

    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    #: 0 means no top-k limit.
    top_k: int = 40
    #: None: a random seed per generation.
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repeat_penalty: float = 1.1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        problems = [
            f"{name} {value!r} is out of range"
            for name, value, ok in (
                ("max_tokens", self.max_tokens, self.max_tokens >= 1),
                ("temperature", self.temperature, self.temperature >= 0),
                ("top_p", self.top_p, 0 < self.top_p <= 1),
                ("top_k", self.top_k, self.top_k >= 0),
                ("seed", self.seed, self.seed is None or 0 <= self.seed <= 0xFFFF_FFFF),
                ("repeat_penalty", self.repeat_penalty, self.repeat_penalty > 0),
                ("stop", self.stop, all(self.stop)),
            )
            if not ok
        ]
        if problems:
            raise MeshError(ErrorCode.INVALID_REQUEST, "; ".join(problems))

    @classmethod
    def from_op(cls, op: Infer) -> GenerationParams:
        """The sampling arguments of `op` (its fields of the same names)."""
        return cls(**{f.name: getattr(op, f.name) for f in dataclasses.fields(cls)})

    def with_seed(self) -> GenerationParams:
        """These params with a fresh random seed if they have none (to report or reuse it)."""
        return self if self.seed is not None else replace(self, seed=secrets.randbits(32))


class LoadedModel(Protocol):
    """A model a backend has loaded: up to `sequences` generations at once, from any threads."""

    #: "ctransformers" or "llama-cpp".
    backend: str
    info: GgufInfo
    #: The context each generation has (prompt plus generated tokens), in tokens.
    n_ctx: int
    #: Generations it runs at once: sequences of one batch (llama-cpp), or 1 (ctransformers).
    sequences: int
    #: What it holds in memory, in bytes: {"weights": ..., "kv_cache": ...} (every sequence's).
    memory: dict[str, int]

    def count_tokens(self, text: str) -> int:
        """The tokens `text` takes as a prompt, the BOS token included."""
        ...

    def generate(self, prompt: str, params: GenerationParams) -> TextStream:
        """The generated text, one item per sampled token: its text, or "" while the text is
        held back (part of a UTF-8 character, or what may begin a stop sequence).

        Ends at max_tokens, end of sequence, a full context, or a stop sequence (which is not
        yielded, nor anything after it). Closing the stream early frees its sequence at once.
        Raises MeshError: INVALID_REQUEST when the prompt does not fit the context, BUSY when
        `sequences` generations are running already.
        """
        ...

    def close(self) -> None:
        """Free the model. Waits for a step being computed; later calls raise MeshError."""
        ...


class Backend(Protocol):
    """A library that loads GGUF models."""

    name: str

    def unavailable(self) -> str | None:
        """None if the library imports; else one line saying why not."""
        ...

    def refuses(self, info: GgufInfo) -> str | None:
        """None if this backend can load the file `info` describes; else why not."""
        ...

    def load(
        self, path: Path, device: str, ctx: int | None = None, sequences: int = 1
    ) -> LoadedModel:
        """Load the model at `path` onto `device` ("cpu" or "cuda:N"), with `ctx` tokens of
        context per sequence (None: `context_size`'s default, the budget shared by `sequences`),
        for up to `sequences` generations at once (a backend may serve fewer: its `sequences`).

        Raises MeshError: INVALID_REQUEST if the file cannot be loaded, UNAVAILABLE if the
        library, the device or the memory is missing.
        """
        ...


# ---- memory ----------------------------------------------------------------------------------


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (free RAM plus reclaimable cache), if known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_needed(path: Path, n_ctx: int) -> tuple[int, str]:
    """RAM a model needs to run on the CPU with `n_ctx` tokens of context, and how that adds up.

    The weights (the file), the KV cache (f16 keys and values of every layer for each context
    position, from the GGUF hyperparameters) and a fixed allowance for compute buffers.
    """
    meta = metadata(path)
    info = meta.info
    kv = meta.kv_bytes_per_position * n_ctx
    total = info.file_size + kv + COMPUTE_OVERHEAD
    return total, (
        f"{human_bytes(info.file_size)} of weights + {human_bytes(kv)} of context "
        f"+ {human_bytes(COMPUTE_OVERHEAD)} of working memory"
    )


def check_memory(what: str, needed: int, available: int | None, breakdown: str = "") -> None:
    """Raise MeshError(UNAVAILABLE, "out of memory ...") unless `needed` bytes fit `available`.

    `available` None (not known on this system) passes.
    """
    if available is None or needed <= available:
        return
    detail = f" ({breakdown})" if breakdown else ""
    raise MeshError(
        ErrorCode.UNAVAILABLE,
        f"out of memory: {what} needs about {human_bytes(needed)}{detail}, "
        f"but only {human_bytes(available)} of RAM is available",
    )


@dataclass(frozen=True)
class Metadata:
    """What the backends read from a GGUF file, beyond GgufInfo."""

    info: GgufInfo
    #: `tokenizer.ggml.model`: "llama" (SentencePiece), "gpt2" (byte-level BPE) ...
    tokenizer: str | None
    #: KV cache bytes per context position: f16 keys and values of every layer.
    kv_bytes_per_position: int


def metadata(path: str | os.PathLike[str]) -> Metadata:
    """The file's metadata, read once per version of the file.

    gguf's reader builds an object per vocabulary entry: about 7 s for a 152k-token vocabulary
    here. A load asks three times (choosing, refusing, sizing), a worker once per slot.
    """
    try:
        stat = os.stat(path)
    except OSError:
        return _readmetadata(str(path), -1, -1)  # open_gguf says what is wrong
    return _readmetadata(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _readmetadata(path: str, size: int, mtime_ns: int) -> Metadata:
    # Plain values only: a cached reader would keep the file mapped after it is deleted.
    gguf_file = open_gguf(path)
    fields = gguf_file.reader.fields
    arch = gguf_file.info.architecture

    def number(key: str) -> int | None:
        field = fields.get(f"{arch}.{key}")
        if field is None or not field.data:
            return None
        # Some architectures give a value per layer: the largest bounds them all.
        return max(int(field.parts[index][0]) for index in field.data)

    layers = number("block_count") or 0
    embedding = number("embedding_length") or 0
    heads = number("attention.head_count") or 0
    kv_bytes = 0
    if layers and embedding and heads:
        kv_heads = number("attention.head_count_kv") or heads
        key = number("attention.key_length") or embedding // heads
        value = number("attention.value_length") or embedding // heads
        kv_bytes = 2 * layers * kv_heads * (key + value)
    tokenizer = gguf_file.reader.get_field(gguf.Keys.Tokenizer.MODEL)
    return Metadata(
        info=gguf_file.info,
        tokenizer=None if tokenizer is None else str(tokenizer.contents()),
        kv_bytes_per_position=kv_bytes,
    )


def tokenizer_model(info: GgufInfo) -> str | None:
    """`tokenizer.ggml.model` of the file: "llama" (SentencePiece), "gpt2" (byte-level BPE) ..."""
    try:
        return metadata(info.path).tokenizer
    except MeshError:  # unreadable now: load() will say so
        return None


# ---- the shared generation loop --------------------------------------------------------------


def stream_text(
    pieces: Generator[bytes, None, None], stop: tuple[str, ...]
) -> Generator[str, None, None]:
    """Decode token bytes to text, stopping before the first stop sequence."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    held = ""
    try:
        for piece in pieces:
            held += decoder.decode(piece)
            cut = _stop_index(held, stop)
            if cut is not None:
                if cut:
                    yield held[:cut]
                return
            ready = len(held) - _stop_prefix_length(held, stop)
            if ready > 0:
                yield held[:ready]
                held = held[ready:]
            else:
                # One item per sampled token, even when its text is held back: the consumer can
                # stop between any two tokens.
                yield ""
        held += decoder.decode(b"", final=True)
        cut = _stop_index(held, stop)
        if cut is not None:
            held = held[:cut]
        if held:
            yield held
    finally:
        pieces.close()


def _stop_index(text: str, stop: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _stop_prefix_length(text: str, stop: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that is the start of a stop sequence."""
    longest = 0
    for sequence in stop:
        for length in range(min(len(sequence) - 1, len(text)), longest, -1):
            if text.endswith(sequence[:length]):
                longest = length
                break
    return longest


def mix_seed(seed: int, stream: int) -> int:
    """splitmix64 of (seed, stream): 64 well-spread bits, the same in every process."""
    z = (seed * 0x9E3779B97F4A7C15 + (stream + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class TextStream:
    """One generation's text (`stream_text` over the backend's token bytes), one item per
    sampled token, with the count of tokens sampled so far. Closing it (or reaching its end)
    gives the generation's sequence back to the model at once."""

    def __init__(
        self,
        pieces: Generator[bytes, None, None],
        stop: tuple[str, ...],
        release: Callable[[], None],
    ) -> None:
        self._release: Callable[[], None] | None = release
        # The count lives apart: a generator holding `self` would make a cycle, and a stream
        # dropped unclosed would then be closed by the cycle collector, in any thread.
        self._counted = [0]
        self._text = stream_text(_counting(pieces, self._counted), stop)

    @property
    def sampled(self) -> int:
        """Tokens the backend has sampled so far (end of sequence not counted)."""
        return self._counted[0]

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._text)
        except BaseException:  # its end, an error: either way the sequence is free
            self.close()
            raise

    def close(self) -> None:
        release, self._release = self._release, None
        try:
            self._text.close()
        finally:
            if release is not None:
                release()

    def __del__(self) -> None:
        self.close()


def _counting(
    pieces: Generator[bytes, None, None], counted: list[int]
) -> Generator[bytes, None, None]:
    try:
        for piece in pieces:
            counted[0] += 1
            yield piece
    finally:
        pieces.close()


class NativeModel(abc.ABC):
    """What both backends' models share: the prompt check, the count of running generations,
    closing."""

    backend: str

    def __init__(self, info: GgufInfo, n_ctx: int, sequences: int, cache_positions: int) -> None:
        self.info = info
        self.n_ctx = n_ctx
        self.sequences = sequences
        kv_cache = metadata(info.path).kv_bytes_per_position * cache_positions
        self.memory = {"weights": info.file_size, "kv_cache": kv_cache}
        # Held by native calls: close() must not free the model under a running call.
        self._lock = threading.Lock()
        self._running = 0
        self._closed = False

    def count_tokens(self, text: str) -> int:
        with self._lock:
            self._check_open()
            return len(self._tokenize(text))

    def generate(self, prompt: str, params: GenerationParams) -> TextStream:
        params = params.with_seed()
        with self._lock:
            self._check_open()
            tokens = self._tokenize(prompt)
            if not tokens:  # no text, and a vocabulary without BOS: nothing to continue from
                raise MeshError(ErrorCode.INVALID_REQUEST, "the prompt has no tokens")
            if len(tokens) >= self.n_ctx:
                raise MeshError(
                    ErrorCode.INVALID_REQUEST,
                    f"the prompt is {len(tokens)} tokens; this model's context holds "
                    f"{self.n_ctx}, leaving no room to generate",
                )
            if self._running >= self.sequences:
                raise MeshError(
                    ErrorCode.BUSY,
                    f"{self.info.name} runs {self._running} of {self.sequences} generation(s)",
                )
            self._running += 1
        budget = min(params.max_tokens, self.n_ctx - len(tokens))
        try:
            pieces, cancel = self._start(tokens, params, budget)
        except BaseException:
            self._release(lambda: None)
            raise
        return TextStream(pieces, params.stop, lambda: self._release(cancel))

    def _release(self, cancel: Callable[[], None]) -> None:
        cancel()
        with self._lock:
            self._running -= 1

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._free()

    def _check_open(self) -> None:
        if self._closed:
            raise MeshError(ErrorCode.UNAVAILABLE, f"the model {self.info.name} is closed")

    @abc.abstractmethod
    def _tokenize(self, text: str) -> list[int]:
        """The prompt's tokens, BOS first. Called with the lock held."""

    @abc.abstractmethod
    def _start(
        self, tokens: list[int], params: GenerationParams, budget: int
    ) -> tuple[Generator[bytes, None, None], Callable[[], None]]:
        """Start a generation: the bytes of each sampled token, at most `budget` of them; and
        what ends it early (called once, when its stream is closed, whether or not it ran)."""

    @abc.abstractmethod
    def _free(self) -> None:
        """Release the library's model and context. Called with the lock held."""


def loadable(
    backend: Backend, path: Path, device: str, ctx: int | None, sequences: int
) -> tuple[int | None, GgufInfo, int]:
    """What a backend's `load` checks first: the GPU index of `device` (None for the CPU), the
    file's metadata and the context of each of `sequences` to load it with (`ctx`, else
    `context_size` within their share of `kv_budget`), or MeshError(INVALID_REQUEST) if the
    backend refuses the file."""
    gpu = gpu_index(device)
    info = metadata(path).info
    refusal = backend.refuses(info)
    if refusal:
        raise MeshError(
            ErrorCode.INVALID_REQUEST, f"{backend.name} cannot load {path.name}: {refusal}"
        )
    return gpu, info, context_size(info, ctx, kv_budget(info, device) // sequences)


def gpu_index(device: str) -> int | None:
    """None for "cpu", N for "cuda:N"; MeshError(INVALID_REQUEST) for anything else."""
    try:
        WORKER_DEVICE.load("device", device)
    except ProtocolError:
        raise MeshError(
            ErrorCode.INVALID_REQUEST, f"unknown device {device!r} (expected cpu or cuda:N)"
        ) from None
    return None if device == "cpu" else int(device.removeprefix("cuda:"))


def context_size(
    info: GgufInfo, requested: int | None = None, budget: int = KV_BUDGET_BYTES
) -> int:
    """The context a sequence is loaded with, in tokens: `requested`, else the model's own (as
    it was trained), as far as its KV cache fits `budget` (`kv_budget`, or a sequence's share
    of it); never more than the model's own, nor less than MIN_CONTEXT unless the model's own
    is less."""
    own = info.context_length or FALLBACK_CONTEXT
    if requested is not None:
        return min(requested, own)
    per_position = metadata(info.path).kv_bytes_per_position
    if not per_position:
        return own
    fits = budget // per_position // 256 * 256
    return min(own, max(fits, MIN_CONTEXT))


def threads_for(info: GgufInfo) -> int:
    """The threads to generate with on this machine's CPU (`sizing.threads_for`)."""
    return sizing.threads_for(info.file_size, len(os.sched_getaffinity(0)))


def kv_budget(info: GgufInfo, device: str) -> int:
    """What a model's KV cache may take by default: KV_BUDGET_BYTES or the weights' size, and
    on the CPU no more than the RAM left once the weights and working memory are in (a large
    model loads with a shorter context rather than not at all)."""
    budget = max(KV_BUDGET_BYTES, info.file_size)
    available = available_memory() if device == "cpu" else None
    if available is not None:
        budget = min(budget, available - info.file_size - COMPUTE_OVERHEAD)
    return max(budget, 0)


def load_guarded(path: Path, info: GgufInfo, device: str, n_ctx: int, load: Any) -> Any:
    """Check RAM (for the CPU, with `n_ctx` tokens of context) before `load()`, and turn a
    MemoryError into MeshError."""
    needed, breakdown = memory_needed(path, n_ctx)
    if device == "cpu":
        check_memory(path.name, needed, available_memory(), breakdown)
    try:
        return load()
    except MemoryError:
        raise MeshError(
            ErrorCode.UNAVAILABLE,
            f"out of memory while loading {path.name}: it needs about {human_bytes(needed)} "
            f"({breakdown})",
        ) from None
