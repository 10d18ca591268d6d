"""The llama-cpp backend: current llama.cpp through llama-cpp-python's C bindings, with
continuous batching.

It loads current architectures (llama 3, qwen2, mistral, phi, gemma ...). It compiles llama.cpp
when installed (minutes), so it is an extra: ``pip install 'rbee-mesh[llama]'``.

**Continuous batching.** A model is loaded once, with one context holding `sequences` KV caches
(llama.cpp's sequence ids, a cache of `n_ctx` tokens each: `kv_unified` off, so that no sequence
can run another out of room). One thread, the batcher, owns the context: each step it decodes
one batch holding the next token of every generating sequence and a chunk of the prompt of
those joining, then samples each sequence that has an output with that sequence's own sampler
chain (its seed, temperature, top-k/p, penalties). On a CPU a step reads the weights once for
every sequence in it, so four streams cost little more than one. A request joins at the next
step; one that ends (its last token, end of sequence, or its stream closed) leaves the batch
and has its cache cleared before the next step. While others generate, a joining prompt is
evaluated PROMPT_CHUNK tokens per step, so it delays their next token by one chunk at most.
A generating thread reads its sequence's tokens from a queue the batcher fills.

llama-cpp-python is used for its bindings only (its `Llama` class serves one sequence): its
seed 0xFFFFFFFF means "random", so seeds are taken modulo that value; its log callback files
llama.cpp's errors as debug output, so we install our own and put llama.cpp's reason in a
failed load's message. llama.cpp loads a SentencePiece vocabulary without byte tokens and then
aborts the process on the first character outside it, so `refuses()` turns such files away for
both backends.
"""

from __future__ import annotations

import ctypes
import functools
import os
import queue
import re
import threading
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbee_mesh.inference.gguf_file import GgufInfo
from rbee_mesh.inference.native import (
    PENALTY_WINDOW,
    GenerationParams,
    NativeModel,
    load_guarded,
    loadable,
    threads_for,
    tokenizer_model,
)
from rbee_mesh.protocol import ErrorCode, MeshError

#: Tokens one decode call takes at most (llama.cpp's n_batch): a prompt evaluated while no
#: other sequence generates goes in chunks of this.
BATCH_TOKENS = 512
#: Prompt tokens a step takes while other sequences generate: their next token waits for this
#: much prompt at most.
PROMPT_CHUNK = 128
#: llama.cpp's "all layers" on the GPU.
_ALL_LAYERS = 0x7FFF_FFFF
#: How long llama.cpp's OpenMP threads spin for work before they sleep (libgomp's default is
#: 300,000 spins). Measured with SmolLM2 on 2 vCPUs, 4 sequences: the same tokens/s on a quiet
#: machine (225-242 tok/s, default 195-231), and 4-6x the default's on one that two other
#: processes keep busy (90-103 tok/s against 17-52): a spinning thread no longer holds a core
#: that the thread it waits for needs. A user's own GOMP_SPINCOUNT wins.
GOMP_SPINCOUNT = "3000"


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
    """The llama_cpp module, with GPU numbering as NVML's, short spinning and our log callback
    installed."""
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)  # read when libgomp loads, below
    import llama_cpp

    llama_cpp.llama_backend_init()
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
        if info.byte_tokens == 0 and tokenizer_model(info) == "llama":
            return (
                "its SentencePiece vocabulary has no byte tokens (<0x0A> ...): llama.cpp loads "
                "it, then aborts the process on the first character outside the vocabulary"
            )
        return None

    def load(
        self, path: Path, device: str, ctx: int | None = None, sequences: int = 1
    ) -> LlamaCppModel:
        gpu, info, n_ctx = loadable(self, path, device, ctx, sequences)
        lib = _llama_cpp()
        if gpu is not None and not lib.llama_supports_gpu_offload():
            raise MeshError(
                ErrorCode.UNAVAILABLE,
                f"this llama-cpp-python build cannot use a GPU (asked for {device}); reinstall "
                "it with CMAKE_ARGS=-DGGML_CUDA=on",
            )
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0 if gpu is None else _ALL_LAYERS
        if gpu is not None:
            model_params.main_gpu = gpu
            model_params.split_mode = lib.LLAMA_SPLIT_MODE_NONE
        context_params = lib.llama_context_default_params()
        context_params.n_ctx = n_ctx * sequences
        context_params.n_seq_max = sequences
        context_params.kv_unified = False  # a cache of n_ctx per sequence
        context_params.n_batch = context_params.n_ubatch = BATCH_TOKENS
        context_params.n_threads = context_params.n_threads_batch = threads_for(info)
        context_params.no_perf = True

        def reason() -> str:
            return _llama_log.errors[0] if _llama_log.errors else "llama.cpp gives no reason"

        def load() -> tuple[Any, Any]:
            _llama_log.errors.clear()
            model = lib.llama_model_load_from_file(str(path).encode(), model_params)
            if not model:
                raise MeshError(
                    ErrorCode.INVALID_REQUEST, f"{self.name} cannot load {path.name}: {reason()}"
                )
            context = lib.llama_init_from_model(model, context_params)
            if not context:  # the weights loaded, their context did not (memory): not the file
                lib.llama_model_free(model)
                raise MeshError(
                    ErrorCode.UNAVAILABLE,
                    f"{self.name} cannot make a context of {sequences} x {n_ctx} tokens for "
                    f"{path.name}: {reason()}",
                )
            return model, context

        model, context = load_guarded(path, info, device, n_ctx * sequences, load)
        return LlamaCppModel(lib, model, context, info, sequences)


class LlamaCppModel(NativeModel):
    """A model loaded by llama.cpp, generating for up to `sequences` streams in one batch."""

    backend = "llama-cpp"

    def __init__(self, lib: Any, model: Any, context: Any, info: GgufInfo, sequences: int) -> None:
        n_ctx = lib.llama_n_ctx_seq(context)
        super().__init__(info, n_ctx, sequences, cache_positions=lib.llama_n_ctx(context))
        self._lib = lib
        self._model = model
        self._vocab = lib.llama_model_get_vocab(model)
        self._batcher = _Batcher(lib, context, self._vocab, sequences)

    def _tokenize(self, text: str) -> list[int]:
        """With special tokens parsed: a chat template's `<|im_start|>` is one token, as the
        model was trained on, not a dozen text tokens."""
        data = text.encode()
        size = len(data) + 2  # at most a token per byte, and BOS
        while True:
            buffer = (self._lib.llama_token * size)()
            count = self._lib.llama_tokenize(self._vocab, data, len(data), buffer, size, True, True)
            if count >= 0:
                return list(buffer[:count])
            size = -count  # too small: it says how many it needs

    def _start(
        self, tokens: list[int], params: GenerationParams, budget: int
    ) -> tuple[Generator[bytes, None, None], Callable[[], None]]:
        sequence = _Sequence(tokens, params, budget)
        self._batcher.join(sequence)
        return self._pieces(sequence), lambda: self._batcher.cancel(sequence)

    def _pieces(self, sequence: _Sequence) -> Generator[bytes, None, None]:
        while True:
            self._check_open()
            piece = sequence.out.get()
            if piece is None:
                return
            if isinstance(piece, MeshError):
                raise piece
            yield piece

    def _free(self) -> None:
        self._batcher.close(
            MeshError(ErrorCode.UNAVAILABLE, f"the model {self.info.name} is closed")
        )
        self._lib.llama_model_free(self._model)


@dataclass(eq=False)
class _Sequence:
    """One generation in the batch. `out` and `cancelled` are shared with the reading thread;
    the rest is the batcher's."""

    prompt: list[int]
    params: GenerationParams
    budget: int
    #: Each sampled token's bytes, then None at the end (or the MeshError that ended it).
    out: queue.SimpleQueue[bytes | MeshError | None] = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    #: Its llama.cpp sequence id while in the batch.
    id: int = -1
    sampler: Any = None
    #: Tokens in its cache: prompt tokens evaluated, then one per token fed back.
    position: int = 0
    #: The token sampled last, to feed in the next step (None while the prompt is evaluated).
    last: int | None = None
    sampled: int = 0


class _Batcher:
    """The thread that owns a llama.cpp context and decodes every sequence's next token in one
    batch per step (see the module doc)."""

    def __init__(self, lib: Any, context: Any, vocab: Any, sequences: int) -> None:
        self._lib = lib
        self._context = context
        self._memory = lib.llama_get_memory(context)
        self._vocab = vocab
        self._batch = lib.llama_batch_init(BATCH_TOKENS, 0, 1)
        self._piece_buffer = ctypes.create_string_buffer(64)
        # Re-entrant: a stream dropped unclosed in this thread cancels its sequence from here.
        self._changed = threading.Condition(threading.RLock())
        #: Shared, under `_changed`: sequences waiting to join, and why it stops (once it does).
        self._waiting: deque[_Sequence] = deque()
        self._closing: MeshError | None = None
        #: The batcher's own: sequences in the batch, and the sequence ids free.
        self._running: list[_Sequence] = []
        self._free_ids = set(range(sequences))
        self._thread = threading.Thread(target=self._run, name="llama-cpp batcher", daemon=True)
        self._thread.start()

    def join(self, sequence: _Sequence) -> None:
        with self._changed:
            if self._closing is not None:
                sequence.out.put(self._closing)
                return
            self._waiting.append(sequence)
            self._changed.notify()

    def cancel(self, sequence: _Sequence) -> None:
        """It leaves the batch before the next step (at once if it is still waiting)."""
        with self._changed:
            sequence.cancelled = True
            self._changed.notify()

    def close(self, why: MeshError) -> None:
        """Stop after the step being computed; every sequence left ends with `why`."""
        with self._changed:
            self._closing = self._closing or why
            self._changed.notify()
        self._thread.join()
        for sequence in [*self._running, *self._waiting]:
            self._leave(sequence, self._closing)
        self._lib.llama_batch_free(self._batch)
        self._lib.llama_free(self._context)

    def _run(self) -> None:
        try:
            while self._step():
                pass
        except BaseException as exc:  # a bug: no sequence must wait for ever
            failed = MeshError(ErrorCode.INTERNAL, f"the llama.cpp batcher failed: {exc!r}")
            with self._changed:
                self._closing = failed
                waiting, self._waiting = list(self._waiting), deque()
            for sequence in [*self._running, *waiting]:
                self._leave(sequence, failed)
            raise

    def _step(self) -> bool:
        with self._changed:
            while self._closing is None and not self._waiting and not self._running:
                self._changed.wait()
            if self._closing is not None:
                return False
            for sequence in [s for s in self._running if s.cancelled]:
                self._leave(sequence, None)
            while self._waiting and self._free_ids:
                sequence = self._waiting.popleft()
                if not sequence.cancelled:
                    self._enter(sequence)
        if self._running:
            outputs = self._fill()
            code = self._lib.llama_decode(self._context, self._batch)
            if code != 0:
                failed = MeshError(ErrorCode.INTERNAL, f"llama.cpp failed to decode (code {code})")
                for sequence in list(self._running):
                    self._leave(sequence, failed)
            else:
                for sequence, index in outputs:
                    self._sample(sequence, index)
        return True

    def _enter(self, sequence: _Sequence) -> None:
        lib, params = self._lib, sequence.params
        assert params.seed is not None
        sequence.id = min(self._free_ids)  # the lowest: see _fill
        self._free_ids.remove(sequence.id)
        self._running.append(sequence)
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        samplers = [
            lib.llama_sampler_init_penalties(
                lib.llama_vocab_n_tokens(self._vocab),
                PENALTY_WINDOW,
                params.repeat_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
        ]
        if params.temperature == 0:
            samplers.append(lib.llama_sampler_init_greedy())
        else:
            if params.top_k:
                samplers.append(lib.llama_sampler_init_top_k(params.top_k))
            samplers += [
                lib.llama_sampler_init_top_p(params.top_p, 1),
                lib.llama_sampler_init_temp(params.temperature),
                # 0xFFFFFFFF is llama.cpp's "random seed".
                lib.llama_sampler_init_dist(params.seed % 0xFFFF_FFFF),
            ]
        for sampler in samplers:
            lib.llama_sampler_chain_add(chain, sampler)  # the chain owns it from here
        for token in sequence.prompt[-PENALTY_WINDOW:]:  # the penalties look back into it
            lib.llama_sampler_accept(chain, token)
        sequence.sampler = chain

    def _leave(self, sequence: _Sequence, end: MeshError | None) -> None:
        """Out of the batch, its cache cleared, its reader told how it ended."""
        if sequence in self._running:
            self._running.remove(sequence)
            self._lib.llama_memory_seq_rm(self._memory, sequence.id, -1, -1)
            self._free_ids.add(sequence.id)
        if sequence.sampler is not None:
            self._lib.llama_sampler_free(sequence.sampler)
            sequence.sampler = None
        sequence.out.put(end)

    def _fill(self) -> list[tuple[_Sequence, int]]:
        """This step's batch: each generating sequence's last token, then joining prompts'
        tokens; returns the sequences to sample after it, with their output's batch index."""
        batch = self._batch
        outputs: list[tuple[_Sequence, int]] = []
        count = 0

        def add(sequence: _Sequence, token: int, output: bool) -> None:
            nonlocal count
            batch.token[count] = token
            batch.pos[count] = sequence.position
            batch.n_seq_id[count] = 1
            batch.seq_id[count][0] = sequence.id
            batch.logits[count] = output
            if output:
                outputs.append((sequence, count))
            sequence.position += 1
            count += 1

        # In sequence id order: with a cache per sequence, llama.cpp decodes tokens of
        # consecutive, rising ids in one pass, and splits the batch wherever they are not (4
        # sequences: 18 ms a step in order, 25 ms as 1, 3, 0, 2; 3 as 0, 1, 3 took 43 ms).
        self._running.sort(key=lambda s: s.id)
        generating = [s for s in self._running if s.last is not None]
        for sequence in generating:
            assert sequence.last is not None
            add(sequence, sequence.last, True)
        room = BATCH_TOKENS - count
        if generating:
            room = min(room, PROMPT_CHUNK)
        for sequence in self._running:
            if sequence.last is not None or room <= 0:
                continue
            prompt = sequence.prompt
            end = min(len(prompt), sequence.position + room)
            room -= end - sequence.position
            for index in range(sequence.position, end):
                add(sequence, prompt[index], index == len(prompt) - 1)
        batch.n_tokens = count
        return outputs

    def _sample(self, sequence: _Sequence, index: int) -> None:
        token = self._lib.llama_sampler_sample(sequence.sampler, self._context, index)
        if self._lib.llama_vocab_is_eog(self._vocab, token):
            self._leave(sequence, None)
            return
        sequence.sampled += 1
        sequence.out.put(self._piece(token))
        if sequence.sampled >= sequence.budget:
            self._leave(sequence, None)
        else:
            sequence.last = token

    def _piece(self, token: int) -> bytes:
        """The bytes of `token` (llama-cpp-python's helper returns an unsliced buffer)."""
        size = self._lib.llama_token_to_piece(
            self._vocab, token, self._piece_buffer, len(self._piece_buffer), 0, False
        )
        if size < 0:  # the piece is longer than the buffer: -size bytes
            self._piece_buffer = ctypes.create_string_buffer(-size)
            size = self._lib.llama_token_to_piece(
                self._vocab, token, self._piece_buffer, -size, 0, False
            )
        return self._piece_buffer.raw[:size]
