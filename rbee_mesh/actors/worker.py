"""A worker: one OS process that loads one model and serves it for its hive.

    python -m rbee_mesh.actors.worker --hive ENDPOINT --worker-id ID --model PATH --device DEVICE
                                      [--heartbeat-s 1.0]

What it does, in order:

1. loads the model through its backend, in a thread, so that SIGTERM during a long load still
   ends it at once;
2. connects a DEALER to the hive's worker endpoint and sends READY (model, pid, device, load
   time, architecture, parameters, ...);
3. sends a HEARTBEAT every interval with its state, and watches the hive's heartbeats.

How it ends (the exit code is how the hive's pool tells these apart; see `WorkerExit`):

- 0 on SIGTERM or SIGINT, or on a DISCONNECT from the hive;
- 2 when the model cannot be loaded (and for bad arguments, as argparse does): the reason is the
  last line on stderr, which the pool reads back from the worker's log file;
- 3 when the hive has been silent for three heartbeat intervals. The pool also makes the kernel
  SIGKILL a worker whose hive dies (PR_SET_PDEATHSIG); this covers a hive that hangs instead, and
  a worker started by hand. Either way a worker is never left running without its hive.

The backend is the plug for inference: today `MappedGguf` only maps the file and reads its
metadata; an inference backend implements `ModelBackend` and is chosen at the load step.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Protocol

import trio
from trio_util import periodic

from rbee_mesh.inference.gguf_file import GgufFile, GgufInfo, open_gguf
from rbee_mesh.protocol import (
    Actor,
    Disconnect,
    Heartbeat,
    MeshError,
    Message,
    PeerLiveness,
    ProtocolError,
    Ready,
    decode,
    encode,
)
from rbee_mesh.protocol.fields import ident
from rbee_mesh.protocol.liveness import Liveness
from rbee_mesh.transport import Connection, TransportClosed, open_connection

log = logging.getLogger("rbee_mesh.worker")

DEVICE_PATTERN = re.compile(r"cpu|cuda:[0-9]{1,2}")
#: The signals that stop a worker on purpose (exit code 0).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class WorkerExit(IntEnum):
    """The exit codes of a worker process."""

    #: Stopped on purpose: SIGTERM, SIGINT, or DISCONNECT from the hive.
    STOPPED = 0
    #: The model could not be loaded (or the arguments were wrong); the reason is on stderr.
    LOAD_FAILED = 2
    #: The hive sent nothing for three heartbeat intervals.
    HIVE_LOST = 3


class LoadedModel(Protocol):
    """A model a backend has loaded. The worker keeps it referenced for as long as it serves."""

    @property
    def info(self) -> GgufInfo: ...


class ModelBackend(Protocol):
    """How a worker loads its model; inference backends implement this (and, later, generation)."""

    #: Reported in READY, so that `worker list` shows what runs the model.
    name: str

    def load(self, path: Path, device: str) -> LoadedModel:
        """Load the model at `path` onto `device`. Runs in a thread.

        Raises MeshError with a reason a person can act on when the model cannot be loaded.
        """
        ...


class MappedGguf:
    """The backend until inference arrives: maps the GGUF file and reads its metadata."""

    name = "gguf-mmap"

    def load(self, path: Path, device: str) -> GgufFile:
        return open_gguf(path)


@dataclass(frozen=True)
class WorkerConfig:
    hive: str
    worker_id: str
    model: Path
    device: str
    heartbeat_s: float = 1.0


class Worker:
    """One worker process's actor. `await run()` returns how it ended."""

    def __init__(self, config: WorkerConfig, backend: ModelBackend | None = None) -> None:
        self.config = config
        self.backend: ModelBackend = backend if backend is not None else MappedGguf()
        self.model: LoadedModel | None = None
        self.exit: tuple[WorkerExit, str] | None = None
        self._load_s = 0.0
        self._scope = trio.CancelScope()
        self._hive = PeerLiveness(config.heartbeat_s, 0.0)

    def finish(self, code: WorkerExit, reason: str) -> None:
        """End the worker with `code`; the first reason given stands."""
        if self.exit is None:
            self.exit = (code, reason)
        self._scope.cancel()

    async def run(self, early_signals: Sequence[int] = ()) -> tuple[WorkerExit, str]:
        """Load, announce, heartbeat until told to stop; returns (exit code, reason).

        `early_signals`: stop signals that arrived before this call could receive them itself.
        """
        with self._scope, trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            for signum in early_signals:
                self._stopped_by(signum)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, signals)
                if await self._load():
                    async with await open_connection(self.config.hive) as connection:
                        await self._announce(connection)
                        nursery.start_soon(self._receive_loop, connection)
                        nursery.start_soon(self._heartbeat_loop, connection)
                        nursery.start_soon(self._watch_hive)
                        await trio.sleep_forever()
        assert self.exit is not None, "the worker's scope is only cancelled through finish()"
        return self.exit

    async def _load(self) -> bool:
        """Load the model; False (and finish) if it cannot be loaded."""
        config = self.config
        log.info("loading model %s on %s with %s", config.model, config.device, self.backend.name)
        started = trio.current_time()
        try:
            # abandon_on_cancel: a SIGTERM during a long load ends the process without waiting.
            self.model = await trio.to_thread.run_sync(
                self.backend.load, config.model, config.device, abandon_on_cancel=True
            )
        except MeshError as exc:
            self.finish(WorkerExit.LOAD_FAILED, f"cannot load model {config.model}: {exc.message}")
            return False
        self._load_s = trio.current_time() - started
        log.info("loaded model %s in %.3fs", config.model, self._load_s)
        return True

    async def _announce(self, connection: Connection) -> None:
        assert self.model is not None
        info = self.model.info
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
                    "backend": self.backend.name,
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

    async def _send(self, connection: Connection, message: Message) -> None:
        # Only this process closes the connection, and only while it is ending.
        with suppress(TransportClosed):
            await connection.send(encode(message))

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
                log.warning("ignored a malformed frame from the hive: %s", exc)
                continue
            match message:
                case Heartbeat():
                    self._hive.interval_s = message.interval_s
                case Disconnect():
                    reason = message.reason or "no reason given"
                    self.finish(WorkerExit.STOPPED, f"the hive disconnected it ({reason})")
                    return
                case _:
                    log.warning("ignored a %s frame from the hive", message.KIND.name)

    async def _heartbeat_loop(self, connection: Connection) -> None:
        seq = 0
        async for _ in periodic(self.config.heartbeat_s):
            await self._send(
                connection,
                Heartbeat(
                    job_id="",
                    sender=self.config.worker_id,
                    seq=seq,
                    interval_s=self.config.heartbeat_s,
                    ts=time.time(),
                    state={"state": "idle"},
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


def _worker_id(value: str) -> str:
    try:
        return ident().load("--worker-id", value)
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rbee_mesh.actors.worker",
        description="One rbee-mesh worker: serves one model for the hive that started it.",
    )
    parser.add_argument("--hive", required=True, help="the hive's worker endpoint (ipc or tcp)")
    parser.add_argument("--worker-id", required=True, type=_worker_id)
    parser.add_argument("--model", required=True, type=Path, help="the GGUF file to load")
    parser.add_argument("--device", required=True, type=_device, help="cpu or cuda:N")
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


if __name__ == "__main__":
    sys.exit(main())
