"""The floor under the mesh's localhost modes: ZeroMQ alone, with no Python logic to speak of.

Three processes, as in the localhost modes: a client DEALER, a relay (ROUTER in front, DEALER
behind, relaying each message unopened, like the queen relays a hive's frames), and an echo
ROUTER behind it: one round trip through one hop (client to echo) and through two (client to
relay to echo), four frames per message like ours. Twice: with plain blocking pyzmq (`blocking`),
and with the same sockets driven by trio through the mesh's own `TrioSocket` (`trio`), with no
codec and no actors. The mesh cannot be faster than these on the same machine; the differences
are what trio and the actors cost (docs/benchmarks.md, "Where the time goes").

    .venv/bin/python -m benchmarks.zmq_floor [--runs 5000] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import statistics
import tempfile
import time
from typing import Any

import trio
import zmq

from rbee_mesh.transport.zmq_trio import TrioSocket

FRAMES = [b"RBEE\x01", b"\x01", b"job-0123456789ab", b"\x81\xa2op\xabworker_list"]


def echo(endpoint: str) -> None:
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        sock.send_multipart(sock.recv_multipart())


def relay(front: str, back: str) -> None:
    ctx = zmq.Context()
    outer, inner = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    outer.bind(front)
    inner.connect(back)
    poller = zmq.Poller()
    poller.register(outer, zmq.POLLIN)
    poller.register(inner, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            if sock is outer:
                inner.send_multipart(outer.recv_multipart())
            else:
                outer.send_multipart(inner.recv_multipart())


def trio_echo(endpoint: str) -> None:
    async def serve() -> None:
        sock = TrioSocket(zmq.Context().socket(zmq.ROUTER))
        sock.socket.bind(endpoint)
        while True:
            await sock.send_multipart(await sock.recv_multipart(), block=False)

    trio.run(serve)


def trio_relay(front: str, back: str) -> None:
    async def serve() -> None:
        ctx = zmq.Context()
        outer, inner = TrioSocket(ctx.socket(zmq.ROUTER)), TrioSocket(ctx.socket(zmq.DEALER))
        outer.socket.bind(front)
        inner.socket.connect(back)

        async def pump(source: TrioSocket, sink: TrioSocket, block: bool) -> None:
            while True:
                await sink.send_multipart(await source.recv_multipart(), block=block)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, outer, inner, True)
            nursery.start_soon(pump, inner, outer, False)

    trio.run(serve)


def round_trips(endpoint: str, runs: int) -> dict[str, float]:
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(endpoint)
    times = []
    for i in range(runs + 200):
        start = time.perf_counter()
        sock.send_multipart(FRAMES)
        sock.recv_multipart()
        if i >= 200:  # the first ones connect and warm up
            times.append(time.perf_counter() - start)
    return percentiles(times)


def percentiles(times: list[float]) -> dict[str, float]:
    """p50 and p99 (nearest rank) of round trips in seconds, in us."""
    times.sort()
    return {
        "p50_us": round(statistics.median(times) * 1e6, 1),
        "p99_us": round(times[round(0.99 * (len(times) - 1))] * 1e6, 1),
    }


def measure(
    runs: int,
    drivers: tuple[str, ...] = ("blocking", "trio"),
    schemes: tuple[str, ...] = ("ipc", "tcp"),
) -> list[dict[str, Any]]:
    rows = []
    servers = {"blocking": (echo, relay), "trio": (trio_echo, trio_relay)}
    with tempfile.TemporaryDirectory() as tmp:
        for driver, scheme in itertools.product(drivers, schemes):
            echo_fn, relay_fn = servers[driver]
            if scheme == "ipc":
                back, front = f"ipc://{tmp}/echo-{driver}", f"ipc://{tmp}/relay-{driver}"
            else:
                port = 17931 if driver == "blocking" else 17933
                back, front = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"
            procs = [
                multiprocessing.Process(target=echo_fn, args=(back,), daemon=True),
                multiprocessing.Process(target=relay_fn, args=(front, back), daemon=True),
            ]
            for proc in procs:
                proc.start()
            try:
                for hops, endpoint in ((1, back), (2, front)):
                    row = {"servers": driver, "transport": scheme, "hops": hops}
                    rows.append({**row, **round_trips(endpoint, runs)})
            finally:
                for proc in procs:
                    proc.kill()
                    proc.join()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = measure(args.runs)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'servers':<9} {'transport':<10} {'hops':>4} {'p50 us':>8} {'p99 us':>8}")
    for r in rows:
        print(
            f"{r['servers']:<9} {r['transport']:<10} {r['hops']:>4} {r['p50_us']:>8} "
            f"{r['p99_us']:>8}"
        )


if __name__ == "__main__":
    main()
