"""Chat turns (inference/chat.py): a conversation rendered with the model's own template, in
Jinja's sandbox, and `infer --chat` through a real mesh and worker."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.inference.backends import load_model
from rbee_mesh.inference.chat import (
    DEFAULT_TEMPLATE,
    ChatTemplate,
    chat_prompt,
    one_turn,
    render,
    template_of,
)
from rbee_mesh.inference.gguf_file import write_tiny_gguf
from rbee_mesh.protocol import Done, ErrorCode, Infer, MeshError, Narration, ProtocolError
from tests.conftest import infer_in_a_mesh

#: A template in the style of Llama 2's: BOS per turn, roles named, EOS after each.
TEMPLATE = (
    "{% for m in messages %}{{ bos_token + m['role'] + ': ' + m['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_a_model_s_own_template_renders_the_turn_with_its_tokens(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "chat.gguf", chat_template=TEMPLATE)
    template = template_of(model)
    assert template.own and (template.bos_token, template.eos_token) == ("<s>", "</s>")
    text = render(template, one_turn("hi", "be brief"))
    assert text == "<s>system: be brief</s><s>user: hi</s>assistant:"
    # The tokenizer adds BOS itself: the prompt does not begin with a second one.
    prompt, _ = chat_prompt(model, one_turn("hi", None))
    assert prompt == "user: hi</s>assistant:"


def test_a_model_without_a_template_gets_chatml(tmp_path: Path) -> None:
    template = template_of(write_tiny_gguf(tmp_path / "plain.gguf"))
    assert not template.own and template.source == DEFAULT_TEMPLATE
    text = render(template, one_turn("What is 2+2?", "Answer in one word."))
    assert text == (
        "<|im_start|>system\nAnswer in one word.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("{{ ''.__class__.__mro__ }}", "unsafe"),  # the sandbox: no Python internals
        ("{{ messages.append(1) }}", "unsafe"),  # immutable: a template changes nothing
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{% for %}", "refused the chat"),  # not even Jinja
    ],
)
def test_a_template_that_fails_or_misbehaves_is_a_clear_refusal(source: str, words: str) -> None:
    with pytest.raises(MeshError) as refused:
        render(ChatTemplate(source, "<s>", "</s>", own=True), one_turn("hi", None))
    assert refused.value.code is ErrorCode.INVALID_REQUEST and words in refused.value.message


def test_a_message_of_an_unknown_role_is_refused() -> None:
    template = ChatTemplate(DEFAULT_TEMPLATE, "", "", own=False)
    with pytest.raises(MeshError) as refused:
        render(template, [{"role": "wizard", "content": "hi"}])
    assert refused.value.code is ErrorCode.INVALID_REQUEST


async def test_infer_chat_runs_the_rendered_turn_on_a_worker(tmp_path: Path) -> None:
    state = tmp_path / "state"
    model = write_tiny_gguf(tmp_path / "chat.gguf", context_length=2048, chat_template=TEMPLATE)
    Catalog(state / "hive" / "models").add_file("rbee-test/chat", "chat.gguf", model)
    loaded, _ = load_model(model, "cpu", "llama-cpp")
    try:
        expected = loaded.count_tokens(chat_prompt(model, one_turn("hi", "be brief"))[0])
        raw = loaded.count_tokens("hi")
    finally:
        loaded.close()
    op = Infer(prompt="hi", system="be brief", model="rbee-test/chat:chat.gguf", max_tokens=4)
    with trio.fail_after(60):
        job, events = await infer_in_a_mesh(state, op)
    assert isinstance(job.terminal, Done), job.terminal
    assert job.terminal.result["usage"]["prompt_tokens"] == expected > raw
    said = [e.human for e in events if isinstance(e, Narration)]
    assert "a chat turn, rendered with the model's own chat template" in said


def test_a_turn_carries_the_chat_so_far_in_order() -> None:
    template = ChatTemplate(DEFAULT_TEMPLATE, "", "", own=False)
    history = (("user", "Hello"), ("assistant", "Hi! How can I help?"))
    text = render(template, one_turn("Tell me a joke.", "Be kind.", history))
    assert text == (
        "<|im_start|>system\nBe kind.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nHi! How can I help?<|im_end|>\n"
        "<|im_start|>user\nTell me a joke.<|im_end|>\n<|im_start|>assistant\n"
    )
    # On the wire the turns are a list of maps; a role other than system, user or assistant is
    # refused.
    op = Infer(prompt="x", chat=True, history=history)
    assert op.to_wire()["history"][1] == {"role": "assistant", "content": "Hi! How can I help?"}
    with pytest.raises(ProtocolError):
        Infer.from_wire({**op.to_wire(), "history": [{"role": "tool", "content": "x"}]}, "op")
