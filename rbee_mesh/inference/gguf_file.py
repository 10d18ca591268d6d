"""GGUF model files: a checked reader of their metadata, and a tiny llama GGUF for tests.

`open_gguf` maps a file into memory with `gguf.GGUFReader` (nothing is copied, so opening a
multi-gigabyte model is cheap) and turns every way a file can be wrong (not GGUF, truncated,
corrupt, unreadable) into `MeshError(INVALID_REQUEST)` with a sentence that says which. The
reader raises a dozen exception types on corrupt input; callers see one.

`write_tiny_gguf` writes a llama model a few hundred KB in size with random weights and the
metadata a llama loader needs: hyperparameters, a SentencePiece vocabulary that includes the 256
byte tokens (`<0x0A>` and friends; ctransformers fails with an opaque "Failed to create LLM"
without them), special token ids and the context length. Nothing in the test suite or CI
downloads a model; tests make their own with this.
"""

from __future__ import annotations

import os
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from rbee_mesh.protocol import ErrorCode, MeshError

GGUF_MAGIC = b"GGUF"
#: magic (4 bytes), version (u32), tensor count (u64), metadata count (u64).
_HEADER_BYTES = 24

_INT_TYPES = frozenset(
    {
        gguf.GGUFValueType.UINT8,
        gguf.GGUFValueType.INT8,
        gguf.GGUFValueType.UINT16,
        gguf.GGUFValueType.INT16,
        gguf.GGUFValueType.UINT32,
        gguf.GGUFValueType.INT32,
        gguf.GGUFValueType.UINT64,
        gguf.GGUFValueType.INT64,
    }
)


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF file says about the model in it."""

    path: str
    architecture: str
    #: `general.name`, else the file name without its extension.
    name: str
    #: `<architecture>.context_length`: the context the model was trained with, if recorded.
    context_length: int | None
    tensor_count: int
    parameter_count: int
    file_size: int
    #: `general.file_type` as a llama.cpp file type name (e.g. MOSTLY_Q4_K_M), if recorded.
    file_type: str | None
    #: The GGUF format version (2 or 3).
    version: int
    vocab_size: int | None
    #: Tokens of type BYTE (`<0x00>` .. `<0xFF>`) in the vocabulary; 0 for byte-level BPE models.
    byte_tokens: int

    def to_record(self) -> dict[str, Any]:
        """A msgpack-able dict of every field."""
        return asdict(self)


@dataclass(frozen=True, eq=False)
class GgufFile:
    """A GGUF file mapped into memory: its metadata, and the reader whose memmap holds it.

    The mapping stays open for as long as this object (or the reader) is referenced.
    """

    info: GgufInfo
    reader: gguf.GGUFReader


def open_gguf(path: str | os.PathLike[str]) -> GgufFile:
    """Map the GGUF file at `path` and read its metadata.

    Raises MeshError(INVALID_REQUEST) if the file cannot be read, is not GGUF, or is truncated
    or corrupt; the message names the file and says which.
    """
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with path.open("rb") as file:
            head = file.read(_HEADER_BYTES)
    except OSError as exc:
        raise _invalid(f"cannot read model file {path}: {exc.strerror or exc}") from None
    if not head:
        raise _invalid(f"{path} is empty, not a GGUF file")
    if head[: len(GGUF_MAGIC)] != GGUF_MAGIC:
        raise _invalid(f"{path} is not a GGUF file (it starts with {head[:8]!r})")
    if len(head) < _HEADER_BYTES:
        raise _invalid(f"{path} is truncated: {file_size} bytes, too short for a GGUF header")
    try:
        reader = gguf.GGUFReader(path)
    except OSError as exc:
        raise _invalid(f"cannot map model file {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # corrupt input fails in many ways: ValueError, IndexError, KeyError
        raise _invalid(
            f"{path} is not a readable GGUF file (truncated or corrupt): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    return GgufFile(info=_info(path, file_size, reader), reader=reader)


def model_facts(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What `model list` shows of a GGUF file: architecture, quantization, context length,
    parameter count, and whether it carries a chat template (`tokenizer.chat_template`).
    Raises MeshError(INVALID_REQUEST) as open_gguf."""
    gguf_file = open_gguf(path)
    info = gguf_file.info
    file_type = info.file_type
    quantization = None if file_type is None else file_type.removeprefix("MOSTLY_")
    return {
        "architecture": info.architecture,
        "quantization": quantization.removeprefix("ALL_") if quantization else None,
        "context_length": info.context_length,
        "parameters": info.parameter_count,
        "chat_template": gguf_file.reader.get_field("tokenizer.chat_template") is not None,
    }


def read_gguf_info(path: str | os.PathLike[str]) -> GgufInfo:
    """The metadata of the GGUF file at `path`; raises MeshError(INVALID_REQUEST) as open_gguf."""
    return open_gguf(path).info


def _info(path: Path, file_size: int, reader: gguf.GGUFReader) -> GgufInfo:
    architecture = _string(reader, gguf.Keys.General.ARCHITECTURE, path)
    if not architecture:
        raise _invalid(f"{path} has no {gguf.Keys.General.ARCHITECTURE}: not a model file")
    file_type = _integer(reader, gguf.Keys.General.FILE_TYPE, path)
    tokens = reader.get_field(gguf.Keys.Tokenizer.LIST)
    return GgufInfo(
        path=str(path),
        architecture=architecture,
        name=_string(reader, gguf.Keys.General.NAME, path) or path.stem,
        context_length=_integer(
            reader, gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=architecture), path
        ),
        tensor_count=len(reader.tensors),
        parameter_count=sum(int(tensor.n_elements) for tensor in reader.tensors),
        file_size=file_size,
        file_type=None if file_type is None else _file_type_name(file_type),
        version=int(reader.fields["GGUF.version"].parts[0][0]),
        vocab_size=None if tokens is None else len(tokens.data),
        byte_tokens=_byte_token_count(reader),
    )


def _string(reader: gguf.GGUFReader, key: str, path: Path) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    if field.types != [gguf.GGUFValueType.STRING]:
        raise _invalid(f"{path}: {key} is not a string")
    try:
        return str(field.contents())
    except UnicodeDecodeError:
        raise _invalid(f"{path}: {key} is not valid UTF-8") from None


def _integer(reader: gguf.GGUFReader, key: str, path: Path) -> int | None:
    field = reader.get_field(key)
    if field is None:
        return None
    if len(field.types) != 1 or field.types[0] not in _INT_TYPES:
        raise _invalid(f"{path}: {key} is not an integer")
    return int(field.contents())


def _byte_token_count(reader: gguf.GGUFReader) -> int:
    field = reader.get_field(gguf.Keys.Tokenizer.TOKEN_TYPE)
    if field is None or field.types[-1] not in _INT_TYPES:
        return 0
    byte = int(gguf.TokenType.BYTE)
    return sum(1 for index in field.data if int(field.parts[index][0]) == byte)


def _file_type_name(value: int) -> str:
    try:
        return gguf.LlamaFileType(value).name
    except ValueError:
        return f"unknown ({value})"


def _invalid(message: str) -> MeshError:
    return MeshError(ErrorCode.INVALID_REQUEST, message)


# ---- a tiny model for tests ------------------------------------------------------------------


def write_tiny_gguf(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    arch: str = "llama",
    name: str = "tiny-llama",
    context_length: int = 256,
    embedding_length: int = 64,
    block_count: int = 2,
    head_count: int = 2,
    head_count_kv: int = 2,
    feed_forward_length: int = 128,
    chat_template: str | None = None,
) -> Path:
    """Write a tiny llama-architecture GGUF model to `path` (about 270 KB with the defaults).

    Random weights (normal, sigma 0.02, from `seed`: the same seed gives the same bytes), F16
    matrices and F32 norms (llama.cpp's MOSTLY_F16), a 380-token SentencePiece vocabulary with
    <unk>, <s>, </s>, the 256 byte tokens and printable ASCII pieces. `arch` names the
    architecture in the metadata; only "llama" describes these tensors faithfully, and another
    name is for testing how a loader refuses an architecture. `chat_template`: a Jinja chat
    template to carry (`tokenizer.chat_template`). The file is written next to `path` and
    renamed into place, so a reader never sees half of it.
    """
    if arch not in gguf.MODEL_ARCH_NAMES.values():
        raise ValueError(f"unknown GGUF architecture {arch!r}")
    if embedding_length % head_count or head_count % head_count_kv:
        raise ValueError("embedding_length must divide by head_count, and it by head_count_kv")
    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, scores, token_types = _tiny_vocabulary()
    vocab_size = len(tokens)
    head_dim = embedding_length // head_count

    def matrix(rows: int, cols: int) -> np.ndarray[Any, np.dtype[np.float16]]:
        # numpy shape (rows, cols) is ggml's ne = (cols, rows): the writer reverses it.
        return rng.normal(0.0, 0.02, size=(rows, cols)).astype(np.float16)

    def norm() -> np.ndarray[Any, np.dtype[np.float32]]:
        return np.ones(embedding_length, dtype=np.float32)

    part = path.with_name(path.name + ".part")
    writer = gguf.GGUFWriter(part, arch)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(context_length)
    writer.add_embedding_length(embedding_length)
    writer.add_block_count(block_count)
    writer.add_feed_forward_length(feed_forward_length)
    writer.add_head_count(head_count)
    writer.add_head_count_kv(head_count_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10_000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    kv_dim = head_dim * head_count_kv
    tensors: list[tuple[gguf.MODEL_TENSOR, int | None, np.ndarray[Any, Any]]] = [
        (gguf.MODEL_TENSOR.TOKEN_EMBD, None, matrix(vocab_size, embedding_length))
    ]
    for block in range(block_count):
        tensors += [
            (gguf.MODEL_TENSOR.ATTN_NORM, block, norm()),
            (gguf.MODEL_TENSOR.ATTN_Q, block, matrix(embedding_length, embedding_length)),
            (gguf.MODEL_TENSOR.ATTN_K, block, matrix(kv_dim, embedding_length)),
            (gguf.MODEL_TENSOR.ATTN_V, block, matrix(kv_dim, embedding_length)),
            (gguf.MODEL_TENSOR.ATTN_OUT, block, matrix(embedding_length, embedding_length)),
            (gguf.MODEL_TENSOR.FFN_NORM, block, norm()),
            (gguf.MODEL_TENSOR.FFN_GATE, block, matrix(feed_forward_length, embedding_length)),
            (gguf.MODEL_TENSOR.FFN_DOWN, block, matrix(embedding_length, feed_forward_length)),
            (gguf.MODEL_TENSOR.FFN_UP, block, matrix(feed_forward_length, embedding_length)),
        ]
    tensors += [
        (gguf.MODEL_TENSOR.OUTPUT_NORM, None, norm()),
        (gguf.MODEL_TENSOR.OUTPUT, None, matrix(vocab_size, embedding_length)),
    ]
    for kind, bid, data in tensors:
        # The names llama.cpp looks up, from the gguf package's own table: "blk.0.attn_q" etc.
        writer.add_tensor(f"{gguf.TENSOR_NAMES[kind].format(bid=bid)}.weight", data)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(part, path)
    except BaseException:
        writer.close()
        part.unlink(missing_ok=True)
        raise
    return path


def _tiny_vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of a small SentencePiece (llama) vocabulary.

    The layout of a real llama vocabulary: <unk> <s> </s> (ids 0, 1, 2), then the byte tokens
    <0x00>..<0xFF> that SentencePiece falls back to for text without a piece (llama.cpp looks
    up <0x0A> for the newline), then pieces with falling scores: "▁" (a space), the printable
    ASCII characters, and "▁a".."▁z".
    """
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = ["▁", *(chr(c) for c in range(0x21, 0x7F)), *(f"▁{c}" for c in string.ascii_lowercase)]
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    return tokens, scores, [int(t) for t in types]
