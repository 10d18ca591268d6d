"""OpenAI's API as shapes: a request body read into an Infer operation, a job's result and
tokens written as OpenAI's responses and stream chunks, a mesh error as OpenAI's error body with
its HTTP status. No I/O: `api.py` serves these (docs/api.md).

Parameters are checked by the Infer operation's own fields, under the names the client used, so
the HTTP API, the command line and the wire refuse the same values with the same words. Unknown
fields are ignored (clients add new ones all the time); a known one this mesh cannot honour
(n > 1, logprobs, tools, JSON mode, echo, suffix) is refused with a 400 naming it, never ignored.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from rbee_mesh.protocol import ErrorCode, Infer, MeshError, ProtocolError
from rbee_mesh.protocol.constants import MAX_GENERATED_TOKENS
from rbee_mesh.protocol.fields import check_field

#: What a request may ask for at most; the worker stops at its context before.
MAX_TOKENS = MAX_GENERATED_TOKENS

#: The HTTP status and OpenAI error type of each mesh error.
_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorCode.NOT_FOUND: (404, "invalid_request_error"),
    ErrorCode.FORBIDDEN: (403, "permission_error"),
    ErrorCode.CONFLICT: (409, "invalid_request_error"),
    ErrorCode.BUSY: (429, "rate_limit_error"),
    ErrorCode.UNAVAILABLE: (503, "server_error"),
    ErrorCode.TIMEOUT: (503, "server_error"),
    ErrorCode.CANCELLED: (503, "server_error"),
    ErrorCode.WORKER_LOST: (503, "server_error"),
    ErrorCode.HIVE_LOST: (503, "server_error"),
}


class ApiError(Exception):
    """An error as OpenAI's API answers it: an HTTP status and an `error` object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        #: Whether a client may send the request again (the official client retries 429 and
        #: 5xx unless told not to, with `x-should-retry`): not a cancelled or overdue job.
        self.retry = code not in ("cancelled", "timeout")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message, "type": self.type, "param": self.param,
                "code": self.code,
            }
        }  # fmt: skip

    @classmethod
    def of(cls, exc: MeshError, *, model: str = "") -> ApiError:
        """The mesh error `exc` of a request for `model` as the API answers it."""
        status, kind = _STATUS.get(exc.code, (500, "server_error"))
        if exc.code is ErrorCode.NOT_FOUND and model and model in exc.message:
            return cls(status, exc.message, type=kind, param="model", code="model_not_found")
        return cls(status, exc.message, type=kind, code=exc.code.lower())


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass(frozen=True)
class Request:
    """A chat or text completion request, read."""

    kind: Literal["chat", "text"]
    model: str
    op: Infer
    stream: bool
    include_usage: bool
    created: int

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def response_id(self, job_id: str) -> str:
        """The response's id: the mesh job's, which `rbee-mesh jobs` shows."""
        return f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{job_id}"


def chat_request(body: Any) -> Request:
    """A `POST /v1/chat/completions` body read; ApiError (400) naming what is wrong."""
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty list of messages")
    turns = [_message(i, m) for i, m in enumerate(messages)]
    role, prompt = turns[-1]
    if role != "user":
        raise invalid(
            "messages", f"the last message must be the user's (got {role}): the model answers it"
        )
    if _given(body, "tools") or _given(body, "functions"):
        raise invalid("tools", "tools and functions are not supported by this server")
    response_format = body.get("response_format")
    if response_format is not None and _get(response_format, "type") != "text":
        raise invalid("response_format", "only response_format type text is supported")
    if body.get("logprobs") not in (None, False):
        raise invalid("logprobs", "logprobs are not supported by this server")
    return _request(body, "chat", prompt=prompt, chat=True, history=tuple(turns[:-1]))


def completion_request(body: Any) -> Request:
    """A `POST /v1/completions` body read; ApiError (400) naming what is wrong."""
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("prompt", "prompt must be a string (or a list of one string)")
    for name, unsupported in (
        ("echo", body.get("echo") not in (None, False)),
        ("suffix", body.get("suffix") not in (None, "")),
        ("logprobs", body.get("logprobs") is not None),
        ("best_of", body.get("best_of") not in (None, 1)),
    ):
        if unsupported:
            raise invalid(name, f"{name} is not supported by this server")
    return _request(body, "text", prompt=prompt, chat=False, history=())


def _request(
    body: Mapping[str, Any],
    kind: Literal["chat", "text"],
    **fields: Any,
) -> Request:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "model must name a model (GET /v1/models lists them)")
    n = body.get("n")
    if n not in (None, 1):
        raise invalid("n", f"n must be 1: this server generates one choice per request, not {n!r}")
    if _given(body, "logit_bias"):
        raise invalid("logit_bias", "logit_bias is not supported by this server")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, Mapping):
        raise invalid("stream_options", "stream_options must be an object")
    include_usage = _flag(options or {}, "include_usage", "stream_options.include_usage")
    which = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    limit = body.get(which)
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > MAX_TOKENS:
        limit = MAX_TOKENS  # a client's "as much as it takes": the context ends it first
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list):
        stop = [s for s in stop if s != ""]  # an empty stop stops nothing
    seed = body.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        seed %= 2**32  # OpenAI's seeds are any integer; the same one still gives the same text
    values = {
        "model": ("model", model),
        "max_tokens": (which, limit if limit is not None else MAX_TOKENS),
        "stop": ("stop", stop if stop is not None else ()),
        "seed": ("seed", seed),
        **{name: (name, body.get(name)) for name in _DEFAULTS},
    }
    greedy = body.get("top_p") == 0 and not isinstance(body.get("top_p"), bool)
    if greedy:  # OpenAI takes top_p 0: only the likeliest token, which is greedy sampling
        values["top_p"], values["temperature"] = ("top_p", 1.0), ("temperature", 0.0)
    args = {field: _checked(field, name, value) for field, (name, value) in values.items()}
    try:
        op = Infer(
            **args, **fields,
            top_k=0,  # OpenAI samples from the whole vocabulary (top_p and temperature only)
            repeat_penalty=1.0,  # ...with no repeat penalty (its own penalties are above)
            download=False,  # a request names a model of the catalog; it downloads nothing
        )  # fmt: skip
    except ProtocolError as exc:  # the prompt or a turn: named as the client sent it
        if kind == "text":
            raise invalid("prompt", exc.message) from None
        last = f"messages[{len(fields['history'])}].content"
        message = re.sub(r"^history\[(\d+)\]", r"messages[\1]", exc.message)
        message = re.sub(r"^history ", "the messages before the last ", message)
        raise invalid("messages", re.sub(r"^prompt", last, message)) from None
    return Request(kind, model, op, stream, include_usage, int(time.time()))


#: OpenAI's defaults, taken also for a parameter sent as null.
_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


def _checked(field: str, name: str, value: Any) -> Any:
    """`value` as the Infer field `field` takes it, or a 400 naming the parameter `name`."""
    if value is None and field in _DEFAULTS:
        value = _DEFAULTS[field]
    try:
        return check_field(Infer, field, value, name=name)
    except ProtocolError as exc:
        raise invalid(name, exc.message) from None


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _flag(body: Mapping[str, Any], key: str, name: str = "") -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(name or key, f"{name or key} must be true or false")
    return value


def _given(body: Mapping[str, Any], key: str) -> bool:
    return body.get(key) not in (None, [], {})


def _get(value: Any, key: str) -> Any:
    return value.get(key) if isinstance(value, Mapping) else None


def _message(i: int, message: Any) -> tuple[str, str]:
    """One chat message as a (role, text) turn; "developer" is OpenAI's newer "system"."""
    param = f"messages[{i}]"
    if not isinstance(message, Mapping):
        raise invalid(param, f"{param} must be an object with a role and a content")
    role = message.get("role")
    if role == "developer":
        role = "system"
    if role not in ("system", "user", "assistant"):
        raise invalid(
            f"{param}.role",
            f"{param}.role must be system, developer, user or assistant, not {role!r}",
        )
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            if _get(part, "type") != "text" or not isinstance(_get(part, "text"), str):
                raise invalid(
                    f"{param}.content[{j}]", "only text content parts are supported by this server"
                )
            texts.append(part["text"])
        content = "".join(texts)
    if content is None and role == "assistant":  # an assistant turn that only called tools
        content = ""
    if not isinstance(content, str):
        raise invalid(f"{param}.content", f"{param}.content must be a string or a list of parts")
    return role, content


# ---- responses -------------------------------------------------------------------------------


def finish_reason(result: Mapping[str, Any]) -> str:
    """OpenAI's finish reason of a generation that ran to its end: `length` when it was cut
    (by max_tokens or the model's context), else `stop` (end of turn, or a stop sequence)."""
    return "length" if result.get("finish_reason") == "length" else "stop"


def usage(result: Mapping[str, Any]) -> dict[str, int]:
    used = result.get("usage") or {}
    prompt = int(used.get("prompt_tokens") or 0)
    completion = int(used.get("generated_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def response(request: Request, job_id: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """The whole response to a request that did not stream."""
    text = str(result.get("text", ""))
    reason = finish_reason(result)
    if request.kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": reason,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    return {
        **_head(request, job_id, request.object),
        "choices": [choice],
        "usage": usage(result),
    }


def chunk(
    request: Request, job_id: str, text: str | None = None, *, reason: str | None = None,
    first: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """A stream chunk: text, or (with `reason`) the last one of the choice; `first` opens a
    chat's assistant message."""
    if request.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": text or ""}
    choice.update(logprobs=None, finish_reason=reason)
    out = {**_head(request, job_id, f"{request.object}.chunk"), "choices": [choice]}
    if request.include_usage:
        out["usage"] = None
    if request.kind == "text":
        out["object"] = "text_completion"  # OpenAI's completions stream says so
    return out


def usage_chunk(request: Request, job_id: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """The stream's last chunk with `stream_options.include_usage`: no choices, the usage."""
    return {**chunk(request, job_id), "choices": [], "usage": usage(result)}


def _head(request: Request, job_id: str, obj: str) -> dict[str, Any]:
    return {
        "id": request.response_id(job_id),
        "object": obj,
        "created": request.created,
        "model": request.model,
        "system_fingerprint": None,
    }


def model_entry(row: Mapping[str, Any]) -> dict[str, Any]:
    """A catalog entry as `GET /v1/models` lists it."""
    return {
        "id": str(row["id"]),
        "object": "model",
        "created": int(row.get("added") or 0),
        "owned_by": str(row.get("hive") or "rbee-mesh"),
    }
