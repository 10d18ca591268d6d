"""A worker: one OS process that loads one model and runs inference jobs for its hive.

    python -m rbee_mesh.actors.worker --hive ENDPOINT --worker-id ID --model PATH --device DEVICE
                                      [--backend auto|llama-cpp|ctransformers] [--slots N]
                                      [--hive-id ID] [--heartbeat-s 1.0]

What it does, in order:

1. loads the model with its backend (`load_model`), once per slot, in a thread, so that SIGTERM
   during a long load still ends it at once;
2. connects a DEALER to the hive's worker endpoint and sends READY (model, pid, device, backend
   and why it was chosen, load time, slots, architecture, parameters, ...);
3. sends a HEARTBEAT every interval with its state, `{"state": "idle" | "busy", "slots": N,
   "busy": n}` ("busy" once every slot is taken), and watches the hive's heartbeats;
4. runs the jobs the hive sends over the same connection.

Jobs. The hive sends SUBMIT(infer) under its own job id (docs/protocol.md, "Forwarding"). The
worker answers at once: ACCEPTED, or an ERROR with an empty job id and the SUBMIT's `ref`
(`BUSY` when every slot is taken, `CONFLICT`, `INVALID_REQUEST`, `UNAVAILABLE` while stopping).
Each slot owns one loaded model, because a backend's model (one llama.cpp context) must not
generate on two threads at once; both backends map the file, so the weights are shared between
slots and each extra slot costs its context and buffers. A job then:

- generates in a thread (`trio.to_thread`), so the trio loop keeps heartbeating and taking
  frames. The thread appends each piece of text the backend yields to a deque and wakes trio
  with the trio token's `run_sync_soon` only if no wake-up is already pending: the thread never
  waits for trio. (Measured: `trio.from_thread.run_sync` per token costs the generating thread
  ~80 us and a memory channel ~130 us; this costs ~0.1 us while trio is behind and ~10 us when
  every token wakes it.) trio sends what has accumulated as one TOKEN frame (`seq` = index of
  its first piece, `count` pieces, `text` their concatenation), at most one frame per
  millisecond, so per-frame costs never limit tokens/s and no piece waits more than a
  millisecond. A piece is one sampled token, except where the backend holds text back (a
  character split over several tokens, text that may start a stop sequence) and yields it
  with a later token;
- stops on CANCEL, on its deadline (ERROR `TIMEOUT`), or when the worker stops (the hive's
  DISCONNECT, SIGTERM): the thread checks a flag after every piece and closes the generator,
  so it stops within one token (a few, while the backend holds text back). The terminal frame
  goes out once the thread has stopped, and the slot is free before it does, so the hive may
  send the next job the moment it sees the end of this one;
- ends with DONE: `{"text", "usage": {"prompt_tokens", "generated_tokens", "ttft_s",
  "tokens_per_s", "duration_s"}, "backend", "worker", "finish_reason"}`. `duration_s` runs
  from ACCEPTED to the last token, `ttft_s` from ACCEPTED to the first, `tokens_per_s` is
  generated tokens / duration. A backend yields text only, so `finish_reason` is inferred:
  "length" when max_tokens (or the context) ran out, "eos" when it ended sooner and no stop
  sequence was given, "end" when it ended sooner and one was: end-of-sequence or a stop
  sequence, and the backend does not say which;
- narrates as actor "worker": what it generates with, and how fast it went.

A frame the worker cannot read is answered with ERROR (empty job id) and changes nothing else.

How it ends (the exit code is how the hive's pool tells these apart; see `WorkerExit`):

- 0 on SIGTERM or SIGINT, or on a DISCONNECT from the hive;
- 2 when the model cannot be loaded (and for bad arguments, as argparse does): the reason is the
  last line on stderr, which the pool reads back from the worker's log file;
- 3 when the hive has been silent for three heartbeat intervals. The pool also makes the kernel
  SIGKILL a worker whose hive dies (PR_SET_PDEATHSIG); this covers a hive that hangs instead, and
  a worker started by hand. Either way a worker is never left running without its hive.

Running jobs are cancelled first (CANCELLED, each within one token), for at most STOP_GRACE_S.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from trio_util import periodic

from rbee_mesh.actors.narration import JobContext, current_job, narrate
from rbee_mesh.protocol import (
    Accepted,
    Actor,
    Cancel,
    Cancelled,
    Disconnect,
    Done,
    Error,
    ErrorCode,
    Heartbeat,
    Infer,
    MeshError,
    Message,
    PeerLiveness,
    ProtocolError,
    Ready,
    Submit,
    Token,
    decode,
    encode,
)
from rbee_mesh.protocol.fields import ident
from rbee_mesh.protocol.liveness import Liveness
from rbee_mesh.transport import Connection, TransportClosed, open_connection

if TYPE_CHECKING:
    # The hive imports this module for its constants; only a worker process needs the inference
    # libraries (numpy, gguf, the backends), so they are imported where a worker uses them.
    from rbee_mesh.inference.backends import GenerationParams, LoadedModel

log = logging.getLogger("rbee_mesh.worker")

DEVICE_PATTERN = re.compile(r"cpu|cuda:[0-9]{1,2}")
BACKENDS = ("auto", "llama-cpp", "ctransformers")
MAX_SLOTS = 64
#: The signals that stop a worker on purpose (exit code 0).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Tokens that arrive within this long of the previous TOKEN frame wait and share the next one.
FLUSH_INTERVAL_S = 0.001
#: How long running jobs get to end (each stops within one token) when the worker stops.
STOP_GRACE_S = 2.0
#: Frames queued for the hive; a hive that leaves this many unread is not reading at all.
OUTBOX_FRAMES = 10_000


class WorkerExit(IntEnum):
    """The exit codes of a worker process."""

    #: Stopped on purpose: SIGTERM, SIGINT, or DISCONNECT from the hive.
    STOPPED = 0
    #: The model could not be loaded (or the arguments were wrong); the reason is on stderr.
    LOAD_FAILED = 2
    #: The hive sent nothing for three heartbeat intervals.
    HIVE_LOST = 3


@dataclass(frozen=True)
class WorkerConfig:
    hive: str
    worker_id: str
    model: Path
    device: str
    heartbeat_s: float = 1.0
    backend: str = "auto"
    slots: int = 1
    #: The hive's id, for the `hive_id` of the worker's narration.
    hive_id: str = ""


class TokenStream:
    """Token texts from a generating thread to the trio task that sends them, never blocking it.

    `put` runs in the thread; everything else in trio. The thread wakes trio with the trio
    token's `run_sync_soon` only when trio waits for a token and no wake-up is pending yet, so a
    burst of tokens costs one wake-up, and tokens that arrive while trio waits out the flush
    interval cost none.
    """

    def __init__(self, trio_token: trio.lowlevel.TrioToken) -> None:
        self._trio_token = trio_token
        self._pending: deque[str] = deque()
        #: True while a wake-up is scheduled, or not needed (trio drains on a timer anyway).
        self._quiet = False
        self._wakeup = trio.Event()
        self._closed = trio.Event()

    def put(self, text: str) -> None:
        """Called by the generating thread for each token."""
        self._pending.append(text)
        if not self._quiet:
            self._quiet = True
            self._trio_token.run_sync_soon(self._wake)

    def _wake(self) -> None:
        self._quiet = False
        self._wakeup.set()

    def close(self) -> None:
        """No more tokens: the generating thread has returned."""
        self._closed.set()
        self._wakeup.set()

    async def next_batch(self, not_before: float) -> list[str] | None:
        """Every token that has arrived, once one has and `not_before` (trio time) has passed;
        None once the stream is closed and drained. Closing skips the wait for `not_before`."""
        while not self._pending:
            if self._closed.is_set():
                return None
            self._wakeup = trio.Event()
            self._quiet = False
            # A token put before `_quiet` was cleared scheduled no wake-up: look once more.
            if self._pending:
                break
            await self._wakeup.wait()
        if trio.current_time() < not_before:
            self._quiet = True  # whatever arrives meanwhile goes out with this batch
            with trio.move_on_at(not_before):
                await self._closed.wait()  # the last batch goes at once
        batch: list[str] = []
        while self._pending:  # popleft, never clear(): the thread may be appending meanwhile
            batch.append(self._pending.popleft())
        return batch


@dataclass(eq=False)
class _Job:
    """One running job. Fields marked (thread) are written by the generating thread only."""

    id: str
    op: Infer
    model: LoadedModel
    stream: TokenStream
    deadline_s: float
    deadline: float  # trio time
    accepted: float = field(default_factory=time.perf_counter)
    #: Set to stop the generating thread, which checks it after every token.
    stop: threading.Event = field(default_factory=threading.Event)
    #: The terminal frame to send instead of the result: set when the job is stopped from outside.
    abort: Message | None = None
    stop_requested: float | None = None
    sampled_at_stop: int = 0
    #: The model counts this job's tokens (its generate() has reset the count).
    generating: bool = False  # (thread)
    #: Pieces of text the backend yielded: the unit of TOKEN frames' `seq` and `count`.
    pieces: int = 0  # (thread)
    first_token: float | None = None  # (thread)
    last_token: float | None = None  # (thread)
    #: The generated text, once generation has ended.
    text: str = ""
    #: The deadline's timer; cancelled once generation ends.
    timer: trio.CancelScope = field(default_factory=trio.CancelScope)


def generate_in_thread(job: _Job, params: GenerationParams) -> None:
    """Iterate the backend's generator and hand each token to trio; stop when `job.stop` is set.

    Runs in a thread. The backend yields once per sampled token (text it holds back comes as
    ""), and the flag is checked after each, so a stop costs at most the token being computed
    when it was requested.
    """
    if job.stop.is_set():
        return
    tokens = job.model.generate(job.op.prompt, params)
    job.generating = True
    try:
        for text in tokens:
            if text:
                now = time.perf_counter()
                if job.first_token is None:
                    job.first_token = now
                job.last_token = now
                job.pieces += 1
                job.stream.put(text)
            if job.stop.is_set():
                return
    finally:
        tokens.close()


class Worker:
    """One worker process's actor. `await run()` returns how it ended."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        #: One loaded model per slot; a job takes one from `_free` and gives it back.
        self.models: list[LoadedModel] = []
        self.backend = ""
        self.backend_reason = ""
        self.exit: tuple[WorkerExit, str] | None = None
        self._free: list[LoadedModel] = []
        self._jobs: dict[str, _Job] = {}
        self._load_s = 0.0
        self._scope = trio.CancelScope()
        self._hive = PeerLiveness(config.heartbeat_s, 0.0)
        # Every frame to the hive goes through this one queue, so a job's narration, tokens and
        # terminal frame leave in the order they were made.
        self._outbox, self._outbox_receive = trio.open_memory_channel[Sequence[bytes]](
            OUTBOX_FRAMES
        )
        self._jobs_nursery: trio.Nursery | None = None

    def finish(self, code: WorkerExit, reason: str) -> None:
        """End the worker with `code`; the first reason given stands.

        Running jobs are stopped first (CANCELLED); the last one to end lets the worker go, and
        STOP_GRACE_S bounds the wait.
        """
        if self.exit is None:
            self.exit = (code, reason)
        for job in self._jobs.values():
            self._stop_job(
                job, Cancelled(job_id=job.id, reason=f"the worker is stopping: {reason}")
            )
        if self._jobs:
            deadline = trio.current_time() + STOP_GRACE_S
            self._scope.deadline = min(self._scope.deadline, deadline)
        else:
            self._scope.cancel()

    async def run(self, early_signals: Sequence[int] = ()) -> tuple[WorkerExit, str]:
        """Load, announce, serve jobs and heartbeat until told to stop; returns (exit code,
        reason).

        `early_signals`: stop signals that arrived before this call could receive them itself.
        """
        with self._scope, trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            for signum in early_signals:
                self._stopped_by(signum)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, signals)
                if await self._load():
                    async with (
                        await open_connection(self.config.hive) as connection,
                        trio.open_nursery() as jobs,
                    ):
                        self._jobs_nursery = jobs
                        await self._announce(connection)
                        jobs.start_soon(self._send_loop, connection)
                        jobs.start_soon(self._receive_loop, connection)
                        jobs.start_soon(self._heartbeat_loop, connection)
                        jobs.start_soon(self._watch_hive)
        # Every generating thread has returned: job tasks wait for theirs, even when cancelled.
        for model in self.models:
            model.close()
        assert self.exit is not None, "the worker's scope is only cancelled through finish()"
        return self.exit

    # ---- loading -------------------------------------------------------------------------------

    async def _load(self) -> bool:
        """Load the model once per slot; False (and finish) if it cannot be loaded."""
        config = self.config
        log.info(
            "loading model %s on %s (backend %s, %d slot(s))",
            config.model,
            config.device,
            config.backend,
            config.slots,
        )
        started = trio.current_time()
        try:
            # abandon_on_cancel: a SIGTERM during a long load ends the process without waiting.
            models, why = await trio.to_thread.run_sync(self._load_models, abandon_on_cancel=True)
        except MeshError as exc:
            self.finish(WorkerExit.LOAD_FAILED, f"cannot load model {config.model}: {exc.message}")
            return False
        self._load_s = trio.current_time() - started
        self.models, self._free = models, list(reversed(models))
        self.backend, self.backend_reason = models[0].backend, why
        log.info(
            "loaded model %s with %s in %.3fs (%s)", config.model, self.backend, self._load_s, why
        )
        return True

    def _load_models(self) -> tuple[list[LoadedModel], str]:
        from rbee_mesh.inference.backends import load_model

        """One model per slot; every slot uses the backend the first load chose. In a thread."""
        config = self.config
        first, why = load_model(config.model, config.device, config.backend)
        models = [first]
        try:
            for _ in range(config.slots - 1):
                models.append(load_model(config.model, config.device, first.backend)[0])
        except BaseException:
            for model in models:
                model.close()
            raise
        return models, why

    async def _announce(self, connection: Connection) -> None:
        info = self.models[0].info
        self._hive.last_seen = trio.current_time()
        await self._send(
            connection,
            Ready(
                job_id="",
                sender=self.config.worker_id,
                role=Actor.WORKER,
                info={
                    "model": str(self.config.model),
                    "pid": os.getpid(),
                    "device": self.config.device,
                    "backend": self.backend,
                    "backend_reason": self.backend_reason,
                    "slots": self.config.slots,
                    "load_s": round(self._load_s, 6),
                    "arch": info.architecture,
                    "name": info.name,
                    "params": info.parameter_count,
                    "context_length": info.context_length,
                    "file_size": info.file_size,
                    "file_type": info.file_type,
                },
            ),
        )
        log.info("connected to the hive at %s; READY sent", self.config.hive)

    # ---- the connection to the hive ----------------------------------------------------------

    async def _send(self, connection: Connection, message: Message) -> None:
        # Only this process closes the connection, and only while it is ending.
        with suppress(TransportClosed):
            await connection.send(encode(message))

    def _queue(self, message: Message) -> None:
        """Queue a frame for the hive without waiting (narration, replies to the hive)."""
        try:
            self._outbox.send_nowait(encode(message))
        except trio.WouldBlock:
            log.warning(
                "the hive left %d frames unread; dropped %s for job %r",
                OUTBOX_FRAMES,
                message.KIND.name,
                message.job_id,
            )

    async def _send_loop(self, connection: Connection) -> None:
        async for frames in self._outbox_receive:
            try:
                await connection.send(frames)
            except TransportClosed:
                return

    async def _receive_loop(self, connection: Connection) -> None:
        while True:
            try:
                frames = await connection.receive()
            except TransportClosed:
                return
            self._hive.seen(trio.current_time())
            try:
                message = decode(frames)
            except ProtocolError as exc:
                log.warning("rejected a malformed frame from the hive: %s", exc)
                self._queue(
                    Error(job_id="", code=exc.code, message=f"rejected: {exc.message}", ref=exc.ref)
                )
                continue
            match message:
                case Submit():
                    self._submit(message)
                case Cancel():
                    job = self._jobs.get(message.job_id)
                    if job is None:
                        # Raced with the job's end: its terminal frame is on its way.
                        log.info("ignored CANCEL of %s: not running", message.job_id)
                        continue
                    reason = message.reason or "cancelled by the hive"
                    self._stop_job(job, Cancelled(job_id=job.id, reason=reason))
                case Heartbeat():
                    self._hive.interval_s = message.interval_s
                case Disconnect():
                    reason = message.reason or "no reason given"
                    self.finish(WorkerExit.STOPPED, f"the hive disconnected it ({reason})")
                case _:
                    log.warning("ignored a %s frame from the hive", message.KIND.name)

    async def _heartbeat_loop(self, connection: Connection) -> None:
        seq = 0
        async for _ in periodic(self.config.heartbeat_s):
            busy = len(self._jobs)
            await self._send(
                connection,
                Heartbeat(
                    job_id="",
                    sender=self.config.worker_id,
                    seq=seq,
                    interval_s=self.config.heartbeat_s,
                    ts=time.time(),
                    state={
                        "state": "busy" if busy >= self.config.slots else "idle",
                        "slots": self.config.slots,
                        "busy": busy,
                    },
                ),
            )
            seq += 1

    async def _watch_hive(self) -> None:
        # Its own loop, so that a send blocked on a full pipe to a dead hive cannot stop it.
        async for _ in periodic(self._hive.interval_s / 2):
            now = trio.current_time()
            self._hive.check(now)
            if self._hive.state is Liveness.LOST:
                self.finish(
                    WorkerExit.HIVE_LOST,
                    f"the hive at {self.config.hive} sent nothing for "
                    f"{self._hive.missed(now)} heartbeat intervals; exiting rather than "
                    "running without it",
                )
                return

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            self._stopped_by(signum)
            return

    def _stopped_by(self, signum: int) -> None:
        self.finish(WorkerExit.STOPPED, f"stopped by {signal.Signals(signum).name}")

    # ---- jobs ----------------------------------------------------------------------------------

    def _submit(self, submit: Submit) -> None:
        refusal = self._refusal(submit)
        if refusal is not None:
            code, why = refusal
            self._queue(Error(job_id="", code=code, message=why, ref=submit.ref))
            return
        assert isinstance(submit.op, Infer)
        deadline_s = submit.timeout_s or submit.op.default_deadline_s
        job = _Job(
            id=submit.job_id,
            op=submit.op,
            model=self._free.pop(),
            stream=TokenStream(trio.lowlevel.current_trio_token()),
            deadline_s=deadline_s,
            deadline=trio.current_time() + deadline_s,
        )
        self._jobs[job.id] = job
        self._queue(Accepted(job_id=job.id, ref=submit.ref, op=job.op.NAME, deadline_s=deadline_s))
        assert self._jobs_nursery is not None
        self._jobs_nursery.start_soon(self._run_job, job, name=f"job {job.id}")

    def _refusal(self, submit: Submit) -> tuple[ErrorCode, str] | None:
        worker = f"worker {self.config.worker_id}"
        if self.exit is not None:
            return ErrorCode.UNAVAILABLE, f"{worker} is stopping"
        if not isinstance(submit.op, Infer):
            return ErrorCode.INVALID_REQUEST, f"a worker runs infer jobs, not {submit.op.NAME}"
        if not submit.job_id:
            return ErrorCode.INVALID_REQUEST, "a worker runs jobs under its hive's job id; got none"
        if submit.job_id in self._jobs:
            return ErrorCode.CONFLICT, f"job {submit.job_id} is already running on {worker}"
        if not self._free:
            slots = self.config.slots
            return ErrorCode.BUSY, f"{worker} is busy: {slots} of {slots} slot(s) taken"
        return None

    def _stop_job(self, job: _Job, terminal: Message) -> None:
        """Stop a job from outside; its first terminal stands. The thread stops within a token."""
        if job.abort is None:
            job.abort = terminal
            job.stop_requested = time.perf_counter()
            job.sampled_at_stop = _sampled(job)
        job.stop.set()

    async def _run_job(self, job: _Job) -> None:
        current_job.set(
            JobContext(
                job_id=job.id,
                actor=str(Actor.WORKER),
                emit=self._queue,
                hive_id=self.config.hive_id,
                worker_id=self.config.worker_id,
            )
        )
        terminal: Message
        try:
            try:
                terminal = Done(job_id=job.id, result=await self._generate(job))
            except MeshError as exc:
                terminal = Error(job_id=job.id, code=exc.code, message=exc.message)
            except Exception as exc:
                log.exception("job %s failed", job.id)
                terminal = Error(
                    job_id=job.id,
                    code=ErrorCode.INTERNAL,
                    message=f"generation failed: {type(exc).__name__}: {exc}",
                )
            if job.abort is not None:
                terminal = job.abort
                self._narrate_stop(job)
        finally:
            # The slot is free before the terminal frame leaves: a hive that has seen the end of
            # a job may send the next one at once.
            del self._jobs[job.id]
            self._free.append(job.model)
        await self._outbox.send(encode(terminal))
        if self.exit is not None and not self._jobs:
            self._scope.cancel()

    async def _generate(self, job: _Job) -> dict[str, Any]:
        op, model = job.op, job.model
        from rbee_mesh.inference.backends import GenerationParams

        params = GenerationParams.from_op(op)
        prompt_tokens = await trio.to_thread.run_sync(model.count_tokens, op.prompt)
        narrate("generate", f"generating with {model.backend}, prompt {prompt_tokens} tokens")
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expire, job)
            nursery.start_soon(self._send_tokens, job)
            try:
                # Not abandoned on cancel: the model stays in use until the thread returns, and
                # the stop flag (set by every way a job ends early) bounds that to one token.
                await trio.to_thread.run_sync(generate_in_thread, job, params)
            except Exception as exc:
                failure = exc
            finally:
                job.stream.close()
                job.timer.cancel()
        if failure is not None:
            raise failure
        generated = _sampled(job)
        end = job.last_token if job.last_token is not None else time.perf_counter()
        duration = end - job.accepted
        rate = generated / duration if duration > 0 else 0.0
        narrate("generate", f"{generated} tokens in {duration:.3f} s ({rate:.1f} tok/s)")
        ttft = None if job.first_token is None else round(job.first_token - job.accepted, 6)
        return {
            "text": job.text,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "generated_tokens": generated,
                "ttft_s": ttft,
                "tokens_per_s": round(rate, 3),
                "duration_s": round(duration, 6),
            },
            "backend": model.backend,
            "worker": self.config.worker_id,
            "finish_reason": _finish_reason(job, generated, prompt_tokens),
        }

    async def _expire(self, job: _Job) -> None:
        with job.timer:
            await trio.sleep_until(job.deadline)
            message = f"infer did not finish within {job.deadline_s:g}s"
            self._stop_job(job, Error(job_id=job.id, code=ErrorCode.TIMEOUT, message=message))

    async def _send_tokens(self, job: _Job) -> None:
        """TOKEN frames from the job's stream: coalesced, in order, none lost or repeated."""
        seq = 0
        sent_at = -math.inf
        parts: list[str] = []
        while (batch := await job.stream.next_batch(sent_at + FLUSH_INTERVAL_S)) is not None:
            parts += batch
            # Once the job is stopped nobody wants its text: its terminal frame comes next.
            if not job.stop.is_set():
                try:
                    frames = encode(
                        Token(job_id=job.id, seq=seq, text="".join(batch), count=len(batch))
                    )
                except ProtocolError as exc:
                    message = f"the backend generated text that cannot be sent: {exc.message}"
                    error = Error(job_id=job.id, code=ErrorCode.INTERNAL, message=message)
                    self._stop_job(job, error)
                else:
                    await self._outbox.send(frames)
                    sent_at = trio.current_time()
            seq += len(batch)
        job.text = "".join(parts)

    def _narrate_stop(self, job: _Job) -> None:
        assert job.stop_requested is not None
        sampled = _sampled(job)
        after = sampled - job.sampled_at_stop
        waited_ms = (time.perf_counter() - job.stop_requested) * 1000
        why = "cancelled" if isinstance(job.abort, Cancelled) else "stopped"
        narrate(
            "generate",
            f"{why} after {sampled} tokens; generation stopped {after} token(s) after the "
            f"request, {waited_ms:.1f} ms later",
        )


def _sampled(job: _Job) -> int:
    """Tokens the backend has sampled for `job` so far (the pieces of text it yielded are fewer
    when it held text back: a character split over tokens, the possible start of a stop)."""
    if not job.generating:
        return 0  # the model's count is still the previous job's
    return job.model.generated_tokens


def _finish_reason(job: _Job, generated: int, prompt_tokens: int) -> str:
    """Why a generation that ran to its end ended, as far as the worker can know.

    A backend ends at max_tokens or a full context ("length"), at the end-of-sequence token, or
    at a stop sequence, and yields only text. Without stop sequences a shorter generation met
    the end-of-sequence token ("eos"); with them it may have met either ("end").
    """
    budget = min(job.op.max_tokens, job.model.n_ctx - prompt_tokens)
    if generated >= budget:
        return "length"
    return "end" if job.op.stop else "eos"


def _ident(value: str) -> str:
    try:
        return ident().load("the id", value)
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _device(value: str) -> str:
    if not DEVICE_PATTERN.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device (expected cpu or cuda:N)")
    return value


def _interval(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.01 <= seconds <= 3600:
        raise argparse.ArgumentTypeError("the heartbeat interval must be 0.01 to 3600 seconds")
    return seconds


def _slots(value: str) -> int:
    try:
        slots = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 1 <= slots <= MAX_SLOTS:
        raise argparse.ArgumentTypeError(f"slots must be 1 to {MAX_SLOTS}")
    return slots


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rbee_mesh.actors.worker",
        description="One rbee-mesh worker: serves one model for the hive that started it.",
    )
    parser.add_argument("--hive", required=True, help="the hive's worker endpoint (ipc or tcp)")
    parser.add_argument("--worker-id", required=True, type=_ident)
    parser.add_argument("--model", required=True, type=Path, help="the GGUF file to load")
    parser.add_argument("--device", required=True, type=_device, help="cpu or cuda:N")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="(default: auto)")
    parser.add_argument(
        "--slots", type=_slots, default=1, help="jobs run at once, each on its own context"
    )
    parser.add_argument("--hive-id", type=_ident, help="the hive's id, for narration")
    parser.add_argument("--heartbeat-s", type=_interval, default=1.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a worker until it is told to stop; returns its exit code (see WorkerExit)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s worker {args.worker_id} %(levelname)s %(message)s",
    )
    config = WorkerConfig(
        hive=args.hive,
        worker_id=args.worker_id,
        model=args.model,
        device=args.device,
        heartbeat_s=args.heartbeat_s,
        backend=args.backend,
        slots=args.slots,
        hive_id=args.hive_id or "",
    )
    # SIGTERM is how the pool stops a worker, and it can come outside trio's signal receiver:
    # before it is in place, or after it is gone (the worker already leaving on the hive's
    # DISCONNECT, which the pool sends just before SIGTERM). It still means "stop", never "die
    # by signal": the exit code says the worker stopped on purpose.
    early: list[int] = []
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda received, _frame: early.append(received))
    code, reason = trio.run(Worker(config).run, early)
    # From here the process only leaves. Python's finalisation resets Python-level handlers to
    # SIG_DFL (a late SIGTERM would then kill it) but leaves SIG_IGN alone.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if code is WorkerExit.STOPPED:
        log.info("exiting: %s", reason)
    else:
        # The last line on stderr: the pool reads it back as the reason this worker ended.
        print(reason, file=sys.stderr, flush=True)
    return int(code)
