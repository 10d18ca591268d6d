"""The hive's worker processes: start them, watch them, run jobs on them, stop them, and never
leave one behind.

    async with open_worker_pool("ipc://@rbee-mesh/hive-a/workers", log_dir=logs) as pool:
        record = await pool.spawn(model_id="tiny", model_path=path, device="cpu", slots=2)
        result = await pool.run_job(record.id, job.id, infer_op, relay=job.relay, timeout_s=60)
        await pool.delete(record.id)

Each worker serves its jobs on a Unix socket of its own, `<prefix>.<worker id>`, with the one job
server; the pool talks to each through the one job client (`actors/jobclient.py`), exactly as the
queen talks to each hive: READY until the worker answers (once its model is loaded), heartbeats
both ways, and jobs forwarded one hop down (`forward`), their NARRATION, DATA and TOKEN frames
relayed unopened. Per worker the pool also has a **watcher** that awaits the process's exit
through a pidfd and reaps it (so there is never a zombie), then records how it ended: stopped
(the pool asked) or dead (exit code or signal, with the last line the worker wrote on stderr). Its
wait is shielded from cancellation, so the pool cannot finish before every child it started has
been reaped.

Jobs. The pool counts each worker's jobs itself (it is the only one that submits to its workers,
and heartbeats lag): a worker with every slot taken is BUSY, refused before anything is sent, and
`idle_workers` lists those with a free slot. A slot is taken from SUBMIT until the worker's
terminal frame, also when `run_job` is cancelled first (the worker is told to cancel, and frees
the slot within one token). A worker that dies or falls silent ends its jobs with WORKER_LOST: at
once when its exit is seen, and when it is declared lost (then it is killed).

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
import contextlib
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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any

import trio
from trio_util import AsyncValue

from rbee_mesh.actors.heartbeat import HeartbeatSchedule
from rbee_mesh.actors.jobclient import JobClient, Relay, forward
from rbee_mesh.actors.narration import current_job, narrate
from rbee_mesh.actors.runtime import single_errors
from rbee_mesh.actors.trust import Trust
from rbee_mesh.actors.worker.worker import WorkerExit
from rbee_mesh.protocol import (
    Actor,
    ErrorCode,
    Infer,
    Level,
    Liveness,
    MeshError,
    Ready,
    WorkerSpawn,
)
from rbee_mesh.protocol.constants import DEFAULT_SLOTS, MAX_SLOTS, MAX_WORKERS_PER_HIVE
from rbee_mesh.protocol.operations import WORKER_DEVICE
from rbee_mesh.transport import EndpointError, parse_endpoint
from rbee_mesh.transport.curve import ClientKeys, Keypair

log = logging.getLogger("rbee_mesh.worker_pool")


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


class ModelUnloadable(MeshError):
    """A worker could not load its model file (INVALID_REQUEST): the file, not the machine, is
    the problem (a backend's refusal, an architecture no backend here builds)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INVALID_REQUEST, message)


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

    def summary(self) -> dict[str, Any]:
        """What a heartbeat says of the worker: what a queen schedules by, no paths."""
        return {
            "id": self.id,
            "model": self.model,
            "device": self.device,
            "pid": self.pid,
            "state": str(self.state),
            "slots": self.slots,
            "busy": self.busy,
            "backend": self.info.get("backend", ""),
            # One copy of the weights and a KV cache per slot, in bytes.
            "memory": self.info.get("memory", {}),
        }


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


def _start_process(argv: list[str], log_path: Path, secret: str) -> _Process:
    """Fork and exec `argv` from this thread, its output appended to `log_path`; the worker
    reads `secret` (the hive's key, which it serves with) from its stdin, never from its argv
    or environment, which other users of the machine can read.

    Blocking (a fork and an exec, milliseconds) on purpose: PR_SET_PDEATHSIG is tied to the
    forking thread, and this one (trio's) lives as long as the pool. See the module docstring.
    """
    with log_path.open("ab") as log_file:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            preexec_fn=_die_with_this_thread(os.getpid()),
        )
    assert popen.stdin is not None
    # One line, far below a pipe's buffer: never blocks. (A worker that died at once broke it.)
    with contextlib.suppress(BrokenPipeError), popen.stdin:
        popen.stdin.write(secret.encode("ascii") + b"\n")
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


_KEPT_AS_IS = (
    "id", "model", "device", "state", "started", "ready_at", "exit_code", "signal", "reason",
    "slots",
)  # fmt: skip


@dataclass(eq=False)
class _Worker:
    """The pool's own, changing view of one worker process."""

    id: str
    model: str
    model_path: Path
    device: str
    process: _Process
    log_path: Path
    client: JobClient
    started: float = field(default_factory=time.time)
    started_clock: float = field(default_factory=trio.current_time)
    state: WorkerState = WorkerState.STARTING
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
    jobs: set[str] = field(default_factory=set)

    def snapshot(self) -> WorkerRecord:
        age = None
        liveness = self.client.liveness
        if liveness is not None and not self.exited.is_set():
            age = round(trio.current_time() - liveness.last_seen, 3)
        # The fields the worker keeps under the record's names, then those it keeps otherwise.
        kept = {name: getattr(self, name) for name in _KEPT_AS_IS}
        return WorkerRecord(
            **kept, model_path=str(self.model_path), pid=self.process.pid,
            last_heartbeat_age_s=age, log_path=str(self.log_path), info=dict(self.info),
            busy=len(self.jobs),
        )  # fmt: skip


class WorkerPool:
    """The hive's workers. Made by `open_worker_pool`, which runs its tasks."""

    def __init__(
        self,
        socket_prefix: str,
        nursery: trio.Nursery,
        *,
        heartbeat_s: float,
        log_dir: Path,
        name: str,
        keypair: Keypair,
    ) -> None:
        self.socket_prefix = socket_prefix
        self.keypair = keypair
        self.heartbeat_s = heartbeat_s
        self.log_dir = log_dir
        self.name = name
        #: Bumped on every change of a worker's state; `await pool.revision.wait_value(pred)`
        #: waits for a condition on the pool without polling.
        self.revision = AsyncValue(0)
        self.schedule = HeartbeatSchedule(heartbeat_s)
        self._nursery = nursery
        self._workers: dict[str, _Worker] = {}
        self._closing = False
        #: Workers that have exited are listed (with how they ended) until deleted, or until
        #: this many newer ones have: a model that kills its worker on every job must not grow
        #: the list, and the heartbeat that carries it, without end.
        self.exited_kept = MAX_WORKERS_PER_HIVE

    # ---- the API the hive uses ------------------------------------------------------------------

    async def spawn(
        self,
        *,
        model_id: str,
        model_path: Path,
        device: str,
        backend: str = "auto",
        slots: int = DEFAULT_SLOTS,
        ctx: int | None = None,
        ready_timeout_s: float = 120,
    ) -> WorkerRecord:
        """Start a worker process for `model_path` on `device`; return once it is READY.

        `backend` is auto, llama-cpp or ctransformers; `slots` how many jobs it runs at once
        (sequences of one batch; a ctransformers worker runs one and says so: its record's
        `slots`); `ctx` each slot's tokens of context (None: the model's).
        Raises MeshError: INVALID_REQUEST for a bad device, backend, slot count or context, or a
        model the worker cannot load (with the worker's reason),
        WORKER_LOST if it exits otherwise, TIMEOUT (after killing it) if it is not ready within
        `ready_timeout_s`, UNAVAILABLE if the pool is closing or the process cannot be started,
        BUSY if the hive runs MAX_WORKERS_PER_HIVE workers. A worker that did not become ready
        is not kept.
        """
        if self._closing:
            raise MeshError(ErrorCode.UNAVAILABLE, "the hive is stopping; it starts no workers")
        WORKER_DEVICE.load("device", device)
        WorkerSpawn(model=model_id, backend=backend, slots=slots, ctx=ctx)  # checks them
        running = sum(1 for w in self._workers.values() if not w.exited.is_set())
        if running >= MAX_WORKERS_PER_HIVE:
            raise MeshError(
                ErrorCode.BUSY,
                f"hive {self.name} runs {running} workers, its limit; delete one first",
                started=False,
            )
        worker_id = f"w-{secrets.token_hex(4)}"
        endpoint = f"{self.socket_prefix}.{worker_id}"
        log_path = self.log_dir / f"{worker_id}.log"
        narrate("worker_spawn", f"starting worker {worker_id}: model {model_id} on {device}")
        argv = [
            sys.executable, "-m", "rbee_mesh.actors.worker", "--listen", endpoint,
            "--worker-id", worker_id, "--model", str(model_path), "--device", device,
            "--backend", backend, "--slots", str(slots), "--hive-id", self.name,
            "--heartbeat-s", repr(self.heartbeat_s),
        ]  # fmt: skip
        argv += [] if ctx is None else ["--ctx", str(ctx)]
        try:
            process = _start_process(argv, log_path, self.keypair.secret)
        except (OSError, subprocess.SubprocessError) as exc:
            raise MeshError(
                ErrorCode.UNAVAILABLE, f"cannot start a worker process: {exc}"
            ) from None
        # Connects before the worker has bound its socket: tried again every 10 ms, it is found
        # as soon as the model is loaded (libzmq's 100 ms cost a spawn 50 ms on average).
        client = JobClient.forwarding(
            endpoint, name=self.name, role=Actor.HIVE, server=f"worker {worker_id}",
            lost_code=ErrorCode.WORKER_LOST, heartbeat_s=self.heartbeat_s, reconnect_ivl_ms=10,
            keys=ClientKeys(self.keypair, self.keypair.public),
        )  # fmt: skip
        worker = _Worker(
            id=worker_id,
            model=model_id,
            model_path=model_path,
            device=device,
            process=process,
            log_path=log_path,
            client=client,
        )
        client.on_ready = partial(self._on_ready, worker)
        client.on_liveness = partial(self._on_liveness, worker)
        self._workers[worker_id] = worker
        self._nursery.start_soon(self._watch_process, worker, name=f"worker {worker_id}")
        await self._nursery.start(client.run)
        self.schedule.add(client)
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
                f"{worker.info.get('context', '?')} tokens of context, "
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
        """Every worker the pool knows (including exited ones: see `exited_kept`), oldest
        first."""
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
        self, worker_id: str, job_id: str, op: Infer, relay: Relay, timeout_s: float
    ) -> Any:
        """Run `op` as job `job_id` on worker `worker_id`; return its result.

        The worker's NARRATION, DATA and TOKEN frames go to `relay` as they arrive, unopened.
        Raises MeshError: the worker's ERROR as it is; CANCELLED when the worker cancelled the
        job; WORKER_LOST when the worker dies (at once) or falls silent (within the liveness
        window) during the job; NOT_FOUND, UNAVAILABLE (not ready, stopping, dead), BUSY (every
        slot taken) or CONFLICT (the job id runs already) before anything is sent, and then
        with `started=False`. Cancelled (trio), it has the worker cancel the job before
        re-raising.
        """
        worker = self._find(worker_id)
        self._check_can_take(worker, job_id)
        worker.jobs.add(job_id)
        self._load_changed(worker)
        try:
            return await forward(
                worker.client, op, job_id=job_id, timeout_s=timeout_s, relay=relay,
                cancelled_by=f"hive {self.name}",
            )  # fmt: skip
        finally:
            worker.jobs.discard(job_id)
            self._load_changed(worker)

    # ---- internals ----------------------------------------------------------------------------

    def _find(self, worker_id: str) -> _Worker:
        worker = self._workers.get(worker_id)
        if worker is None:
            raise MeshError(
                ErrorCode.NOT_FOUND, f"no worker {worker_id} on this hive", started=False
            )
        return worker

    def _check_can_take(self, worker: _Worker, job_id: str) -> None:
        if worker.state not in _ALIVE_FOR_JOBS or worker.cause:
            why = f": {worker.reason or worker.cause}" if worker.reason or worker.cause else ""
            raise MeshError(
                ErrorCode.UNAVAILABLE,
                f"worker {worker.id} is {worker.state}{why}; it runs no jobs",
                started=False,
            )
        if job_id in worker.jobs:
            raise MeshError(
                ErrorCode.CONFLICT,
                f"job {job_id} is already running on worker {worker.id}",
                started=False,
            )
        if len(worker.jobs) >= worker.slots:
            raise MeshError(
                ErrorCode.BUSY,
                f"worker {worker.id} is busy: {len(worker.jobs)} of {worker.slots} slot(s) taken",
                started=False,
            )

    def _load_changed(self, worker: _Worker) -> None:
        """A job was added to or removed from `worker`: BUSY when every slot is taken."""
        if worker.state in _ALIVE_FOR_JOBS:
            full = len(worker.jobs) >= worker.slots
            worker.state = WorkerState.BUSY if full else WorkerState.READY
        self._changed()

    def _changed(self) -> None:
        self.revision.value += 1

    def _on_ready(self, worker: _Worker, ready: Ready) -> None:
        if (
            worker.state is not WorkerState.STARTING
            or ready.role is not Actor.WORKER
            or ready.sender != worker.id
            or ready.info.get("pid") != worker.process.pid
        ):
            # Only the process this pool started under that id, and only once.
            if worker.state is WorkerState.STARTING:
                log.warning("refused READY from %r: not the worker this pool started", ready.sender)
            return
        worker.info = dict(ready.info)
        slots = ready.info.get("slots", 1)
        worker.slots = slots if isinstance(slots, int) and 1 <= slots <= MAX_SLOTS else 1
        worker.ready_at = time.time()
        worker.ready_clock = trio.current_time()
        worker.state = WorkerState.READY
        worker.settled.set()
        self._changed()

    def _on_liveness(self, worker: _Worker, was: Liveness, now: Liveness) -> None:
        """A worker that falls silent is killed: its jobs have ended WORKER_LOST already."""
        if now is not Liveness.LOST or worker.exited.is_set() or worker.cause:
            return
        liveness = worker.client.liveness
        missed = liveness.missed(trio.current_time()) if liveness is not None else 0
        worker.cause = f"lost: it sent nothing for {missed} heartbeat intervals"
        log.warning("worker %s %s; killing it", worker.id, worker.cause)
        worker.process.send_signal(signal.SIGKILL)
        self._changed()

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
        if worker.exit_code == WorkerExit.LOAD_FAILED:
            return ModelUnloadable(f"{where} failed to start: {worker.reason}")
        code = ErrorCode.WORKER_LOST
        if worker.exit_code == WorkerExit.CANNOT_RUN:
            code = ErrorCode.UNAVAILABLE
        elif worker.exit_code == WorkerExit.BAD_START:
            code = ErrorCode.INTERNAL  # the pool's own arguments: our bug
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
            how_it_ended = "was stopped" if worker.state is WorkerState.STOPPED else "died"
            worker.client.lose(f"worker {worker.id} {how_it_ended}: {worker.reason}")
            self.schedule.discard(worker.client)
            await worker.client.aclose(worker.reason)
            _remove_socket_file(worker.client.endpoint)
            worker.exited.set()
            worker.settled.set()
            exited = [w.id for w in self._workers.values() if w.exited.is_set()]
            for forgotten in exited[: max(0, len(exited) - self.exited_kept)]:
                del self._workers[forgotten]
            self._load_changed(worker)

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
        await worker.client.aclose(cause)
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


def _remove_socket_file(endpoint: str) -> None:
    """Remove a worker's socket file (a worker killed outright leaves it behind)."""
    path = parse_endpoint(endpoint).address
    if not path.startswith("@"):
        Path(path).unlink(missing_ok=True)


@asynccontextmanager
async def open_worker_pool(
    socket_prefix: str,
    *,
    heartbeat_s: float = 1.0,
    log_dir: Path | None = None,
    grace_s: float = 5.0,
    name: str = "hive",
    keypair: Keypair | None = None,
) -> AsyncIterator[WorkerPool]:
    """A worker pool for the duration of the block; each worker serves at
    `<socket_prefix>.<worker id>` (an ipc:// endpoint: a path, or @name for a Linux abstract
    socket).

    `log_dir` receives one log file per worker; without it the pool uses a temporary directory
    and removes it on exit. `name` is the sender id of the pool's frames (the hive's id). On
    exit every worker is stopped (SIGKILL after `grace_s`) and reaped, even when the block is
    cancelled. `keypair`: the hive's, which its workers serve with and admit alone (default:
    this process's node's).
    """
    if parse_endpoint(socket_prefix).scheme != "ipc":
        raise EndpointError(
            f"workers serve on Unix sockets of this machine; {socket_prefix} is not ipc://"
        )
    own_log_dir = log_dir is None
    logs = Path(tempfile.mkdtemp(prefix="rbee-mesh-workers-")) if log_dir is None else log_dir
    logs.mkdir(parents=True, exist_ok=True)
    try:
        with single_errors():
            async with trio.open_nursery() as nursery:
                pool = WorkerPool(
                    socket_prefix, nursery, heartbeat_s=heartbeat_s, log_dir=logs, name=name,
                    keypair=keypair or Trust.for_process().keypair,
                )  # fmt: skip
                nursery.start_soon(pool.schedule.run)
                try:
                    yield pool
                finally:
                    with trio.CancelScope(shield=True):
                        await pool._shutdown(grace_s)
                    nursery.cancel_scope.cancel()
    finally:
        if own_log_dir:
            shutil.rmtree(logs, ignore_errors=True)
