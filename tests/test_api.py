"""The queen's OpenAI-compatible API (actors/queen/api.py) with the official `openai` client:
a real queen and hive in this process, a real worker process, a random-weight model; the API
on a real loopback port. What a real model answers is in test_real_model.py.

The client is synchronous (as most users run it): each call runs in a thread, bounded by the
client's own timeout.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
import trio

from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.actors.jobclient import ClientConfig
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.mesh import memory_endpoint, running_queen
from rbee_mesh.actors.queen import openai as shapes
from rbee_mesh.actors.queen.api import serving_api
from rbee_mesh.inference.gguf_file import write_tiny_gguf
from rbee_mesh.protocol import Done, ErrorCode, MeshError, Ping
from rbee_mesh.protocol.constants import DEFAULT_SLOTS
from tests.conftest import FAST_QUEEN, TINY_MODEL, Served, serving_a_mesh

MODEL = TINY_MODEL
HI: Any = [{"role": "user", "content": "hi"}]
T = TypeVar("T")


async def call(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


def chat(client: openai.OpenAI, **params: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=HI, **params)


# ---- with the openai client -------------------------------------------------------------------


async def test_models_lists_the_catalog_and_gets_one(served: Served) -> None:
    client = served.client()
    with trio.fail_after(60):
        listed = await call(client.models.list)
        one = await call(lambda: client.models.retrieve(MODEL))
        with pytest.raises(openai.NotFoundError) as missing:
            await call(lambda: client.models.retrieve("rbee-test/none:none.gguf"))
    assert [m.id for m in listed.data] == [MODEL]
    assert one.id == MODEL and one.object == "model"
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]


async def test_a_chat_streamed_says_what_the_plain_answer_says_and_ends_with_usage(
    served: Served,
) -> None:
    client = served.client()
    params = {"temperature": 0, "max_tokens": 12, "seed": 1}
    with trio.fail_after(60):
        plain = await call(lambda: chat(client, **params))
        chunks = await call(
            lambda: list(
                chat(client, stream=True, stream_options={"include_usage": True}, **params)
            )
        )
    text = plain.choices[0].message.content
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert plain.usage.completion_tokens == 12 and plain.choices[0].finish_reason == "length"
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    [last_choice] = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert last_choice.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens > 0
    assert len({c.id for c in chunks}) == 1


async def test_a_completion_continues_the_prompt_as_is(served: Served) -> None:
    client = served.client()
    with trio.fail_after(60):
        done = await call(
            lambda: client.completions.create(model=MODEL, prompt="hi", max_tokens=5, temperature=0)
        )
        as_chat = await call(lambda: chat(client, max_tokens=5, temperature=0))
    assert done.object == "text_completion" and done.usage is not None
    assert done.usage.completion_tokens == 5
    # No chat template around it: the prompt is its own tokens alone.
    assert done.usage.prompt_tokens < as_chat.usage.prompt_tokens


async def test_a_stop_sequence_ends_the_text_before_it(served: Served) -> None:
    client = served.client()
    with trio.fail_after(60):
        free = await call(lambda: chat(client, temperature=0, max_tokens=16))
        text = free.choices[0].message.content
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        stopped = await call(lambda: chat(client, temperature=0, max_tokens=16, stop=[stop]))
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


async def test_the_same_seed_gives_the_same_text(served: Served) -> None:
    client = served.client()
    with trio.fail_after(60):
        texts = [
            (await call(lambda s=s: chat(client, seed=s, max_tokens=16))).choices[0].message.content  # type: ignore[misc]
            for s in (7, 7, 8)
        ]
    assert texts[0] == texts[1] != texts[2]


async def test_unknown_fields_are_ignored(served: Served) -> None:
    client = served.client()
    with trio.fail_after(60):
        done = await call(
            lambda: chat(
                client, max_tokens=2, user="u1",
                extra_body={"a_field_from_next_year": {"x": 1}, "metadata": {"k": "v"}},
            )
        )  # fmt: skip
    assert done.usage.completion_tokens == 2


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"logit_bias": {"42": 10}}, "logit_bias"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"n": 2}, "n"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stop": ["x" * 65]}, "stop[0]"),
        ({"logprobs": True}, "logprobs"),
        ({"stream": "yes"}, "stream"),
    ],
)
async def test_a_parameter_out_of_range_is_a_400_naming_it(
    served: Served, params: dict[str, Any], param: str
) -> None:
    client = served.client()
    with trio.fail_after(60), pytest.raises(openai.BadRequestError) as refused:
        await call(lambda: chat(client, extra_body=params))
    assert refused.value.status_code == 400
    assert refused.value.body["param"] == param.split("[")[0] or param  # type: ignore[index]
    assert param.split("[")[0] in refused.value.body["message"]  # type: ignore[index]
    assert served.finished() == []  # nothing ran


async def test_an_unknown_model_is_a_404_and_nothing_is_downloaded(served: Served) -> None:
    client = served.client()
    with trio.fail_after(60), pytest.raises(openai.NotFoundError) as refused:
        await call(
            lambda: client.chat.completions.create(model="someone/elsewhere:x.gguf", messages=HI)
        )
    assert refused.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert [e.id for e in served.hive.catalog.listing().entries] == [MODEL]


async def test_a_stream_that_fails_before_its_first_token_gets_its_own_status(
    served: Served,
) -> None:
    client = served.client()
    with trio.fail_after(60), pytest.raises(openai.NotFoundError) as refused:
        await call(
            lambda: client.chat.completions.create(
                model="rbee-test/none:none.gguf", messages=HI, stream=True
            )
        )
    assert refused.value.body["code"] == "model_not_found"  # type: ignore[index]


async def test_max_completion_tokens_sent_as_null_leaves_max_tokens_in_force(
    served: Served,
) -> None:
    client = served.client()
    with trio.fail_after(60):
        done = await call(
            lambda: chat(client, max_tokens=3, extra_body={"max_completion_tokens": None})
        )
    assert done.usage.completion_tokens == 3


async def test_a_request_no_worker_can_take_with_the_queue_full_is_a_429(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    model = write_tiny_gguf(tmp_path / "tiny.gguf", context_length=2048)
    Catalog(state / "hive" / "models").add_file("rbee-test/tiny", "tiny.gguf", model)
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})  # one core: a busy worker takes it (hive and workers)
    try:
        async with serving_a_mesh(state, max_queued=0) as served:
            client = served.client()
            with trio.fail_after(60):
                held = {"stream": True, "max_tokens": 2000, "temperature": 0}  # greedy: no EOS
                streams = []
                for _ in range(DEFAULT_SLOTS):  # every slot of the worker the first one spawns
                    stream = await call(lambda: chat(client, **held))
                    await call(lambda: next(c for c in stream if c.choices[0].delta.content))  # noqa: B023
                    streams.append(stream)
                with pytest.raises(openai.RateLimitError) as refused:
                    await call(lambda: chat(client, max_tokens=2))
                for stream in streams:
                    await call(stream.close)
    finally:
        os.sched_setaffinity(0, cores)
    assert "the queue is full" in refused.value.body["message"]  # type: ignore[index]
    assert refused.value.body["code"] == "busy"  # type: ignore[index]


async def test_no_live_hive_is_a_503(tmp_path: Path) -> None:
    async with (
        running_queen(memory_endpoint("queen"), FAST_QUEEN) as queen,
        serving_api(queen, "127.0.0.1:0") as url,
    ):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30)
        with trio.fail_after(60), pytest.raises(openai.APIStatusError) as refused:
            await call(lambda: chat(client))
    assert refused.value.status_code == 503
    assert "no hive" in refused.value.body["message"]  # type: ignore[index]


async def test_top_p_zero_empty_stops_and_a_tool_calling_turn_are_taken(served: Served) -> None:
    client = served.client()
    turns: Any = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "hi"},
    ]
    with trio.fail_after(60):
        greedy = await call(lambda: chat(client, temperature=0, max_tokens=8))
        top_p_zero = await call(lambda: chat(client, top_p=0, seed=3, max_tokens=8, stop=[""]))
        await call(
            lambda: client.chat.completions.create(model=MODEL, messages=turns, max_tokens=2)
        )
    assert top_p_zero.choices[0].message.content == greedy.choices[0].message.content


def test_a_cancelled_or_overdue_request_tells_the_client_not_to_retry() -> None:
    for code, retry in ((ErrorCode.CANCELLED, False), (ErrorCode.TIMEOUT, False),
                        (ErrorCode.BUSY, True), (ErrorCode.UNAVAILABLE, True)):  # fmt: skip
        assert shapes.ApiError.of(MeshError(code, "why")).retry is retry


async def test_a_page_that_rebinds_its_name_or_posts_plain_text_is_refused(
    served: Served,
) -> None:
    host, port = served.url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
    body = json.dumps({"model": MODEL, "messages": HI, "max_tokens": 1})

    async def post(headers: str) -> bytes:
        request = (
            f"POST /v1/chat/completions HTTP/1.1\r\n{headers}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
        ).encode()
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(request)
            answer = b""
            while chunk := await stream.receive_some():
                answer += chunk
        return answer

    with trio.fail_after(30):
        rebound = await post("Host: attacker.example\r\nContent-Type: application/json")
        plain = await post(f"Host: 127.0.0.1:{port}\r\nContent-Type: text/plain")
    assert rebound.startswith(b"HTTP/1.1 400"), rebound[:80]
    assert plain.startswith(b"HTTP/1.1 415") and b"application/json" in plain, plain[:300]
    assert served.finished() == []  # nothing ran


async def test_bad_json_and_unknown_paths_answer_in_openai_s_shape(served: Served) -> None:
    with trio.fail_after(60):
        bad = await call(lambda: _raw(served.url, "/chat/completions", b"{not json"))
        deep = await call(lambda: _raw(served.url, "/chat/completions", b"[" * 100_000))
        nowhere = await call(lambda: _raw(served.url, "/nowhere", b"{}"))
    assert bad[0] == 400 and "not JSON" in bad[1]["error"]["message"]
    assert deep[0] == 400 and "not JSON" in deep[1]["error"]["message"]
    assert nowhere[0] == 404 and set(nowhere[1]["error"]) == {"message", "type", "param", "code"}


def _raw(url: str, path: str, body: bytes) -> tuple[int, Any]:
    """POST `body` as it is (the client would not send it)."""
    request = urllib.request.Request(
        url + path, data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_each_request_is_a_mesh_job_of_the_api(served: Served) -> None:
    client = served.client()
    with trio.fail_after(60):
        done = await call(lambda: chat(client, max_tokens=2))
    [job] = served.finished()
    assert done.id == f"chatcmpl-{job['id']}"
    assert job["keeper"] == "api" and job["state"] == "done"


async def test_concurrent_requests_are_all_served(served: Served) -> None:
    client = served.client()
    answers: list[Any] = []

    async def one(i: int) -> None:
        answers.append(await call(lambda: chat(client, max_tokens=4, seed=i)))

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, i)
    assert len(answers) == 3 and all(a.usage.completion_tokens == 4 for a in answers)
    assert [j["state"] for j in served.finished()] == ["done"] * 3


async def _worker(served: Served, busy: int) -> None:
    """Wait until the hive has one worker, running `busy` jobs."""
    pool = served.hive.pool
    await pool.revision.wait_value(lambda _: [w.busy for w in pool.list()] == [busy])


async def test_a_client_that_disconnects_from_a_stream_cancels_its_job(served: Served) -> None:
    client = served.client()

    def read_a_token_and_leave() -> str:
        stream = chat(client, stream=True, max_tokens=2000, temperature=0)
        token = next(c for c in stream if c.choices[0].delta.content)  # a worker generates
        stream.close()
        return str(token.id)

    with trio.fail_after(60):
        chunk_id = await call(read_a_token_and_leave)
        await served.queen.server.job_count.wait_value(0)
        await _worker(served, 0)
    [job] = served.finished()
    assert chunk_id == f"chatcmpl-{job['id']}"
    assert job["state"] == "cancelled", job


async def test_a_client_that_disconnects_while_waiting_cancels_its_job(served: Served) -> None:
    host, port = served.url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
    body = json.dumps({"model": MODEL, "messages": HI, "max_tokens": 2000, "temperature": 0})
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    with trio.fail_after(60):
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(request)
        await _worker(served, 1)  # generating
        await stream.aclose()
        await served.queen.server.job_count.wait_value(0)
        await _worker(served, 0)
    [job] = served.finished()
    assert job["state"] == "cancelled", job


# ---- the shapes alone -------------------------------------------------------------------------


def test_messages_become_the_turns_of_a_chat() -> None:
    asked = shapes.chat_request(
        {
            "model": MODEL,
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": t} for t in "ab"]},
                {"role": "assistant", "content": "c"},
                {"role": "user", "content": "d"},
            ],
            "seed": -1,
            "max_tokens": 10**9,
        }
    )  # fmt: skip
    op = asked.op
    assert op.chat and op.prompt == "d"
    assert op.history == (("system", "be brief"), ("user", "ab"), ("assistant", "c"))
    assert op.seed == 2**32 - 1 and op.max_tokens == shapes.MAX_TOKENS
    assert not op.download and op.repeat_penalty == 1.0 and op.top_k == 0


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ([{"role": "assistant", "content": "x"}], "messages"),
        ([{"role": "tool", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": "user", "content": ""}], "messages"),
        ([{"role": "user", "content": "x"}] * 258, "messages"),
    ],
)
def test_messages_that_cannot_be_a_chat_are_refused_naming_the_message(
    messages: list[Any], param: str
) -> None:
    with pytest.raises(shapes.ApiError) as refused:
        shapes.chat_request({"model": MODEL, "messages": messages})
    assert refused.value.status == 400 and refused.value.param == param
    # It names what the client sent, never the operation's own fields.
    assert not refused.value.message.startswith(("prompt", "history")), refused.value.message


def test_a_text_stream_s_chunks_are_text_completions_to_the_last() -> None:
    asked = shapes.completion_request({"model": MODEL, "prompt": "x", "stream": True,
                                       "stream_options": {"include_usage": True}})  # fmt: skip
    result = {"text": "y", "usage": {"prompt_tokens": 1, "generated_tokens": 1}}
    chunks = [shapes.chunk(asked, "j", "y"), shapes.usage_chunk(asked, "j", result)]
    assert [c["object"] for c in chunks] == ["text_completion", "text_completion"]
    assert chunks[1]["usage"]["total_tokens"] == 2 and chunks[1]["choices"] == []


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ErrorCode.INVALID_REQUEST, 400),
        (ErrorCode.NOT_FOUND, 404),
        (ErrorCode.BUSY, 429),
        (ErrorCode.UNAVAILABLE, 503),
        (ErrorCode.TIMEOUT, 503),
        (ErrorCode.INTERNAL, 500),
    ],
)
def test_mesh_errors_have_openai_s_statuses(code: ErrorCode, status: int) -> None:
    error = shapes.ApiError.of(MeshError(code, "why"))
    assert error.status == status
    assert error.body() == {
        "error": {"message": "why", "type": error.type, "param": None, "code": code.lower()}
    }


async def test_a_job_whose_reader_falls_behind_is_cancelled_and_the_others_go_on(
    tmp_path: Path,
) -> None:
    """The API's one client serves every request: a request that stops reading must not hold
    up the others (`cancel_slow_readers`)."""
    config = ClientConfig(heartbeat_s=0.2, job_buffer=4, cancel_slow_readers=True)
    async with (
        running_queen(memory_endpoint("queen"), FAST_QUEEN) as queen,
        open_keeper(queen.listener.endpoint, config) as client,
    ):
        with trio.fail_after(30):
            unread = await client.submit(Ping(count=1_000, interval_s=0.001))
            read = await client.submit(Ping(count=20, interval_s=0.001))
            assert isinstance(await read.end(), Done)  # it went on meanwhile
            await queen.server.job_count.wait_value(0)
    [summary] = [
        j for j in queen.server.job_summaries(include_finished=True) if j["id"] == unread.job_id
    ]
    assert summary["state"] == "cancelled" and "fell behind" in summary["error"], summary
