"""The hive's worker processes: start them, watch them, stop them, and never leave one behind.

    async with open_worker_pool("ipc:///state/hive/workers.sock", log_dir=logs) as pool:
        record = await pool.spawn(model_id="tiny", model_path=path, device="cpu", slots=2)
        result = await pool.run_job(record.id, job.id, infer_op, relay=forward, timeout_s=60)
        await pool.delete(record.id)

The pool owns one Listener (ROUTER) that its workers connect to, and three kinds of task:

- a **watcher per process** awaits its exit through a pidfd and reaps it (so there is never a
  zombie), then records how it ended: stopped (the pool asked) or dead (exit code or signal,
  with the last line the worker wrote on stderr). Its wait is shielded from cancellation, so the
  pool cannot finish before every child it started has been reaped;
- a **receive loop** takes READY (a worker is up) and HEARTBEAT from the workers, and routes
  each job's frames to the `run_job` waiting for them, by job id, without unpacking them;
- a **heartbeat loop** sends each worker a HEARTBEAT every interval (a worker exits by itself
  after three silent intervals) and kills a worker that has sent nothing for three intervals.

Jobs. `run_job` sends SUBMIT under the hive's job id to one worker and relays the worker's
NARRATION, DATA and TOKEN frames unopened (`peek_route`), as the queen relays a hive's; only the
terminal frame is decoded, into the result or a MeshError. The pool counts each worker's jobs
itself (it is the only one that submits to its workers, and heartbeats lag): a worker with every
slot taken is BUSY, and `idle_workers` lists those with a free slot. A slot is taken from SUBMIT
until the worker's terminal frame, also when `run_job` is cancelled first (it sends CANCEL, and
the worker frees the slot within one token). A worker that dies or falls silent ends its jobs
with WORKER_LOST: at once when its exit is seen, at the latest when it is declared lost.

No worker outlives its hive:

- on exit of the context manager every worker gets DISCONNECT and SIGTERM, SIGKILL after a
  grace period, and is reaped;
- if the hive is killed outright (kill -9, OOM killer), the kernel SIGKILLs each worker:
  workers are started with PR_SET_PDEATHSIG. The kernel sends that signal when the *thread*
  that forked the child exits, not the process, and trio.lowlevel.open_process forks in a
  worker thread that trio retires after 10 s idle, which SIGKILLs the child 10 s after it
  started (measured). So the pool forks from the thread running trio, which lives as long as
  the pool, and awaits the exit itself through a pidfd;
- if the hive hangs instead, the workers stop hearing from it and exit (code 3).

Workers run in their own session (start_new_session), so a Ctrl-C at the hive's terminal reaches
the hive only, and the hive stops them in order. Each worker's stdout and stderr go to
`<log_dir>/<worker id>.log`: a file, not a pipe that could fill up and stall the worker.
"""

from __future__ import annotations

import builtins
import ctypes
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any

import trio
from trio_util import AsyncValue, periodic

from rbee_mesh.actors.narration import current_job, narrate
from rbee_mesh.actors.runtime import CANCEL_CONFIRM_S, single_errors
from rbee_mesh.actors.worker.worker import BACKENDS, DEVICE_PATTERN, MAX_SLOTS, WorkerExit
from rbee_mesh.protocol import (
    TERMINAL_KINDS,
    Actor,
    Cancel,
    Cancelled,
    Disconnect,
    Done,
    Error,
    ErrorCode,
    Heartbeat,
    Infer,
    Kind,
    Level,
    MeshError,
    Message,
    PeerLiveness,
    ProtocolError,
    Ready,
    Submit,
    decode,
    encode,
    peek_route,
)
from rbee_mesh.protocol.liveness import Liveness
from rbee_mesh.transport import (
    EndpointError,
    Listener,
    PeerBusy,
    PeerUnreachable,
    TransportClosed,
    local_endpoint_for,
    open_listener,
    parse_endpoint,
)

log = logging.getLogger("rbee_mesh.worker_pool")

#: A job's frames passed on to its submitter unopened.
_RELAYED = frozenset({Kind.NARRATION, Kind.DATA, Kind.TOKEN})
#: Frames of one job buffered for its `run_job`; when full, the receive loop waits for it.
JOB_BACKLOG = 1_000
#: How long a job's SUBMIT or CANCEL may wait for a worker whose pipe is full.
SEND_PATIENCE_S = 1.0
#: Heartbeat intervals after which a silent worker has certainly been declared lost (3.5).
LOST_AFTER = 4


class WorkerState(StrEnum):
    """Where a worker is in its life. STOPPED and DEAD are final: the process has been reaped."""

    #: The process runs and loads its model; no READY yet.
    STARTING = "starting"
    #: READY received, with a free slot.
    READY = "ready"
    #: Every slot runs a job.
    BUSY = "busy"
    #: The pool asked it to stop and waits for it to exit.
    STOPPING = "stopping"
    #: It exited after the pool asked it to.
    STOPPED = "stopped"
    #: It exited without being asked, or was killed for falling silent.
    DEAD = "dead"


_ALIVE_FOR_JOBS = (WorkerState.READY, WorkerState.BUSY)


@dataclass(frozen=True)
class WorkerRecord:
    """A worker as the pool saw it at one moment (a snapshot: it does not change afterwards)."""

    id: str
    #: The catalog id of its model.
    model: str
    model_path: str
    device: str
    pid: int
    state: WorkerState
    #: Wall-clock time the process was started, and it reported READY.
    started: float
    ready_at: float | None
    #: How the process ended, once it has: an exit code, or the name of the signal that killed it.
    exit_code: int | None
    signal: str | None
    #: Why it stopped or died, for a person.
    reason: str
    #: Seconds since the last frame from it (None before READY).
    last_heartbeat_age_s: float | None
    #: Where its stdout and stderr go.
    log_path: str
    #: What it said about itself in READY: pid, backend, load_s, slots, arch, params, ...
    info: dict[str, Any]
    #: Jobs it can run at once, and jobs it runs now.
    slots: int
    busy: int

    def to_record(self) -> dict[str, Any]:
        """A msgpack-able dict of every field."""
        record = asdict(self)
        record["state"] = str(self.state)
        return record


class _Process:
    """A child process forked from the calling thread, whose exit is awaited through a pidfd."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except OSError:
            # Without a pidfd there is no way to await this child; do not leave it running.
            popen.kill()
            popen.wait()
            raise

    def send_signal(self, signum: signal.Signals) -> None:
        """Signal the process unless it has been reaped (then its pid may belong to another)."""
        # Popen.send_signal checks for that; only this pool reaps its children.
        self.popen.send_signal(signum)

    async def wait(self) -> int:
        """Wait for the exit, reap the process, and return its Popen-style return code."""
        await trio.lowlevel.wait_readable(self._pidfd)
        code = self.popen.wait()  # at once: the pidfd is readable once the child has exited
        trio.lowlevel.notify_closing(self._pidfd)
        os.close(self._pidfd)
        return code


# Resolved before any fork: the child between fork and exec should only make system calls.
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int
_PR_SET_PDEATHSIG = 1


def _die_with_this_thread(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn that makes the kernel SIGKILL the child when its forking thread exits."""

    def preexec() -> None:
        if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        # If the parent died between fork and prctl, no signal will ever come: die now.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _start_process(argv: list[str], log_path: Path) -> _Process:
    """Fork and exec `argv` from this thread, its output appended to `log_path`.

    Blocking (a fork and an exec, milliseconds) on purpose: PR_SET_PDEATHSIG is tied to the
    forking thread, and this one (trio's) lives as long as the pool. See the module docstring.
    """
    with log_path.open("ab") as log_file:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            preexec_fn=_die_with_this_thread(os.getpid()),
        )
    return _Process(popen)


def _last_line(path: Path) -> str:
    """The last non-empty line of a (small, local) log file: a worker's reason for exiting."""
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - 4096))
            tail = file.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _describe_exit(code: int) -> tuple[int | None, str | None, str]:
    """(exit code, signal name, description) of a Popen return code."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return None, name, f"killed by {name}"
    return code, None, f"exited with code {code}"


@dataclass(eq=False)
class _PoolJob:
    """A job sent to a worker: from SUBMIT until the worker's terminal frame or its end."""

    id: str
    #: Where the receive loop puts the job's frames; None once its `run_job` stopped reading.
    frames: trio.MemorySendChannel[Sequence[bytes]] | None
    #: Why the job ended without a terminal frame: the worker died or fell silent.
    lost: MeshError | None = None


@dataclass(eq=False)
class _Worker:
    """The pool's own, changing view of one worker process."""

    id: str
    model: str
    model_path: Path
    device: str
    process: _Process
    log_path: Path
    started: float = field(default_factory=time.time)
    started_clock: float = field(default_factory=trio.current_time)
    state: WorkerState = WorkerState.STARTING
    peer: bytes | None = None
    liveness: PeerLiveness | None = None
    ready_at: float | None = None
    ready_clock: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    signal: str | None = None
    reason: str = ""
    #: Why the pool is ending it (set before it signals the process), so that the exit is
    #: explained by its cause rather than by the signal alone.
    cause: str = ""
    #: Set once the process has been reaped.
    exited: trio.Event = field(default_factory=trio.Event)
    #: Set on READY or exit: what spawn() waits for.
    settled: trio.Event = field(default_factory=trio.Event)
    slots: int = 1
    #: Jobs sent to it and not ended, by job id: each holds one slot.
    jobs: dict[str, _PoolJob] = field(default_factory=dict)

    def snapshot(self) -> WorkerRecord:
        age = None
        if self.liveness is not None and not self.exited.is_set():
            age = round(trio.current_time() - self.liveness.last_seen, 3)
        return WorkerRecord(
            id=self.id,
            model=self.model,
            model_path=str(self.model_path),
            device=self.device,
            pid=self.process.pid,
            state=self.state,
            started=self.started,
            ready_at=self.ready_at,
            exit_code=self.exit_code,
            signal=self.signal,
            reason=self.reason,
            last_heartbeat_age_s=age,
            log_path=str(self.log_path),
            info=dict(self.info),
            slots=self.slots,
            busy=len(self.jobs),
        )


class WorkerPool:
    """The hive's workers. Made by `open_worker_pool`, which runs its tasks."""

    def __init__(
        self,
        listener: Listener,
        nursery: trio.Nursery,
        *,
        heartbeat_s: float,
        log_dir: Path,
        name: str,
    ) -> None:
        self.listener = listener
        self.heartbeat_s = heartbeat_s
        self.log_dir = log_dir
        self.name = name
        #: Bumped on every change of a worker's state; `await pool.revision.wait_value(pred)`
        #: waits for a condition on the pool without polling.
        self.revision = AsyncValue(0)
        self._nursery = nursery
        self._workers: dict[str, _Worker] = {}
        self._peers: dict[bytes, _Worker] = {}
        self._closing = False

    @property
    def endpoint(self) -> str:
        """The endpoint workers connect to (a wildcard bind resolved to loopback)."""
        return local_endpoint_for(self.listener.endpoint)

    # ---- the API the hive uses ------------------------------------------------------------------

    async def spawn(
        self,
        *,
        model_id: str,
        model_path: Path,
        device: str,
        backend: str = "auto",
        slots: int = 1,
        ready_timeout_s: float = 120,
    ) -> WorkerRecord:
        """Start a worker process for `model_path` on `device`; return once it is READY.

        `backend` is auto, llama-cpp or ctransformers; `slots` how many jobs it runs at once
        (each slot loads its own context). Raises MeshError: INVALID_REQUEST for a bad device,
        backend or slot count or a model the worker cannot load (with the worker's reason),
        WORKER_LOST if it exits otherwise, TIMEOUT (after killing it) if it is not ready within
        `ready_timeout_s`, UNAVAILABLE if the pool is closing or the process cannot be started.
        A worker that did not become ready is not kept.
        """
        if self._closing:
            raise MeshError(ErrorCode.UNAVAILABLE, "the hive is stopping; it starts no workers")
        if not DEVICE_PATTERN.fullmatch(device):
            raise MeshError(ErrorCode.INVALID_REQUEST, f"{device!r} is not cpu or cuda:N")
        if backend not in BACKENDS:
            raise MeshError(
                ErrorCode.INVALID_REQUEST,
                f"{backend!r} is not a backend (expected {', '.join(BACKENDS)})",
            )
        if not 1 <= slots <= MAX_SLOTS:
            raise MeshError(ErrorCode.INVALID_REQUEST, f"slots must be 1 to {MAX_SLOTS}")
        worker_id = f"w-{secrets.token_hex(4)}"
        log_path = self.log_dir / f"{worker_id}.log"
        narrate("worker_spawn", f"starting worker {worker_id}: model {model_id} on {device}")
        argv = [
            sys.executable,
            "-m",
            "rbee_mesh.actors.worker",
            "--hive",
            self.endpoint,
            "--worker-id",
            worker_id,
            "--model",
            str(model_path),
            "--device",
            device,
            "--backend",
            backend,
            "--slots",
            str(slots),
            "--hive-id",
            self.name,
            "--heartbeat-s",
            repr(self.heartbeat_s),
        ]
        try:
            process = _start_process(argv, log_path)
        except (OSError, subprocess.SubprocessError) as exc:
            raise MeshError(
                ErrorCode.UNAVAILABLE, f"cannot start a worker process: {exc}"
            ) from None
        worker = _Worker(
            id=worker_id,
            model=model_id,
            model_path=model_path,
            device=device,
            process=process,
            log_path=log_path,
        )
        self._workers[worker_id] = worker
        self._nursery.start_soon(self._watch_process, worker, name=f"worker {worker_id}")
        self._changed()
        narrate(
            "worker_spawn",
            f"worker {worker_id} started as pid {process.pid}; loading model {model_path.name}",
        )
        try:
            with trio.move_on_after(ready_timeout_s):
                await worker.settled.wait()
        except BaseException:
            # Cancelled (the job's deadline, its keeper gone): a worker nobody waits for must not
            # stay behind.
            with trio.CancelScope(shield=True):
                await self._kill(worker, "its spawn was cancelled")
            self._workers.pop(worker_id, None)
            raise
        if worker.state in _ALIVE_FOR_JOBS:
            assert worker.ready_clock is not None
            load_s = worker.info.get("load_s")
            loaded = (
                f"model loaded in {load_s:.3f}s with {worker.info.get('backend', '?')}, "
                if isinstance(load_s, float)
                else ""
            )
            narrate(
                "worker_spawn",
                f"worker {worker_id} ready in {worker.ready_clock - worker.started_clock:.2f}s "
                f"({loaded}pid {process.pid})",
            )
            return worker.snapshot()
        timed_out = not worker.settled.is_set()
        if timed_out:
            with trio.CancelScope(shield=True):
                await self._kill(worker, f"it was not ready within {ready_timeout_s:g}s")
        self._workers.pop(worker_id, None)
        raise self._spawn_error(worker, timed_out=timed_out)

    async def delete(self, worker_id: str, *, grace_s: float = 5.0) -> WorkerRecord:
        """Stop a worker and forget it: DISCONNECT, SIGTERM, SIGKILL after `grace_s`, reaped.

        A worker that is already dead is just forgotten. Returns its final record; raises
        MeshError(NOT_FOUND) for an unknown id. Runs to the end even if cancelled (a stop half
        done would leave a process without an owner), which takes at most `grace_s` and a kill.
        """
        worker = self._find(worker_id)
        with trio.CancelScope(shield=True):
            if worker.state is WorkerState.STOPPING:
                await worker.exited.wait()
            elif not worker.exited.is_set():
                await self._stop(worker, grace_s=grace_s, cause="deleted", action="worker_delete")
        self._workers.pop(worker_id, None)
        self._changed()
        return worker.snapshot()

    def list(self) -> list[WorkerRecord]:
        """Every worker the pool knows (including dead ones, until deleted), oldest first."""
        return [worker.snapshot() for worker in self._workers.values()]

    def get(self, worker_id: str) -> WorkerRecord:
        """One worker's record; MeshError(NOT_FOUND) if there is no such worker."""
        return self._find(worker_id).snapshot()

    def workers_using(self, model_id: str) -> builtins.list[str]:
        """Ids of the workers whose process runs (so has the file open) for model `model_id`."""
        return [
            worker.id
            for worker in self._workers.values()
            if worker.model == model_id and not worker.exited.is_set()
        ]

    def idle_workers(self, model_id: str | None = None) -> builtins.list[WorkerRecord]:
        """Ready workers with a free slot, for model `model_id` (any model if None), the least
        loaded first."""
        idle = [
            worker
            for worker in self._workers.values()
            if worker.state is WorkerState.READY
            and not worker.cause
            and len(worker.jobs) < worker.slots
            and (model_id is None or worker.model == model_id)
        ]
        idle.sort(key=lambda worker: len(worker.jobs) / worker.slots)
        return [worker.snapshot() for worker in idle]

    async def run_job(
        self,
        worker_id: str,
        job_id: str,
        op: Infer,
        relay: Callable[[Sequence[bytes]], None],
        timeout_s: float,
    ) -> Any:
        """Run `op` as job `job_id` on worker `worker_id`; return its result.

        The worker's NARRATION, DATA and TOKEN frames go to `relay` as they arrive, unopened.
        Raises MeshError: the worker's ERROR as it is; CANCELLED when the worker cancelled the
        job; WORKER_LOST when the worker dies (at once) or falls silent (within the liveness
        window) during the job; NOT_FOUND, UNAVAILABLE (not ready, stopping, dead), BUSY (every
        slot taken) or CONFLICT (the job id runs already) before anything is sent; TIMEOUT if
        the worker, which enforces `timeout_s` itself, has not ended the job a liveness window
        after it. Cancelled (trio), it sends CANCEL to the worker before re-raising.
        """
        worker = self._find(worker_id)
        self._check_can_take(worker, job_id)
        send, receive = trio.open_memory_channel[Sequence[bytes]](JOB_BACKLOG)
        job = _PoolJob(id=job_id, frames=send)
        worker.jobs[job_id] = job
        self._load_changed(worker)
        submitted = ended = False
        with receive:
            try:
                submit = Submit(job_id=job_id, ref=job_id, op=op, timeout_s=timeout_s)
                await self._send_job_frame(worker, submit)
                submitted = True
                # The worker ends the job at its deadline; this only bounds a wait on a worker
                # that, alive and heartbeating, would not.
                with trio.move_on_after(timeout_s + LOST_AFTER * self.heartbeat_s):
                    async for frames in receive:
                        kind, _ = peek_route(frames)
                        if kind in _RELAYED:
                            relay(frames)
                        elif kind in TERMINAL_KINDS:
                            ended = True
                            return self._outcome(worker, frames)
                    ended = True
                    raise job.lost or MeshError(
                        ErrorCode.WORKER_LOST, f"worker {worker.id} went away during the job"
                    )
                raise MeshError(
                    ErrorCode.TIMEOUT,
                    f"worker {worker.id} did not end job {job_id} after its {timeout_s:g}s",
                )
            finally:
                if not submitted:
                    self._release(worker, job)
                elif not ended:
                    # Cancelled here (the job's deadline, its submitter gone): the worker must
                    # stop too, and this job ends when the worker says so (its slot is free
                    # then), so that whoever is told "ended" may use the worker at once.
                    with trio.CancelScope(shield=True), suppress(MeshError):
                        cancel = Cancel(job_id=job_id, reason="cancelled at the hive")
                        await self._send_job_frame(worker, cancel)
                        with trio.move_on_after(CANCEL_CONFIRM_S):
                            async for frames in receive:
                                if peek_route(frames)[0] in TERMINAL_KINDS:
                                    break
                job.frames = None

    # ---- internals ----------------------------------------------------------------------------

    def _find(self, worker_id: str) -> _Worker:
        worker = self._workers.get(worker_id)
        if worker is None:
            raise MeshError(ErrorCode.NOT_FOUND, f"no worker {worker_id} on this hive")
        return worker

    def _check_can_take(self, worker: _Worker, job_id: str) -> None:
        if worker.state not in _ALIVE_FOR_JOBS or worker.cause or worker.peer is None:
            why = f": {worker.reason or worker.cause}" if worker.reason or worker.cause else ""
            raise MeshError(
                ErrorCode.UNAVAILABLE, f"worker {worker.id} is {worker.state}{why}; it runs no jobs"
            )
        if job_id in worker.jobs:
            raise MeshError(
                ErrorCode.CONFLICT, f"job {job_id} is already running on worker {worker.id}"
            )
        if len(worker.jobs) >= worker.slots:
            raise MeshError(
                ErrorCode.BUSY,
                f"worker {worker.id} is busy: {len(worker.jobs)} of {worker.slots} slot(s) taken",
            )

    def _load_changed(self, worker: _Worker) -> None:
        """A job was added to or removed from `worker`: BUSY when every slot is taken."""
        if worker.state in _ALIVE_FOR_JOBS:
            full = len(worker.jobs) >= worker.slots
            worker.state = WorkerState.BUSY if full else WorkerState.READY
        self._changed()

    def _release(self, worker: _Worker, job: _PoolJob) -> None:
        """The job no longer holds a slot of `worker`."""
        if worker.jobs.get(job.id) is job:
            del worker.jobs[job.id]
            self._load_changed(worker)

    def _end_jobs(self, worker: _Worker, error: MeshError) -> None:
        """End every job of `worker` with `error`: it will send no terminal frame for them."""
        for job in worker.jobs.values():
            job.lost = error
            if job.frames is not None:
                job.frames.close()  # its run_job reads what came before, then raises `error`
        worker.jobs.clear()
        self._load_changed(worker)

    @staticmethod
    def _outcome(worker: _Worker, frames: Sequence[bytes]) -> Any:
        """The result of a job from its terminal frame, or its MeshError."""
        try:
            terminal = decode(frames)
        except ProtocolError as exc:
            raise MeshError(
                ErrorCode.INTERNAL,
                f"worker {worker.id} ended a job with a malformed frame: {exc.message}",
            ) from None
        match terminal:
            case Done():
                return terminal.result
            case Error():
                raise MeshError(terminal.code, terminal.message)
            case Cancelled():
                raise MeshError(ErrorCode.CANCELLED, f"worker {worker.id}: {terminal.reason}")
        raise MeshError(
            ErrorCode.INTERNAL, f"worker {worker.id} ended a job with {terminal.KIND.name}"
        )

    async def _send_job_frame(self, worker: _Worker, message: Message) -> None:
        """Send a job's frame, waiting up to SEND_PATIENCE_S while the worker's pipe is full.

        Raises MeshError: WORKER_LOST if the worker is gone, UNAVAILABLE if it reads nothing.
        """
        if worker.peer is None or worker.exited.is_set():
            raise MeshError(ErrorCode.WORKER_LOST, f"worker {worker.id} is gone")
        frames = encode(message)
        backoff = 0.001
        with trio.move_on_after(SEND_PATIENCE_S):
            while True:
                try:
                    await self.listener.send(worker.peer, frames)
                    return
                except PeerBusy:
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 0.05)
                except (PeerUnreachable, TransportClosed) as exc:
                    raise MeshError(
                        ErrorCode.WORKER_LOST, f"cannot reach worker {worker.id}: {exc}"
                    ) from None
        raise MeshError(
            ErrorCode.UNAVAILABLE,
            f"worker {worker.id} has read nothing for {SEND_PATIENCE_S:g}s",
        )

    def _changed(self) -> None:
        self.revision.value += 1

    def _spawn_error(self, worker: _Worker, *, timed_out: bool) -> MeshError:
        where = f"worker {worker.id} (pid {worker.process.pid})"
        if timed_out:
            tail = _last_line(worker.log_path)
            return MeshError(
                ErrorCode.TIMEOUT,
                f"{where} was killed: {worker.cause}"
                + (f"; the last line of its log: {tail}" if tail else ""),
            )
        if worker.state is WorkerState.STOPPED:
            return MeshError(
                ErrorCode.UNAVAILABLE, f"{where} was stopped before it was ready: {worker.reason}"
            )
        # The worker's documented "cannot load this model": the request named an unusable file.
        code = (
            ErrorCode.INVALID_REQUEST
            if worker.exit_code == WorkerExit.LOAD_FAILED
            else ErrorCode.WORKER_LOST
        )
        return MeshError(code, f"{where} failed to start: {worker.reason}")

    async def _watch_process(self, worker: _Worker) -> None:
        # This task outlives the job that spawned the worker: its narration goes to the log.
        current_job.set(None)
        # Shielded: the process is reaped whatever happens, and the pool's nursery cannot end
        # while a child it started is still running.
        with trio.CancelScope(shield=True):
            code = await worker.process.wait()
        worker.exit_code, worker.signal, how = _describe_exit(code)
        if worker.state is WorkerState.STOPPING:
            worker.state = WorkerState.STOPPED
            worker.reason = f"{worker.cause} ({how})"
        else:
            worker.state = WorkerState.DEAD
            if worker.cause:
                worker.reason = f"{worker.cause} ({how})"
            else:
                last_words = _last_line(worker.log_path) if code > 0 else ""
                worker.reason = f"{how}: {last_words}" if last_words else how
            if worker.ready_at is not None:
                log.warning(
                    "worker %s (pid %d, model %s) died: %s",
                    worker.id,
                    worker.process.pid,
                    worker.model,
                    worker.reason,
                )
        if worker.peer is not None:
            self._peers.pop(worker.peer, None)
        if worker.jobs:
            how_it_ended = "was stopped" if worker.state is WorkerState.STOPPED else "died"
            self._end_jobs(
                worker,
                MeshError(
                    ErrorCode.WORKER_LOST, f"worker {worker.id} {how_it_ended}: {worker.reason}"
                ),
            )
        worker.exited.set()
        worker.settled.set()
        self._changed()

    async def _kill(self, worker: _Worker, cause: str) -> None:
        """SIGKILL a worker and wait until it is reaped."""
        if not worker.exited.is_set():
            worker.cause = worker.cause or cause
            worker.process.send_signal(signal.SIGKILL)
            await worker.exited.wait()

    async def _stop(self, worker: _Worker, *, grace_s: float, cause: str, action: str) -> None:
        """DISCONNECT and SIGTERM, then SIGKILL after `grace_s`; returns once it is reaped."""
        worker.state = WorkerState.STOPPING
        worker.cause = cause
        self._changed()
        pid = worker.process.pid
        if worker.peer is not None:
            await self._send(worker, Disconnect(job_id="", sender=self.name, reason=cause))
        worker.process.send_signal(signal.SIGTERM)
        narrate(action, f"stopping worker {worker.id} (pid {pid}): sent DISCONNECT and SIGTERM")
        with trio.move_on_after(grace_s):
            await worker.exited.wait()
        if not worker.exited.is_set():
            narrate(
                action,
                f"worker {worker.id} did not stop within {grace_s:g}s; sending SIGKILL",
                level=Level.WARN,
            )
            worker.process.send_signal(signal.SIGKILL)
            await worker.exited.wait()
        narrate(action, f"worker {worker.id} stopped: {worker.reason}")

    async def _send(self, worker: _Worker, message: Message) -> None:
        assert worker.peer is not None
        try:
            await self.listener.send(worker.peer, encode(message))
        except (PeerBusy, PeerUnreachable, TransportClosed) as exc:
            # Heartbeats and goodbyes only: a worker that misses them is handled by liveness
            # (or has already gone).
            log.debug("could not send %s to worker %s: %r", message.KIND.name, worker.id, exc)

    async def _receive_loop(self) -> None:
        while True:
            try:
                peer, frames = await self.listener.receive()
            except TransportClosed:
                return
            now = trio.current_time()
            try:
                kind, job_id = peek_route(frames)
            except ProtocolError as exc:
                log.warning("ignored a malformed frame on the worker socket: %s", exc)
                continue
            worker = self._peers.get(peer)
            if worker is not None and worker.liveness is not None:
                worker.liveness.seen(now)
            if job_id:
                # A job's frames pass unopened: only the job's own run_job decodes its end.
                if worker is None:
                    log.warning("ignored %s from a peer that sent no READY", kind.name)
                else:
                    await self._route(worker, kind, job_id, frames)
                continue
            try:
                message = decode(frames)
            except ProtocolError as exc:
                log.warning("ignored a malformed frame on the worker socket: %s", exc)
                continue
            if isinstance(message, Ready):
                self._on_ready(peer, message, now)
                continue
            if worker is None or worker.liveness is None:
                log.warning("ignored %s from a peer that sent no READY", message.KIND.name)
                continue
            match message:
                case Heartbeat():
                    worker.liveness.interval_s = message.interval_s
                case Error() if message.ref in worker.jobs:
                    # The worker refused a SUBMIT (BUSY, ...): that ends the job.
                    await self._route(worker, Kind.ERROR, message.ref, frames)
                case Error():
                    log.warning("worker %s refused a frame: %s", worker.id, message.message)
                case Disconnect():
                    log.info("worker %s is leaving: %s", worker.id, message.reason or "no reason")
                case _:
                    log.warning("ignored %s from worker %s", message.KIND.name, worker.id)

    async def _route(
        self, worker: _Worker, kind: Kind, job_id: str, frames: Sequence[bytes]
    ) -> None:
        """Hand a job's frame to its run_job; a terminal frame frees the job's slot."""
        job = worker.jobs.get(job_id)
        if job is None:
            log.debug(
                "ignored %s for job %s: not running on worker %s", kind.name, job_id, worker.id
            )
            return
        if kind in TERMINAL_KINDS:
            self._release(worker, job)
        if job.frames is None:  # its run_job has left: only the slot mattered
            return
        # Its run_job may leave, or the worker be declared lost, while this waits for room.
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await job.frames.send(frames)

    def _on_ready(self, peer: bytes, message: Ready, now: float) -> None:
        worker = self._workers.get(message.sender)
        if (
            worker is None
            or worker.state is not WorkerState.STARTING
            or message.role is not Actor.WORKER
            or message.info.get("pid") != worker.process.pid
        ):
            # Only the process this pool started under that id, and only once.
            log.warning("refused READY from %r: not a worker this pool is starting", message.sender)
            return
        worker.peer = peer
        self._peers[peer] = worker
        worker.liveness = PeerLiveness(self.heartbeat_s, now)
        worker.info = dict(message.info)
        slots = message.info.get("slots", 1)
        worker.slots = slots if isinstance(slots, int) and 1 <= slots <= MAX_SLOTS else 1
        worker.ready_at = time.time()
        worker.ready_clock = now
        worker.state = WorkerState.READY
        worker.settled.set()
        self._changed()

    async def _heartbeat_loop(self) -> None:
        seq = 0
        async for _ in periodic(self.heartbeat_s):
            now = trio.current_time()
            for worker in list(self._workers.values()):
                if worker.liveness is None or worker.state not in _ALIVE_FOR_JOBS or worker.cause:
                    continue
                worker.liveness.check(now)
                if worker.liveness.state is Liveness.LOST:
                    missed = worker.liveness.missed(now)
                    worker.cause = f"lost: it sent nothing for {missed} heartbeat intervals"
                    log.warning("worker %s %s; killing it", worker.id, worker.cause)
                    self._end_jobs(
                        worker,
                        MeshError(
                            ErrorCode.WORKER_LOST,
                            f"worker {worker.id} stopped answering: nothing heard for {missed} "
                            "heartbeat intervals",
                        ),
                    )
                    worker.process.send_signal(signal.SIGKILL)
                    continue
                await self._send(
                    worker,
                    Heartbeat(
                        job_id="",
                        sender=self.name,
                        seq=seq,
                        interval_s=self.heartbeat_s,
                        ts=time.time(),
                    ),
                )
            seq += 1

    async def _shutdown(self, grace_s: float) -> None:
        """Stop every worker at once (each: DISCONNECT, SIGTERM, grace, SIGKILL) and reap it."""
        self._closing = True
        async with trio.open_nursery() as nursery:
            for worker in self._workers.values():
                if worker.state is WorkerState.STOPPING:
                    nursery.start_soon(worker.exited.wait)
                elif not worker.exited.is_set():
                    stop = partial(
                        self._stop,
                        worker,
                        grace_s=grace_s,
                        cause="the hive is stopping",
                        action="worker_stop",
                    )
                    nursery.start_soon(stop)


@asynccontextmanager
async def open_worker_pool(
    endpoint: str,
    *,
    heartbeat_s: float = 1.0,
    log_dir: Path | None = None,
    grace_s: float = 5.0,
    name: str = "hive",
) -> AsyncIterator[WorkerPool]:
    """A worker pool listening on `endpoint` (ipc:// or tcp://) for the duration of the block.

    `log_dir` receives one log file per worker; without it the pool uses a temporary directory
    and removes it on exit. `name` is the sender id of the pool's frames (the hive's id). On
    exit every worker is stopped (SIGKILL after `grace_s`) and reaped, even when the block is
    cancelled.
    """
    scheme = parse_endpoint(endpoint).scheme
    if scheme not in ("ipc", "tcp"):
        raise EndpointError(
            f"workers are separate processes and cannot reach {endpoint}: use ipc:// or tcp://"
        )
    own_log_dir = log_dir is None
    logs = Path(tempfile.mkdtemp(prefix="rbee-mesh-workers-")) if log_dir is None else log_dir
    logs.mkdir(parents=True, exist_ok=True)
    try:
        with single_errors():
            async with await open_listener(endpoint) as listener, trio.open_nursery() as nursery:
                pool = WorkerPool(
                    listener, nursery, heartbeat_s=heartbeat_s, log_dir=logs, name=name
                )
                nursery.start_soon(pool._receive_loop)
                nursery.start_soon(pool._heartbeat_loop)
                try:
                    yield pool
                finally:
                    with trio.CancelScope(shield=True):
                        await pool._shutdown(grace_s)
                    nursery.cancel_scope.cancel()
    finally:
        if own_log_dir:
            shutil.rmtree(logs, ignore_errors=True)
