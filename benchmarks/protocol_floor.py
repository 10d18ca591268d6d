"""The floor under a job: what the mesh's job protocol costs with nothing else in it.

A control job (`worker list`) takes these frames and task steps through keeper -> queen -> hive,
whatever else the actors do (docs/protocol.md, "Job lifecycle"; actors/jobserver.py and
actors/jobclient.py):

- the keeper sends SUBMIT; its client's receive loop hands each frame to the task that waits;
- the queen answers ACCEPTED from its receive loop and starts a job task, which sends SUBMIT to
  the hive and waits for its ACCEPTED and DONE (handed over by the queen's client loop, which
  passes NARRATION on unopened), then sends DONE;
- the hive answers ACCEPTED from its receive loop and starts a job task, which sends one
  NARRATION and DONE.

This runs exactly that, with frames of the mesh's sizes, and nothing decoded, validated, timed
or recorded: in one process over trio memory channels (the integrated mode's layout), and in
three processes over localhost tcp with the mesh's TrioSocket (the localhost modes' layout,
plaintext). The mesh cannot be faster than these; `rbee-mesh bench` measures them in its run
and says how far each goal is from them (docs/benchmarks.md, "Issue 15"). A third layout, in
one process, is the leanest the protocol allows: the queen relays a job from its loops, with no
job task, and the keeper reads its frames itself, with no client loop.

    .venv/bin/python -m benchmarks.protocol_floor [--runs 3000] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from collections.abc import Awaitable, Callable
from functools import partial
from multiprocessing.connection import Connection

import trio
import zmq

from benchmarks.zmq_floor import percentiles
from rbee_mesh.protocol.codec import HEADER
from rbee_mesh.transport.zmq_trio import TrioSocket

_JOB = b"job-0123456789ab"
#: A keeper's SUBMIT has no job id; the queen's, forwarding it, has the job's.
SUBMIT = [HEADER, b"\x01", b"", b"s" * 95]
FORWARDED = [HEADER, b"\x01", _JOB, b"s" * 95]
ACCEPTED = [HEADER, b"\x02", _JOB, b"a" * 51]
NARRATION = [HEADER, b"\x03", _JOB, b"n" * 129]
DONE = [HEADER, b"\x06", _JOB, b"d" * 126]
_KIND_ACCEPTED, _KIND_NARRATION, _KIND_DONE = ACCEPTED[1], NARRATION[1], DONE[1]
WARM_UP = 200

Send = Callable[[list[bytes]], None]
Receive = Callable[[], Awaitable[list[bytes]]]


async def hive(receive: Receive, send: Send) -> None:
    """A server's part: ACCEPTED at once, then a job task. Frames come and go with the
    client's routing id first."""
    async with trio.open_nursery() as jobs:
        while True:
            peer, *_ = await receive()
            send([peer, *ACCEPTED])

            async def job(peer: bytes) -> None:
                send([peer, *NARRATION])
                send([peer, *DONE])

            jobs.start_soon(job, peer)


async def queen(receive: Receive, send: Send, down: Send, up: Receive) -> None:
    """The server's part to keepers (`receive`, `send`), forwarding each job down one hop
    (`down`, `up`) from a job task that waits for the hive's ACCEPTED and DONE."""
    waiting: dict[bytes, trio.MemorySendChannel[list[bytes]]] = {}
    keepers: dict[bytes, bytes] = {}

    async def client_loop() -> None:
        while True:
            frames = await up()
            if frames[1] == _KIND_NARRATION:
                send([keepers[frames[2]], *frames])  # relayed unopened
            else:
                waiting[frames[2]].send_nowait(frames)

    async def job(peer: bytes) -> None:
        answers, answered = trio.open_memory_channel[list[bytes]](10)
        waiting[_JOB], keepers[_JOB] = answers, peer
        down(FORWARDED)
        await answered.receive()  # ACCEPTED
        done = await answered.receive()
        del waiting[_JOB]
        send([peer, *done])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_loop)
        while True:
            peer, *_ = await receive()
            send([peer, *ACCEPTED])
            nursery.start_soon(job, peer)


async def relaying_queen(receive: Receive, send: Send, down: Send, up: Receive) -> None:
    """`queen` with no job task: SUBMIT passed down from its receive loop, and every frame
    of the hive's but ACCEPTED passed back from its client loop."""
    keepers: dict[bytes, bytes] = {}

    async def client_loop() -> None:
        while True:
            frames = await up()
            if frames[1] != _KIND_ACCEPTED:
                send([keepers[frames[2]], *frames])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_loop)
        while True:
            peer, *_ = await receive()
            send([peer, *ACCEPTED])
            keepers[_JOB] = peer
            down(FORWARDED)


async def keeper(
    send: Send, receive: Receive, runs: int, *, client_loop: bool = True
) -> list[float]:
    """Submit `runs` jobs one after another (after WARM_UP more); each one's round trip, in s.
    A client loop hands the frames to the submitting task, as the mesh's JobClient does
    (without one, the submitting task reads them itself)."""
    frames, handed = trio.open_memory_channel[list[bytes]](100)

    async def hand_over() -> None:
        while True:
            frames.send_nowait(await receive())

    times = []
    async with trio.open_nursery() as nursery:
        if client_loop:
            nursery.start_soon(hand_over)
        read = handed.receive if client_loop else receive
        for i in range(WARM_UP + runs):
            start = time.perf_counter()
            send(SUBMIT)
            while (await read())[1] != _KIND_DONE:
                pass
            if i >= WARM_UP:
                times.append(time.perf_counter() - start)
        nursery.cancel_scope.cancel()
    return times


# ---- one process --------------------------------------------------------------------------


async def in_process(runs: int, *, lean: bool = False) -> list[float]:
    """The three actors as tasks of one trio run, over memory channels; `lean`: the queen
    with no job task (`relaying_queen`) and the keeper with no client loop."""
    to_queen, queen_inbox = trio.open_memory_channel[list[bytes]](1_000)
    to_keeper, keeper_inbox = trio.open_memory_channel[list[bytes]](1_000)
    to_hive, hive_inbox = trio.open_memory_channel[list[bytes]](1_000)
    to_link, link_inbox = trio.open_memory_channel[list[bytes]](1_000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hive, hive_inbox.receive, lambda f: to_link.send_nowait(f[1:]))
        nursery.start_soon(
            relaying_queen if lean else queen, queen_inbox.receive,
            lambda f: to_keeper.send_nowait(f[1:]), lambda f: to_hive.send_nowait([b"queen", *f]),
            link_inbox.receive,
        )  # fmt: skip
        times = await keeper(
            lambda f: to_queen.send_nowait([b"k", *f]), keeper_inbox.receive, runs,
            client_loop=not lean,
        )  # fmt: skip
        nursery.cancel_scope.cancel()
    return times


# ---- three processes ------------------------------------------------------------------------


def _router(ctx: zmq.Context[zmq.Socket[bytes]]) -> tuple[TrioSocket, str]:
    """A ROUTER on an ephemeral loopback port, and its endpoint."""
    sock = TrioSocket(ctx.socket(zmq.ROUTER))
    sock.socket.bind("tcp://127.0.0.1:*")
    return sock, sock.socket.getsockopt_string(zmq.LAST_ENDPOINT)


def _dealer(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> TrioSocket:
    sock = TrioSocket(ctx.socket(zmq.DEALER))
    sock.socket.connect(endpoint)
    return sock


def _hive_process(bound: Connection) -> None:
    async def serve() -> None:
        sock, endpoint = _router(zmq.Context())
        bound.send(endpoint)
        await hive(sock.recv_multipart, sock.send_multipart_nowait)

    trio.run(serve)


def _queen_process(bound: Connection, hive_endpoint: str) -> None:
    async def serve() -> None:
        ctx = zmq.Context()
        (front, endpoint), back = _router(ctx), _dealer(ctx, hive_endpoint)
        bound.send(endpoint)
        await queen(
            front.recv_multipart, front.send_multipart_nowait, back.send_multipart_nowait,
            back.recv_multipart,
        )  # fmt: skip

    trio.run(serve)


def _start(procs: list[multiprocessing.Process], target: Callable[..., None], *args: str) -> str:
    """Start a server process; the endpoint it bound."""
    mine, theirs = multiprocessing.Pipe()
    proc = multiprocessing.Process(target=target, args=(theirs, *args), daemon=True)
    procs.append(proc)
    proc.start()
    if not mine.poll(30):
        raise RuntimeError(
            f"{target.__name__} bound nothing within 30 s (exit code {proc.exitcode})"
        )
    return str(mine.recv())


def over_tcp(runs: int) -> list[float]:
    """The three actors as processes on localhost tcp (ephemeral ports)."""
    procs: list[multiprocessing.Process] = []

    async def client(endpoint: str) -> list[float]:
        ctx = zmq.Context()
        sock = _dealer(ctx, endpoint)
        try:
            # A bound on the whole: a server that dies midway must not hang the benchmark.
            with trio.fail_after(30 + runs * 0.01):
                await sock.send_multipart(SUBMIT)  # both servers up and connected: it comes back
                while (await sock.recv_multipart())[1] != _KIND_DONE:
                    pass
                return await keeper(sock.send_multipart_nowait, sock.recv_multipart, runs)
        finally:
            await sock.aclose()
            ctx.destroy(linger=0)

    try:
        hive_endpoint = _start(procs, _hive_process)
        queen_endpoint = _start(procs, _queen_process, hive_endpoint)
        return trio.run(client, queen_endpoint)
    finally:
        for proc in procs:
            proc.kill()
            proc.join()


def measure(runs: int) -> dict[str, dict[str, float]]:
    """The floors, p50 and p99 in us: in one process as the mesh lays its actors out
    (`integrated`) and in the leanest layout (`integrated_lean`), and over tcp."""
    return {
        "integrated": percentiles(trio.run(in_process, runs)),
        "integrated_lean": percentiles(trio.run(partial(in_process, runs, lean=True))),
        "tcp": percentiles(over_tcp(runs)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    floors = measure(args.runs)
    if args.json:
        print(json.dumps(floors, indent=2))
        return
    print(f"{'the job protocol alone':<24} {'p50 us':>8} {'p99 us':>8}")
    for layout, row in floors.items():
        print(f"{layout:<24} {row['p50_us']:>8} {row['p99_us']:>8}")


if __name__ == "__main__":
    main()
