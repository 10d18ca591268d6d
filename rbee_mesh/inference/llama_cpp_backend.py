"""The llama-cpp backend: llama-cpp-python, current llama.cpp.

It loads current architectures (llama 3, qwen2, mistral, phi, gemma ...). It compiles llama.cpp
when installed (minutes), so it is an extra: ``pip install 'rbee-mesh[llama]'``.

llama-cpp-python: its seed 0xFFFFFFFF means "random", so seeds are taken modulo that value; its
``token_to_piece`` helper returns an unsliced 32-byte buffer, so we call the C function; its
load errors say only "Failed to load model" (its log callback files llama.cpp's errors as
debug output), so we install our own and put llama.cpp's reason in the message. llama.cpp loads
a SentencePiece vocabulary without byte tokens and then aborts the process on the first
character outside it, so `refuses()` turns such files away for both backends.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from collections import deque
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rbee_mesh.inference.gguf_file import GgufInfo
from rbee_mesh.inference.native import (
    GenerationParams,
    NativeModel,
    load_guarded,
    loadable,
    threads_for,
    tokenizer_model,
)
from rbee_mesh.protocol import ErrorCode, MeshError

if TYPE_CHECKING:
    import llama_cpp


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
        if info.byte_tokens == 0 and tokenizer_model(info) == "llama":
            return (
                "its SentencePiece vocabulary has no byte tokens (<0x0A> ...): llama.cpp loads "
                "it, then aborts the process on the first character outside the vocabulary"
            )
        return None

    def load(self, path: Path, device: str, ctx: int | None = None) -> LlamaCppModel:
        gpu, info, n_ctx = loadable(self, path, device, ctx)
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
                    n_ctx=n_ctx,
                    n_threads=threads_for(info),
                    n_threads_batch=threads_for(info),
                    verbose=False,
                    **gpu_args,
                )
            except ValueError as exc:  # "Failed to load model from file": the log says why
                said = _llama_log.errors[0] if _llama_log.errors else str(exc)
                # The weights loaded but their context did not fit (memory): not the file's fault.
                the_file = not str(exc).startswith("Failed to create llama_context")
                raise MeshError(
                    ErrorCode.INVALID_REQUEST if the_file else ErrorCode.UNAVAILABLE,
                    f"{self.name} cannot load {path.name}: {said}",
                ) from None

        llama = load_guarded(path, info, device, n_ctx, load)
        return LlamaCppModel(llama, info)


class LlamaCppModel(NativeModel):
    """A model loaded by llama-cpp-python, sampled token by token through Llama.generate."""

    backend = "llama-cpp"

    def __init__(self, llama: llama_cpp.Llama, info: GgufInfo) -> None:
        super().__init__(info, llama.n_ctx())
        self._llama: llama_cpp.Llama | None = llama
        self._lib = _llama_cpp()
        self._vocab = self._lib.llama_model_get_vocab(llama.model)
        self._piece_buffer = ctypes.create_string_buffer(64)

    def _tokenize(self, text: str) -> list[int]:
        """With special tokens parsed: a chat template's `<|im_start|>` is one token, as the
        model was trained on, not a dozen text tokens."""
        assert self._llama is not None
        return self._llama.tokenize(text.encode(), add_bos=True, special=True)

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
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty,
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
