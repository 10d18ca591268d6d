"""GGUF files: the tiny llama model tests are built on, and how bad files are refused."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from rbee_mesh.inference.gguf_file import read_gguf_info, write_tiny_gguf
from rbee_mesh.protocol import ErrorCode, MeshError


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def test_tiny_gguf_round_trips_through_read_gguf_info(tiny: Path) -> None:
    info = read_gguf_info(tiny)
    assert info.architecture == "llama"
    assert info.name == "tiny-llama"
    assert info.context_length == 256
    assert info.file_type == "MOSTLY_F16"
    assert info.version == 3
    assert info.vocab_size == 380
    assert info.byte_tokens == 256
    # token_embd, output_norm, output, and nine tensors per block (two blocks).
    assert info.tensor_count == 3 + 2 * 9
    per_block = 2 * 64 + 4 * 64 * 64 + 3 * 64 * 128
    assert info.parameter_count == 2 * 380 * 64 + 64 + 2 * per_block
    assert info.file_size == tiny.stat().st_size < 400_000
    assert info.to_record()["architecture"] == "llama"


def test_tiny_gguf_has_what_a_llama_loader_needs(tiny: Path) -> None:
    reader = gguf.GGUFReader(tiny)

    def value(key: str) -> object:
        field = reader.get_field(key)
        assert field is not None, f"{key} is missing"
        return field.contents()

    tokens = value(gguf.Keys.Tokenizer.LIST)
    types = value(gguf.Keys.Tokenizer.TOKEN_TYPE)
    assert isinstance(tokens, list) and isinstance(types, list)
    # llama.cpp looks up <0x0A> for the newline; without byte tokens ctransformers cannot load.
    newline = tokens.index("<0x0A>")
    assert types[newline] == gguf.TokenType.BYTE
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert value(gguf.Keys.Tokenizer.MODEL) == "llama"
    assert value(gguf.Keys.Tokenizer.BOS_ID) == 1
    assert value(gguf.Keys.Tokenizer.EOS_ID) == 2
    for key in ("embedding_length", "block_count", "feed_forward_length"):
        assert isinstance(value(f"llama.{key}"), int)
    assert value("llama.attention.head_count") == 2
    assert isinstance(value("llama.attention.layer_norm_rms_epsilon"), float)
    # Every tensor is one the gguf package lists for llama, and every one a llama block needs.
    llama = gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA]
    allowed = {
        gguf.TENSOR_NAMES[kind].format(bid=block) + ".weight"
        for kind in llama
        for block in range(2)
    }
    names = {tensor.name for tensor in reader.tensors}
    assert names <= allowed
    required = [
        gguf.MODEL_TENSOR.ATTN_NORM,
        gguf.MODEL_TENSOR.ATTN_Q,
        gguf.MODEL_TENSOR.ATTN_K,
        gguf.MODEL_TENSOR.ATTN_V,
        gguf.MODEL_TENSOR.ATTN_OUT,
        gguf.MODEL_TENSOR.FFN_NORM,
        gguf.MODEL_TENSOR.FFN_GATE,
        gguf.MODEL_TENSOR.FFN_DOWN,
        gguf.MODEL_TENSOR.FFN_UP,
    ]
    for block in range(2):
        for kind in required:
            assert f"{gguf.TENSOR_NAMES[kind].format(bid=block)}.weight" in names
    assert {"token_embd.weight", "output_norm.weight", "output.weight"} <= names
    # ggml dimensions (the reverse of numpy's): token_embd is {n_embd, n_vocab}.
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert embd.shape.tolist() == [64, 380]


def test_same_seed_writes_same_bytes_and_another_seed_other_weights(tmp_path: Path) -> None:
    a = write_tiny_gguf(tmp_path / "a.gguf", seed=7).read_bytes()
    b = write_tiny_gguf(tmp_path / "b.gguf", seed=7).read_bytes()
    c = write_tiny_gguf(tmp_path / "c.gguf", seed=8).read_bytes()
    assert a == b
    assert len(a) == len(c) and a != c
    assert not list(tmp_path.glob("*.part"))


def test_file_that_is_not_gguf_is_refused_with_invalid_request(tmp_path: Path) -> None:
    garbage = tmp_path / "model.gguf"
    garbage.write_bytes(b"<html>Not Found</html>" * 10)
    with pytest.raises(MeshError) as caught:
        read_gguf_info(garbage)
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert f"{garbage} is not a GGUF file" in caught.value.message


def test_empty_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.touch()
    with pytest.raises(MeshError, match="is empty, not a GGUF file") as caught:
        read_gguf_info(empty)
    assert caught.value.code is ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize(
    "keep",
    [10, 1_000, 100_000, -100],
    ids=["in-header", "in-metadata", "in-tensor-data", "last-tensor-short"],
)
def test_truncated_gguf_is_refused_as_truncated(tiny: Path, tmp_path: Path, keep: int) -> None:
    data = tiny.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(MeshError, match="truncated") as caught:
        read_gguf_info(cut)
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert str(cut) in caught.value.message


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_path_is_refused_with_the_reason(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model.gguf"
    if kind == "directory":
        path.mkdir()
    with pytest.raises(MeshError, match=f"cannot read model file {path}") as caught:
        read_gguf_info(path)
    assert caught.value.code is ErrorCode.INVALID_REQUEST
