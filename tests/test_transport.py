"""Behaviour of every transport (mem, inproc, ipc, tcp) through the public API, on real sockets.

Nothing here sleeps to synchronise: tests wait for conditions, each under trio.fail_after. Where
the condition lives inside libzmq's I/O thread (a peer's disconnect noticed, a full pipe
drained), the test polls it at a short interval until it holds.
"""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest
import trio
import trio.testing
import zmq

from rbee_mesh.transport import (
    DEFAULT_HWM,
    Connection,
    Endpoint,
    EndpointError,
    Listener,
    PeerBusy,
    PeerUnreachable,
    SocketOptions,
    TransportClosed,
    local_endpoint_for,
    make_socket,
    parse_endpoint,
    shared_context,
)
from tests.keyed import open_connection, open_listener
from tests.skips import skip_or_fail

TRANSPORTS = ["mem", "inproc", "ipc", "tcp"]
MESSAGE = [b"RBEE\x01", b"SUBMIT", b"job-1", b"\x81\xa2op\xa4ping"]

Connect = Callable[..., Awaitable[Connection]]


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
def bind_endpoint(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh endpoint to bind, once per transport."""
    transport: str = request.param
    return fresh_endpoint(transport, tmp_path)


@pytest.fixture
async def mesh(bind_endpoint: str) -> AsyncIterator[tuple[Listener, Connect]]:
    """A bound listener and a factory of connections to it; all closed afterwards."""
    listener = await open_listener(bind_endpoint)
    connections: list[Connection] = []

    async def connect(options: SocketOptions | None = None) -> Connection:
        connection = await open_connection(local_endpoint_for(listener.endpoint), options=options)
        connections.append(connection)
        return connection

    try:
        yield listener, connect
    finally:
        for connection in connections:
            await connection.aclose()
        await listener.aclose()


async def introduce(listener: Listener, connection: Connection) -> bytes:
    """Make the listener learn the connection's peer id (it only does from a message)."""
    await connection.send([b"hello"])
    peer, frames, _ = await listener.receive()
    assert frames == [b"hello"]
    return peer


async def poll_until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Retry ``condition`` until it holds, for state that only libzmq's I/O thread knows (a
    peer's disconnect, a drained pipe): there is no event to wait on, so this polls."""
    while not await condition():  # noqa: ASYNC110 -- no event exists; callers bound it in time
        await trio.sleep(0.001)


# --- behaviour shared by every transport ---------------------------------------------------


async def test_round_trip_from_connection_to_listener_and_back(
    mesh: tuple[Listener, Connect],
) -> None:
    listener, connect = mesh
    with trio.fail_after(10):
        connection = await connect()
        await connection.send(MESSAGE)
        peer, frames, _ = await listener.receive()
        assert frames == MESSAGE
        assert all(type(frame) is bytes for frame in frames)

        reply = [b"RBEE\x01", b"ACCEPTED", b"job-1", b""]
        await listener.send(peer, reply)
        received = await connection.receive()
        assert received == reply
        assert all(type(frame) is bytes for frame in received)


async def test_listener_routes_replies_by_peer_id_among_three_connections(
    mesh: tuple[Listener, Connect],
) -> None:
    listener, connect = mesh
    with trio.fail_after(10):
        connections = [await connect() for _ in range(3)]
        for index, connection in enumerate(connections):
            await connection.send([b"hello", b"%d" % index])
        peer_of: dict[bytes, bytes] = {}
        for _ in connections:
            peer, frames, _ = await listener.receive()
            peer_of[frames[1]] = peer
        assert len(set(peer_of.values())) == 3

        for index in reversed(range(3)):
            await listener.send(peer_of[b"%d" % index], [b"for", b"%d" % index])
        for index, connection in enumerate(connections):
            assert await connection.receive() == [b"for", b"%d" % index]


async def test_sending_to_an_unknown_peer_raises_peer_unreachable(
    mesh: tuple[Listener, Connect],
) -> None:
    listener, _ = mesh
    with trio.fail_after(10), pytest.raises(PeerUnreachable):
        await listener.send(b"\x00nobody", [b"ping"])


async def test_sending_to_a_closed_connection_raises_peer_unreachable(
    mesh: tuple[Listener, Connect],
) -> None:
    listener, connect = mesh
    with trio.fail_after(10):
        connection = await connect()
        peer = await introduce(listener, connection)
        await connection.aclose()

        async def unreachable() -> bool:
            # libzmq accepts (and drops) messages until its I/O thread has seen the disconnect.
            try:
                await listener.send(peer, [b"ping"])
            except PeerUnreachable:
                return True
            return False

        await poll_until(unreachable)


async def test_peer_that_never_reads_makes_send_raise_peer_busy_until_it_catches_up(
    bind_endpoint: str,
) -> None:
    small = SocketOptions(sndhwm=4, rcvhwm=4)
    body = bytes(64 * 1024)
    with trio.fail_after(20):
        async with await open_listener(bind_endpoint, options=small) as listener:
            endpoint = local_endpoint_for(listener.endpoint)
            async with await open_connection(endpoint, options=small) as connection:
                peer = await introduce(listener, connection)
                sent = 0
                while True:
                    try:
                        await listener.send(peer, [b"data", body])
                    except PeerBusy:
                        break
                    sent += 1
                assert sent > 0

                for _ in range(sent):
                    assert await connection.receive() == [b"data", body]

                async def sent_after() -> bool:
                    try:
                        await listener.send(peer, [b"after"])
                    except PeerBusy:
                        return False
                    return True

                await poll_until(sent_after)
                assert await connection.receive() == [b"after"]


async def test_aclose_wakes_blocked_receivers_and_later_calls_raise_transport_closed(
    mesh: tuple[Listener, Connect],
) -> None:
    listener, connect = mesh
    closed: list[str] = []

    async def receive_until_closed(name: str, receive: Callable[[], Awaitable[object]]) -> None:
        with pytest.raises(TransportClosed):
            await receive()
        closed.append(name)

    with trio.fail_after(10):
        connection = await connect()
        peer = await introduce(listener, connection)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_until_closed, "connection", connection.receive)
            nursery.start_soon(receive_until_closed, "listener", listener.receive)
            await trio.testing.wait_all_tasks_blocked()
            await connection.aclose()
            await listener.aclose()
        assert sorted(closed) == ["connection", "listener"]

        with pytest.raises(TransportClosed):
            await connection.send([b"late"])
        with pytest.raises(TransportClosed):
            await listener.send(peer, [b"late"])
        await connection.aclose()  # idempotent
        await listener.aclose()


async def test_async_with_closes_listener_and_connection(bind_endpoint: str) -> None:
    with trio.fail_after(10):
        async with await open_listener(bind_endpoint) as listener:
            endpoint = local_endpoint_for(listener.endpoint)
            async with await open_connection(endpoint) as connection:
                await introduce(listener, connection)
            with pytest.raises(TransportClosed):
                await connection.receive()
        with pytest.raises(TransportClosed):
            await listener.receive()


async def test_a_message_without_frames_is_refused(mesh: tuple[Listener, Connect]) -> None:
    listener, connect = mesh
    with trio.fail_after(10):
        connection = await connect()
        peer = await introduce(listener, connection)
        with pytest.raises(ValueError, match="at least one frame"):
            await connection.send([])
        with pytest.raises(ValueError, match="at least one frame"):
            await listener.send(peer, [])


# --- endpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp://0.0.0.0:7833", Endpoint("tcp", "0.0.0.0:7833", "0.0.0.0", 7833)),
        ("tcp://*:0", Endpoint("tcp", "*:0", "*", 0)),
        ("tcp://queen.lan:7833", Endpoint("tcp", "queen.lan:7833", "queen.lan", 7833)),
        ("tcp://[::1]:7835", Endpoint("tcp", "[::1]:7835", "[::1]", 7835)),
        ("ipc:///run/rbee/hive.sock", Endpoint("ipc", "/run/rbee/hive.sock")),
        ("inproc://queen", Endpoint("inproc", "queen")),
        ("mem://queen", Endpoint("mem", "queen")),
    ],
)
def test_parse_endpoint_accepts_every_scheme_and_round_trips(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected
    assert str(parse_endpoint(text)) == text


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("127.0.0.1:7833", "expected scheme://address"),
        ("http://127.0.0.1:7833", "unsupported scheme"),
        ("tcp://127.0.0.1", "missing port"),
        ("tcp://127.0.0.1:", "missing port"),
        ("tcp://:7833", "missing host"),
        ("tcp://127.0.0.1:65536", "bad port"),
        ("tcp://127.0.0.1:-1", "bad port"),
        ("tcp://127.0.0.1:http", "bad port"),
        ("tcp://::1:7833", "bad host"),
        ("tcp://[fe80::zz]:7833", "bad host"),
        ("tcp://queen lan:7833", "whitespace"),
        ("ipc://", "nothing after"),
        ("inproc://", "nothing after"),
        ("mem://", "nothing after"),
        ("ipc:///" + "d" * 120, "too long"),
    ],
)
async def test_malformed_endpoints_raise_endpoint_error_naming_them(
    text: str, complaint: str
) -> None:
    with pytest.raises(EndpointError, match=re.escape(complaint)) as info:
        parse_endpoint(text)
    assert text in str(info.value)
    with pytest.raises(EndpointError, match=re.escape(complaint)):
        await open_listener(text)
    with pytest.raises(EndpointError, match=re.escape(complaint)):
        await open_connection(text)


@pytest.mark.parametrize("text", ["tcp://127.0.0.1:0", "tcp://*:7833"])
async def test_connecting_to_a_wildcard_endpoint_raises_endpoint_error(text: str) -> None:
    with pytest.raises(EndpointError, match="no particular host:port"):
        await open_connection(text)


@pytest.mark.parametrize(
    ("bound", "local"),
    [
        ("tcp://0.0.0.0:7833", "tcp://127.0.0.1:7833"),
        ("tcp://*:7833", "tcp://127.0.0.1:7833"),
        ("tcp://[::]:7833", "tcp://[::1]:7833"),
        ("tcp://192.168.1.20:7833", "tcp://192.168.1.20:7833"),
        ("ipc:///run/rbee/hive.sock", "ipc:///run/rbee/hive.sock"),
        ("mem://queen", "mem://queen"),
    ],
)
def test_local_endpoint_for_replaces_only_wildcard_hosts(bound: str, local: str) -> None:
    assert local_endpoint_for(bound) == local


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
async def test_binding_tcp_port_zero_exposes_the_real_port(host: str) -> None:
    with trio.fail_after(10):
        async with await open_listener(f"tcp://{host}:0") as listener:
            bound = parse_endpoint(listener.endpoint)
            assert bound.host == host
            assert bound.port is not None and bound.port > 0
            async with await open_connection(local_endpoint_for(listener.endpoint)) as connection:
                await introduce(listener, connection)


async def test_binding_tcp_ipv6_loopback_works() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        skip_or_fail("no IPv6 loopback on this machine")
    with trio.fail_after(10):
        async with await open_listener("tcp://[::1]:0") as listener:
            assert listener.endpoint.startswith("tcp://[::1]:")
            async with await open_connection(listener.endpoint) as connection:
                await introduce(listener, connection)


async def test_binding_a_tcp_port_in_use_raises_endpoint_error_naming_it() -> None:
    async with await open_listener("tcp://127.0.0.1:0") as first:
        with pytest.raises(EndpointError, match="in use") as info:
            await open_listener(first.endpoint)
        assert first.endpoint in str(info.value)


@pytest.mark.parametrize("transport", ["mem", "inproc"])
async def test_binding_a_name_already_bound_raises_endpoint_error(
    transport: str, tmp_path: Path
) -> None:
    endpoint = fresh_endpoint(transport, tmp_path)
    async with await open_listener(endpoint):
        with pytest.raises(EndpointError, match=re.escape(endpoint)):
            await open_listener(endpoint)
    # Closing frees the name.
    async with await open_listener(endpoint):
        pass


# --- ipc socket files -----------------------------------------------------------------------


async def test_stale_ipc_socket_file_from_a_crashed_process_does_not_prevent_binding(
    tmp_path: Path,
) -> None:
    path = tmp_path / "hive.sock"
    # A process that dies leaves its socket file behind, with nobody accepting on it.
    with socket.socket(socket.AF_UNIX) as crashed:
        crashed.bind(str(path))
    assert path.is_socket()
    with trio.fail_after(10):
        async with (
            await open_listener(f"ipc://{path}") as listener,
            await open_connection(listener.endpoint) as connection,
        ):
            peer = await introduce(listener, connection)
            await listener.send(peer, [b"welcome"])
            assert await connection.receive() == [b"welcome"]
    assert not path.exists(), "a cleanly closed listener removes its socket file"


async def test_binding_the_ipc_path_of_a_running_listener_raises_endpoint_error(
    tmp_path: Path,
) -> None:
    endpoint = f"ipc://{tmp_path}/hive.sock"
    with trio.fail_after(10):
        async with await open_listener(endpoint) as running:
            with pytest.raises(EndpointError, match="another listener is running"):
                await open_listener(endpoint)
            async with await open_connection(endpoint) as connection:
                await introduce(running, connection)


async def test_binding_an_ipc_path_that_is_a_regular_file_refuses_and_keeps_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("precious")
    with pytest.raises(EndpointError, match="not a socket"):
        await open_listener(f"ipc://{path}")
    assert path.read_text() == "precious"


# --- ZeroMQ specifics -----------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["inproc", "ipc"])
async def test_zmq_connection_queues_messages_until_the_listener_appears(
    transport: str, tmp_path: Path
) -> None:
    endpoint = fresh_endpoint(transport, tmp_path)
    with trio.fail_after(10):
        async with await open_connection(endpoint) as connection:
            await connection.send([b"early"])
            async with await open_listener(endpoint) as listener:
                _, frames, _ = await listener.receive()
                assert frames == [b"early"]


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
async def test_zmq_peer_sending_an_oversized_message_is_cut_off_without_delivering_it(
    transport: str, tmp_path: Path
) -> None:
    # libzmq enforces MAXMSGSIZE only on stream transports, not on inproc.
    strict = SocketOptions(max_msg_size=1024)
    with trio.fail_after(10):
        async with (
            await open_listener(fresh_endpoint(transport, tmp_path), options=strict) as listener,
            await open_connection(local_endpoint_for(listener.endpoint)) as connection,
        ):
            await connection.send([b"big", bytes(4096)])
            async with trio.open_nursery() as nursery:

                async def probe() -> None:
                    # The DEALER reconnects after the cut; probes get through after that.
                    for index in range(10_000):
                        await connection.send([b"probe", b"%d" % index])
                        await trio.sleep(0.01)

                nursery.start_soon(probe)
                _, frames, _ = await listener.receive()
                assert frames[0] == b"probe"
                nursery.cancel_scope.cancel()


def test_make_socket_applies_the_safe_defaults_on_the_shared_context() -> None:
    sock = make_socket(zmq.DEALER)
    try:
        assert sock.context is shared_context()
        assert sock.getsockopt(zmq.LINGER) == 0
        assert sock.getsockopt(zmq.SNDHWM) == DEFAULT_HWM
        assert sock.getsockopt(zmq.RCVHWM) == DEFAULT_HWM
        assert sock.getsockopt(zmq.MAXMSGSIZE) == 16 * 1024 * 1024
        assert sock.getsockopt(zmq.TCP_KEEPALIVE) == 1
        assert sock.getsockopt(zmq.HANDSHAKE_IVL) == SocketOptions().handshake_ivl_ms
    finally:
        sock.close()


def test_make_socket_makes_router_sockets_refuse_unroutable_messages() -> None:
    sock = make_socket(zmq.ROUTER, options=SocketOptions(sndhwm=5))
    try:
        assert sock.getsockopt(zmq.SNDHWM) == 5
        # ROUTER_MANDATORY: an unknown peer is an error, not a silent drop.
        with pytest.raises(zmq.ZMQError) as info:
            sock.send_multipart([b"nobody", b"ping"], zmq.NOBLOCK)
        assert info.value.errno == zmq.EHOSTUNREACH
    finally:
        sock.close()


# --- in-memory specifics --------------------------------------------------------------------


async def test_connecting_to_an_unbound_mem_name_raises_peer_unreachable() -> None:
    with pytest.raises(PeerUnreachable, match="nothing is bound"):
        await open_connection("mem://nobody-here")


async def test_mem_listener_closing_makes_its_connections_raise_peer_unreachable() -> None:
    endpoint = "mem://closing-" + uuid.uuid4().hex
    tiny = SocketOptions(rcvhwm=1)
    with trio.fail_after(10):
        listener = await open_listener(endpoint, options=tiny)
        connection = await open_connection(endpoint)
        peer = await introduce(listener, connection)
        await listener.send(peer, [b"last words"])
        await connection.send([b"fills the listener's inbound channel"])

        async def blocked_send() -> None:
            with pytest.raises(PeerUnreachable):
                await connection.send([b"waits for capacity"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked_send)
            await trio.testing.wait_all_tasks_blocked()
            await listener.aclose()

        assert await connection.receive() == [b"last words"]
        with pytest.raises(PeerUnreachable):
            await connection.receive()
        with pytest.raises(PeerUnreachable):
            await connection.send([b"anyone?"])
        await connection.aclose()
        # The name is free again.
        async with await open_listener(endpoint):
            pass


async def test_mem_transport_copies_frames_so_sender_and_receiver_share_nothing() -> None:
    endpoint = "mem://copies-" + uuid.uuid4().hex
    with trio.fail_after(10):
        async with (
            await open_listener(endpoint) as listener,
            await open_connection(endpoint) as connection,
        ):
            frame = bytearray(b"original")
            # Typed as bytes, but nothing stops a caller from passing a mutable buffer.
            frames = [b"kind", cast(bytes, frame)]
            await connection.send(frames)
            frame[:] = b"mutated!"
            frames.append(b"appended")
            peer, received, _ = await listener.receive()
            assert received == [b"kind", b"original"]
            assert all(type(f) is bytes for f in received)

            reply = [b"reply"]
            await listener.send(peer, reply)
            reply.append(b"appended")
            assert await connection.receive() == [b"reply"]
