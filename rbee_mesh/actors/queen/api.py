"""The queen's OpenAI-compatible HTTP API (docs/api.md): what IDEs, agents, notebooks and the
`openai` client speak, served next to the queen's own socket.

HTTP is hypercorn's (a maintained ASGI server with a trio worker: this process's event loop)
and routing Starlette's; the shapes are `openai.py`'s. Every request is a mesh job, submitted
to the queen by the API's own job client over the queen's own listener: it is scheduled,
queued, narrated (into the queen's log), listed by `rbee-mesh jobs` and cancellable like any
other; a client that disconnects cancels it, which frees its worker within a token.

The same server answers `GET /metrics` (Prometheus' scrape: metrics.py) and serves the live
dashboard: its page at `/` and its snapshots at `/events` (dashboard.py; docs/observability.md).

Bound to loopback the API takes any request from this machine. Bound anywhere else it takes
only requests with an API key (`Authorization: Bearer KEY`, `rbee-mesh apikey create`), whose
hash the trust file holds: /metrics and /events too (the page itself holds nothing of the mesh).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from hypercorn.config import Config as HttpConfig
from hypercorn.trio import serve as serve_http
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from rbee_mesh.actors.jobclient import ClientConfig, ClientJob, JobClient
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.queen import dashboard, metrics, openai
from rbee_mesh.actors.queen.openai import ApiError
from rbee_mesh.actors.queen.queen import Queen
from rbee_mesh.actors.runtime import single_errors
from rbee_mesh.protocol import (
    MAX_BODY_BYTES,
    MeshError,
    Message,
    Narration,
    Token,
    outcome,
)
from rbee_mesh.protocol import operations as ops
from rbee_mesh.protocol.constants import MAX_API_REQUESTS
from rbee_mesh.transport import EndpointError, HttpBind, local_endpoint_for, parse_http_bind

log = logging.getLogger("rbee_mesh.api")

#: How long the CANCEL of a job whose client went away may wait to be sent.
CANCEL_SEND_S = 2.0


class Api:
    """The ASGI application: routes, keys, and each request as a job of `client`; at most
    `max_requests` at once."""

    def __init__(
        self,
        client: JobClient,
        queen: Queen,
        where: HttpBind,
        max_requests: int = MAX_API_REQUESTS,
    ) -> None:
        self.client = client
        self.queen = queen
        self.trust = queen.trust
        self.require_key = not where.loopback
        self.max_requests = max_requests
        #: Requests being served now (/health aside), and dashboards following /events.
        self.requests = 0
        self.viewers = 0
        # Without keys (on loopback), only requests that name this machine: a web page that
        # rebinds its own name to 127.0.0.1 reaches the port, but not with a Host of ours.
        local = ["127.0.0.1", "localhost", "::1", where.host]
        trusted_host = Middleware(TrustedHostMiddleware, allowed_hosts=local)
        middleware = [] if self.require_key else [trusted_host]
        self.app = Starlette(
            middleware=middleware,
            routes=[
                Route("/", self.dashboard),
                Route("/events", self.events),
                Route("/metrics", self.metrics),
                Route("/health", self.health),
                Route("/v1/models", self.models),
                Route("/v1/models/{model:path}", self.model),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
            ],
            exception_handlers={404: _not_found, 405: _not_allowed},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve a request, or refuse it at once when `max_requests` are being served: what
        each holds (a task, a body being read, a job) is bounded. A health check is always
        answered: it is what says that the API is busy."""
        if scope["type"] != "http" or scope["path"] == "/health":
            await self._serve(scope, receive, send)
            return
        if self.requests >= self.max_requests:
            busy = ApiError(
                429,
                f"the API serves {self.max_requests} requests at once; try again when one ends",
                type="rate_limit_error",
                code="busy",
            )
            await _error(busy)(scope, receive, send)
            return
        self.requests += 1
        try:
            await self._serve(scope, receive, send)
        finally:
            self.requests -= 1

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except trio.BusyResourceError:
            # hypercorn (0.18) closes a connection whose client closed its side (send_eof)
            # without taking the lock its sends take: an answer that races that close fails so.
            # The client is gone, nothing is lost; without this, a traceback in the log for each
            # such request (one a second is easy for any local process).
            log.debug("a client left as its answer was sent: %s", scope.get("path"))

    # ---- endpoints -------------------------------------------------------------------------

    async def health(self, request: HttpRequest) -> Response:
        live = self.client.is_live
        body = {
            "status": "ok" if live else "unavailable", "queen": self.client.state,
            "requests": self.requests, "max_requests": self.max_requests,
        }  # fmt: skip
        return JSONResponse(body, status_code=200 if live else 503)

    async def dashboard(self, request: HttpRequest) -> Response:
        """The live dashboard's page: nothing of the mesh in it (its data comes from /events,
        which asks for the key where the API does)."""
        return HTMLResponse(dashboard.page())

    async def events(self, request: HttpRequest) -> Response:
        """The dashboard's snapshots, for as long as the page follows them and its key stays
        valid; at most MAX_VIEWERS pages at once."""
        try:
            self._authorize(request)
            if self.viewers >= dashboard.MAX_VIEWERS:
                raise ApiError(
                    429, f"{dashboard.MAX_VIEWERS} dashboards follow this queen already",
                    type="rate_limit_error", code="busy",
                )  # fmt: skip
        except ApiError as exc:
            return _error(exc)

        def allowed() -> bool:
            try:
                self._authorize(request)  # (a key revoked meanwhile ends the stream)
            except ApiError:
                return False
            return True

        async def followed() -> AsyncIterator[str]:
            self.viewers += 1
            try:
                async for event in dashboard.events(self.queen, allowed):
                    yield event
            finally:
                self.viewers -= 1

        return StreamingResponse(
            followed(), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )  # fmt: skip

    async def metrics(self, request: HttpRequest) -> Response:
        """Prometheus' scrape: the queen's metrics (metrics.py), in its text format."""
        try:
            self._authorize(request)
        except ApiError as exc:
            return _error(exc)
        assert self.queen.metrics is not None  # (made before the server serves)
        return Response(self.queen.metrics.render(), media_type=metrics.CONTENT_TYPE)

    async def models(self, request: HttpRequest) -> Response:
        return await self._answer(request, self._models)

    async def model(self, request: HttpRequest) -> Response:
        wanted = request.path_params["model"]

        async def one() -> dict[str, Any]:
            listed = await self._models()
            for entry in listed["data"]:
                if entry["id"] == wanted:
                    return dict(entry)
            raise ApiError(
                404, f"no model {wanted!r} in the mesh's catalogs", param="model",
                code="model_not_found",
            )  # fmt: skip

        return await self._answer(request, one)

    async def chat(self, request: HttpRequest) -> Response:
        return await self._generate(request, openai.chat_request)

    async def completions(self, request: HttpRequest) -> Response:
        return await self._generate(request, openai.completion_request)

    # ---- serving -----------------------------------------------------------------------------

    async def _answer(
        self, request: HttpRequest, work: Callable[[], Awaitable[dict[str, Any]]]
    ) -> Response:
        try:
            self._authorize(request)
            return JSONResponse(await work())
        except ApiError as exc:
            return _error(exc)

    async def _models(self) -> dict[str, Any]:
        rows = await self._run(ops.ModelList())
        entries = {
            row["id"]: openai.model_entry(row)
            for row in rows
            if isinstance(row, dict) and row.get("status") == "available"
        }
        return {"object": "list", "data": sorted(entries.values(), key=lambda e: e["id"])}

    async def _run(self, op: ops.Operation) -> Any:
        """A short job's result (listing models), or the ApiError of its failure."""
        try:
            job = await self.client.submit(op)
            return outcome(await job.end(), "the queen")
        except MeshError as exc:
            raise ApiError.of(exc) from None

    async def _generate(
        self, request: HttpRequest, read: Callable[[Any], openai.Request]
    ) -> Response:
        try:
            self._authorize(request)
            asked = read(await _json_body(request))
            try:
                job = await self.client.submit(asked.op)
            except MeshError as exc:  # too large to send, the queen unreachable
                raise ApiError.of(exc, model=asked.model) from None
        except ApiError as exc:
            return _error(exc)
        log.info("job %s: %s for %s", job.job_id, request.url.path, _client_of(request))
        # Nothing is sent before the first token: a job that fails before it (an unknown
        # model, a full queue, no live hive) is answered with its own status, streamed or not.
        first = await _until(job, request, first_token=asked.stream)
        if first is None:
            return Response(status_code=499)  # nobody reads it: the client went away
        if job.terminal is not None:
            try:
                result = _result(job, asked)
            except ApiError as exc:
                return _error(exc)
            if not asked.stream:
                return JSONResponse(openai.response(asked, job.job_id, result))
        token = first if isinstance(first, Token) else None
        return _JobStream(job, self._stream(job, asked, token))

    async def _stream(
        self, job: ClientJob, asked: openai.Request, first: Token | None
    ) -> AsyncIterator[str]:
        """The job as server-sent events, from its first token on."""
        if asked.kind == "chat":
            yield _event(openai.chunk(asked, job.job_id, "", first=True))
        if first is not None:
            yield _event(openai.chunk(asked, job.job_id, first.text))
        async for message in job:
            if isinstance(message, Token):
                yield _event(openai.chunk(asked, job.job_id, message.text))
            elif isinstance(message, Narration):
                _log_narration(job, message)
        try:
            result = _result(job, asked)
        except ApiError as exc:  # the status was sent already: an error event says it
            yield _event(exc.body())
        else:
            reason = openai.finish_reason(result)
            yield _event(openai.chunk(asked, job.job_id, reason=reason))
            if asked.include_usage:
                yield _event(openai.usage_chunk(asked, job.job_id, result))
        yield "data: [DONE]\n\n"

    def _authorize(self, request: HttpRequest) -> None:
        if not self.require_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "this API needs an API key (Authorization: Bearer KEY); "
                "`rbee-mesh apikey create NAME` on the queen's machine makes one",
                code="invalid_api_key",
            )
        if self.trust.api_client(token.strip()) is None:
            raise ApiError(
                401, "this API key is not valid (or was revoked)", code="invalid_api_key"
            )


@asynccontextmanager
async def serving_api(
    queen: Queen, bind: str | HttpBind, max_requests: int = MAX_API_REQUESTS
) -> AsyncIterator[str]:
    """Serve the API of `queen` at `bind` (HOST:PORT; port 0 picks a free one) for the block,
    `max_requests` at once; yields its base URL (http://HOST:PORT/v1). EndpointError if it
    cannot listen there."""
    where = parse_http_bind(bind) if isinstance(bind, str) else bind
    endpoint = local_endpoint_for(queen.listener.endpoint)
    # Each request reads its own job: one that reads too slowly has its job cancelled.
    config = ClientConfig(
        heartbeat_s=queen.server.config.heartbeat_s, job_buffer=1_000, cancel_slow_readers=True
    )
    async with (
        open_keeper(endpoint, config, queen.trust, name="api") as client,
        trio.open_nursery() as nursery,
    ):
        if queen.metrics is None:
            queen.metrics = metrics.Metrics(queen)
            queen.server.observer = queen.metrics
        api = Api(client, queen, where, max_requests)
        http = HttpConfig()
        http.bind = [str(where)]
        http.accesslog = None
        http.errorlog = logging.getLogger("rbee_mesh.api.http")
        http.graceful_timeout = 1.0
        try:
            with single_errors():  # hypercorn's nurseries wrap it
                bound = await nursery.start(serve_http, api, http)
        except OSError as exc:
            raise EndpointError(
                f"the API cannot listen on {where}: {exc.strerror or exc} "
                "(--api HOST:PORT moves it, --no-api turns it off)"
            ) from None
        url = f"{bound[0]}/v1"
        queen.api_url = url
        log.info(
            "OpenAI-compatible API at %s%s", url,
            "" if where.loopback else " (API keys required)",
        )  # fmt: skip
        try:
            yield url
        finally:
            queen.api_url = ""
            nursery.cancel_scope.cancel()


# ---- helpers ---------------------------------------------------------------------------------


async def _json_body(request: HttpRequest) -> Any:
    """The request's JSON body, at most MAX_BODY_BYTES (what one job may carry)."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/json":  # (a web page can send text/plain without asking)
        raise ApiError(415, f"the request body must be application/json, not {kind or 'untyped'}")
    size = 0
    chunks = []
    try:
        async for part in request.stream():
            size += len(part)
            if size > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
            chunks.append(part)
    except ClientDisconnect:
        raise ApiError(400, "the client went away before its request was whole") from None
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not JSON: {exc}") from None


async def _until(job: ClientJob, request: HttpRequest, *, first_token: bool) -> Message | None:
    """Follow the job until its first token (with `first_token`) or its end, and return that
    frame; if the client disconnects first, cancel the job and return None once it ended."""
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        await job.cancel("the HTTP client disconnected")

    reached: Message | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        async for message in job:
            if isinstance(message, Narration):
                _log_narration(job, message)
            elif isinstance(message, Token) and first_token:
                reached = message
                break
        nursery.cancel_scope.cancel()
    return None if gone else reached or job.terminal


def _result(job: ClientJob, asked: openai.Request) -> dict[str, Any]:
    """The result of the ended `job`, or the ApiError of its end."""
    assert job.terminal is not None
    try:
        result = outcome(job.terminal, "the mesh")
    except MeshError as exc:
        raise ApiError.of(exc, model=asked.model) from None
    assert isinstance(result, dict)
    return result


class _JobStream(StreamingResponse):
    """A job's server-sent events. However the response ends (Starlette cancels it when the
    client disconnects, also while it waits to send), the job is cancelled then if it has not
    ended: the worker is free at once, not when the stream's generator is collected."""

    def __init__(self, job: ClientJob, events: AsyncIterator[str]) -> None:
        super().__init__(
            events, media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )  # fmt: skip
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _cancel_unless_ended(self.job)


async def _cancel_unless_ended(job: ClientJob) -> None:
    """Cancel the job of a request that went away, even from a cancelled task (shielded), but
    not for longer than a CANCEL takes to leave (a connection being made again holds it)."""
    if job.terminal is None:
        with trio.move_on_after(CANCEL_SEND_S, shield=True):
            await job.cancel("the HTTP client disconnected")


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def _error(exc: ApiError) -> Response:
    headers = {} if exc.retry else {"x-should-retry": "false"}
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _log_narration(job: ClientJob, n: Narration) -> None:
    log.info("job %s: [%s] %s: %s", job.job_id, n.actor, n.action, n.human)


def _client_of(request: HttpRequest) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "a client"


async def _not_found(request: HttpRequest, exc: Exception) -> Response:
    return _error(ApiError(404, f"no such endpoint: {request.url.path}", code="not_found"))


async def _not_allowed(request: HttpRequest, exc: Exception) -> Response:
    return _error(
        ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="not_allowed")
    )
