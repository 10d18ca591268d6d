"""Chat prompts: a conversation rendered with the model's own chat template.

A GGUF file of an instruct model carries its template (`tokenizer.chat_template`, Jinja), the
one its makers trained it with. It is rendered as Hugging Face's transformers does: in
Jinja2's immutable sandbox (a template comes with a downloaded file: it may not reach Python's
internals or change anything), with `trim_blocks` and `lstrip_blocks`, the messages, the model's
BOS and EOS token texts, `add_generation_prompt` and the helpers templates use
(`raise_exception`, `strftime_now`). A model without a template gets ChatML (`DEFAULT_TEMPLATE`),
the format most small instruct models use. The rendered text is tokenized with special tokens
parsed, so the template's control tokens are single tokens; generation stops at the model's end
of turn (an end-of-generation token).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import gguf
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rbee_mesh.inference.gguf_file import open_gguf
from rbee_mesh.protocol import ErrorCode, MeshError

#: ChatML, for models that carry no template of their own.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template and the token texts it may use."""

    source: str
    bos_token: str
    eos_token: str
    #: False: the model carries none, and `source` is DEFAULT_TEMPLATE.
    own: bool


def template_of(path: str | os.PathLike[str]) -> ChatTemplate:
    """The chat template of the GGUF file at `path` (read once per version of the file)."""
    stat = os.stat(path)
    return _template_of(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _template_of(path: str, size: int, mtime_ns: int) -> ChatTemplate:
    reader = open_gguf(path).reader
    field = reader.get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    source = str(field.contents()) if field is not None else None
    tokens = reader.get_field(gguf.Keys.Tokenizer.LIST)

    def token(key: str) -> str:
        id_field = reader.get_field(key)
        if id_field is None or tokens is None:
            return ""
        index = int(id_field.contents())
        return str(tokens.contents(index)) if 0 <= index < len(tokens.data) else ""

    return ChatTemplate(
        source=source or DEFAULT_TEMPLATE,
        bos_token=token(gguf.Keys.Tokenizer.BOS_ID),
        eos_token=token(gguf.Keys.Tokenizer.EOS_ID),
        own=source is not None,
    )


def render(
    template: ChatTemplate, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
) -> str:
    """The prompt for `messages` ({"role", "content"} each), ending where the assistant's turn
    begins. INVALID_REQUEST if the template refuses them (many insist that roles alternate) or
    cannot be rendered."""
    for message in messages:
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise MeshError(
                ErrorCode.INVALID_REQUEST,
                f"a chat message is a role ({', '.join(ROLES)}) and a text content",
            )
    try:
        compiled = _environment().from_string(template.source)
        return compiled.render(
            messages=messages,
            bos_token=template.bos_token,
            eos_token=template.eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    except TemplateError as exc:  # SecurityError (the sandbox) included
        raise MeshError(
            ErrorCode.INVALID_REQUEST, f"the model's chat template refused the chat: {exc}"
        ) from None


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    return env


def _raise(message: str) -> NoReturn:
    raise TemplateError(message)


def one_turn(
    prompt: str, system: str | None, history: Sequence[tuple[str, str]] = ()
) -> list[dict[str, Any]]:
    """The conversation of a turn: a system message if given, the earlier turns, the prompt."""
    before = [{"role": role, "content": content} for role, content in history]
    first = [{"role": "system", "content": system}] if system else []
    return [*first, *before, {"role": "user", "content": prompt}]


def chat_prompt(
    path: str | os.PathLike[str], messages: list[dict[str, str]]
) -> tuple[str, ChatTemplate]:
    """The prompt of `messages` for the model at `path`, and the template it was rendered
    with. A template that begins with the BOS token loses it here: the tokenizer adds it."""
    template = template_of(path)
    text = render(template, messages)
    if template.bos_token:
        text = text.removeprefix(template.bos_token)
    return text, template
