"""A worker: one OS process that loads one model and serves inference jobs to its hive.

    python -m rbee_mesh.actors.worker --listen ENDPOINT --worker-id ID --model PATH
                                      --device DEVICE [--backend auto|llama-cpp|ctransformers]
                                      [--slots N] [--hive-id ID] [--heartbeat-s 0.5]
                                      [--patience-s 30]

What it does, in order:

1. loads the model with its backend (`load_model`) in a thread, so that SIGTERM during a long
   load still ends it at once: one copy of the weights, and a KV cache per slot;
2. binds a listener at ENDPOINT (a Unix socket the hive chose) and serves jobs there with the one
   job server (`actors/jobserver.py`), as the queen and the hive serve theirs: its hive connects,
   says READY, and is answered with the worker's READY (model, pid, device, backend and why it
   was chosen, load time, slots, architecture, parameters, ...);
3. runs the infer jobs the hive sends (`generate.py`), up to one per slot at once (a further one
   is refused BUSY before it starts). A slot is a sequence of the model's batch: llama-cpp
   decodes every running job's next token in one step (continuous batching, see
   `inference/llama_cpp_backend.py`). ctransformers runs one sequence: its worker has one slot
   whatever was asked, and says so.

How it ends (the exit code is how the hive's pool tells these apart; see `WorkerExit`):

- 0 on SIGTERM or SIGINT, or on a DISCONNECT from the hive;
- 5 when the model file cannot be loaded (no backend here loads it): the reason is the last
  line on stderr, which the pool reads back from the worker's log file;
- 4 when this machine cannot load it now (out of memory, the backend not installed, the device
  missing): the reason likewise;
- 2 for bad arguments (as argparse does) or no key on stdin: the reason likewise;
- 3 when the hive has been silent for WORKER_PATIENCE_S (30 s; `--patience-s`), or never came.
  The pool also makes the kernel SIGKILL a worker whose hive dies (PR_SET_PDEATHSIG); this
  covers a hive that hangs instead, and a worker started by hand. Either way a worker is never
  left running without its hive; a hive that only stalls for a while keeps its workers.

Running jobs end first (each within one token), for at most STOP_GRACE_S.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from rbee_mesh.actors.jobserver import JobServer, Peer, ServerConfig, ServerJob
from rbee_mesh.actors.trust import Trust
from rbee_mesh.actors.worker.generate import generate
from rbee_mesh.protocol import Actor, ErrorCode, Infer, MeshError, ProtocolError
from rbee_mesh.protocol.constants import (
    HEARTBEAT_S,
    MAX_CONTEXT_TOKENS,
    MAX_HEARTBEAT_S,
    MAX_SLOTS,
    MIN_CONTEXT_TOKENS,
    MIN_HEARTBEAT_S,
    SERVER_LOST_AFTER,
    WORKER_PATIENCE_S,
)
from rbee_mesh.protocol.fields import Spec, ident
from rbee_mesh.protocol.operations import BACKEND, WORKER_DEVICE
from rbee_mesh.transport import SocketOptions, open_listener
from rbee_mesh.transport.curve import Keypair
from rbee_mesh.units import human_bytes

if TYPE_CHECKING:
    # Only a worker process needs the inference libraries (numpy, gguf, the backends).
    from rbee_mesh.inference.backends import LoadedModel

log = logging.getLogger("rbee_mesh.worker")

#: The signals that stop a worker on purpose (exit code 0).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: How long running jobs get to end (each stops within one token) when the worker stops.
STOP_GRACE_S = 2.0


class WorkerExit(IntEnum):
    """The exit codes of a worker process."""

    #: Stopped on purpose: SIGTERM, SIGINT, or DISCONNECT from the hive.
    STOPPED = 0
    #: Bad arguments (argparse's code) or no key on stdin; the reason is on stderr.
    BAD_START = 2
    #: The hive fell silent, or never came.
    HIVE_LOST = 3
    #: The machine could not load it now (memory, backend, device); the reason is on stderr.
    CANNOT_RUN = 4
    #: The model file could not be loaded by any backend here; the reason is on stderr.
    LOAD_FAILED = 5


@dataclass(frozen=True)
class WorkerConfig:
    #: Where the worker serves its hive (a Unix socket).
    listen: str
    worker_id: str
    model: Path
    device: str
    heartbeat_s: float = HEARTBEAT_S
    #: Seconds of its hive's silence (or absence) after which it exits.
    patience_s: float = WORKER_PATIENCE_S
    backend: str = "auto"
    slots: int = 1
    #: Tokens of context per slot (None: the model's own, within a memory budget).
    ctx: int | None = None
    #: The hive's id, for the `hive_id` of the worker's narration.
    hive_id: str = ""
    #: The hive's keypair: the worker serves with it and admits its hive (that key) alone.
    keypair: Keypair = dataclasses.field(default_factory=lambda: Trust.for_process().keypair)


class Worker:
    """One worker process's actor. `await run()` returns how it ended."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        #: The loaded model, once loaded: it runs up to `slots` jobs at once.
        self.model: LoadedModel | None = None
        self.backend = ""
        self.backend_reason = ""
        self.exit: tuple[WorkerExit, str] | None = None
        self.server: JobServer | None = None
        self._load_s = 0.0
        self._loading = trio.CancelScope()
        self._stop = trio.Event()
        self._hive_came = trio.Event()

    def finish(self, code: WorkerExit, reason: str) -> None:
        """End the worker with `code`; the first reason given stands. Running jobs end first."""
        if self.exit is None:
            self.exit = (code, reason)
        self._loading.cancel()
        self._stop.set()

    async def run(self, early_signals: Sequence[int] = ()) -> tuple[WorkerExit, str]:
        """Load, serve and heartbeat until told to stop; returns (exit code, reason).

        `early_signals`: stop signals that arrived before this call could receive them itself.
        """
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            for signum in early_signals:
                self._stopped_by(signum)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, signals)
                with self._loading:
                    loaded = await self._load()
                if loaded and self.exit is None:
                    await self._serve()
                nursery.cancel_scope.cancel()
        # Every generating thread has returned: a job ends only once its thread has.
        if self.model is not None:
            self.model.close()
        assert self.exit is not None, "the worker only stops through finish()"
        return self.exit

    # ---- loading -------------------------------------------------------------------------------

    async def _load(self) -> bool:
        """Load the model for `slots` sequences; False (and finish) if it cannot be loaded."""
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
            model, why = await trio.to_thread.run_sync(self._load_model, abandon_on_cancel=True)
        except MeshError as exc:
            why = f"cannot load model {config.model}: {exc.message}"
            the_file = exc.code is ErrorCode.INVALID_REQUEST
            self.finish(WorkerExit.LOAD_FAILED if the_file else WorkerExit.CANNOT_RUN, why)
            return False
        self._load_s = trio.current_time() - started
        self.model = model
        self.backend, self.backend_reason = model.backend, why
        log.info(
            "loaded model %s with %s in %.3fs (%s): %d slot(s) of %d tokens, %s of weights and "
            "%s of KV cache",
            config.model,
            self.backend,
            self._load_s,
            why,
            model.sequences,
            model.n_ctx,
            human_bytes(model.memory["weights"]),
            human_bytes(model.memory["kv_cache"]),
        )
        if model.sequences < config.slots:
            log.warning(
                "%s runs one sequence per worker: %d slot(s) asked, %d served",
                self.backend,
                config.slots,
                model.sequences,
            )
        return True

    def _load_model(self) -> tuple[LoadedModel, str]:
        from rbee_mesh.inference.backends import load_model

        config = self.config
        return load_model(config.model, config.device, config.backend, config.ctx, config.slots)

    # ---- serving -------------------------------------------------------------------------------

    async def _serve(self) -> None:
        config = self.config
        trust = Trust(config.keypair)
        options = SocketOptions(curve=trust.server_keys(Actor.WORKER))
        async with await open_listener(config.listen, options=options) as listener:
            self.server = JobServer(
                listener,
                name=config.worker_id,
                actor=Actor.WORKER,
                handlers={Infer: self._infer},
                config=ServerConfig(
                    heartbeat_s=config.heartbeat_s,
                    max_running_jobs=self.slots,
                    shutdown_grace_s=STOP_GRACE_S,
                    lost_after=max(
                        SERVER_LOST_AFTER, math.ceil(config.patience_s / config.heartbeat_s)
                    ),
                ),
                assigns_job_ids=False,
                ready_info=self._ready_info,
                peer_label="hive",
                hive_id=config.hive_id,
                trust=trust,
                worker_id=config.worker_id,
                on_peer_gone=self._peer_gone,
            )
            log.info("serving on %s; waiting for the hive", listener.endpoint)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.server.run)
                nursery.start_soon(self._await_hive)
                await self._stop.wait()
                assert self.exit is not None
                await self.server.stop(f"the worker is stopping: {self.exit[1]}")

    @property
    def slots(self) -> int:
        """Jobs it runs at once: the sequences its model serves (fewer than asked with a backend
        that cannot batch)."""
        assert self.model is not None
        return self.model.sequences

    async def _infer(self, job: ServerJob, op: Infer) -> dict[str, Any]:
        # The server runs at most `slots` jobs at once, and a job's sequence is given back
        # before it ends: there is always one free here.
        assert self.model is not None
        return await generate(job, op, self.model, self.config.worker_id)

    def _ready_info(self, peer: Peer) -> dict[str, Any]:
        if peer.role is Actor.HIVE:
            self._hive_came.set()
        assert self.model is not None
        info = self.model.info
        return {
            "model": str(self.config.model),
            "pid": os.getpid(),
            "device": self.config.device,
            "backend": self.backend,
            "backend_reason": self.backend_reason,
            "slots": self.slots,
            "load_s": round(self._load_s, 6),
            "arch": info.architecture,
            "name": info.name,
            "params": info.parameter_count,
            "context_length": info.context_length,
            # What it was loaded with: the model's own, a budget's share of it, or --ctx.
            "context": self.model.n_ctx,
            # One copy of the weights, and a KV cache per slot.
            "memory": dict(self.model.memory),
            "file_size": info.file_size,
            "file_type": info.file_type,
        }

    def _peer_gone(self, peer: Peer, why: str, left: bool) -> None:
        """The hive left (DISCONNECT: stop) or was lost (exit, rather than run without it)."""
        if peer.role is not Actor.HIVE:
            return
        if left:
            self.finish(WorkerExit.STOPPED, f"the hive disconnected it: {why}")
        else:
            self.finish(
                WorkerExit.HIVE_LOST,
                f"the hive at {self.config.listen} {why}; exiting rather than running without it",
            )

    async def _await_hive(self) -> None:
        """A hive that never comes is as good as lost."""
        assert self.server is not None
        intervals = self.server.config.lost_after + 0.5
        with trio.move_on_after(intervals * self.config.heartbeat_s):
            await self._hive_came.wait()
            return
        self.finish(
            WorkerExit.HIVE_LOST,
            f"no hive came to {self.config.listen}: it sent nothing for "
            f"{self.server.config.lost_after} heartbeat intervals; exiting",
        )

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            self._stopped_by(signum)
            return

    def _stopped_by(self, signum: int) -> None:
        self.finish(WorkerExit.STOPPED, f"stopped by {signal.Signals(signum).name}")


# ---- the command line -------------------------------------------------------------------------


def _checked(spec: Spec, what: str) -> Any:
    """An argparse type that validates with the protocol's own spec of the value."""

    def check(value: str) -> Any:
        try:
            return spec.load(what, value)
        except ProtocolError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    return check


def _number(kind: type[int] | type[float], low: float, high: float, what: str) -> Any:
    def check(value: str) -> int | float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{what} must be {low:g} to {high:g}")
        return number

    return check


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rbee_mesh.actors.worker",
        description="One rbee-mesh worker: serves one model for the hive that started it.",
    )
    parser.add_argument("--listen", required=True, help="where to serve the hive (ipc://)")
    parser.add_argument("--worker-id", required=True, type=_checked(ident(), "the id"))
    parser.add_argument("--model", required=True, type=Path, help="the GGUF file to load")
    parser.add_argument(
        "--device", required=True, type=_checked(WORKER_DEVICE, "device"), help="cpu or cuda:N"
    )
    parser.add_argument("--backend", type=_checked(BACKEND, "backend"), default="auto")
    parser.add_argument(
        "--slots",
        type=_number(int, 1, MAX_SLOTS, "slots"),
        default=1,
        help="jobs run at once: sequences of one batch, each with its own context",
    )
    parser.add_argument(
        "--ctx",
        type=_number(int, MIN_CONTEXT_TOKENS, MAX_CONTEXT_TOKENS, "ctx"),
        default=None,
        help="tokens of context per slot",
    )
    parser.add_argument("--hive-id", type=_checked(ident(), "the id"), help="for narration")
    parser.add_argument(
        "--heartbeat-s",
        type=_number(float, MIN_HEARTBEAT_S, MAX_HEARTBEAT_S, "the heartbeat interval"),
        default=HEARTBEAT_S,
    )
    parser.add_argument(
        "--patience-s",
        type=_number(float, MIN_HEARTBEAT_S, 3_600.0, "the patience"),
        default=WORKER_PATIENCE_S,
        help="seconds of the hive's silence after which the worker exits",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a worker until it is told to stop; returns its exit code (see WorkerExit)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s worker {args.worker_id} %(levelname)s %(message)s",
    )
    args.hive_id = args.hive_id or ""
    try:
        # The hive's key comes on stdin, one line (never in argv or the environment).
        args.keypair = Keypair.from_secret(sys.stdin.readline().strip())
    except ValueError:
        print("no key on stdin: a worker serves with its hive's key", file=sys.stderr)
        return int(WorkerExit.BAD_START)
    # The options are named as the config's fields.
    config = WorkerConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(WorkerConfig)}
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
