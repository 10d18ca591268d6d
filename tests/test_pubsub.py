"""PUB/SUB on every transport (mem, inproc, ipc, tcp) through the public API, on real sockets.

Nothing sleeps to synchronise. PUB/SUB has no handshake the API could wait on, so a test that
needs a subscriber to have joined publishes until a message arrives (publish_until_heard), each
test bounded by trio.fail_after.
"""

from __future__ import annotations

import itertools
import math
import re
import socket
import uuid
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path

import pytest
import trio
import trio.testing
import zmq

from rbee_mesh.transport import (
    PUBSUB_HWM,
    EndpointError,
    Publisher,
    SocketOptions,
    TransportClosed,
    local_endpoint_for,
    make_socket,
)
from tests.keyed import open_listener, open_publisher, open_subscriber

TRANSPORTS = ["mem", "inproc", "ipc", "tcp"]

Receive = Callable[[], Awaitable[list[bytes]]]


def fresh_endpoint(transport: str, tmp_path: Path) -> str:
    """An endpoint of ``transport`` that nothing else in this process uses."""
    name = uuid.uuid4().hex[:12]
    return {
        "mem": f"mem://{name}",
        "inproc": f"inproc://{name}",
        "ipc": f"ipc://{tmp_path}/{name}.sock",
        "tcp": "tcp://127.0.0.1:0",
    }[transport]


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


async def receive_tagged(
    receive: Receive, tag: bytes, *, never: Collection[bytes] = ()
) -> list[bytes]:
    """The next message whose first frame is ``tag``, skipping others (left over from earlier
    steps) but failing on one tagged with any of ``never``."""
    while True:
        message = await receive()
        assert message[0] not in never, f"received {message!r}, which must not arrive"
        if message[0] == tag:
            return message


async def publish_until_heard(publisher: Publisher, receive: Receive, tag: bytes) -> list[bytes]:
    """Publish [tag, n] for n = 0, 1, ... until ``receive`` returns one of them; return it.

    This is how a test waits for a subscriber to join. A ZeroMQ SUB joins on libzmq's I/O
    thread some time after connect() returns: after the connection and its subscription have
    reached the PUB, which may take a reconnect interval (100 ms) if the publisher was not
    bound yet or has restarted. A PUB drops what it publishes before that (the "slow joiner"),
    and nothing tells the application when the join is done. So the test keeps publishing until
    a message gets through, bounded by the caller's fail_after.
    """
    async with trio.open_nursery() as nursery:

        async def keep_publishing() -> None:
            for n in itertools.count():
                publisher.publish([tag, b"%d" % n])
                # Pacing, not synchronisation: about a thousand probes a second instead of
                # filling the subscriber's queue with them.
                await trio.sleep(0.001)

        nursery.start_soon(keep_publishing)
        message = await receive_tagged(receive, tag)
        nursery.cancel_scope.cancel()
    return message


# --- behaviour shared by every transport ---------------------------------------------------


async def test_one_subscriber_receives_from_two_publishers(transport: str, tmp_path: Path) -> None:
    with trio.fail_after(5):
        async with (
            await open_publisher(fresh_endpoint(transport, tmp_path)) as hive_a,
            await open_publisher(fresh_endpoint(transport, tmp_path)) as hive_b,
            await open_subscriber() as queen,
        ):
            assert hive_a.endpoint != hive_b.endpoint
            await queen.connect(local_endpoint_for(hive_a.endpoint))
            await queen.connect(local_endpoint_for(hive_b.endpoint))
            await publish_until_heard(hive_a, queen.receive, b"a-join")
            await publish_until_heard(hive_b, queen.receive, b"b-join")

            # Both have joined and nothing overflows: one message from each arrives.
            hive_a.publish([b"heartbeat", b"a"])
            hive_b.publish([b"heartbeat", b"b"])
            senders = {(await receive_tagged(queen.receive, b"heartbeat"))[1] for _ in range(2)}
            assert senders == {b"a", b"b"}


async def test_subscriber_connected_before_the_publisher_exists_receives_once_it_binds(
    transport: str, tmp_path: Path
) -> None:
    with trio.fail_after(5):
        endpoint = fresh_endpoint(transport, tmp_path)
        if transport == "tcp":
            # A concrete port that nothing is bound to: bind one, then close it.
            async with await open_publisher(endpoint) as placeholder:
                endpoint = placeholder.endpoint
        async with await open_subscriber() as queen:
            await queen.connect(endpoint)
            async with await open_publisher(endpoint) as hive:
                message = await publish_until_heard(hive, queen.receive, b"hello")
                assert message[0] == b"hello"


async def test_publisher_restarting_on_the_same_endpoint_is_heard_again_without_reconnecting(
    transport: str, tmp_path: Path
) -> None:
    with trio.fail_after(5):
        async with await open_subscriber() as queen:
            hive = await open_publisher(fresh_endpoint(transport, tmp_path))
            endpoint = hive.endpoint  # tcp: the real port, which the restarts bind again
            await queen.connect(local_endpoint_for(endpoint))
            await publish_until_heard(hive, queen.receive, b"life-0")
            for life in (b"life-1", b"life-2"):
                await hive.aclose()
                # aclose returns once the endpoint is free, so it can be bound again at once.
                hive = await open_publisher(endpoint)
                await publish_until_heard(hive, queen.receive, life)
            await hive.aclose()


async def test_a_closed_publisher_endpoint_can_be_bound_again_at_once(
    transport: str, tmp_path: Path
) -> None:
    # libzmq releases a closed socket's tcp port or inproc name later, on its own threads; with
    # a subscriber connected, binding again right after close() failed about half the time.
    # aclose waits for the release, so twenty rebinds in a row all succeed.
    with trio.fail_after(5):
        hive = await open_publisher(fresh_endpoint(transport, tmp_path))
        endpoint = hive.endpoint
        for life in range(20):
            # A new subscriber each time: it joins a bound publisher within milliseconds, where
            # one kept across the restart would wait out a 100 ms reconnect interval.
            async with await open_subscriber() as queen:
                await queen.connect(local_endpoint_for(endpoint))
                await publish_until_heard(hive, queen.receive, b"life-%d" % life)
                await hive.aclose()
                hive = await open_publisher(endpoint)
        await hive.aclose()


async def test_publish_never_blocks_when_a_subscriber_does_not_read(
    transport: str, tmp_path: Path
) -> None:
    body = bytes(1024)  # 100 MB in all: far more than the queues and socket buffers hold
    # About 1 s here (10 us a publish); the bound is generous because a publish that blocked
    # would block forever: this subscriber reads nothing until the flood is over.
    with trio.fail_after(20):
        async with (
            await open_publisher(fresh_endpoint(transport, tmp_path)) as hive,
            await open_subscriber() as queen,
        ):
            await queen.connect(local_endpoint_for(hive.endpoint))
            await publish_until_heard(hive, queen.receive, b"join")

            for n in range(100_000):
                hive.publish([b"flood", b"%d" % n, body])

            received: list[list[bytes]] = []

            async def receive() -> list[bytes]:
                message = await queen.receive()
                received.append(message)
                return message

            # The queen reads again: what its queues kept comes first, then new messages.
            await publish_until_heard(hive, receive, b"after")
            flood = [int(message[1]) for message in received if message[0] == b"flood"]
            assert flood, "the subscriber kept none of the flood"
            # A full queue drops the newest messages: the first ones are kept, in order.
            assert flood[0] == 0
            assert flood == sorted(flood)
            assert len(flood) < 100_000, "nothing was dropped: the flood did not fill the queue"


async def test_disconnect_stops_delivery_from_that_publisher(
    transport: str, tmp_path: Path
) -> None:
    with trio.fail_after(5):
        async with (
            await open_publisher(fresh_endpoint(transport, tmp_path)) as hive_a,
            await open_publisher(fresh_endpoint(transport, tmp_path)) as hive_b,
            await open_subscriber() as queen,
        ):
            a_endpoint = local_endpoint_for(hive_a.endpoint)
            await queen.connect(a_endpoint)
            await queen.connect(local_endpoint_for(hive_b.endpoint))
            await publish_until_heard(hive_a, queen.receive, b"a-join")
            await publish_until_heard(hive_b, queen.receive, b"b-join")

            await queen.disconnect(a_endpoint)
            await queen.disconnect(a_endpoint)  # a no-op the second time
            for n in range(20):
                hive_a.publish([b"a-after", b"%d" % n])
                hive_b.publish([b"b-after", b"%d" % n])
                # hive_b's message, published after hive_a's, arrives; hive_a's never does.
                message = await receive_tagged(queen.receive, b"b-after", never={b"a-after"})
                assert message[1] == b"%d" % n

            # Connecting again works after a disconnect.
            await queen.connect(a_endpoint)
            await publish_until_heard(hive_a, queen.receive, b"a-again")


async def test_aclose_makes_receive_raise_transport_closed(transport: str, tmp_path: Path) -> None:
    with trio.fail_after(5):
        hive = await open_publisher(fresh_endpoint(transport, tmp_path))
        queen = await open_subscriber()
        endpoint = local_endpoint_for(hive.endpoint)
        await queen.connect(endpoint)
        await publish_until_heard(hive, queen.receive, b"join")

        async def receive_until_closed() -> None:
            with pytest.raises(TransportClosed):
                while True:  # drain what is left of the probes, then wait
                    await queen.receive()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_until_closed)
            nursery.start_soon(receive_until_closed)
            await trio.testing.wait_all_tasks_blocked()
            await queen.aclose()

        with pytest.raises(TransportClosed):
            await queen.receive()
        with pytest.raises(TransportClosed):
            await queen.connect(endpoint)
        with pytest.raises(TransportClosed):
            await queen.disconnect(endpoint)
        await queen.aclose()  # idempotent

        await hive.aclose()
        with pytest.raises(TransportClosed):
            hive.publish([b"late"])
        await hive.aclose()  # idempotent


async def test_aclose_wakes_a_subscriber_waiting_with_no_publishers() -> None:
    with trio.fail_after(5):
        queen = await open_subscriber()
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                with pytest.raises(TransportClosed):
                    await queen.receive()

            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await queen.aclose()


@pytest.mark.parametrize("holder", ["publisher", "listener"])
async def test_binding_a_taken_endpoint_raises_endpoint_error(
    transport: str, holder: str, tmp_path: Path
) -> None:
    with trio.fail_after(5):
        opener = open_publisher if holder == "publisher" else open_listener
        async with await opener(fresh_endpoint(transport, tmp_path)) as first:
            taken = first.endpoint
            with pytest.raises(EndpointError, match=re.escape(taken)):
                await open_publisher(taken)
            if holder == "publisher" and transport == "mem":
                with pytest.raises(EndpointError, match=re.escape(taken)):
                    await open_listener(taken)  # one namespace, as ZeroMQ's endpoints
        if holder == "publisher":
            # A closed publisher has released its endpoint.
            async with await open_publisher(taken):
                pass


async def test_connecting_twice_to_the_same_endpoint_delivers_each_message_once(
    transport: str, tmp_path: Path
) -> None:
    with trio.fail_after(5):
        async with (
            await open_publisher(fresh_endpoint(transport, tmp_path)) as hive,
            await open_subscriber() as queen,
        ):
            endpoint = local_endpoint_for(hive.endpoint)
            await queen.connect(endpoint)
            await queen.connect(endpoint)
            await publish_until_heard(hive, queen.receive, b"join")
            for n in range(3):
                hive.publish([b"data", b"%d" % n])
            hive.publish([b"end"])
            data = [(await receive_tagged(queen.receive, b"data"))[1] for _ in range(3)]
            assert data == [b"0", b"1", b"2"]
            # A second connection would have delivered a second copy of each by now.
            await receive_tagged(queen.receive, b"end", never={b"data"})


async def test_one_subscriber_hears_memory_and_zeromq_publishers_at_once(tmp_path: Path) -> None:
    with trio.fail_after(5):
        async with (
            await open_publisher(fresh_endpoint("mem", tmp_path)) as local_hive,
            await open_publisher(fresh_endpoint("tcp", tmp_path)) as remote_hive,
            await open_subscriber() as queen,
        ):
            await queen.connect(local_hive.endpoint)
            inbox_in, inbox = trio.open_memory_channel[list[bytes]](math.inf)

            async def pump() -> None:
                while True:
                    await inbox_in.send(await queen.receive())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump)
                # The pump waits for memory messages only; connecting over ZeroMQ wakes it to
                # wait on the new SUB socket as well.
                await trio.testing.wait_all_tasks_blocked()
                await queen.connect(local_endpoint_for(remote_hive.endpoint))
                await publish_until_heard(remote_hive, inbox.receive, b"remote")
                await publish_until_heard(local_hive, inbox.receive, b"local")
                await publish_until_heard(remote_hive, inbox.receive, b"remote-again")
                nursery.cancel_scope.cancel()


async def test_connecting_a_subscriber_to_a_bad_endpoint_raises_endpoint_error() -> None:
    async with await open_subscriber() as queen:
        for endpoint in ["tcp://127.0.0.1:0", "tcp://*:7836", "http://hive:7836", "mem://"]:
            with pytest.raises(EndpointError):
                await queen.connect(endpoint)


# --- in-memory specifics --------------------------------------------------------------------


async def test_mem_subscriber_has_no_slow_joiner_and_receives_everything_after_connect() -> None:
    with trio.fail_after(5):
        endpoint = f"mem://{uuid.uuid4().hex}"
        async with await open_subscriber() as queen:
            await queen.connect(endpoint)
            async with await open_publisher(endpoint) as hive:
                hive.publish([b"first"])
                assert await queen.receive() == [b"first"]


async def test_mem_subscriber_takes_publishers_in_turn_and_drops_when_a_queue_is_full() -> None:
    with trio.fail_after(5):
        async with (
            await open_publisher(f"mem://{uuid.uuid4().hex}") as flooding,
            await open_publisher(f"mem://{uuid.uuid4().hex}") as quiet,
            await open_subscriber(options=SocketOptions(rcvhwm=4)) as queen,
        ):
            await queen.connect(flooding.endpoint)
            await queen.connect(quiet.endpoint)
            for n in range(10):
                flooding.publish([b"flood", b"%d" % n])
            quiet.publish([b"heartbeat"])

            received = [await queen.receive() for _ in range(5)]
            # The heartbeat is not stuck behind the flood, and the flood kept its first four.
            assert received == [
                [b"flood", b"0"],
                [b"heartbeat"],
                [b"flood", b"1"],
                [b"flood", b"2"],
                [b"flood", b"3"],
            ]
            flooding.publish([b"flood", b"late"])
            assert await queen.receive() == [b"flood", b"late"]


# --- ZeroMQ specifics -----------------------------------------------------------------------


def test_make_socket_gives_pub_and_sub_sockets_shallow_queues_unless_told_otherwise() -> None:
    for kind in (zmq.PUB, zmq.SUB):
        sock = make_socket(kind)
        try:
            assert sock.getsockopt(zmq.SNDHWM) == PUBSUB_HWM
            assert sock.getsockopt(zmq.RCVHWM) == PUBSUB_HWM
            assert sock.getsockopt(zmq.LINGER) == 0
        finally:
            sock.close()
    sock = make_socket(zmq.SUB, options=SocketOptions(rcvhwm=7))
    try:
        assert sock.getsockopt(zmq.RCVHWM) == 7
    finally:
        sock.close()


async def test_publisher_replaces_a_stale_ipc_file_and_removes_its_own(tmp_path: Path) -> None:
    path = tmp_path / "heartbeats.sock"
    # A hive that crashed leaves its socket file behind, with nobody accepting on it.
    with socket.socket(socket.AF_UNIX) as crashed:
        crashed.bind(str(path))
    with trio.fail_after(5):
        async with (
            await open_publisher(f"ipc://{path}") as hive,
            await open_subscriber() as queen,
        ):
            await queen.connect(hive.endpoint)
            await publish_until_heard(hive, queen.receive, b"alive")
    assert not path.exists(), "a cleanly closed publisher removes its socket file"


async def test_a_subscriber_that_sent_other_messages_first_still_hears_what_it_subscribed_to() -> (
    None
):
    """A subscriber's other messages (not subscriptions) must not cost another subscriber its
    subscription: in libzmq's manual mode they put the queue that pairs each subscription with
    its connection out of step, and the subscription of one was applied to another."""
    endpoint = f"inproc://{uuid.uuid4().hex[:12]}"
    context = zmq.Context.instance()
    chatty, quiet = context.socket(zmq.XSUB), context.socket(zmq.XSUB)
    try:
        with trio.fail_after(10):
            async with await open_publisher(endpoint) as hive:
                for sock in (chatty, quiet):
                    sock.connect(endpoint)
                chatty.send(b"not a subscription")
                chatty.send(b"\x01")  # everything
                quiet.send(b"\x01")
                heard: dict[str, list[bytes]] = {}
                n = 0
                while len(heard) < 2:  # publish until both have heard (bounded above)
                    hive.publish([b"beat", b"%d" % n])
                    n += 1
                    for name, sock in (("chatty", chatty), ("quiet", quiet)):
                        if sock.poll(0):
                            heard[name] = sock.recv_multipart()
                    await trio.sleep(0.001)  # pacing: a thousand probes a second
    finally:
        chatty.close(linger=0)
        quiet.close(linger=0)
    assert heard["chatty"][0] == heard["quiet"][0] == b"beat"
