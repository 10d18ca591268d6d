"""What CURVE costs: the same exchanges over localhost tcp with and without it, in one run.

Every socket of the mesh that another process can reach is CURVE (docs/security.md); the mode
rows of `rbee-mesh bench` measure the mesh with it. This measures the difference it makes, one
hop (a DEALER and a ROUTER, through the mesh's own transport: `open_connection`,
`open_listener`, the ZAP handler admitting the client's key), both ends in this process, the two
modes interleaved round by round:

- handshake: a new connection, its first request and the reply (TCP connect, ZMTP greeting,
  and with CURVE the key exchange and the ZAP round trip);
- control: a request of ~300 bytes and a reply of ~1.5 KB on an open connection (a worker list);
- tokens: a request, then 64 frames of ~60 bytes back (a token stream, uncoalesced: the worst
  case for per-message crypto).

    .venv/bin/python -m benchmarks.curve [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import trio

from rbee_mesh.actors.trust import Role, Trust
from rbee_mesh.transport import Connection, Listener, SocketOptions, open_connection, open_listener
from rbee_mesh.transport.curve import ClientKeys, Keypair

MODES = ("curve", "plaintext")
OPS = ("handshake", "control", "tokens")
TOKENS = 64
REQUEST = b"r" * 300
REPLY = b"w" * 1_500
TOKEN = b"t" * 60


def _options(mode: str, server: Trust, client: Keypair) -> tuple[SocketOptions, SocketOptions]:
    if mode == "plaintext":
        plain = SocketOptions(plaintext=True)
        return plain, plain
    keys = ClientKeys(client, server.public)
    return SocketOptions(curve=server.server_keys()), SocketOptions(curve=keys)


async def _serve(listener: Listener) -> None:
    """Answer `control` with REPLY and `tokens` with TOKENS frames, to whoever asks."""
    while True:
        peer, frames, _ = await listener.receive()
        if frames[0] == b"tokens":
            for _ in range(TOKENS):
                await listener.send(peer, [TOKEN])
        else:
            await listener.send(peer, [REPLY])


async def _control(conn: Connection) -> None:
    await conn.send([b"control", REQUEST])
    await conn.receive()


async def _tokens(conn: Connection) -> None:
    await conn.send([b"tokens"])
    for _ in range(TOKENS):
        await conn.receive()


async def measure(
    rounds: int, batch: dict[str, int], progress: Callable[[str], None] = lambda _: None
) -> list[dict[str, Any]]:
    """Samples of each op in each mode, interleaved; summarised as rows (p50, p99, ratio)."""
    server = Trust(Keypair.generate())
    client = Keypair.generate()
    server.trust(client.public, Role.KEEPER, "bench")
    samples: dict[tuple[str, str], list[float]] = {(m, o): [] for m in MODES for o in OPS}
    for n in range(rounds):
        progress(f"CURVE cost: round {n + 1} of {rounds}")
        for mode in random.sample(MODES, len(MODES)):
            served, dialled = _options(mode, server, client)
            async with AsyncExitStack() as stack:
                listener = await stack.enter_async_context(
                    await open_listener("tcp://127.0.0.1:0", options=served)
                )
                nursery = await stack.enter_async_context(trio.open_nursery())
                nursery.start_soon(_serve, listener)
                for op in random.sample(OPS, len(OPS)):
                    samples[mode, op] += await _batch(op, batch[op], listener.endpoint, dialled)
                nursery.cancel_scope.cancel()
    return summarise(samples)


async def _batch(op: str, n: int, endpoint: str, options: SocketOptions) -> list[float]:
    times = []
    if op == "handshake":
        for _ in range(n):
            start = time.perf_counter()
            async with await open_connection(endpoint, options=options) as conn:
                await _control(conn)
            times.append(time.perf_counter() - start)
        return times
    run: Callable[[Connection], Awaitable[None]] = _control if op == "control" else _tokens
    async with await open_connection(endpoint, options=options) as conn:
        await run(conn)  # connected and warm
        for _ in range(n):
            start = time.perf_counter()
            await run(conn)
            times.append(time.perf_counter() - start)
    return times


def summarise(samples: dict[tuple[str, str], list[float]]) -> list[dict[str, Any]]:
    rows = []
    for op in OPS:
        plain = statistics.median(samples["plaintext", op])
        for mode in MODES:
            values = sorted(samples[mode, op])
            p50 = statistics.median(values)
            rows.append(
                {
                    "op": op,
                    "mode": mode,
                    "samples": len(values),
                    "p50_us": round(p50 * 1e6, 1),
                    "p99_us": round(values[min(len(values) - 1, int(len(values) * 0.99))] * 1e6, 1),
                    "vs_plaintext": round(p50 / plain, 3),
                }
            )
    return rows


def plan(quick: bool) -> tuple[int, dict[str, int]]:
    """(rounds, runs per batch of each op)."""
    if quick:
        return 3, {"handshake": 20, "control": 200, "tokens": 50}
    return 10, {"handshake": 50, "control": 500, "tokens": 100}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'CURVE cost, one tcp hop':<26} {'p50':>10} {'p99':>10} {'vs plaintext':>13}"]
    for r in rows:
        label = f"{r['op']} ({r['mode']})"
        lines.append(
            f"{label:<26} {r['p50_us']:>8.0f}us {r['p99_us']:>8.0f}us {r['vs_plaintext']:>12.2f}x"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.curve", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rounds, batch = plan(args.quick)
    rows = trio.run(measure, rounds, batch)
    print(json.dumps(rows, indent=2) if args.json else table(rows))


if __name__ == "__main__":
    main()
