"""TrioSocket under load and under cancellation, over real inproc, ipc and tcp sockets.

The burst is the regression test for the edge-triggered zmq.FD: the naive "try, then
wait_readable(FD)" loop hung here after a few hundred messages.
"""

from __future__ import annotations

import itertools
import struct
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
import zmq

from rbee_mesh.transport import SocketOptions, TrioSocket, make_socket

ZMQ_TRANSPORTS = ["inproc", "ipc", "tcp"]

MESSAGES_EACH_WAY = 100_000
SENDERS = 4  # per side
RECEIVERS = 4  # per side
HEADER = b"RBEE\x01"
KIND = b"TOKEN"
BODY = bytes(range(64))  # the size of a small msgpack body


def ident(sender: int, seq: int) -> bytes:
    return struct.pack(">HI", sender, seq)


@pytest.fixture(params=ZMQ_TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@asynccontextmanager
async def router_and_dealer(
    transport: str, tmp_path: Path, options: SocketOptions | None = None
) -> AsyncIterator[tuple[TrioSocket, TrioSocket, bytes]]:
    """A connected (router, dealer, the dealer's peer id at the router)."""
    address = {
        "inproc": f"inproc://{uuid.uuid4().hex}",
        "ipc": f"ipc://{tmp_path}/burst.sock",
        "tcp": "tcp://127.0.0.1:*",
    }[transport]
    router = TrioSocket(make_socket(zmq.ROUTER, options=options))
    dealer = TrioSocket(make_socket(zmq.DEALER, options=options))
    try:
        router.socket.bind(address)
        dealer.socket.connect(router.socket.get_string(zmq.LAST_ENDPOINT))
        await dealer.send_multipart([b"hello"])
        peer, hello = await router.recv_multipart()
        assert hello == b"hello"
        yield router, dealer, peer
    finally:
        await dealer.aclose()
        await router.aclose()


class Tally:
    """What one side received, checked as it arrives: each message exactly once, and each
    receiver sees every sender's messages in the order they were sent."""

    def __init__(self, senders: int, per_sender: int) -> None:
        self.seen = [bytearray(per_sender) for _ in range(senders)]
        self.expected = senders * per_sender
        self.count = 0
        self.complete = trio.Event()

    def record(self, frames: list[bytes], last_seq: list[int]) -> None:
        header, kind, message_id, body = frames
        assert (header, kind, body) == (HEADER, KIND, BODY)
        sender, seq = struct.unpack(">HI", message_id)
        assert not self.seen[sender][seq], f"duplicate {sender}/{seq}"
        assert seq > last_seq[sender], f"out of order {sender}/{seq} after {last_seq[sender]}"
        self.seen[sender][seq] = 1
        last_seq[sender] = seq
        self.count += 1
        if self.count == self.expected:
            self.complete.set()


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_burst_of_100k_messages_each_way_arrives_exactly_once_in_order(
    transport: str, tmp_path: Path
) -> None:
    per_sender = MESSAGES_EACH_WAY // SENDERS
    at_router = Tally(SENDERS, per_sender)
    at_dealer = Tally(SENDERS, per_sender)

    with trio.fail_after(120):
        async with router_and_dealer(transport, tmp_path) as (router, dealer, peer):

            async def dealer_sender(sender: int) -> None:
                for seq in range(per_sender):
                    await dealer.send_multipart([HEADER, KIND, ident(sender, seq), BODY])

            async def router_sender(sender: int) -> None:
                # One peer, so the ROUTER's POLLOUT is that peer's: blocking is meaningful.
                for seq in range(per_sender):
                    await router.send_multipart([peer, HEADER, KIND, ident(sender, seq), BODY])

            async def dealer_receiver() -> None:
                last_seq = [-1] * SENDERS
                while True:
                    at_dealer.record(await dealer.recv_multipart(), last_seq)

            async def router_receiver() -> None:
                last_seq = [-1] * SENDERS
                while True:
                    source, *frames = await router.recv_multipart()
                    assert source == peer
                    at_router.record(frames, last_seq)

            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(RECEIVERS):
                    nursery.start_soon(dealer_receiver)
                    nursery.start_soon(router_receiver)
                for sender in range(SENDERS):
                    nursery.start_soon(dealer_sender, sender)
                    nursery.start_soon(router_sender, sender)
                await at_router.complete.wait()
                await at_dealer.complete.wait()
                elapsed = trio.current_time() - started
                nursery.cancel_scope.cancel()

    assert at_router.count == at_dealer.count == MESSAGES_EACH_WAY
    print(
        f"\n{transport}: {MESSAGES_EACH_WAY:,} x 4-frame messages each way in {elapsed:.2f} s, "
        f"{MESSAGES_EACH_WAY / elapsed:,.0f} msg/s each way, "
        f"{2 * MESSAGES_EACH_WAY / elapsed:,.0f} msg/s total"
    )


async def assert_usable(router: TrioSocket, dealer: TrioSocket, peer: bytes) -> None:
    """Both directions still carry messages."""
    await router.send_multipart([peer, b"to dealer"], block=False)
    assert await dealer.recv_multipart() == [b"to dealer"]
    await dealer.send_multipart([b"to router"])
    assert await router.recv_multipart() == [peer, b"to router"]


@pytest.mark.parametrize("side", ["dealer", "router"])
async def test_cancelling_a_blocked_receiver_leaves_the_socket_usable(
    transport: str, side: str, tmp_path: Path
) -> None:
    with trio.fail_after(10):
        async with router_and_dealer(transport, tmp_path) as (router, dealer, peer):
            sock = dealer if side == "dealer" else router
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sock.recv_multipart)
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
            await assert_usable(router, dealer, peer)


@pytest.mark.parametrize("cancelled", ["fd waiter", "parked"])
async def test_cancelling_one_of_two_blocked_receivers_leaves_the_other_receiving(
    transport: str, cancelled: str, tmp_path: Path
) -> None:
    with trio.fail_after(10):
        async with router_and_dealer(transport, tmp_path) as (router, dealer, peer):
            scopes = [trio.CancelScope(), trio.CancelScope()]
            received: list[tuple[int, list[bytes]]] = []

            async def receive(index: int) -> None:
                with scopes[index]:
                    received.append((index, await dealer.recv_multipart()))

            async with trio.open_nursery() as nursery:
                # Started one at a time: the first waits on the FD, the second parks.
                nursery.start_soon(receive, 0)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(receive, 1)
                await trio.testing.wait_all_tasks_blocked()
                victim = 0 if cancelled == "fd waiter" else 1
                scopes[victim].cancel()
                await trio.testing.wait_all_tasks_blocked()
                await router.send_multipart([peer, b"for the survivor"], block=False)
            assert received == [(1 - victim, [b"for the survivor"])]
            await assert_usable(router, dealer, peer)


async def test_cancelling_a_sender_blocked_on_a_full_pipe_never_sends_half_a_message(
    transport: str, tmp_path: Path
) -> None:
    small = SocketOptions(sndhwm=2, rcvhwm=2)
    body = bytes(16 * 1024)  # fills tcp's kernel buffers after a few hundred messages
    sent = 0
    with trio.fail_after(20):
        async with router_and_dealer(transport, tmp_path, small) as (router, dealer, peer):

            async def flood() -> None:
                nonlocal sent
                for seq in itertools.count():
                    await dealer.send_multipart([HEADER, KIND, ident(0, seq), body])
                    sent += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                # The router reads nothing, so the flood ends up waiting for room.
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
            assert sent > 0

            # Everything sent arrives whole and in order, then the marker sent after the
            # cancellation: nothing half-sent is stuck in the pipe.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dealer.send_multipart, [b"marker"])
                for seq in range(sent):
                    assert await router.recv_multipart() == [
                        peer,
                        HEADER,
                        KIND,
                        ident(0, seq),
                        body,
                    ]
                assert await router.recv_multipart() == [peer, b"marker"]
            await assert_usable(router, dealer, peer)


async def test_receiver_waiting_on_the_fd_wakes_when_another_task_swallows_its_signal(
    transport: str, tmp_path: Path
) -> None:
    # Deterministic over inproc, where a send signals the peer's FD synchronously: the
    # receiver waits on the dealer's FD; a message arrives (FD signalled); before the
    # receiver runs, a sender on the same dealer finds its pipe full and reads EVENTS, which
    # consumes the signal. Nothing else will ever signal the FD again, so unless the sender
    # wakes the receiver, the receiver hangs although the message is waiting.
    small = SocketOptions(sndhwm=1, rcvhwm=1)
    with trio.fail_after(10):
        async with router_and_dealer(transport, tmp_path, small) as (router, dealer, peer):
            # The router never reads, so the dealer's outbound pipe fills up.
            with pytest.raises(zmq.Again):
                while True:
                    await dealer.send_multipart([b"fill"], block=False)
            received: list[list[bytes]] = []
            done = trio.Event()

            async def receive() -> None:
                received.append(await dealer.recv_multipart())
                done.set()

            async def deliver_then_send() -> None:
                # No checkpoint between these two lines: the receiver cannot run in between.
                router.socket.send_multipart([peer, b"waiting"], zmq.NOBLOCK)
                await dealer.send_multipart([b"blocks: the pipe is full"])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(deliver_then_send)
                await done.wait()
                nursery.cancel_scope.cancel()
            assert received == [[b"waiting"]]
