"""What a real instruct model does through the mesh (SmolLM2-135M-Instruct; tests/real_model.py):
its own chat template, special tokens, an answer that is right."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
import trio

from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.inference.chat import template_of
from rbee_mesh.inference.gguf_file import model_facts
from rbee_mesh.protocol import Done, Infer, Narration, Token
from tests.clitools import Mesh
from tests.conftest import infer_in_a_mesh, serving_a_mesh
from tests.real_model import FILE, smollm2

pytestmark = pytest.mark.slow

MODEL = f"local/smollm2:{FILE}"
QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="module")
def model() -> Path:
    return smollm2()


def test_the_model_carries_a_chatml_template_of_its_own(model: Path) -> None:
    template = template_of(model)
    assert template.own and "<|im_start|>" in template.source
    assert template.eos_token == "<|im_end|>"


async def test_a_chat_turn_at_temperature_zero_answers_paris(model: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    Catalog(state / "hive" / "models").add_file("local/smollm2", FILE, model)
    op = Infer(prompt=QUESTION, model=MODEL, chat=True, temperature=0.0, max_tokens=16)
    with trio.fail_after(120):
        job, events = await infer_in_a_mesh(state, op)
    assert isinstance(job.terminal, Done), job.terminal
    text = "".join(e.text for e in events if isinstance(e, Token))
    assert "Paris" in text, text
    said = [e.human for e in events if isinstance(e, Narration)]
    assert "a chat turn, rendered with the model's own chat template" in said
    # It stopped at its end of turn, not at max_tokens; and the template's control tokens were
    # one token each (the turn is 41 tokens; read as text they would be over 60).
    assert job.terminal.result["finish_reason"] == "eos", job.terminal.result
    assert job.terminal.result["usage"]["prompt_tokens"] < 50
    # Its own context (8192), whose cache (23 KB a token) fits the default budget.
    assert job.terminal.result["context"] == 8192


async def test_the_openai_client_gets_paris_plain_and_streamed_alike(
    model: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    Catalog(state / "hive" / "models").add_file("local/smollm2", FILE, model)
    question = [{"role": "user", "content": QUESTION}]

    def ask(client: openai.OpenAI, **params: Any) -> Any:
        return client.chat.completions.create(
            model=MODEL, messages=question, temperature=0, max_tokens=16, **params
        )

    async with serving_a_mesh(state) as served:
        client = served.client()
        with trio.fail_after(120):
            plain = await trio.to_thread.run_sync(lambda: ask(client))
            chunks = await trio.to_thread.run_sync(lambda: list(ask(client, stream=True)))
    answer = plain.choices[0].message.content
    assert "Paris" in answer, answer
    assert plain.choices[0].finish_reason == "stop"  # its end of turn, not max_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer


def test_the_demo_answers_with_a_real_model_of_the_user_s_catalog(
    model: Path, tmp_path: Path
) -> None:
    mesh = Mesh(tmp_path / "state")
    Catalog(mesh.home / "hive" / "models").add_file(
        "local/smollm2", FILE, model, gguf=model_facts(model)
    )
    result = mesh.run("demo", timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"demo model: {MODEL}, a real instruct model" in result.stderr, result.stderr
    assert "Paris" in result.stdout, result.stdout
    # Copied into the demo's own state: the next run needs the user's catalog no more.
    assert Catalog(tmp_path / "cache" / "rbee-mesh" / "demo" / "hive" / "models").lookup(MODEL)
