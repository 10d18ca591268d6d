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
which it chose and why. Everything here is synchronous: a worker runs it in a thread.

Both backends share one generation loop (`_stream_text`): a backend yields the bytes of each
sampled token; the loop decodes UTF-8 incrementally (a character split across tokens is held
until it is whole), cuts the text at the first stop sequence and holds back text that may be the
start of one. Sampling is seeded per request, so the same seed, parameters and prompt give the
same text in every process on the same machine and library build.

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

llama-cpp-python: its seed 0xFFFFFFFF means "random", so seeds are taken modulo that value; its
``token_to_piece`` helper returns an unsliced 32-byte buffer, so we call the C function; its
load errors say only "Failed to load model" (its log callback files llama.cpp's errors as
debug output), so we install our own and put llama.cpp's reason in the message. llama.cpp loads
a SentencePiece vocabulary without byte tokens and then aborts the process on the first
character outside it, so `refuses()` turns such files away for both backends.

Threads: a model under 64 MiB runs on one thread. ggml threads spin at every barrier; on a busy
machine a descheduled thread stalls the others (two threads on 2 CPUs with one CPU taken ran
100 to 4,000 times slower than one), and a small model gains nothing from them anyway. A larger
model gets one thread per core; a caller running several models at once on one machine should
keep their threads within its cores.
"""

from __future__ import annotations

import abc
import codecs
import ctypes
import functools
import os
import re
import secrets
import threading
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import gguf

from rbee_mesh.inference.gguf_file import GgufInfo, open_gguf
from rbee_mesh.protocol import ErrorCode, MeshError
from rbee_mesh.protocol.operations import Infer
from rbee_mesh.units import human_bytes

if TYPE_CHECKING:
    import llama_cpp

#: The largest context a model is loaded with: enough for chat, small enough for tiny machines.
MAX_CONTEXT = 2048
#: How many recent tokens the repeat penalty looks at (llama.cpp's default).
PENALTY_WINDOW = 64
#: Working memory beyond the weights and the KV cache: llama.cpp's compute buffers.
COMPUTE_OVERHEAD = 64 * 1024 * 1024
#: Models smaller than this run on one thread (see _threads).
SMALL_MODEL_BYTES = 64 * 1024 * 1024

_DEVICE = re.compile(r"cpu|cuda:([0-9]{1,2})")
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
        return cls(
            max_tokens=op.max_tokens,
            temperature=op.temperature,
            top_p=op.top_p,
            top_k=op.top_k,
            seed=op.seed,
            stop=op.stop,
            repeat_penalty=op.repeat_penalty,
        )

    def with_seed(self) -> GenerationParams:
        """These params with a fresh random seed if they have none (to report or reuse it)."""
        return self if self.seed is not None else replace(self, seed=secrets.randbits(32))


class LoadedModel(Protocol):
    """A model a backend has loaded. One generation at a time; a thread may run it."""

    #: "ctransformers" or "llama-cpp".
    backend: str
    info: GgufInfo
    #: The context the model was loaded with (prompt plus generated tokens), in tokens.
    n_ctx: int
    #: Tokens sampled by the latest generate() call so far (its text may be held back).
    generated_tokens: int

    def count_tokens(self, text: str) -> int:
        """The tokens `text` takes as a prompt, the BOS token included."""
        ...

    def generate(self, prompt: str, params: GenerationParams) -> Generator[str, None, None]:
        """The generated text, one item per sampled token: its text, or "" while the text is
        held back (part of a UTF-8 character, or what may begin a stop sequence).

        Ends at max_tokens, end of sequence, a full context, or a stop sequence (which is not
        yielded, nor anything after it). Closing the iterator early frees the model at once; a
        new generate() call also takes the model over from an unfinished one. Raises MeshError
        (INVALID_REQUEST) when the prompt does not fit the context.
        """
        ...

    def close(self) -> None:
        """Free the model. Waits for a token being computed; later calls raise MeshError."""
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

    def load(self, path: Path, device: str) -> LoadedModel:
        """Load the model at `path` onto `device` ("cpu" or "cuda:N").

        Raises MeshError: INVALID_REQUEST if the file cannot be loaded, UNAVAILABLE if the
        library, the device or the memory is missing.
        """
        ...


# ---- choosing a backend ----------------------------------------------------------------------


def load_model(path: Path, device: str, backend: str = "auto") -> tuple[LoadedModel, str]:
    """Load the model at `path` with `backend` ("auto" tries each of BACKENDS in order).

    Returns the model and one line saying which backend loads it and why that one.
    """
    if backend != "auto" and backend not in BACKENDS:
        choices = ", ".join(["auto", *BACKENDS])
        raise MeshError(ErrorCode.INVALID_REQUEST, f"unknown backend {backend!r}; use {choices}")
    _gpu_index(device)
    info = _metadata(path).info
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
        return chosen.load(Path(path), device), f"{backend}: loads {info.architecture}; named"

    passed: list[str] = []
    missing_count = 0
    for name, candidate in BACKENDS.items():
        missing = candidate.unavailable()
        if missing:
            missing_count += 1
            passed.append(missing)
            continue
        refusal = candidate.refuses(info)
        if refusal:
            passed.append(f"{name} cannot load {Path(path).name}: {refusal}")
            continue
        try:
            model = candidate.load(Path(path), device)
        except MeshError as exc:
            if exc.code != ErrorCode.INVALID_REQUEST:
                raise
            passed.append(exc.message)
            continue
        why = "; ".join(passed) if passed else f"loads {info.architecture}; chosen first"
        return model, f"{name}: {why}"
    if missing_count == len(BACKENDS):
        raise MeshError(
            ErrorCode.UNAVAILABLE, "no inference backend is installed: " + "; ".join(passed)
        )
    raise MeshError(
        ErrorCode.INVALID_REQUEST,
        f"no backend can load {Path(path).name}: " + "; ".join(passed),
    )


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
    meta = _metadata(path)
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
class _Metadata:
    """What the backends read from a GGUF file, beyond GgufInfo."""

    info: GgufInfo
    #: `tokenizer.ggml.model`: "llama" (SentencePiece), "gpt2" (byte-level BPE) ...
    tokenizer: str | None
    #: KV cache bytes per context position: f16 keys and values of every layer.
    kv_bytes_per_position: int


def _metadata(path: str | os.PathLike[str]) -> _Metadata:
    """The file's metadata, read once per version of the file.

    gguf's reader builds an object per vocabulary entry: about 7 s for a 152k-token vocabulary
    here. A load asks three times (choosing, refusing, sizing), a worker once per slot.
    """
    try:
        stat = os.stat(path)
    except OSError:
        return _read_metadata(str(path), -1, -1)  # open_gguf says what is wrong
    return _read_metadata(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_metadata(path: str, size: int, mtime_ns: int) -> _Metadata:
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
    return _Metadata(
        info=gguf_file.info,
        tokenizer=None if tokenizer is None else str(tokenizer.contents()),
        kv_bytes_per_position=kv_bytes,
    )


def _tokenizer_model(info: GgufInfo) -> str | None:
    """`tokenizer.ggml.model` of the file: "llama" (SentencePiece), "gpt2" (byte-level BPE) ..."""
    try:
        return _metadata(info.path).tokenizer
    except MeshError:  # unreadable now: load() will say so
        return None


# ---- the shared generation loop --------------------------------------------------------------


def _stream_text(
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


def _mix(seed: int, stream: int) -> int:
    """splitmix64 of (seed, stream): 64 well-spread bits, the same in every process."""
    z = (seed * 0x9E3779B97F4A7C15 + (stream + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class _NativeModel(abc.ABC):
    """What both backends' models share: the lock, taking over, closing, the prompt check."""

    backend: str

    def __init__(self, info: GgufInfo, n_ctx: int) -> None:
        self.info = info
        self.n_ctx = n_ctx
        #: Tokens sampled by the latest generate() call (end-of-sequence not counted).
        self.generated_tokens = 0
        # Native calls hold the lock: close() must not free the model under a running token.
        self._lock = threading.Lock()
        self._ticket = 0
        self._closed = False

    def count_tokens(self, text: str) -> int:
        with self._lock:
            self._check_open()
            return len(self._tokenize(text))

    def generate(self, prompt: str, params: GenerationParams) -> Generator[str, None, None]:
        params = params.with_seed()
        with self._lock:
            self._check_open()
            tokens = self._tokenize(prompt)
            if len(tokens) >= self.n_ctx:
                raise MeshError(
                    ErrorCode.INVALID_REQUEST,
                    f"the prompt is {len(tokens)} tokens; this model's context holds "
                    f"{self.n_ctx}, leaving no room to generate",
                )
            self._ticket += 1
            self.generated_tokens = 0
            ticket = self._ticket
        budget = min(params.max_tokens, self.n_ctx - len(tokens))
        return _stream_text(self._pieces(tokens, params, ticket, budget), params.stop)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._free()

    def _check_open(self) -> None:
        if self._closed:
            raise MeshError(ErrorCode.UNAVAILABLE, f"the model {self.info.name} is closed")

    def _check_current(self, ticket: int) -> None:
        """Call with the lock held, before each token."""
        self._check_open()
        if ticket != self._ticket:
            raise MeshError(ErrorCode.CONFLICT, "a newer generate() call took over this model")

    @abc.abstractmethod
    def _tokenize(self, text: str) -> list[int]:
        """The prompt's tokens, BOS first."""

    @abc.abstractmethod
    def _pieces(
        self, tokens: list[int], params: GenerationParams, ticket: int, budget: int
    ) -> Generator[bytes, None, None]:
        """The bytes of each sampled token, at most `budget` of them."""

    @abc.abstractmethod
    def _free(self) -> None:
        """Release the library's model and context."""


def _gpu_index(device: str) -> int | None:
    """None for "cpu", N for "cuda:N"; MeshError(INVALID_REQUEST) for anything else."""
    match = _DEVICE.fullmatch(device)
    if match is None:
        raise MeshError(
            ErrorCode.INVALID_REQUEST, f"unknown device {device!r} (expected cpu or cuda:N)"
        )
    return None if match.group(1) is None else int(match.group(1))


def _context_size(info: GgufInfo) -> int:
    return min(info.context_length or MAX_CONTEXT, MAX_CONTEXT)


def _threads(info: GgufInfo) -> int:
    """One for a small model (see the module doc); else one per core, assuming two threads per
    core past 4 CPUs."""
    if info.file_size < SMALL_MODEL_BYTES:
        return 1
    cpus = len(os.sched_getaffinity(0))
    return cpus if cpus <= 4 else cpus // 2


def _load_guarded(path: Path, info: GgufInfo, device: str, load: Any) -> Any:
    """Check RAM (for the CPU) before `load()`, and turn a MemoryError into MeshError."""
    needed, breakdown = memory_needed(path, _context_size(info))
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


# ---- ctransformers ---------------------------------------------------------------------------

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
        tokenizer = _tokenizer_model(info)
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

    def load(self, path: Path, device: str) -> CtransformersModel:
        gpu = _gpu_index(device)
        info = _metadata(path).info
        refusal = self.refuses(info)
        if refusal:
            raise MeshError(
                ErrorCode.INVALID_REQUEST, f"{self.name} cannot load {path.name}: {refusal}"
            )
        if gpu is not None and gpu > 0:
            raise MeshError(
                ErrorCode.UNAVAILABLE,
                f"ctransformers cannot choose a GPU (asked for {device}); use llama-cpp",
            )
        if gpu == 0:
            os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        from ctransformers import LLM, Config

        config = Config(
            context_length=_context_size(info),
            gpu_layers=0 if gpu is None else 1_000_000,
            batch_size=512,
            threads=_threads(info),
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

        llm = _load_guarded(path, info, device, load)
        return CtransformersModel(llm, info, config.threads)


class CtransformersModel(_NativeModel):
    """A model loaded by ctransformers, driven through its C functions."""

    backend = "ctransformers"

    def __init__(self, llm: Any, info: GgufInfo, threads: int) -> None:
        super().__init__(info, int(llm.context_length))
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

    def _pieces(
        self, tokens: list[int], params: GenerationParams, ticket: int, budget: int
    ) -> Generator[bytes, None, None]:
        llm = self._llm
        assert params.seed is not None
        top_k = params.top_k or self._vocab_size
        temperature = params.temperature
        if temperature == 0:
            top_k, temperature = 1, 1.0
        history = list(tokens)
        for step in range(budget):
            with self._lock:
                self._check_current(ticket)
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
                        _mix(params.seed, step) >> 33,
                    )
                )
                if llm.ctransformers_llm_is_eos_token(token):
                    return
                piece = bytes(llm.ctransformers_llm_detokenize(token))
                history.append(token)
                self.generated_tokens += 1
            yield piece

    def _free(self) -> None:
        # The LLM object frees the native model when its last reference goes.
        self._llm = None


# ---- llama-cpp -------------------------------------------------------------------------------


class _LlamaCppLog:
    """llama.cpp's error lines: the only place it says why a load failed.

    Installed as its log callback in place of llama-cpp-python's, which still numbers the log
    levels as ggml did in 2024 (3 for errors, now warnings; 4, now errors, as debug), so with
    verbose=False it drops every error, and prints warnings as errors.
    """

    def __init__(self) -> None:
        self.errors: deque[str] = deque(maxlen=8)
        #: The ctypes wrapper of this object, kept alive for as long as llama.cpp may call it.
        self.callback: Any = None
        self._in_error = False

    def __call__(self, level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        # enum ggml_log_level: ... 4 error, 5 continues the previous line.
        self._in_error = level == 4 or (level == 5 and self._in_error)
        if self._in_error:
            # "llama_model_load: error loading model: ...": the function name says nothing.
            line = re.sub(r"^\w+: ", "", text.decode("utf-8", errors="replace").strip())
            if line:
                self.errors.append(line)


_llama_log = _LlamaCppLog()


@functools.cache
def _llama_cpp() -> Any:
    """The llama_cpp module, with GPU numbering as NVML's and our log callback installed."""
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    import llama_cpp

    _llama_log.callback = llama_cpp.llama_log_callback(_llama_log)
    llama_cpp.llama_log_set(_llama_log.callback, ctypes.c_void_p(0))
    return llama_cpp


class LlamaCppBackend:
    name = "llama-cpp"

    def unavailable(self) -> str | None:
        try:
            _llama_cpp()
        except ImportError:
            return "llama-cpp-python is not installed (pip install 'rbee-mesh[llama]')"
        except Exception as exc:  # a broken build: a missing libllama.so, libgomp ...
            return f"llama-cpp-python does not import: {type(exc).__name__}: {exc}"
        return None

    def refuses(self, info: GgufInfo) -> str | None:
        # Which architectures it builds is known only to llama.cpp: load() reports its reason.
        if info.version not in (2, 3):
            return f"GGUF version {info.version} is not supported (2 and 3 only)"
        if info.byte_tokens == 0 and _tokenizer_model(info) == "llama":
            return (
                "its SentencePiece vocabulary has no byte tokens (<0x0A> ...): llama.cpp loads "
                "it, then aborts the process on the first character outside the vocabulary"
            )
        return None

    def load(self, path: Path, device: str) -> LlamaCppModel:
        gpu = _gpu_index(device)
        info = _metadata(path).info
        refusal = self.refuses(info)
        if refusal:
            raise MeshError(
                ErrorCode.INVALID_REQUEST, f"{self.name} cannot load {path.name}: {refusal}"
            )
        lib = _llama_cpp()
        if gpu is not None and not lib.llama_supports_gpu_offload():
            raise MeshError(
                ErrorCode.UNAVAILABLE,
                f"this llama-cpp-python build cannot use a GPU (asked for {device}); reinstall "
                "it with CMAKE_ARGS=-DGGML_CUDA=on",
            )
        gpu_args: dict[str, Any] = (
            {}
            if gpu is None
            else {
                "n_gpu_layers": -1,
                "main_gpu": gpu,
                "split_mode": lib.LLAMA_SPLIT_MODE_NONE,
            }
        )

        def load() -> Any:
            _llama_log.errors.clear()
            try:
                return lib.Llama(
                    model_path=str(path),
                    n_ctx=_context_size(info),
                    n_threads=_threads(info),
                    n_threads_batch=_threads(info),
                    verbose=False,
                    **gpu_args,
                )
            except ValueError as exc:  # "Failed to load model from file": the log says why
                said = _llama_log.errors[0] if _llama_log.errors else str(exc)
                raise MeshError(
                    ErrorCode.INVALID_REQUEST, f"{self.name} cannot load {path.name}: {said}"
                ) from None

        llama = _load_guarded(path, info, device, load)
        return LlamaCppModel(llama, info)


class LlamaCppModel(_NativeModel):
    """A model loaded by llama-cpp-python, sampled token by token through Llama.generate."""

    backend = "llama-cpp"

    def __init__(self, llama: llama_cpp.Llama, info: GgufInfo) -> None:
        super().__init__(info, llama.n_ctx())
        self._llama: llama_cpp.Llama | None = llama
        self._lib = _llama_cpp()
        self._vocab = self._lib.llama_model_get_vocab(llama.model)
        self._piece_buffer = ctypes.create_string_buffer(64)

    def _tokenize(self, text: str) -> list[int]:
        assert self._llama is not None
        return self._llama.tokenize(text.encode(), add_bos=True)

    def _piece(self, token: int) -> bytes:
        size = self._lib.llama_token_to_piece(
            self._vocab, token, self._piece_buffer, len(self._piece_buffer), 0, False
        )
        if size < 0:  # the piece is longer than the buffer: -size bytes
            self._piece_buffer = ctypes.create_string_buffer(-size)
            size = self._lib.llama_token_to_piece(
                self._vocab, token, self._piece_buffer, -size, 0, False
            )
        return self._piece_buffer.raw[:size]

    def _pieces(
        self, tokens: list[int], params: GenerationParams, ticket: int, budget: int
    ) -> Generator[bytes, None, None]:
        assert params.seed is not None
        with self._lock:
            self._check_current(ticket)
            llama = self._llama
            assert llama is not None
            # 0xFFFFFFFF is llama.cpp's "random seed".
            llama.set_seed(params.seed % 0xFFFF_FFFF)
            # Evaluate the whole prompt every time: reusing a cached prefix evaluates its last
            # token alone, whose logits may differ in the last bits and change a sample.
            llama.reset()  # type: ignore[no-untyped-call]
            sampled = llama.generate(
                tokens,
                top_k=params.top_k,
                top_p=params.top_p,
                min_p=0.0,
                typical_p=1.0,
                temp=params.temperature,
                repeat_penalty=params.repeat_penalty,
                reset=True,
            )
        try:
            for _ in range(budget):
                with self._lock:
                    self._check_current(ticket)
                    token = next(sampled)
                    if self._lib.llama_vocab_is_eog(self._vocab, token):
                        return
                    piece = self._piece(token)
                    self.generated_tokens += 1
                yield piece
        finally:
            sampled.close()

    def _free(self) -> None:
        if self._llama is not None:
            self._llama.close()
            self._llama = None


BACKENDS: dict[str, Backend] = {
    LlamaCppBackend.name: LlamaCppBackend(),
    CtransformersBackend.name: CtransformersBackend(),
}
