"""Inference backends on tiny GGUF models: real libraries, nothing downloaded, no mocks.

Crashes (a heap overflow, an abort in native code) are provoked only in subprocesses, so a crash
fails its test instead of killing pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import gguf
import pytest

from rbee_mesh.inference.backends import (
    BACKENDS,
    COMPUTE_OVERHEAD,
    GenerationParams,
    available_memory,
    check_memory,
    load_model,
    memory_needed,
)
from rbee_mesh.inference.ctransformers_backend import CtransformersBackend, ctransformers_lib
from rbee_mesh.inference.gguf_file import read_gguf_info, write_tiny_gguf
from rbee_mesh.inference.llama_cpp_backend import LlamaCppBackend
from rbee_mesh.inference.native import MIN_CONTEXT, context_size, metadata, stream_text
from rbee_mesh.protocol import ErrorCode, Infer, MeshError

BACKEND_NAMES = ["llama-cpp", "ctransformers"]
PROMPT = "Hello world"
EMOJI_CJK = "😀🎉 日本語のテキスト, 中文字符 " * 400


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(params=BACKEND_NAMES)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def generate(tiny: Path, backend: str, prompt: str = PROMPT, **params: object) -> str:
    model, _ = load_model(tiny, "cpu", backend)
    try:
        return "".join(model.generate(prompt, GenerationParams(**params)))  # type: ignore[arg-type]
    finally:
        model.close()


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )


def without_byte_tokens(path: Path) -> Path:
    """Rewrite the tiny model's 256 byte tokens (<0x00>..<0xFF>) as ordinary pieces ([0x00]...)
    in place: a SentencePiece vocabulary with no byte fallback."""
    reader = gguf.GGUFReader(path, "r+")
    types = reader.get_field(gguf.Keys.Tokenizer.TOKEN_TYPE)
    tokens = reader.get_field(gguf.Keys.Tokenizer.LIST)
    assert types is not None and tokens is not None
    for type_index, token_index in zip(types.data, tokens.data, strict=True):
        if int(types.parts[type_index][0]) == gguf.TokenType.BYTE:
            types.parts[type_index][0] = gguf.TokenType.NORMAL
            text = tokens.parts[token_index]
            text[0], text[-1] = ord("["), ord("]")
    reader.data.flush()
    return path


# ---- both backends ---------------------------------------------------------------------------


def test_both_backends_are_installed() -> None:
    # The test extra installs both; CI must exercise both.
    assert {name: b.unavailable() for name, b in BACKENDS.items()} == {
        "llama-cpp": None,
        "ctransformers": None,
    }


def test_backend_loads_tiny_model_and_generates_exactly_max_tokens(
    tiny: Path, backend: str
) -> None:
    model, why = load_model(tiny, "cpu", backend)
    try:
        assert model.backend == backend
        assert why == f"{backend}: loads llama; named"
        assert model.info.architecture == "llama"
        for max_tokens in (1, 12):
            stream = model.generate(PROMPT, GenerationParams(max_tokens=max_tokens, seed=3))
            assert "".join(stream)
            # No end-of-sequence within 12 tokens for this seed, on either backend.
            assert stream.sampled == max_tokens
    finally:
        model.close()


def test_same_seed_gives_same_text_and_different_seeds_differ(tiny: Path, backend: str) -> None:
    model, _ = load_model(tiny, "cpu", backend)
    try:

        def text(seed: int) -> str:
            params = GenerationParams(max_tokens=24, temperature=1.0, seed=seed)
            return "".join(model.generate(PROMPT, params))

        assert text(1) == text(1)
        assert len({text(1), text(2), text(3)}) == 3
    finally:
        model.close()


def test_seeded_text_is_the_same_in_other_processes(tiny: Path, backend: str) -> None:
    code = """
import json, sys
from pathlib import Path
from rbee_mesh.inference.backends import GenerationParams, load_model
model, _ = load_model(Path(sys.argv[1]), "cpu", sys.argv[2])
texts = {
    seed: "".join(model.generate("Hello world", GenerationParams(24, 1.0, seed=seed)))
    for seed in (1, 2)
}
print(json.dumps(texts))
"""
    here = {
        str(seed): generate(tiny, backend, max_tokens=24, temperature=1.0, seed=seed)
        for seed in (1, 2)
    }
    runs = [run_python(code, str(tiny), backend) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout) == here
    assert here["1"] != here["2"]


def test_no_seed_gives_a_random_seed_each_time(tiny: Path, backend: str) -> None:
    texts = {generate(tiny, backend, max_tokens=24, temperature=1.0) for _ in range(3)}
    assert len(texts) == 3


def test_stop_sequence_cuts_the_text_and_is_not_emitted(tiny: Path, backend: str) -> None:
    model, _ = load_model(tiny, "cpu", backend)
    try:
        params = GenerationParams(max_tokens=40, seed=11)
        full = "".join(model.generate(PROMPT, params))
        # A stop sequence taken from the text itself: two characters well inside it.
        start = next(i for i in range(5, len(full) - 2) if full.find(full[i : i + 2]) == i)
        stop = full[start : start + 2]
        pieces = list(model.generate(PROMPT, replace(params, stop=("never there", stop))))
        assert "".join(pieces) == full[:start]
        assert all(stop not in piece for piece in pieces)
        # A stop sequence that never appears changes nothing.
        assert "".join(model.generate(PROMPT, replace(params, stop=("never there",)))) == full
    finally:
        model.close()


def test_temperature_zero_is_greedy_and_ignores_the_seed(tiny: Path, backend: str) -> None:
    texts = {generate(tiny, backend, max_tokens=16, temperature=0.0, seed=s) for s in (1, 2, 3)}
    assert len(texts) == 1
    assert texts != {generate(tiny, backend, max_tokens=16, temperature=1.5, seed=1)}


def test_top_k_zero_means_no_limit_not_greedy(tiny: Path, backend: str) -> None:
    texts = {
        generate(tiny, backend, max_tokens=16, temperature=1.5, top_k=0, seed=s) for s in (1, 2)
    }
    assert len(texts) == 2


def test_count_tokens_counts_the_prompt_with_bos(tiny: Path, backend: str) -> None:
    model, _ = load_model(tiny, "cpu", backend)
    try:
        # BOS, "▁", then H e l l o "▁w" o r l d: the pieces of the tiny vocabulary.
        assert model.count_tokens(PROMPT) == 12
        # BOS, "▁", and the emoji's 4 UTF-8 bytes as byte tokens.
        assert model.count_tokens("😀") == 6
    finally:
        model.close()


def test_llama_cpp_parses_special_tokens_in_a_prompt(tiny: Path) -> None:
    """A template's control tokens are one token each (here the tiny vocabulary's "</s>", its
    end of sequence), not the text of their names."""
    model, _ = load_model(tiny, "cpu", "llama-cpp")
    try:
        assert model.count_tokens("</s></s></s>") == 4  # BOS and three end-of-sequence tokens
    finally:
        model.close()


def test_closing_a_generation_early_frees_the_model_for_the_next(tiny: Path, backend: str) -> None:
    model, _ = load_model(tiny, "cpu", backend)
    try:
        params = GenerationParams(max_tokens=20, seed=5)
        whole = "".join(model.generate(PROMPT, params))
        tokens = model.generate(PROMPT, params)
        next(tokens)
        tokens.close()
        assert "".join(model.generate(PROMPT, params)) == whole
    finally:
        model.close()


def test_a_generation_beyond_the_model_s_sequences_is_busy_until_one_ends(
    tiny: Path, backend: str
) -> None:
    model, _ = load_model(tiny, "cpu", backend)
    try:
        assert model.sequences == 1
        params = GenerationParams(max_tokens=20, seed=5)
        running = model.generate(PROMPT, params)
        next(running)
        with pytest.raises(MeshError) as caught:
            model.generate(PROMPT, params)
        assert caught.value.code == ErrorCode.BUSY
        running.close()
        assert "".join(model.generate(PROMPT, params))
    finally:
        model.close()


def test_a_prompt_longer_than_a_batch_joins_in_chunks_beside_a_generating_sequence(
    tmp_path: Path,
) -> None:
    path = write_tiny_gguf(tmp_path / "2k.gguf", context_length=2048)
    model, _ = load_model(path, "cpu", "llama-cpp", sequences=2)
    try:
        long_prompt = "word " * 400  # over three batches of 512 tokens: it must go in chunks
        assert model.count_tokens(long_prompt) > 3 * 512
        params = GenerationParams(max_tokens=40, temperature=0.0)
        alone = "".join(model.generate(long_prompt, params))
        running = model.generate(PROMPT, replace(params, max_tokens=2000))  # all its context
        first = next(running)  # generating: the long prompt now joins in 128-token chunks
        beside = "".join(model.generate(long_prompt, params))
        rest = "".join(running)
        assert beside == alone and first + rest
        assert running.sampled == 2000
    finally:
        model.close()


def test_llama_cpp_runs_as_many_sequences_as_asked_ctransformers_one(tiny: Path) -> None:
    for backend, served in (("llama-cpp", 3), ("ctransformers", 1)):
        model, _ = load_model(tiny, "cpu", backend, sequences=3)
        try:
            assert model.sequences == served
            per_position = metadata(tiny).kv_bytes_per_position
            assert model.memory == {
                "weights": tiny.stat().st_size,
                "kv_cache": per_position * model.n_ctx * served,
            }
        finally:
            model.close()


def test_generation_stops_when_the_context_is_full(tiny: Path, backend: str) -> None:
    model, _ = load_model(tiny, "cpu", backend)
    try:
        prompt = "x" * 240  # BOS, "▁x", then 239 "x"
        room = 256 - model.count_tokens(prompt)
        assert 0 < room < 30
        stream = model.generate(prompt, GenerationParams(max_tokens=500, seed=1))
        "".join(stream)
        assert stream.sampled <= room
    finally:
        model.close()


def test_a_prompt_longer_than_the_context_is_invalid_request(tiny: Path, backend: str) -> None:
    model, _ = load_model(tiny, "cpu", backend)
    try:
        with pytest.raises(MeshError) as caught:
            model.generate("ab " * 200, GenerationParams())
        assert caught.value.code == ErrorCode.INVALID_REQUEST
        assert "context holds 256" in caught.value.message
    finally:
        model.close()


def test_a_context_asked_for_is_loaded_within_the_model_s_own(tmp_path: Path, backend: str) -> None:
    path = write_tiny_gguf(tmp_path / "2k.gguf", context_length=2048)
    # (llama.cpp pads a context to a multiple of 256.)
    for asked, loaded in ((512, 512), (100_000, 2048)):
        model, _ = load_model(path, "cpu", backend, ctx=asked)
        try:
            assert model.n_ctx == loaded
        finally:
            model.close()


def test_the_default_context_is_the_model_s_own_as_far_as_its_cache_fits_a_budget(
    tmp_path: Path,
) -> None:
    path = write_tiny_gguf(tmp_path / "long.gguf", context_length=1 << 20)
    meta = metadata(path)
    per_position, info = meta.kv_bytes_per_position, meta.info
    assert context_size(info) == 1 << 20  # its cache fits the default budget whole
    budget = info.file_size + 3_000 * per_position
    capped = context_size(info, budget=budget)
    assert capped % 256 == 0 and MIN_CONTEXT <= capped < 1 << 20
    assert capped * per_position <= budget < (capped + 256) * per_position
    assert context_size(info, budget=1) == MIN_CONTEXT  # never less, however tight


def test_a_closed_model_is_unavailable(tiny: Path, backend: str) -> None:
    model, _ = load_model(tiny, "cpu", backend)
    tokens = model.generate(PROMPT, GenerationParams(max_tokens=5, seed=1))
    next(tokens)
    model.close()
    model.close()
    for attempt in (lambda: next(tokens), lambda: model.count_tokens(PROMPT)):
        with pytest.raises(MeshError) as caught:
            attempt()
        assert caught.value.code == ErrorCode.UNAVAILABLE


def test_emoji_and_cjk_prompts_generate_on_both_backends(tiny: Path, backend: str) -> None:
    text = generate(tiny, backend, "日本語 😀", max_tokens=8, seed=2)
    assert isinstance(text, str) and text


def test_tokens_per_second_is_measured(tiny: Path, backend: str) -> None:
    model, _ = load_model(tiny, "cpu", backend)
    try:
        count, elapsed = 0, 0.0
        for seed in range(1, 11):  # some generations meet end-of-sequence early
            params = GenerationParams(max_tokens=200, temperature=1.0, seed=seed)
            start = time.perf_counter()
            stream = model.generate("Hi", params)
            for _ in stream:
                pass
            elapsed += time.perf_counter() - start
            count += stream.sampled
        rate = f"{count} tokens in {elapsed * 1000:.1f} ms: {count / elapsed:.0f} tok/s"
        print(f"\n{backend}: {rate}")
        assert count > 0
    finally:
        model.close()


# ---- the shared text stream ------------------------------------------------------------------


def stream(pieces: list[bytes], stop: tuple[str, ...] = ()) -> list[str]:
    return list(stream_text((piece for piece in pieces), stop))


def test_text_that_may_start_a_stop_sequence_is_held_until_it_cannot() -> None:
    # One item per token: "" for a token whose text is held back.
    assert stream([b"ab", b"c", b"d", b"e"], ("cx",)) == ["ab", "", "cd", "e"]
    assert stream([b"ab", b"c", b"x", b"e"], ("cx",)) == ["ab", ""]
    # The earliest of several stop sequences wins, even one that ends later.
    assert stream([b"one two three"], ("three", "wo t")) == ["one t"]
    assert stream([b"held ", b"at the e"], ("end",)) == ["held ", "at the ", "e"]


def test_a_character_split_across_tokens_is_yielded_whole() -> None:
    cut = "日".encode()
    assert stream([b"a", cut[:1], cut[1:2], cut[2:], b"b"]) == ["a", "", "", "日", "b"]
    # Bytes that can never become a character come out as U+FFFD, not an error.
    assert "".join(stream([b"\xff", b"z", cut[:2]])) == "\ufffdz\ufffd"


def test_generation_params_come_from_the_infer_operation() -> None:
    op = Infer(prompt="hi", max_tokens=9, temperature=0.5, top_k=0, seed=7, stop=("x",))
    params = GenerationParams.from_op(op)
    assert params == GenerationParams(
        max_tokens=9, temperature=0.5, top_p=0.95, top_k=0, seed=7, stop=("x",)
    )
    assert params.with_seed() is params
    assert GenerationParams().with_seed().seed is not None
    with pytest.raises(MeshError) as caught:
        GenerationParams(top_p=0.0, max_tokens=0)
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    assert "top_p" in caught.value.message and "max_tokens" in caught.value.message


# ---- ctransformers' defects ------------------------------------------------------------------

_CTRANSFORMERS_OWN_TOKENIZE = """
import sys
from ctransformers import LLM
LLM(sys.argv[1], lib="avx2").tokenize(sys.argv[2])
print("survived")
"""

_CTRANSFORMERS_VIA_BACKEND = """
import sys
from pathlib import Path
from rbee_mesh.inference.backends import GenerationParams, load_model
model, _ = load_model(Path(sys.argv[1]), "cpu", "ctransformers")
prompt = sys.argv[2]
print(model.count_tokens(prompt))
print(repr("".join(model.generate(prompt[:40], GenerationParams(max_tokens=8, seed=1)))))
"""


def test_ctransformers_own_tokenize_overflows_the_heap_on_an_emoji_prompt(tiny: Path) -> None:
    # The defect the backend works around: 2,000 emoji need 8,002 tokens; it allocates 2,001.
    run = run_python(_CTRANSFORMERS_OWN_TOKENIZE, str(tiny), "😀" * 2000)
    assert run.returncode != 0
    assert "survived" not in run.stdout


def test_ctransformers_backend_takes_emoji_and_cjk_prompts_without_crashing(tiny: Path) -> None:
    run = run_python(_CTRANSFORMERS_VIA_BACKEND, str(tiny), EMOJI_CJK)
    assert run.returncode == 0, run.stderr
    count = int(run.stdout.splitlines()[0])
    assert count > len(EMOJI_CJK)  # more tokens than characters: byte tokens, as expected


def test_ctransformers_rejects_a_nul_character_instead_of_truncating(tiny: Path) -> None:
    model, _ = load_model(tiny, "cpu", "ctransformers")
    try:
        with pytest.raises(MeshError) as caught:
            model.count_tokens("before\0after")
        assert caught.value.code == ErrorCode.INVALID_REQUEST
    finally:
        model.close()


def test_ctransformers_loads_fast_with_the_cpu_build_named(tiny: Path) -> None:
    from ctransformers import LLM

    flags = set(Path("/proc/cpuinfo").read_text().split())
    expected = "avx2" if "avx2" in flags else "avx" if {"avx", "f16c"} <= flags else "basic"
    assert ctransformers_lib("cpu") == expected
    assert ctransformers_lib("cuda:0") == "cuda"
    LLM(str(tiny), lib=ctransformers_lib("cpu"))  # the first load reads the library
    start = time.perf_counter()
    LLM(str(tiny))
    detecting = time.perf_counter() - start
    start = time.perf_counter()
    CtransformersBackend().load(tiny, "cpu").close()
    named = time.perf_counter() - start
    print(f"\nctransformers load: {detecting * 1000:.0f} ms detecting the CPU,", end=" ")
    print(f"{named * 1000:.1f} ms with the build named")
    assert named < 0.5


def test_ctransformers_refuses_a_vocabulary_without_byte_tokens(tmp_path: Path) -> None:
    path = without_byte_tokens(write_tiny_gguf(tmp_path / "no-bytes.gguf"))
    info = read_gguf_info(path)
    assert info.byte_tokens == 0
    reason = CtransformersBackend().refuses(info)
    assert reason is not None and "no byte tokens" in reason
    with pytest.raises(MeshError) as caught:
        load_model(path, "cpu", "ctransformers")
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    assert "no byte tokens" in caught.value.message


def test_ctransformers_refuses_architectures_and_quantisations_it_predates(tiny: Path) -> None:
    backend = CtransformersBackend()
    info = read_gguf_info(tiny)
    assert backend.refuses(info) is None
    for arch in ("qwen2", "gpt2"):
        reason = backend.refuses(replace(info, architecture=arch))
        assert reason == f"the {arch} architecture is not supported (GGUF: falcon, llama only)"
    reason = backend.refuses(replace(info, file_type="MOSTLY_IQ4_XS"))
    assert reason == "the MOSTLY_IQ4_XS quantisation is newer than ctransformers 0.2.27"
    assert backend.refuses(replace(info, file_type="MOSTLY_Q4_K_M")) is None


def test_ctransformers_refuses_a_relabelled_architecture_file(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(MeshError) as caught:
        load_model(path, "cpu", "ctransformers")
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    assert "qwen2 architecture is not supported" in caught.value.message


# ---- llama-cpp -------------------------------------------------------------------------------


def test_llama_cpp_would_abort_on_a_vocabulary_without_byte_tokens_so_it_refuses(
    tmp_path: Path,
) -> None:
    path = without_byte_tokens(write_tiny_gguf(tmp_path / "no-bytes.gguf"))
    # The defect: llama.cpp loads the file, then aborts the process tokenizing a newline.
    code = "import sys; from llama_cpp import Llama\n"
    code += "Llama(sys.argv[1], verbose=False).tokenize(b'a\\nb'); print('survived')"
    run = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        # ggml runs gdb for a backtrace when it aborts, if it finds one: slow and noisy.
        env={**os.environ, "PATH": "/nonexistent"},
    )
    assert run.returncode != 0 and "survived" not in run.stdout
    reason = LlamaCppBackend().refuses(read_gguf_info(path))
    assert reason is not None and "no byte tokens" in reason


def test_llama_cpp_says_why_it_cannot_load_a_file(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "gptj.gguf", arch="gptj")
    with pytest.raises(MeshError) as caught:
        load_model(path, "cpu", "llama-cpp")
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    assert caught.value.message == (
        "llama-cpp cannot load gptj.gguf: "
        "error loading model: unsupported model architecture: 'gptj'"
    )


def test_llama_cpp_loads_a_current_architecture(tmp_path: Path) -> None:
    # The tiny llama tensors relabelled qwen2 (whose biases llama.cpp treats as optional).
    model, why = load_model(write_tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2"), "cpu")
    try:
        assert why == "llama-cpp: loads qwen2; chosen first"
        assert "".join(model.generate(PROMPT, GenerationParams(max_tokens=4, seed=1)))
    finally:
        model.close()


# ---- choosing a backend ----------------------------------------------------------------------


def test_auto_picks_llama_cpp_first_and_says_why(tiny: Path) -> None:
    model, why = load_model(tiny, "cpu")
    try:
        assert model.backend == "llama-cpp"
        assert why == "llama-cpp: loads llama; chosen first"
    finally:
        model.close()


def test_auto_falls_back_to_ctransformers_without_llama_cpp_python(tiny: Path) -> None:
    # A process in which llama_cpp cannot be imported, as after `pip install rbee-mesh`.
    code = """
import sys
sys.modules["llama_cpp"] = None
from pathlib import Path
from rbee_mesh.inference.backends import BACKENDS, load_model
from rbee_mesh.protocol import MeshError
print(BACKENDS["llama-cpp"].unavailable())
model, why = load_model(Path(sys.argv[1]), "cpu")
print(model.backend)
print(why)
try:
    load_model(Path(sys.argv[1]), "cpu", "llama-cpp")
except MeshError as exc:
    print(exc)
"""
    run = run_python(code, str(tiny))
    assert run.returncode == 0, run.stderr
    missing = "llama-cpp-python is not installed (pip install 'rbee-mesh[llama]')"
    assert run.stdout.splitlines() == [
        missing,
        "ctransformers",
        f"ctransformers: {missing}",
        f"UNAVAILABLE: backend llama-cpp is unavailable: {missing}",
    ]


def test_an_unknown_backend_name_is_invalid_request(tiny: Path) -> None:
    with pytest.raises(MeshError) as caught:
        load_model(tiny, "cpu", "vllm")
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    assert caught.value.message == "unknown backend 'vllm'; use auto, llama-cpp, ctransformers"


def test_an_unknown_device_is_invalid_request(tiny: Path) -> None:
    with pytest.raises(MeshError) as caught:
        load_model(tiny, "gpu0")
    assert caught.value.code == ErrorCode.INVALID_REQUEST


def test_a_file_no_backend_can_load_lists_each_backends_reason(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "gptj.gguf", arch="gptj")
    with pytest.raises(MeshError) as caught:
        load_model(path, "cpu")
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    assert caught.value.message == (
        "no backend can load gptj.gguf: "
        "llama-cpp cannot load gptj.gguf: "
        "error loading model: unsupported model architecture: 'gptj'; "
        "ctransformers cannot load gptj.gguf: "
        "the gptj architecture is not supported (GGUF: falcon, llama only)"
    )


def test_a_file_that_is_not_gguf_is_invalid_request(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"<html>not a model</html>")
    with pytest.raises(MeshError) as caught:
        load_model(path, "cpu")
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    assert "not a GGUF file" in caught.value.message


def test_a_gpu_without_gpu_support_is_unavailable(tiny: Path, backend: str) -> None:
    import llama_cpp

    if backend == "llama-cpp" and llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python build has GPU support")
    with pytest.raises(MeshError) as caught:
        load_model(tiny, "cuda:0", backend)
    assert caught.value.code == ErrorCode.UNAVAILABLE


# ---- memory ----------------------------------------------------------------------------------


def test_a_model_larger_than_available_ram_is_out_of_memory() -> None:
    gib = 1024**3
    with pytest.raises(MeshError) as caught:
        check_memory("big.gguf", 3 * gib, 2 * gib, "the breakdown")
    assert caught.value.code == ErrorCode.UNAVAILABLE
    assert caught.value.message == (
        "out of memory: big.gguf needs about 3.0 GiB (the breakdown), "
        "but only 2.0 GiB of RAM is available"
    )
    check_memory("fits.gguf", gib, gib)
    check_memory("unknown.gguf", gib, None)


def test_memory_needed_counts_weights_kv_cache_and_working_memory(tiny: Path) -> None:
    info = read_gguf_info(tiny)
    needed, breakdown = memory_needed(tiny, 256)
    # Keys and values (32 dimensions each) of 2 KV heads in 2 layers, f16, for 256 positions.
    kv = (32 + 32) * 2 * 2 * 2 * 256
    assert needed == info.file_size + kv + COMPUTE_OVERHEAD
    assert breakdown.endswith("128.0 KiB of context + 64.0 MiB of working memory")
    available = available_memory()
    assert available is not None and available > needed
