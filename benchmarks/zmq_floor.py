"""The floor under the mesh's localhost modes: ZeroMQ alone, with no Python logic to speak of.

Three processes, as in the localhost modes: a client DEALER, a relay (ROUTER in front, DEALER
behind, relaying each message unopened, like the queen relays a hive's frames), and an echo
ROUTER behind it. Plain blocking pyzmq, no trio, no codec: one round trip through one hop (client
to echo) and through two (client to relay to echo), four frames per message like ours. The mesh
cannot be faster than this on the same machine; the difference is what trio, the codec and the
actors cost (docs/benchmarks.md, "Where the time goes").

    .venv/bin/python -m benchmarks.zmq_floor [--runs 5000] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from typing import Any

import zmq

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
    times.sort()
    return {
        "p50_us": round(statistics.median(times) * 1e6, 1),
        "p99_us": round(times[round(0.99 * (len(times) - 1))] * 1e6, 1),
    }


def measure(runs: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in ("ipc", "tcp"):
            if scheme == "ipc":
                back, front = f"ipc://{tmp}/echo", f"ipc://{tmp}/relay"
            else:
                back, front = "tcp://127.0.0.1:17931", "tcp://127.0.0.1:17932"
            procs = [
                multiprocessing.Process(target=echo, args=(back,), daemon=True),
                multiprocessing.Process(target=relay, args=(front, back), daemon=True),
            ]
            for proc in procs:
                proc.start()
            try:
                for hops, endpoint in ((1, back), (2, front)):
                    rows.append({"transport": scheme, "hops": hops, **round_trips(endpoint, runs)})
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
    print(f"{'transport':<10} {'hops':>4} {'p50 us':>8} {'p99 us':>8}")
    for r in rows:
        print(f"{r['transport']:<10} {r['hops']:>4} {r['p50_us']:>8} {r['p99_us']:>8}")


if __name__ == "__main__":
    main()
