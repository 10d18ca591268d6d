"""Scale run: one real queen, N simulated hives of 8 workers each, over real sockets.

What runs, for each N:

- **The queen** is the real daemon, `python -m rbee_mesh queen start --foreground`, in a process
  of its own with a fresh state directory (`RBEE_MESH_HOME`), discovery off, bound to an
  ephemeral loopback port. It learns its hives as static peers from `<state>/config.toml`, so it
  links them exactly as it links hives named by a user: a DEALER to each hive's control ROUTER,
  READY, heartbeats, and a subscription to each hive's heartbeat PUB.
- **The simulated hives** live in one simulator process (`python -m benchmarks.scale simulate`),
  or a few when one would run out of file descriptors (`MAX_HIVES_PER_SIMULATOR`). Each hive
  has what a real hive shows the queen: a control ROUTER (made by the transport's socket
  factory) that answers READY as `Hive` does and runs `worker_list` jobs (ACCEPTED, one
  NARRATION, DONE with its 8 worker records), every frame built and encoded by the protocol's
  own code; and a heartbeat PUB (`open_publisher`) on which it publishes a HEARTBEAT every
  interval (1 s, the queen's too: what a mesh this large should run at, `--heartbeat 1`; the
  default 0.5 s doubles the load, docs/reliability.md), the N hives spread evenly over it. The
  heartbeat's state is shaped like a real hive's: a CPU and two GPUs, the catalog's count and
  digest, and a row for each of 8 workers (1.7 KB packed; their full records, 6.5 KB, answer
  `worker_list`). What a simulated hive lacks is what the queen cannot see: processes behind
  its workers, a catalog on disk. The simulator is lean on purpose, since
  it shares the machine's cores with the queen: one task serves all control sockets (see
  `Simulator.serve_forever` for why not a JobServer per hive), heartbeats are spliced around a
  state packed once (`SimulatedHive.heartbeat`), and it reports its own lateness.
- **The driver** (`run_scale`, in the calling process) is a keeper.

Phases, for each N, all bounded in time:

1. setup: start the simulator(s), write the config, start the queen, and poll the queen's
   `status` (a job through a keeper) until it reports all N hives live: `setup_s`, from the
   queen's start. Then two heartbeat intervals, so that every subscription carries.
2. idle, `window_s`: heartbeats only; the cost of N hives to the queen at rest.
3. four windows of `window_s`, each after a second of warm-up: `worker_list` pinned to a random
   simulated hive (forwarded to it: the control path the target is about) back to back (one
   job in flight: the most the mesh does), then the same in open loop at `rate` jobs/s (the
   honest latency, and so the row for the target: see `time_ops`), then `status` and
   `hive_list` back to back, which the queen answers alone but with a record per hive, so they
   grow with N.

Measured in every window:

- **latency** of each job, from its submission to its terminal frame, at the keeper: p50, p99
  (nearest rank), max, and jobs per second;
- **CPU share** of the queen, the simulator(s), the driver and everything else on the machine:
  the change of utime + stime of the process (all its threads, libzmq's I/O thread too) from
  /proc/PID/stat, or of the machine's busy time from /proc/stat, over the window's wall time;
  1.0 is one core, and this machine may have only two;
- **heartbeat processing rate**: the change of the queen's own count of heartbeats taken off its
  SUB socket (`status` -> `queen.heartbeats_received`) over the change of its uptime, next to
  what the hives were meant to send (N / interval) and what the simulators say they published
  (each prints its counters every second), so that a simulator falling behind is not taken for a
  queen falling behind;
- **liveness alarms**: lines in the queen's log saying a hive became suspect or lost (each a
  false alarm: no simulated hive ever stops); the queen's resident memory and open descriptors;
  the simulators' worst heartbeat lateness and longest pass over their sockets.

    .venv/bin/python -m benchmarks.scale [--hives 10,100,1000] [--window 10] [--rate 50]
                                          [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import msgpack
import trio
import zmq

from rbee_mesh import __version__
from rbee_mesh.actors.hive.devices import CpuDevice, CudaDevice
from rbee_mesh.actors.hive.worker_pool import WorkerRecord, WorkerState
from rbee_mesh.actors.jobclient import JobClient
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.trust import Trust
from rbee_mesh.protocol import (
    HEADER,
    PROTOCOL_VERSION,
    Accepted,
    Actor,
    Done,
    Error,
    ErrorCode,
    Heartbeat,
    HiveList,
    Kind,
    Message,
    Narration,
    Operation,
    ProtocolError,
    Ready,
    Status,
    Submit,
    WorkerList,
    decode,
    encode,
    peek_route,
)
from rbee_mesh.transport import (
    PUBSUB_OPTIONS,
    Publisher,
    SocketOptions,
    make_socket,
    open_publisher,
)

REPO = Path(__file__).resolve().parent.parent
WORKERS_PER_HIVE = 8
HEARTBEAT_S = 1.0
#: Jobs per second of the open-loop `worker_list` window: a busy control plane (dashboards,
#: scripts, a scheduler's own lookups), well below what the queen can do back to back.
RATE_PER_S = 50.0

#: A simulated hive holds 6 descriptors (its ROUTER and PUB: a libzmq mailbox, a listening
#: socket and the queen's connection each); 2,000 hives stay well inside a 20,000 limit.
MAX_HIVES_PER_SIMULATOR = 2_000

#: Two models on two GPUs, as a real hive reports them (`Catalog` entries, `DeviceReport`).
_MODELS = (
    ("TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF:tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf", 668_788_096),
    ("TheBloke/Mistral-7B-Instruct-v0.2-GGUF:mistral-7b-instruct-v0.2.Q4_K_M.gguf", 4_368_439_584),
)
_GIB = 2**30
_STATE_DIR = "/home/rbee/.local/state/rbee-mesh/hive"
_HEARTBEAT_KIND = bytes([Kind.HEARTBEAT])


def _packb(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)  # as `encode` packs
    return packed


# ---- the simulated hives ------------------------------------------------------------------------


def hive_workers(workers: int, rng: random.Random) -> list[WorkerRecord]:
    """A hive's workers, made up once per hive: their shape and size are what the queen pays
    for (in full in `worker_list` answers, a row each in heartbeats)."""
    now = time.time()
    records: list[WorkerRecord] = []
    for n in range(workers):
        model, size = _MODELS[n % len(_MODELS)]
        worker_id = f"w-{rng.getrandbits(32):08x}"
        device = f"cuda:{n % 2}"
        pid = rng.randrange(10_000, 4_000_000)
        started = now - rng.uniform(60, 86_400)
        busy = n % 4 == 0
        records.append(
            WorkerRecord(
                id=worker_id,
                model=model,
                model_path=f"{_STATE_DIR}/models/{model.replace('/', '--').replace(':', '--')}"
                f"/{model.partition(':')[2]}",
                device=device,
                pid=pid,
                state=WorkerState.BUSY if busy else WorkerState.READY,
                started=started,
                ready_at=started + rng.uniform(1, 20),
                exit_code=None,
                signal=None,
                reason="",
                last_heartbeat_age_s=round(rng.uniform(0, 1), 3),
                log_path=f"{_STATE_DIR}/logs/{worker_id}.log",
                info={
                    "model": model,
                    "pid": pid,
                    "device": device,
                    "backend": "llama-cpp",
                    "backend_reason": "the default for GGUF files this build can load",
                    "slots": 1,
                    "load_s": round(rng.uniform(0.5, 20), 6),
                    "arch": "llama",
                    "name": model.split("/")[1].split(":")[0],
                    "params": 1_100_048_384 if size < _GIB else 7_241_732_096,
                    "context_length": 4096,
                    "file_size": size,
                    "file_type": "Q4_K_M",
                },
                slots=1,
                busy=1 if busy else 0,
            )
        )
    return records


def hive_state(workers: list[WorkerRecord], rng: random.Random) -> dict[str, Any]:
    """What a hive's heartbeat carries (`Hive.state`): devices, a row per worker, and its
    catalog's size and digest."""
    devices = [
        CpuDevice(
            id="cpu",
            name="AMD Ryzen 9 7950X 16-Core Processor",
            memory_total=64 * _GIB,
            memory_free=rng.randrange(20 * _GIB, 60 * _GIB),
            cores=32,
        ),
        *(
            CudaDevice(
                id=f"cuda:{i}",
                name="NVIDIA GeForce RTX 4090",
                memory_total=24 * _GIB,
                memory_free=rng.randrange(2 * _GIB, 20 * _GIB),
                index=i,
                compute_capability="8.9",
            )
            for i in range(2)
        ),
    ]
    return {
        "version": __version__,
        "devices": [d.to_record() for d in devices],
        "workers": [w.summary() for w in workers],
        "models": {"count": len(_MODELS), "digest": f"{rng.getrandbits(64):016x}"},
    }


@dataclass(eq=False)
class SimulatedHive:
    """One hive as the queen sees it: a control ROUTER that speaks the hive's side of the
    protocol, and a PUB for heartbeats."""

    id: str
    router: zmq.Socket[bytes]
    control: str
    publisher: Publisher
    workers: list[WorkerRecord]
    state: dict[str, Any]
    heartbeat_s: float
    seq: int = 0
    #: Frames taken off the control socket, by kind (the queen's heartbeats among them).
    received: Counter[Kind] = field(default_factory=Counter)

    def ready_info(self) -> dict[str, Any]:
        """What `Hive` answers READY with."""
        return {
            "hive_id": self.id,
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "control": self.control,
            "heartbeat": self.publisher.endpoint,
            "state": self.state,
        }

    def serve(self) -> None:
        """Answer everything waiting on the control socket; never blocks.

        Reading until EAGAIN is what re-arms the socket's FD: the next message to arrive signals
        it (docs/architecture.md, "trio and ZeroMQ"), and the reply sends come before that read.
        """
        while True:
            try:
                peer, *frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            for reply in self.answer(frames):
                # As a JobServer does: a queen that is gone (EHOSTUNREACH) or not reading
                # (EAGAIN: its pipe is full) loses the frame, and the hive goes on serving.
                with contextlib.suppress(zmq.ZMQError):
                    self.router.send_multipart([peer, *encode(reply)], zmq.NOBLOCK)

    def answer(self, frames: list[bytes]) -> list[Message]:
        """What a hive sends back for `frames`: READY for READY, and for a `worker_list` job
        ACCEPTED, one NARRATION and DONE with the workers, as `Hive` does through its JobServer.
        The queen's heartbeats need no answer."""
        try:
            kind, _ = peek_route(frames)
            self.received[kind] += 1
            if kind is Kind.HEARTBEAT:
                return []  # a hive only needs to have heard its queen
            message = decode(frames)
        except ProtocolError as exc:
            rejection = f"rejected: {exc.message}"
            return [Error(job_id="", code=exc.code, message=rejection, ref=exc.ref)]
        match message:
            case Ready():
                info = self.ready_info()
                return [Ready(job_id="", sender=self.id, role=Actor.HIVE, info=info)]
            case Submit(job_id=job, ref=ref, op=WorkerList() as op):
                workers = [w.to_record() for w in self.workers]
                deadline = message.timeout_s or op.default_deadline_s
                said = f"{len(workers)} worker(s) on hive {self.id}"
                return [
                    Accepted(job_id=job, ref=ref, op=op.NAME, deadline_s=deadline),
                    Narration(
                        job_id=job,
                        actor=str(Actor.HIVE),
                        action=op.NAME,
                        human=said,
                        ts=time.time(),
                        hive_id=self.id,
                    ),
                    Done(job_id=job, result=workers),
                ]
            case Submit(ref=ref, op=op):
                refusal = f"a simulated hive runs worker_list only, not {op.NAME}"
                return [Error(job_id="", code=ErrorCode.INVALID_REQUEST, message=refusal, ref=ref)]
        return []  # CANCEL (its job has ended already), DISCONNECT

    def heartbeat(self) -> list[bytes]:
        """The next heartbeat: exactly the frames `encode(Heartbeat(...))` gives, made faster.

        Building a `Heartbeat` validates its state, and encoding packs it: 110 us per beat for
        8 workers, 11% of a core for 1,000 hives, taken from the cores the queen runs on (a real
        hive pays it on its own machine). The state does not change here, so it is validated
        and packed once (`_packed_state`) and each beat packs only its few scalars around it.
        """
        self.seq += 1
        body = b"".join(
            (
                b"\x85",  # a msgpack map of 5 pairs, in `Heartbeat.to_wire` order
                _packb("sender"),
                _packb(self.id),
                _packb("seq"),
                _packb(self.seq),
                _packb("interval_s"),
                _packb(float(self.heartbeat_s)),
                _packb("ts"),
                _packb(time.time()),
                _packb("state"),
                self._packed_state,
            )
        )
        return [HEADER, _HEARTBEAT_KIND, b"", body]

    @cached_property
    def _packed_state(self) -> bytes:
        """The state packed, once the protocol's own encoder agrees with the splice."""
        beat = Heartbeat(
            job_id="", sender=self.id, seq=self.seq, interval_s=self.heartbeat_s, state=self.state
        )
        real = encode(beat)[3]
        packed = real[real.index(_packb("state")) + len(_packb("state")) :]
        assert packed == _packb(self.state), "the state is not the end of the heartbeat's body"
        return packed


@dataclass(eq=False)
class Simulator:
    """Simulated hives in this process, and counters of what they did."""

    hives: list[SimulatedHive]
    heartbeat_s: float
    published: int = 0
    #: The longest a heartbeat went out after its slot in the interval (the simulator's lag).
    late_max_s: float = 0.0
    #: The longest pass over the control sockets that had something: while it lasts, a job for
    #: a hive served later in the pass waits, so it bounds what the simulator adds to a job.
    pass_max_s: float = 0.0

    async def serve_forever(self) -> None:
        """Serve every hive's control socket from this one task.

        A task per hive (a JobServer each, as a real hive has) was measured first: at 1,000
        hives, 17% of a core at rest, and when the queen greets its hives (a burst of 1,000
        heartbeats once a second) 1,000 tasks woke in one scheduler pass, 50-135 ms during
        which no simulated hive answered a job. That is a cost of hosting a thousand hives in
        one process, not of the queen, and it put 150-280 ms into the queen's measured p99.
        Here the sockets' FDs sit in one epoll set that trio watches; a wake-up serves the
        sockets that have something, each in a few microseconds.
        """
        by_fd = {hive.router.fileno(): hive for hive in self.hives}  # zmq.FD
        with select.epoll() as poller:
            for fd in by_fd:
                poller.register(fd, select.EPOLLIN)
            ready = list(self.hives)  # messages may have come before the FDs were watched
            while True:
                started = time.perf_counter()
                for hive in ready:
                    hive.serve()
                self.pass_max_s = max(self.pass_max_s, time.perf_counter() - started)
                await trio.lowlevel.wait_readable(poller.fileno())
                ready = [by_fd[fd] for fd, _ in poller.poll(0)]

    async def publish_forever(self, tick_s: float = 0.005) -> None:
        """Every hive's heartbeat once per interval, the hives spread evenly over it.

        Hive k of n is due at start + (i + k/n) * interval in round i. One task publishes them
        all: it wakes at the next hive's slot, but at most once per `tick_s` (a wake-up per hive
        would cost more than the heartbeat: a trio sleep is a cancel scope with a deadline), and
        publishes every hive whose slot has come, so that it catches up rather than drifts.
        """
        n = len(self.hives)
        slot = self.heartbeat_s / n
        start = trio.current_time()
        beat = 0  # heartbeats that were due so far, over all hives
        while True:
            await trio.sleep_until(max(start + beat * slot, trio.current_time() + tick_s))
            now = trio.current_time()
            while (due := start + beat * slot) <= now:
                hive = self.hives[beat % n]
                hive.publisher.publish(hive.heartbeat())
                self.late_max_s = max(self.late_max_s, trio.current_time() - due - tick_s)
                self.published += 1
                beat += 1


@asynccontextmanager
async def simulated_hives(
    count: int,
    *,
    first: int = 0,
    workers: int = WORKERS_PER_HIVE,
    heartbeat_s: float = HEARTBEAT_S,
    host: str = "127.0.0.1",
    seed: int = 0,
    trust: Trust | None = None,
) -> AsyncIterator[Simulator]:
    """`count` hives, ids `sim-{first:05d}` on, serving and heartbeating for the block, as the
    node of `trust` (default: this process's; all of them one node, with the queen's key).

    Control sockets come from the transport's socket factory (`make_socket`: the options every
    rbee-mesh ROUTER has, CURVE keys included) rather than `open_listener`, whose Listener wants
    a task per socket.
    """
    rng = random.Random(seed + first)
    node = trust or Trust.for_process()
    keys = node.server_keys(Actor.HIVE)
    async with AsyncExitStack() as stack:
        hives = []
        for n in range(first, first + count):
            router = make_socket(zmq.ROUTER, options=SocketOptions(curve=keys))
            stack.callback(router.close, linger=0)
            router.bind(f"tcp://{host}:*")
            control = router.getsockopt_string(zmq.LAST_ENDPOINT)
            beats = replace(PUBSUB_OPTIONS, curve=node.heartbeat_keys())
            publisher = await stack.enter_async_context(
                await open_publisher(f"tcp://{host}:0", options=beats)
            )
            records = hive_workers(workers, rng)
            state = hive_state(records, rng)
            hives.append(
                SimulatedHive(
                    f"sim-{n:05d}", router, control, publisher, records, state, heartbeat_s
                )
            )
        simulator = Simulator(hives, heartbeat_s)
        nursery = await stack.enter_async_context(trio.open_nursery())
        nursery.start_soon(simulator.serve_forever)
        nursery.start_soon(simulator.publish_forever)
        try:
            yield simulator
        finally:
            nursery.cancel_scope.cancel()


async def serve_simulated_hives(
    count: int, first: int, workers: int, heartbeat_s: float, seed: int
) -> None:
    """`simulate`: print the hives as one JSON line once all are bound, then every second a line
    of counters (heartbeats published so far; since the last line, the worst lateness of a
    heartbeat and the longest pass over the control sockets), until killed. SIGTERM ends it at
    once: the kernel closes its sockets (closing thousands one by one, each waiting for libzmq
    to release its port, would take seconds)."""
    trust = Trust.load(Path(os.environ["RBEE_MESH_HOME"]))  # the queen's: one node
    async with simulated_hives(
        count, first=first, workers=workers, heartbeat_s=heartbeat_s, seed=seed, trust=trust
    ) as sim:
        # Everything made so far lives as long as the process: keep the collector from walking
        # it again and again. Unfrozen, a full collection took 40 ms at 1,000 hives, during
        # which no heartbeat went out and no job was answered.
        gc.freeze()
        hives = [{"id": h.id, "control": h.control} for h in sim.hives]
        print(json.dumps({"pid": os.getpid(), "hives": hives}), flush=True)
        while True:
            await trio.sleep(1.0)
            counters = {
                "published": sim.published,
                "late_max_s": round(sim.late_max_s, 4),
                "pass_max_s": round(sim.pass_max_s, 4),
            }
            sim.late_max_s = sim.pass_max_s = 0.0
            print(json.dumps(counters), flush=True)


# ---- processes ---------------------------------------------------------------------------------

#: Runs argv[2:] in place of itself (exec: same pid) after asking the kernel to SIGKILL it when
#: the thread that started it exits, so that no queen or simulator outlives a killed driver.
#: Children are started from the driver's trio thread, which lives until they are stopped.
_ORPHAN_GUARD = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(70)  # the driver is gone already\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class Child:
    """A process of this benchmark: started, watched through a pidfd, always stopped."""

    def __init__(
        self, name: str, argv: list[str], *, env: dict[str, str], log: Path, stdout: bool = False
    ) -> None:
        self.name = name
        self.log = log
        with open(log, "ab") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-c", _ORPHAN_GUARD, str(os.getpid()), sys.executable, *argv],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout else err,
                stderr=err,
            )
        self.pid = self.popen.pid
        self._pidfd = os.pidfd_open(self.pid)
        self.stdout: trio.lowlevel.FdStream | None = None
        if self.popen.stdout is not None:
            self.stdout = trio.lowlevel.FdStream(os.dup(self.popen.stdout.fileno()))
            self.popen.stdout.close()
        self.started = time.monotonic()

    def exited(self) -> bool:
        return self.popen.poll() is not None

    async def wait(self) -> int:
        await trio.lowlevel.wait_readable(self._pidfd)
        return self.popen.wait()

    async def stop(self, grace_s: float) -> float:
        """SIGTERM, up to `grace_s` to exit, then SIGKILL; returns how long it took."""
        start = time.monotonic()
        with trio.CancelScope(shield=True):
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM)
                with trio.move_on_after(grace_s):
                    await self.wait()
                if self.popen.poll() is None:
                    self.popen.kill()
                    with trio.move_on_after(10):
                        await self.wait()
            if self.stdout is not None:
                await self.stdout.aclose()
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
        return time.monotonic() - start

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class LineReader:
    """Lines from a child's stdout, read by a task of their own."""

    def __init__(self, stream: trio.lowlevel.FdStream) -> None:
        self._stream = stream
        self._buffer = b""
        self._send, self._lines = trio.open_memory_channel[bytes](math.inf)

    async def run(self) -> None:
        async with self._send:
            while True:
                try:
                    data = await self._stream.receive_some(1 << 20)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    return
                if not data:
                    return
                self._buffer += data
                *lines, self._buffer = self._buffer.split(b"\n")
                for line in lines:
                    self._send.send_nowait(line)

    async def next(self) -> bytes:
        return await self._lines.receive()

    def drain(self) -> list[bytes]:
        lines = []
        while True:
            try:
                lines.append(self._lines.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return lines


@dataclass(eq=False)
class SimulatorProcess:
    child: Child
    lines: LineReader
    hives: list[dict[str, str]] = field(default_factory=list)
    published: int = 0
    #: The worst over the lines taken by the last `update` (see `Simulator`).
    late_max_s: float = 0.0
    pass_max_s: float = 0.0

    def update(self) -> None:
        """Take the counters the simulator printed since the last look."""
        self.late_max_s = self.pass_max_s = 0.0
        for line in self.lines.drain():
            counters = json.loads(line)
            self.published = counters["published"]
            self.late_max_s = max(self.late_max_s, counters["late_max_s"])
            self.pass_max_s = max(self.pass_max_s, counters["pass_max_s"])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid`, all its threads, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # fields 3.. of proc(5); utime, stime are 14, 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time every core of this machine spent busy since boot (/proc/stat: all but idle and
    iowait), to tell what else ran during a window."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---- the driver --------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """Counters at one moment, to take differences over a window."""

    wall: float
    queen_cpu: float
    simulator_cpu: float
    driver_cpu: float
    machine_busy: float
    published: int
    #: The worst the simulators reported since the previous snapshot (see `Simulator`).
    simulator_late_max_s: float
    simulator_pass_max_s: float
    heartbeats: int
    queen_uptime: float
    log_offset: int

    @property
    def others_cpu(self) -> float:
        """CPU time of every process on the machine but the queen, simulators and driver."""
        return self.machine_busy - self.queen_cpu - self.simulator_cpu - self.driver_cpu


@dataclass
class Mesh:
    """One N's processes, and how to read their counters."""

    hives: int
    queen: Child
    simulators: list[SimulatorProcess]
    keeper: JobClient
    queen_log: Path
    hive_ids: list[str]
    setup_s: float = 0.0

    async def snapshot(self) -> Snapshot:
        status = await run_op(self.keeper, Status())
        for sim in self.simulators:
            sim.update()
        return Snapshot(
            wall=time.monotonic(),
            queen_cpu=cpu_seconds(self.queen.pid),
            simulator_cpu=sum(cpu_seconds(s.child.pid) for s in self.simulators),
            driver_cpu=cpu_seconds(os.getpid()),
            machine_busy=machine_busy_seconds(),
            published=sum(s.published for s in self.simulators),
            simulator_late_max_s=max(s.late_max_s for s in self.simulators),
            simulator_pass_max_s=max(s.pass_max_s for s in self.simulators),
            heartbeats=status["queen"]["heartbeats_received"],
            queen_uptime=status["queen"]["uptime_s"],
            log_offset=self.queen_log.stat().st_size,
        )

    def liveness_changes(self, since: Snapshot, until: Snapshot) -> dict[str, int]:
        """How often the queen logged a hive turning suspect, or lost, between two snapshots."""
        with open(self.queen_log, "rb") as log:
            log.seek(since.log_offset)
            text = log.read(until.log_offset - since.log_offset).decode(errors="replace")
        changes = {"suspect": 0, "lost": 0}
        for state in _LIVENESS_CHANGE.findall(text):
            changes[state] += 1
        return changes


_LIVENESS_CHANGE = re.compile(r"hive \S+ is (suspect|lost) \(was ")


async def run_op(keeper: JobClient, op: Operation) -> Any:
    """Run one job to its end: its result, or a RuntimeError saying how it ended."""
    job = await keeper.submit(op)
    async for _ in job:
        pass
    terminal: Message | None = job.terminal
    if not isinstance(terminal, Done):
        raise RuntimeError(f"{op.NAME} ended with {terminal!r:.300}")
    return terminal.result


async def time_ops(
    keeper: JobClient,
    make: Callable[[], Operation],
    check: Callable[[Any], None],
    duration_s: float,
    rate: float | None = None,
) -> tuple[list[float], float]:
    """Run jobs for `duration_s`: (the latency of each, the time they took in all).

    `rate` None: back to back, one job in flight. Else open loop: a job is submitted every
    1/rate s whether or not the earlier ones have ended. Back to back finds the most jobs per
    second but hides stalls: a stall holds back the next submission instead of delaying the
    jobs it would have met ("coordinated omission"). Open loop shows a stall in every job it
    delays. Each job is timed from its submission to its terminal frame; in open loop that is
    up to a millisecond after it was due (trio's timers wake on epoll's millisecond timeouts),
    which is this process's lateness, not the mesh's.
    """
    samples: list[float] = []

    async def timed() -> None:
        start = trio.current_time()
        result = await run_op(keeper, make())
        samples.append(trio.current_time() - start)
        check(result)

    start = trio.current_time()
    if rate is None:
        while trio.current_time() < start + duration_s:
            await timed()
    else:
        async with trio.open_nursery() as nursery:
            for n in range(round(duration_s * rate)):
                await trio.sleep_until(start + n / rate)
                nursery.start_soon(timed)
    return samples, trio.current_time() - start


def _share(cpu_before: float, cpu_after: float, wall: float) -> float:
    return round((cpu_after - cpu_before) / wall, 3)


def window_record(
    mesh: Mesh,
    op: str,
    rate: float | None,
    timed: tuple[list[float], float],
    before: Snapshot,
    after: Snapshot,
    hb_s: float,
) -> dict[str, Any]:
    samples, elapsed = timed
    wall = after.wall - before.wall
    ordered = sorted(samples)
    uptime = after.queen_uptime - before.queen_uptime
    record: dict[str, Any] = {
        "hives": mesh.hives,
        "workers": mesh.hives * WORKERS_PER_HIVE,
        "op": op,
        "mode": "back-to-back" if rate is None else "open-loop",
        "rate_per_s": rate,
        "samples": len(samples),
        "p50_us": round(statistics.median(ordered) * 1e6, 1) if ordered else None,
        "p99_us": round(ordered[math.ceil(0.99 * len(ordered)) - 1] * 1e6, 1) if ordered else None,
        "max_us": round(ordered[-1] * 1e6, 1) if ordered else None,
        "ops_per_s": round(len(samples) / elapsed, 1) if samples else None,
        "queen_cpu_share": _share(before.queen_cpu, after.queen_cpu, wall),
        "simulator_cpu_share": _share(before.simulator_cpu, after.simulator_cpu, wall),
        "driver_cpu_share": _share(before.driver_cpu, after.driver_cpu, wall),
        # Whatever else ran on the machine meanwhile (other benchmarks, builds): noise to read
        # these numbers against.
        "other_cpu_share": _share(before.others_cpu, after.others_cpu, wall),
        "heartbeats_per_s": round((after.heartbeats - before.heartbeats) / uptime, 1),
        "expected_heartbeats_per_s": round(mesh.hives / hb_s, 1),
        "published_heartbeats_per_s": round((after.published - before.published) / wall, 1),
        # Each is a false alarm: no simulated hive ever stops.
        **{f"hives_{k}": n for k, n in mesh.liveness_changes(before, after).items()},
        "simulator_late_max_s": after.simulator_late_max_s,
        "simulator_pass_max_ms": round(after.simulator_pass_max_s * 1e3, 1),
        "setup_s": round(mesh.setup_s, 2),
        "window_s": round(wall, 2),
        "queen_rss_mb": rss_mb(mesh.queen.pid),
        "queen_fds": open_fds(mesh.queen.pid),
        "simulator_processes": len(mesh.simulators),
        "simulator_rss_mb": round(sum(rss_mb(s.child.pid) for s in mesh.simulators), 1),
    }
    return record


@asynccontextmanager
async def running_mesh(
    hives: int,
    *,
    home: Path,
    heartbeat_s: float,
    progress: Callable[[str], None],
) -> AsyncIterator[Mesh]:
    """Simulators, then a queen that manages their hives, then a keeper that sees them all live.

    Everything started is stopped on the way out, whatever happened.
    """
    env = {**os.environ, "RBEE_MESH_HOME": str(home), "RBEE_MESH_DISCOVERY": "0"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    setup_timeout = 30 + 0.1 * hives  # 130 s at 1,000 hives
    splits = math.ceil(hives / MAX_HIVES_PER_SIMULATOR)
    children: list[Child] = []
    queen_log = home / "queen.log"
    try:
        async with trio.open_nursery() as nursery:
            simulators = []
            first = 0
            for n in range(splits):
                count = hives // splits + (1 if n < hives % splits else 0)
                argv = ["-m", "benchmarks.scale", "simulate", "--hives", str(count)]
                argv += ["--first", str(first), "--heartbeat", str(heartbeat_s)]
                child = Child(
                    f"simulator-{n}", argv, env=env, log=home / f"sim-{n}.log", stdout=True
                )
                children.append(child)
                assert child.stdout is not None
                reader = LineReader(child.stdout)
                nursery.start_soon(reader.run)
                simulators.append(SimulatorProcess(child, reader))
                first += count
            with trio.move_on_after(setup_timeout) as scope:
                for sim in simulators:
                    try:
                        sim.hives = json.loads(await sim.lines.next())["hives"]
                    except trio.EndOfChannel:
                        raise _failure(sim.child, "exited before it bound its hives") from None
            if scope.cancelled_caught:
                raise _failure(simulators[0].child, f"bound no hives in {setup_timeout:g} s")
            peers = [h["control"] for sim in simulators for h in sim.hives]
            hive_ids = [h["id"] for sim in simulators for h in sim.hives]
            progress(f"{hives} hives: {splits} simulator(s) bound them")
            (home / "config.toml").write_text(f"[queen]\npeers = {json.dumps(peers)}\n")
            argv = ["-m", "rbee_mesh", "queen", "start", "--foreground"]
            argv += ["--bind", "tcp://127.0.0.1:0", "--no-discovery"]
            argv += ["--heartbeat", str(heartbeat_s)]
            queen = Child("queen", argv, env=env, log=queen_log)
            children.append(queen)
            with trio.move_on_after(setup_timeout) as scope:
                endpoint = await _queen_endpoint(home / "queen.json", queen)
                async with open_keeper(endpoint, trust=Trust.load(home)) as keeper:
                    await _all_live(keeper, hives, queen)
                    mesh = Mesh(hives, queen, simulators, keeper, queen_log, hive_ids)
                    mesh.setup_s = time.monotonic() - queen.started
                    scope.deadline = math.inf
                    progress(
                        f"{hives} hives: all live {mesh.setup_s:.1f} s after the queen's start"
                    )
                    yield mesh
            if scope.cancelled_caught:
                raise _failure(queen, f"did not see {hives} hives live in {setup_timeout:g} s")
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for child in reversed(children):  # the queen first: it must not see hives vanish
                took = await child.stop(grace_s=10)
                progress(f"{hives} hives: {child.name} stopped in {took:.1f} s")


def _failure(child: Child, what: str) -> RuntimeError:
    return RuntimeError(f"the {child.name} {what}; its log ends:\n{child.log_tail()}")


async def _queen_endpoint(info: Path, queen: Child) -> str:
    """Where the queen listens, once its daemon info file says so (a file in another process:
    no event reaches this one, so it is polled, every 50 ms, within the caller's deadline)."""
    while (endpoint := _recorded_endpoint(info, queen.pid)) is None:
        if queen.exited():
            raise _failure(queen, "exited")
        await trio.sleep(0.05)
    return endpoint


def _recorded_endpoint(info: Path, pid: int) -> str | None:
    try:
        recorded = json.loads(info.read_text())
        return str(recorded["endpoint"]) if recorded["pid"] == pid else None
    except (OSError, ValueError, KeyError):
        return None


async def _all_live(keeper: JobClient, hives: int, queen: Child) -> None:
    """Until the queen's `status` lists `hives` hives, all live. Its state is in another
    process, so it is polled, every 200 ms (each poll is a job with a record per hive)."""
    while True:
        if queen.exited():
            raise _failure(queen, "exited")
        status = await run_op(keeper, Status())
        live = sum(1 for h in status["hives"] if h["liveness"] == "live")
        if len(status["hives"]) == hives and live == hives:
            return
        await trio.sleep(0.2)


@dataclass(frozen=True)
class Load:
    """One measurement window's jobs: what to submit, how to check its result, how often."""

    op: str
    make: Callable[[], Operation]
    check: Callable[[Any], None]
    #: Jobs per second, open loop; None: back to back.
    rate: float | None = None


async def measure(
    mesh: Mesh,
    *,
    window_s: float,
    heartbeat_s: float,
    rate: float,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    """The idle window, then one window per load, on a mesh whose hives are all live."""
    rng = random.Random(mesh.hives)
    with trio.fail_after(3 * heartbeat_s + window_s + 60):
        await trio.sleep(2 * heartbeat_s)  # let every subscription carry heartbeats
        before = await mesh.snapshot()
        await trio.sleep(window_s)
        after = await mesh.snapshot()
    idle = window_record(mesh, "idle", None, ([], window_s), before, after, heartbeat_s)
    progress(
        f"{mesh.hives} hives idle: queen {idle['queen_cpu_share']:.0%} of a core, "
        f"{idle['heartbeats_per_s']} heartbeats/s of {idle['expected_heartbeats_per_s']}"
    )

    def workers_listed(result: Any) -> None:
        if len(result) != WORKERS_PER_HIVE:
            raise RuntimeError(f"worker_list gave {len(result)} rows")

    def hives_listed(result: Any) -> None:
        rows = result["hives"] if isinstance(result, dict) else result
        if len(rows) != mesh.hives:
            raise RuntimeError(f"{len(rows)} hives listed of {mesh.hives}")

    def pinned() -> Operation:
        return WorkerList(hive=rng.choice(mesh.hive_ids))

    loads = [
        Load("worker_list", pinned, workers_listed),
        Load("worker_list", pinned, workers_listed, rate),  # the target's row: see time_ops
        Load("status", Status, hives_listed),
        Load("hive_list", HiveList, hives_listed),
    ]
    records = []
    for load in loads:
        # Bounded: a job ends by its deadline (30 s at most here), and no job starts after
        # window_s; an open loop's jobs are all due within it.
        with trio.fail_after(2 * window_s + 90):
            await time_ops(mesh.keeper, load.make, load.check, min(window_s, 1.0), load.rate)
            before = await mesh.snapshot()
            timed = await time_ops(mesh.keeper, load.make, load.check, window_s, load.rate)
            after = await mesh.snapshot()
        record = window_record(mesh, load.op, load.rate, timed, before, after, heartbeat_s)
        for key in ("queen_cpu_share", "simulator_cpu_share", "heartbeats_per_s"):
            record[f"idle_{key}"] = idle[key]
        record["idle_hives_suspect"] = idle["hives_suspect"]
        record["idle_hives_lost"] = idle["hives_lost"]
        records.append(record)
        progress(
            f"{mesh.hives} hives {load.op} {record['mode']}: p50 {record['p50_us'] / 1e3:.2f} "
            f"ms, p99 {record['p99_us'] / 1e3:.2f} ms, {record['ops_per_s']} ops/s, "
            f"queen {record['queen_cpu_share']:.0%}"
        )
    return records


async def _run_scale(
    hive_counts: Sequence[int],
    window_s: float,
    workdir: Path,
    heartbeat_s: float,
    rate: float,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for hives in hive_counts:
        home = Path(tempfile.mkdtemp(prefix=f"scale-{hives}-", dir=workdir))
        try:
            async with running_mesh(
                hives, home=home, heartbeat_s=heartbeat_s, progress=progress
            ) as mesh:
                records += await measure(
                    mesh, window_s=window_s, heartbeat_s=heartbeat_s, rate=rate, progress=progress
                )
        finally:
            shutil.rmtree(home, ignore_errors=True)
    return records


def run_scale(
    hive_counts: Sequence[int],
    *,
    window_s: float,
    workdir: Path,
    progress: Callable[[str], None] = lambda s: None,
    heartbeat_s: float = HEARTBEAT_S,
    rate: float = RATE_PER_S,
) -> list[dict[str, Any]]:
    """For each N in `hive_counts`: a queen with N simulated hives of 8 workers; one record per
    (N, operation, mode) with latency, CPU shares and heartbeat rates (see the module
    docstring). `rate`: jobs per second of the open-loop `worker_list` window.

    `workdir` holds each N's state directory (the queen's home, logs) while it runs.
    """
    counts = list(hive_counts)
    return trio.run(_run_scale, counts, window_s, workdir, heartbeat_s, rate, progress)


# ---- command line ------------------------------------------------------------------------------


def print_table(records: list[dict[str, Any]]) -> None:
    def ms(us: float | None) -> str:
        return "-" if us is None else f"{us / 1e3:.2f}"

    print(
        f"{'hives':>6} {'op':<12} {'mode':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'ops/s':>7} {'queen':>6} {'idle q':>6} {'sims':>5} {'keeper':>6} {'other':>5} "
        f"{'hb/s':>7} {'expect':>7} {'alarms':>6} {'setup s':>7} {'RSS MB':>6}"
    )
    for r in records:
        mode = "max" if r["rate_per_s"] is None else f"{r['rate_per_s']:g}/s"
        print(
            f"{r['hives']:>6} {r['op']:<12} {mode:>6} {ms(r['p50_us']):>7} {ms(r['p99_us']):>7} "
            f"{ms(r['max_us']):>7} {r['ops_per_s']:>7} {r['queen_cpu_share']:>6.0%} "
            f"{r['idle_queen_cpu_share']:>6.0%} {r['simulator_cpu_share']:>5.0%} "
            f"{r['driver_cpu_share']:>6.0%} {r['other_cpu_share']:>5.0%} "
            f"{r['heartbeats_per_s']:>7} {r['expected_heartbeats_per_s']:>7} "
            f"{r['hives_suspect'] + r['hives_lost']:>6} {r['setup_s']:>7} {r['queen_rss_mb']:>6}"
        )
    print(
        "mode: open loop at that rate, or back to back (max). CPU shares are of one core: the "
        "queen, the queen at rest (idle q), the simulators, the keeper's process, everything "
        "else on the machine. hb/s: heartbeats the queen took, of those expected. alarms: hives "
        "the queen thought suspect or lost (none ever stops)."
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["simulate"]:
        sim = argparse.ArgumentParser(prog="benchmarks.scale simulate")
        sim.add_argument("--hives", type=int, required=True)
        sim.add_argument("--first", type=int, default=0, help="number of the first hive's id")
        sim.add_argument("--workers", type=int, default=WORKERS_PER_HIVE)
        sim.add_argument("--heartbeat", type=float, default=HEARTBEAT_S)
        sim.add_argument("--seed", type=int, default=0)
        a = sim.parse_args(args[1:])
        trio.run(serve_simulated_hives, a.hives, a.first, a.workers, a.heartbeat, a.seed)
        return
    parser = argparse.ArgumentParser(prog="benchmarks.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--hives", default="10,100,1000", help="hive counts, comma-separated")
    parser.add_argument("--window", type=float, default=10.0, help="seconds per window")
    parser.add_argument(
        "--rate", type=float, default=RATE_PER_S, help="jobs/s of the open-loop worker_list"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--out", type=Path, help="also write the records to this JSON file")
    a = parser.parse_args(args)
    counts = [int(n) for n in a.hives.split(",")]
    with tempfile.TemporaryDirectory(prefix="rbee-scale-") as tmp:
        records = run_scale(
            counts,
            window_s=a.window,
            workdir=Path(tmp),
            progress=lambda s: print(s, file=sys.stderr, flush=True),
            rate=a.rate,
        )
    report = {"benchmark": "scale", "cpus": os.cpu_count(), "results": records}
    if a.out is not None:
        a.out.write_text(json.dumps(report, indent=2))
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(records)


if __name__ == "__main__":
    main()
