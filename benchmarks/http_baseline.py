"""The HTTP + SSE baseline: rbee's actor pattern, built well, for the benchmarks to compare with.

rbee (the Rust system rbee-mesh replaces) linked its actors with HTTP and server-sent events. A
client POSTs a job to the queen (`POST /v1/jobs` answers `{"job_id", "sse_url"}` at once) and GETs
the job's event stream; the queen forwards the job to a hive the same way and relays the hive's
events; for inference the hive POSTs to a worker process that streams tokens as SSE. This module
is that pattern in Python, as three servers and a client:

    python -m benchmarks.http_baseline queen  --port P --hive http://HOST:H
    python -m benchmarks.http_baseline hive   --port H --id HIVE_ID --model-dir DIR
    python -m benchmarks.http_baseline worker --port W --model PATH

Each prints one line, `{"listening": "http://127.0.0.1:PORT"}`, once its socket accepts
connections (`--port 0` picks a free port). `HttpKeeper` is the client (it runs under trio, as the
benchmark driver does, or asyncio) and `start_server` starts a server process.

Why the comparison is fair, not a strawman:

- The production stack: uvicorn with uvloop and the httptools parser, one process per server,
  access log off, running Starlette; httpx (`httpx2`) clients, one long-lived `AsyncClient` per
  process, so connections are pooled and kept alive (a job's POST and GET reuse one connection).
- The same operations with the same semantics as the mesh: the arguments are validated by the
  mesh's own operation classes (`rbee_mesh.protocol.operations`), `ping` narrates exactly as the
  mesh's does, and the worker runs the same backends (`rbee_mesh.inference.backends`) in a thread
  that hands tokens to the event loop as they are sampled.
- Streaming all the way: every hop relays each event as it arrives; only the terminal event is
  decoded (as the mesh's queen does), narration and tokens pass through as their JSON text.
  Events already waiting when a stream writes go out in one write (one chunk), as the mesh
  coalesces tokens into frames; each is still its own SSE event.
- Each job ends with exactly one terminal event (`done` or `error`), never with silence; events
  produced before the client's GET are buffered for it; a client that leaves cancels its job, and
  the cancellation travels up the chain (queen -> hive -> worker, which stops generating).

What it leaves out, none of which would make it faster: authentication, job listing and
cancellation by id, heartbeats (a dead peer is seen as a closed connection), scheduling beyond
"an idle worker", several hives per queen. The queen forwards every operation, `ping` included,
to its one hive (the mesh's queen answers a `ping` itself unless `hive` names one: compare
pinned pings).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rbee_mesh.protocol.errors import ErrorCode, MeshError, ProtocolError
from rbee_mesh.protocol.operations import (
    Infer,
    Operation,
    Ping,
    WorkerDelete,
    WorkerList,
    WorkerSpawn,
)

if TYPE_CHECKING:
    # Imported for real only in the worker process: the queen and hive never load the inference
    # stack (numpy, gguf, the backends).
    from rbee_mesh.inference.backends import GenerationParams, LoadedModel

log = logging.getLogger("benchmarks.http_baseline")

REPO_ROOT = Path(__file__).resolve().parent.parent

#: The operations this baseline serves, by name; their arguments are the mesh's.
OPERATIONS: dict[str, type[Operation]] = {
    cls.NAME: cls for cls in (Ping, WorkerList, WorkerSpawn, WorkerDelete, Infer)
}

#: Headers of every event stream: never cached, never buffered by a proxy.
SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
#: A job whose stream nobody GETs within this time is dropped (and cancelled if still running).
UNCLAIMED_JOB_S = 60.0
#: How long a server process may take to print its `listening` line.
START_TIMEOUT_S = 30.0
#: How long a worker may take to load its model, and how often the hive asks (rbee polled too).
WORKER_READY_TIMEOUT_S = 300.0
HEALTH_POLL_S = 0.02
#: How long a terminated process may take to exit before it is killed.
STOP_GRACE_S = 5.0


class HttpJobFailed(Exception):
    """A job ended with an `error` event, or could not be submitted (`code`: an ErrorCode)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def http_client() -> httpx2.AsyncClient:
    """The one client of a process: pooled keep-alive connections, no read timeout (a stream may
    be silent for as long as its job runs; jobs have deadlines), no proxies from the environment
    (loopback must not go through one)."""
    return httpx2.AsyncClient(
        timeout=httpx2.Timeout(10.0, read=None),
        limits=httpx2.Limits(max_connections=None, max_keepalive_connections=256),
        trust_env=False,
    )


# ---- server-sent events ---------------------------------------------------------------------


def sse_event(event: str, data: str) -> bytes:
    """One SSE event; `data` is JSON text, which has no line breaks unless relayed from a peer
    that split its data over several `data:` lines (rejoined with \\n by the parser)."""
    if "\n" in data:
        data = data.replace("\n", "\ndata: ")
    return f"event: {event}\ndata: {data}\n\n".encode()


def error_event(code: str, message: str) -> bytes:
    return sse_event("error", json.dumps({"code": code, "message": message}))


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


async def failure_from(response: httpx2.Response, peer: str) -> HttpJobFailed:
    """The HttpJobFailed that a non-success answer of `peer` stands for."""
    await response.aread()
    try:
        body = response.json()
        return HttpJobFailed(str(body["code"]), str(body["message"]))
    except (ValueError, KeyError, TypeError):
        return HttpJobFailed(
            ErrorCode.INTERNAL, f"{peer} answered {response.status_code}: {response.text[:200]}"
        )


async def read_events(
    source: httpx2.EventSource, peer: str, on_event: Callable[[str, str], None], lost: str
) -> Any:
    """Read a job's event stream from `peer`: hand each narration and token event to
    `on_event(event, data)` as it arrives (its data left as JSON text), and return the result of
    the `done` event or raise the `error` event as HttpJobFailed. A stream that ends without
    either raises HttpJobFailed with the code `lost`."""
    outcome: tuple[Any] | HttpJobFailed | None = None
    # Read to the end, which comes right after the terminal event: the connection then goes
    # back to the pool instead of being closed.
    async for event in source:
        if outcome is not None:
            raise HttpJobFailed(ErrorCode.INTERNAL, f"{peer} sent {event.event} after the end")
        if event.event in ("narration", "token"):
            on_event(event.event, event.data)
        elif event.event == "done":
            outcome = (json.loads(event.data)["result"],)
        elif event.event == "error":
            error = json.loads(event.data)
            outcome = HttpJobFailed(str(error["code"]), str(error["message"]))
    if outcome is None:
        raise HttpJobFailed(lost, f"{peer} ended the stream without a terminal event")
    if isinstance(outcome, HttpJobFailed):
        raise outcome
    return outcome[0]


# ---- jobs: what queen and hive share --------------------------------------------------------


@dataclass(eq=False)
class Job:
    """One job: its operation, and the events its stream has not sent yet (None ends them)."""

    id: str
    actor: str
    op: Operation
    #: The request as it came, for the queen to forward unchanged.
    body: dict[str, Any]
    events: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)

    def emit(self, event: str, data: str) -> None:
        self.events.put_nowait(sse_event(event, data))

    def narrate(self, action: str, human: str) -> None:
        data = {"actor": self.actor, "action": action, "human": human, "ts": time.time()}
        self.emit("narration", json.dumps(data))


class JobServer:
    """`POST /v1/jobs` starts a job as a task; `GET /v1/jobs/{job_id}/stream` streams its events.

    `run(job)` does the job's work, narrating into it, and returns its result; its outcome becomes
    the one terminal event: `done` with the result, `error` with the code of an HttpJobFailed,
    TIMEOUT past the operation's deadline (the mesh's defaults), INTERNAL for anything else.
    """

    def __init__(self, actor: str, run: Callable[[Job], Awaitable[Any]]) -> None:
        self.actor = actor
        self._run = run
        #: Jobs whose stream has not been claimed yet, and their expiry timers.
        self._unclaimed: dict[str, tuple[Job, asyncio.Task[None], asyncio.TimerHandle]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def routes(self) -> list[Route]:
        return [
            Route("/v1/jobs", self.submit, methods=["POST"]),
            Route("/v1/jobs/{job_id}/stream", self.stream, methods=["GET"]),
        ]

    async def submit(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError as exc:
            return error_response(400, ErrorCode.INVALID_REQUEST, f"the body is not JSON: {exc}")
        try:
            op = parse_operation(body)
        except ProtocolError as exc:
            return error_response(400, ErrorCode.INVALID_REQUEST, exc.message)
        job = Job(id=uuid.uuid4().hex, actor=self.actor, op=op, body=body)
        task = asyncio.create_task(self._run_job(job), name=f"job {job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        expiry = asyncio.get_running_loop().call_later(UNCLAIMED_JOB_S, self._expire, job.id)
        self._unclaimed[job.id] = (job, task, expiry)
        return JSONResponse(
            {"job_id": job.id, "sse_url": f"/v1/jobs/{job.id}/stream"}, status_code=202
        )

    async def stream(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        claimed = self._unclaimed.pop(job_id, None)
        if claimed is None:
            return error_response(
                404, ErrorCode.NOT_FOUND, f"no job {job_id} (or its stream is already taken)"
            )
        job, task, expiry = claimed
        expiry.cancel()
        return StreamingResponse(
            self._events(job, task), media_type="text/event-stream", headers=SSE_HEADERS
        )

    async def _events(self, job: Job, task: asyncio.Task[None]) -> AsyncIterator[bytes]:
        try:
            while True:
                item = await job.events.get()
                waiting: list[bytes] = []
                while item is not None:
                    waiting.append(item)
                    if job.events.empty():
                        break
                    item = job.events.get_nowait()
                if waiting:
                    yield b"".join(waiting)
                if item is None:
                    return
        finally:
            # Ended, or its client left (then nobody wants the job any more).
            task.cancel()

    async def _run_job(self, job: Job) -> None:
        deadline = asyncio.timeout(job.op.default_deadline_s)
        try:
            async with deadline:
                result = await self._run(job)
        except HttpJobFailed as exc:
            terminal = error_event(exc.code, exc.message)
        except asyncio.CancelledError:
            message = "the job was cancelled: its client left, or the server is stopping"
            job.events.put_nowait(error_event(ErrorCode.CANCELLED, message))
            job.events.put_nowait(None)
            raise
        except Exception as exc:
            if deadline.expired():
                message = f"{job.op.NAME} did not finish within {job.op.default_deadline_s:g}s"
                terminal = error_event(ErrorCode.TIMEOUT, message)
            else:
                log.exception("job %s (%s) failed", job.id, job.op.NAME)
                message = f"{job.op.NAME} failed: {type(exc).__name__}: {exc}"
                terminal = error_event(ErrorCode.INTERNAL, message)
        else:
            terminal = sse_event("done", json.dumps({"result": result}))
        job.events.put_nowait(terminal)
        job.events.put_nowait(None)

    def _expire(self, job_id: str) -> None:
        claimed = self._unclaimed.pop(job_id, None)
        if claimed is not None:
            _, task, _ = claimed
            task.cancel()

    async def aclose(self) -> None:
        """Cancel every running job (each ends with a CANCELLED event) and wait for them."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def app(
        self, client: httpx2.AsyncClient, then: Callable[[], Awaitable[Any]] | None = None
    ) -> Starlette:
        """An app serving these routes, with `client` open while it serves; at shutdown the
        running jobs end first, then `then` runs."""

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            async with client:
                try:
                    yield
                finally:
                    await self.aclose()
                    if then is not None:
                        await then()

        return Starlette(routes=self.routes(), lifespan=lifespan)


def parse_operation(body: Any) -> Operation:
    """The operation of a job request `{"op": NAME, ...arguments}`, validated as the mesh does."""
    if not isinstance(body, dict):
        raise ProtocolError('a job is a JSON object {"op": NAME, ...arguments}')
    args = dict(body)
    name = args.pop("op", None)
    cls = OPERATIONS.get(name) if isinstance(name, str) else None
    if cls is None:
        served = ", ".join(OPERATIONS)
        raise ProtocolError(f"unknown operation {name!r} (this server runs: {served})")
    return cls.from_wire(args, f"operation {name}")


# ---- the queen ------------------------------------------------------------------------------


class Queen:
    """Forwards every job to its hive (POST, then GET the stream) and relays the hive's events."""

    def __init__(self, hive_url: str) -> None:
        self.hive_url = hive_url.rstrip("/")
        self.jobs = JobServer("queen", self._forward)
        self.client = http_client()

    def app(self) -> Starlette:
        return self.jobs.app(self.client)

    async def _forward(self, job: Job) -> Any:
        peer = f"hive at {self.hive_url}"
        try:
            response = await self.client.post(f"{self.hive_url}/v1/jobs", json=job.body)
            if response.status_code != 202:
                raise await failure_from(response, peer)
            stream_url = self.hive_url + response.json()["sse_url"]
            async with self.client.sse(stream_url) as source:
                if source.response.status_code != 200:
                    raise await failure_from(source.response, peer)
                return await read_events(source, peer, job.emit, ErrorCode.HIVE_LOST)
        except httpx2.TransportError as exc:
            raise HttpJobFailed(ErrorCode.HIVE_LOST, f"{peer}: {exc!r}") from exc


# ---- the hive -------------------------------------------------------------------------------


@dataclass(eq=False)
class WorkerProcess:
    """A worker process the hive started: one model, one generation at a time."""

    id: str
    model: str
    process: asyncio.subprocess.Process
    url: str = ""
    port: int = 0
    backend: str = ""
    #: starting, ready, busy, stopping or dead.
    state: str = "starting"
    exit_code: int | None = None

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "pid": self.process.pid,
            "port": self.port,
            "url": self.url,
            "state": self.state,
            "backend": self.backend,
            "device": "cpu",
            "slots": 1,
            "exit_code": self.exit_code,
        }


class Hive:
    """Runs jobs: pings, worker processes (spawn, list, delete) and inference on an idle worker."""

    def __init__(self, hive_id: str, model_dir: Path) -> None:
        self.id = hive_id
        self.model_dir = model_dir.resolve()
        self.jobs = JobServer("hive", self._run)
        self.client = http_client()
        self.workers: dict[str, WorkerProcess] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    def app(self) -> Starlette:
        async def stop_workers() -> None:
            await asyncio.gather(*(self._stop(w) for w in list(self.workers.values())))

        return self.jobs.app(self.client, then=stop_workers)

    async def _run(self, job: Job) -> Any:
        op = job.op
        if op.hive_pin not in (None, self.id):
            raise HttpJobFailed(ErrorCode.NOT_FOUND, f"this is hive {self.id}, not {op.hive_pin}")
        match op:
            case Ping():
                return await self._ping(job, op)
            case WorkerList():
                job.narrate("worker_list", f"{len(self.workers)} worker(s) on hive {self.id}")
                return [w.record() for w in self.workers.values()]
            case WorkerSpawn():
                return await self._spawn(job, op)
            case WorkerDelete():
                return await self._delete(job, op)
            case Infer():
                return await self._infer(job, op)
        raise HttpJobFailed(ErrorCode.INVALID_REQUEST, f"hive {self.id} does not run {op.NAME}")

    async def _ping(self, job: Job, op: Ping) -> dict[str, Any]:
        """The mesh's ping: `count` pongs, `interval_s` apart, each a checkpoint."""
        start = time.perf_counter()
        for i in range(1, op.count + 1):
            job.narrate("pong", f"pong {i}/{op.count}")
            await asyncio.sleep(op.interval_s if i < op.count else 0)
        return {"count": op.count, "elapsed_s": round(time.perf_counter() - start, 6)}

    def _model_path(self, model: str) -> Path:
        path = (self.model_dir / model).resolve()
        if not path.is_relative_to(self.model_dir) or not path.is_file():
            raise HttpJobFailed(
                ErrorCode.NOT_FOUND,
                f"no model file {model!r} in {self.model_dir} on hive {self.id}",
            )
        return path

    async def _spawn(self, job: Job, op: WorkerSpawn) -> dict[str, Any]:
        """rbee's way: start the process, read the port it listens on, poll /health until the
        model is loaded. Every wait is bounded; a worker that fails is not left behind."""
        # Its workers serve one job at a time (rbee's did), whatever `slots` asks.
        if op.device not in ("auto", "cpu"):
            raise HttpJobFailed(ErrorCode.INVALID_REQUEST, "the baseline's workers run on the CPU")
        path = self._model_path(op.model)
        worker_id = f"w-{uuid.uuid4().hex[:8]}"
        argv = [sys.executable, "-m", "benchmarks.http_baseline", "worker", "--port", "0"]
        argv += ["--model", str(path), "--id", worker_id, "--backend", op.backend]
        started = time.perf_counter()
        job.narrate("worker_spawn", f"starting worker {worker_id}: model {op.model} on cpu")
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            raise HttpJobFailed(
                ErrorCode.UNAVAILABLE, f"cannot start a worker process: {exc}"
            ) from exc
        worker = WorkerProcess(id=worker_id, model=op.model, process=process)
        self.workers[worker_id] = worker
        watcher = asyncio.create_task(self._watch(worker))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        try:
            await self._wait_ready(worker)
        except BaseException:
            await self._stop(worker)
            raise
        worker.state = "ready"
        job.narrate(
            "worker_spawn",
            f"worker {worker_id} ready in {time.perf_counter() - started:.2f}s "
            f"({worker.backend}, pid {process.pid}, {worker.url})",
        )
        return worker.record()

    async def _wait_ready(self, worker: WorkerProcess) -> None:
        assert worker.process.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                line = await worker.process.stdout.readline()
        except TimeoutError:
            raise HttpJobFailed(
                ErrorCode.WORKER_LOST,
                f"worker {worker.id} did not listen within {START_TIMEOUT_S:g}s",
            ) from None
        if not line:
            code = await worker.process.wait()
            raise HttpJobFailed(
                ErrorCode.WORKER_LOST,
                f"worker {worker.id} exited with code {code} before listening",
            )
        worker.url = json.loads(line)["listening"]
        worker.port = int(worker.url.rsplit(":", 1)[1])
        try:
            async with asyncio.timeout(WORKER_READY_TIMEOUT_S):
                while True:
                    if worker.state == "dead":
                        raise HttpJobFailed(
                            ErrorCode.WORKER_LOST,
                            f"worker {worker.id} exited with code {worker.exit_code} while loading",
                        )
                    health = await self.client.get(f"{worker.url}/health")
                    status = health.json()
                    if status.get("ready"):
                        worker.backend = status.get("backend", "")
                        return
                    if "error" in status:
                        raise HttpJobFailed(ErrorCode.UNAVAILABLE, status["error"])
                    await asyncio.sleep(HEALTH_POLL_S)
        except TimeoutError:
            raise HttpJobFailed(
                ErrorCode.TIMEOUT,
                f"worker {worker.id} was not ready within {WORKER_READY_TIMEOUT_S:g}s",
            ) from None
        except httpx2.TransportError as exc:
            raise HttpJobFailed(ErrorCode.WORKER_LOST, f"worker {worker.id}: {exc!r}") from exc

    async def _watch(self, worker: WorkerProcess) -> None:
        worker.exit_code = await worker.process.wait()
        worker.state = "dead"

    async def _stop(self, worker: WorkerProcess) -> None:
        """Terminate a worker, kill it if it does not exit in time, and forget it."""
        if worker.process.returncode is None:
            worker.state = "stopping"
            worker.process.terminate()
            try:
                async with asyncio.timeout(STOP_GRACE_S):
                    await worker.process.wait()
            except TimeoutError:
                worker.process.kill()
                await worker.process.wait()
        worker.exit_code = worker.process.returncode
        worker.state = "dead"
        self.workers.pop(worker.id, None)

    async def _delete(self, job: Job, op: WorkerDelete) -> dict[str, Any]:
        worker = self.workers.get(op.worker)
        if worker is None:
            raise HttpJobFailed(ErrorCode.NOT_FOUND, f"no worker {op.worker} on hive {self.id}")
        await self._stop(worker)
        job.narrate("worker_delete", f"worker {worker.id} stopped (exit code {worker.exit_code})")
        return worker.record()

    async def _infer(self, job: Job, op: Infer) -> Any:
        idle = [
            w
            for w in self.workers.values()
            if w.state == "ready" and op.worker in (None, w.id) and op.model in (None, w.model)
        ]
        if not idle:
            wanted = f"worker {op.worker}" if op.worker else f"model {op.model or 'any'}"
            raise HttpJobFailed(
                ErrorCode.UNAVAILABLE,
                f"no idle worker ({wanted}) on hive {self.id}: spawn one, or wait",
            )
        worker = idle[0]
        worker.state = "busy"
        job.narrate("infer", f"running on worker {worker.id} ({worker.model})")
        peer = f"worker {worker.id}"
        try:
            async with self.client.sse(
                f"{worker.url}/v1/infer", method="POST", json=op.to_wire()
            ) as source:
                if source.response.status_code != 200:
                    raise await failure_from(source.response, peer)
                return await read_events(source, peer, job.emit, ErrorCode.WORKER_LOST)
        except httpx2.TransportError as exc:
            raise HttpJobFailed(ErrorCode.WORKER_LOST, f"{peer}: {exc!r}") from exc
        finally:
            if worker.state == "busy":
                worker.state = "ready"


_PR_SET_PDEATHSIG = 1
# Looked up here, not in the child: between fork and exec only the call itself is safe.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """A preexec_fn: the kernel kills the worker should its hive die without stopping it."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# ---- the worker -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _End:
    """The end of a generation, and the exception that ended it, if any."""

    error: Exception | None = None


class Worker:
    """One model: `GET /health` says whether it is loaded, `POST /v1/infer` streams tokens."""

    def __init__(self, worker_id: str, model_path: Path, backend: str) -> None:
        self.id = worker_id
        self.model_path = model_path
        self.backend = backend
        self.model: LoadedModel | None = None
        self.load_error: str | None = None

    def app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            # Loaded in the background: /health answers (not ready) while it loads.
            loading = asyncio.create_task(self._load())
            try:
                yield
            finally:
                loading.cancel()

        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/infer", self.infer, methods=["POST"]),
        ]
        return Starlette(routes=routes, lifespan=lifespan)

    async def _load(self) -> None:
        from rbee_mesh.inference.backends import load_model

        try:
            self.model, why = await asyncio.to_thread(
                load_model, self.model_path, "cpu", self.backend
            )
        except Exception as exc:
            why = exc.message if isinstance(exc, MeshError) else f"{type(exc).__name__}: {exc}"
            self.load_error = f"worker {self.id} cannot load {self.model_path.name}: {why}"
            log.error("%s", self.load_error)
        else:
            log.info("worker %s: %s", self.id, why)

    async def health(self, request: Request) -> Response:
        if self.model is not None:
            return JSONResponse({"ready": True, "backend": self.model.backend})
        if self.load_error is not None:
            return JSONResponse({"ready": False, "error": self.load_error}, status_code=500)
        return JSONResponse({"ready": False}, status_code=503)

    async def infer(self, request: Request) -> Response:
        from rbee_mesh.inference.backends import GenerationParams

        model = self.model
        if model is None:
            return error_response(
                503, ErrorCode.UNAVAILABLE, self.load_error or "the model is still loading"
            )
        try:
            op = Infer.from_wire(await request.json(), "infer")
            params = GenerationParams.from_op(op)
        except ValueError as exc:
            return error_response(400, ErrorCode.INVALID_REQUEST, f"the body is not JSON: {exc}")
        except (ProtocolError, MeshError) as exc:
            return error_response(400, ErrorCode.INVALID_REQUEST, exc.message)
        return StreamingResponse(
            self._generate(model, op.prompt, params),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )

    async def _generate(
        self, model: LoadedModel, prompt: str, params: GenerationParams
    ) -> AsyncIterator[bytes]:
        """Token events as the backend samples them (one per token; "" for held-back text),
        then `done` with the text and its timings, or `error`."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[str | _End] = asyncio.Queue()
        stop = threading.Event()

        def generate() -> None:  # in a thread; the model runs one generation at a time
            outcome = _End()
            try:
                with contextlib.closing(model.generate(prompt, params)) as sampled:
                    for text in sampled:
                        loop.call_soon_threadsafe(tokens.put_nowait, text)
                        if stop.is_set():
                            break
            except Exception as exc:
                outcome = _End(exc)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(tokens.put_nowait, outcome)

        start = time.perf_counter()
        first: float | None = None
        texts: list[str] = []
        thread = loop.run_in_executor(None, generate)
        try:
            while True:
                item = await tokens.get()
                waiting: list[bytes] = []
                while isinstance(item, str):
                    if first is None:
                        first = time.perf_counter()
                    waiting.append(
                        sse_event("token", json.dumps({"seq": len(texts), "text": item}))
                    )
                    texts.append(item)
                    if tokens.empty():
                        break
                    item = tokens.get_nowait()
                if waiting:
                    yield b"".join(waiting)
                if isinstance(item, _End):
                    end = item
                    break
        finally:
            stop.set()  # the client left: the thread stops within a token
        await thread
        if end.error is not None:
            error = end.error
            if isinstance(error, MeshError):
                yield error_event(error.code, error.message)
            else:
                message = f"generation failed: {type(error).__name__}: {error}"
                yield error_event(ErrorCode.INTERNAL, message)
            return
        duration = time.perf_counter() - start
        result = {
            "text": "".join(texts),
            "usage": {
                "generated_tokens": len(texts),
                "ttft_s": None if first is None else round(first - start, 6),
                "tokens_per_s": round(len(texts) / duration, 3) if duration > 0 else 0.0,
                "duration_s": round(duration, 6),
            },
            "backend": model.backend,
            "worker": self.id,
        }
        yield sse_event("done", json.dumps({"result": result}))


# ---- running a server -----------------------------------------------------------------------


def serve(app: Starlette, host: str, port: int) -> None:
    """Serve `app` with uvicorn on uvloop and httptools, in this process, until SIGINT or SIGTERM.

    The socket is bound here (so `port` 0 works) and `{"listening": URL}` printed once it
    accepts connections; a wildcard host is reported as the loopback address."""
    sock = socket.create_server((host, port), family=_family(host), backlog=2048)
    bound = sock.getsockname()[1]
    shown = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    shown = f"[{shown}]" if ":" in shown else shown
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        # Streams of running jobs get this long to end on shutdown, then are cancelled.
        timeout_graceful_shutdown=2,
    )
    print(json.dumps({"listening": f"http://{shown}:{bound}"}), flush=True)
    uvicorn.Server(config).run(sockets=[sock])


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def start_server(
    role: str,
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    argv_prefix: Sequence[str] = (),
    timeout_s: float = START_TIMEOUT_S,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `python -m benchmarks.http_baseline ROLE ARGS...` (after `argv_prefix`, e.g.
    `ip netns exec NS`) in `cwd` (the repository root) and wait, at most `timeout_s`, for its
    `listening` line. Returns the process and the URL it printed; stop it with `stop_server`."""
    argv = [*argv_prefix, sys.executable, "-m", "benchmarks.http_baseline", role, *args]
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )
    try:
        line = _read_line(proc, timeout_s, f"the {role} server")
        return proc, str(json.loads(line)["listening"])
    except BaseException:
        stop_server(proc)
        raise


def _read_line(proc: subprocess.Popen[bytes], timeout_s: float, what: str) -> bytes:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    received = b""
    while b"\n" not in received:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{what} did not print its listening line in {timeout_s:g}s")
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                code = proc.wait()
                raise RuntimeError(f"{what} exited with code {code} before listening")
            received += chunk
    return received.split(b"\n", 1)[0]


def stop_server(proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> int:
    """Terminate a server started by `start_server` (a hive stops its workers), kill it if it
    does not exit within `grace_s`; returns its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


# ---- the client -----------------------------------------------------------------------------


class HttpKeeper:
    """The client side: submits jobs to a queen and reads their event streams.

    Runs under trio or asyncio (httpx2 runs on anyio). One `AsyncClient`, so the POST and the GET
    of every job reuse one kept-alive connection.

        async with HttpKeeper("http://127.0.0.1:8000") as keeper:
            result, events = await keeper.run({"op": "ping", "count": 10})
    """

    def __init__(self, queen_url: str) -> None:
        self.queen_url = queen_url.rstrip("/")
        self._client = http_client()

    async def __aenter__(self) -> HttpKeeper:
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._client.aclose()

    async def run(
        self, op: dict[str, Any], on_event: Callable[[str, str], None] | None = None
    ) -> tuple[Any, int]:
        """Run `op` (`{"op": NAME, ...arguments}`) and return the result of its `done` event and
        how many narration and token events came before it. `on_event(event, data)` (optional)
        sees each of those as it arrives, its data as JSON text. Raises HttpJobFailed on an
        `error` event, a refused request, or a queen that cannot be reached."""
        peer = f"queen at {self.queen_url}"
        try:
            response = await self._client.post(f"{self.queen_url}/v1/jobs", json=op)
            if response.status_code != 202:
                raise await failure_from(response, peer)
            stream_url = self.queen_url + response.json()["sse_url"]
            events = 0

            def seen(event: str, data: str) -> None:
                nonlocal events
                events += 1
                if on_event is not None:
                    on_event(event, data)

            async with self._client.sse(stream_url) as source:
                if source.response.status_code != 200:
                    raise await failure_from(source.response, peer)
                result = await read_events(source, peer, seen, ErrorCode.UNAVAILABLE)
        except httpx2.TransportError as exc:
            raise HttpJobFailed(ErrorCode.UNAVAILABLE, f"{peer}: {exc!r}") from exc
        return result, events


# ---- command line ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.http_baseline",
        description="A server of the HTTP + SSE baseline (rbee's pattern) for the benchmarks.",
    )
    roles = parser.add_subparsers(dest="role", required=True)
    for role in ("queen", "hive", "worker"):
        sub = roles.add_parser(role)
        sub.add_argument(
            "--host", default="127.0.0.1", help="address to bind (default %(default)s)"
        )
        sub.add_argument("--port", type=int, required=True, help="port to bind; 0 picks one")
        if role == "queen":
            sub.add_argument("--hive", required=True, help="the hive's URL, http://HOST:PORT")
        elif role == "hive":
            sub.add_argument("--id", required=True, help="the hive's id")
            sub.add_argument("--model-dir", type=Path, required=True, help="where models are")
        else:
            sub.add_argument("--model", type=Path, required=True, help="the GGUF file to load")
            sub.add_argument("--id", default="worker", help="the worker's id (for its messages)")
            sub.add_argument("--backend", default="auto", help="auto, llama-cpp or ctransformers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"[{args.role}] %(levelname)s %(message)s")
    app: Starlette
    if args.role == "queen":
        app = Queen(args.hive).app()
    elif args.role == "hive":
        app = Hive(args.id, args.model_dir).app()
    else:
        app = Worker(args.id, args.model, args.backend).app()
    serve(app, args.host, args.port)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: uvicorn has already shut down
        main()
