"""Connection (DEALER), Listener (ROUTER), Publisher (PUB) and the SUB half of a Subscriber over
ZeroMQ, for tcp://, ipc:// and inproc://.

Use open_connection/open_listener (rbee_mesh.transport.endpoints) and open_publisher/
open_subscriber (rbee_mesh.transport.pubsub) rather than these classes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import threading
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import trio
import zmq

from .base import Connection, Listener, Publisher
from .curve import (
    Admission,
    ClientKeys,
    ServerKeys,
    fingerprint,
    release_server,
    set_server_key,
)
from .endpoints import Endpoint
from .errors import EndpointError, PeerBusy, PeerUnreachable, TransportClosed, TransportError
from .factory import MAX_TOPIC_BYTES, SocketOptions, make_socket
from .zmq_trio import TrioSocket

log = logging.getLogger("rbee_mesh.transport")

_UNBIND_TIMEOUT_S = 1.0
"""How long a publisher's aclose waits for libzmq to release a tcp port before giving up."""


class ZmqConnection(Connection):
    """A DEALER socket connected to one listener.

    Like any ZeroMQ connect, this succeeds before the listener exists: messages queue (up to
    the high-water mark) and flow once it appears, and libzmq reconnects after a drop.
    """

    def __init__(self, sock: TrioSocket, endpoint: str) -> None:
        self._sock = sock
        self.endpoint = endpoint

    @classmethod
    def connect(cls, endpoint: Endpoint, options: SocketOptions | None = None) -> ZmqConnection:
        """Create a DEALER and connect it to ``endpoint``."""
        sock = make_socket(zmq.DEALER, options=_keys_for(endpoint, options, ClientKeys))
        try:
            if endpoint.is_ipv6:
                sock.setsockopt(zmq.IPV6, 1)
            sock.connect(str(endpoint))
        except zmq.ZMQError as exc:
            sock.close()
            raise EndpointError(f"cannot connect to {endpoint}: {exc.strerror}") from exc
        return cls(TrioSocket(sock), str(endpoint))

    async def send(self, frames: Sequence[bytes]) -> None:
        """Send one multipart message, waiting while the pipe is at its high-water mark."""
        _check_frames(frames)
        try:
            await self._sock.send_multipart(frames)
        except zmq.ZMQError as exc:
            raise TransportError(f"send on {self.endpoint} failed: {exc.strerror}") from exc

    def send_nowait(self, frames: Sequence[bytes]) -> None:
        """Send one multipart message now, or raise PeerBusy."""
        _check_frames(frames)
        try:
            self._sock.send_multipart_nowait(frames)
        except zmq.Again:
            raise PeerBusy(f"the pipe to {self.endpoint} is full") from None
        except zmq.ZMQError as exc:
            raise TransportError(f"send on {self.endpoint} failed: {exc.strerror}") from exc

    async def receive(self) -> list[bytes]:
        """Wait for the next multipart message from the listener."""
        try:
            return await self._sock.recv_multipart()
        except zmq.ZMQError as exc:
            raise TransportError(f"receive on {self.endpoint} failed: {exc.strerror}") from exc

    async def aclose(self) -> None:
        """Close the socket; unsent messages are dropped (LINGER is 0 by default)."""
        await self._sock.aclose()


class _Bound:
    """A socket bound to one endpoint, what a listener and a publisher share: closing it
    unbinds the endpoint (so it can be bound again at once) and removes its ipc socket file."""

    def __init__(self, sock: TrioSocket, endpoint: str, ipc_file: os.stat_result | None) -> None:
        self._sock = sock
        self.endpoint = endpoint
        self._ipc_file = ipc_file

    async def aclose(self) -> None:
        await _close_bound(self._sock, self.endpoint, self._ipc_file)


class ZmqListener(_Bound, Listener):
    """A ROUTER socket bound to one endpoint; peers are named by their ZeroMQ routing id, and
    each message comes with its sender's CURVE key (the ZAP handler's User-Id)."""

    def __init__(self, sock: TrioSocket, endpoint: str, ipc_file: os.stat_result | None) -> None:
        super().__init__(sock, endpoint, ipc_file)
        self._curve = sock.socket.get(zmq.MECHANISM) == zmq.CURVE

    @classmethod
    def bind(cls, endpoint: Endpoint, options: SocketOptions | None = None) -> ZmqListener:
        """Create a ROUTER and bind it to ``endpoint``.

        A tcp port 0 binds an ephemeral port; ``self.endpoint`` then names the real one.
        """
        sock, bound, ipc_file = _bind_socket(zmq.ROUTER, endpoint, options, "listener")
        return cls(TrioSocket(sock), bound, ipc_file)

    def send_nowait(self, peer: bytes, frames: Sequence[bytes]) -> None:
        """Send to ``peer`` now or fail: PeerBusy if its pipe is full, PeerUnreachable if gone."""
        _check_frames(frames)
        try:
            self._sock.send_multipart_nowait([peer, *frames])
        except zmq.Again:
            raise PeerBusy(f"peer {peer.hex()} on {self.endpoint} is not keeping up") from None
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                message = f"peer {peer.hex()} is not connected to {self.endpoint}"
                raise PeerUnreachable(message) from None
            raise TransportError(f"send on {self.endpoint} failed: {exc.strerror}") from exc

    async def receive(self) -> tuple[bytes, list[bytes], str]:
        """Wait for the next message: (peer id, frames after the identity frame, the sender's
        key; "" without CURVE)."""
        try:
            if self._curve:
                key, (peer, *frames) = await self._sock.recv_multipart_keyed()
            else:
                key, (peer, *frames) = "", await self._sock.recv_multipart()
        except zmq.ZMQError as exc:
            raise TransportError(f"receive on {self.endpoint} failed: {exc.strerror}") from exc
        return peer, frames, key


class ZmqPublisher(_Bound, Publisher):
    """An XPUB socket bound to one endpoint, counting what its subscribers subscribe to.

    libzmq's PUB never blocks and never reports a full pipe: at a subscriber's high-water mark
    it drops the message for that subscriber, silently. It also stores every topic any peer
    subscribes to, of any size and number (two 12 MiB subscriptions took a hive from 474 MB to
    1.2 GB): a message over MAX_SUBSCRIPTION_BYTES drops its sender's connection, and the
    subscriptions, each passed up (XPUB_VERBOSE), are read and counted by the key that sent them
    before each publish (so a new subscriber also hears the next message): a key that sends more
    than MAX_TOPIC_BYTES of topics (ours send none: they subscribe to everything) is refused from
    then on, and every connection is cut (libzmq cannot cut one) by unbinding and binding again;
    the others connect again within their reconnect interval and subscribe again.

    Not manual mode (XPUB_MANUAL), where the publisher would admit subscriptions itself: there
    libzmq pairs each subscription with its connection through a queue that other messages from
    subscribers put out of step, and a subscriber's "everything" could be applied to another
    connection (a fuzz found subscribers that never heard a heartbeat).
    """

    def __init__(
        self,
        sock: TrioSocket,
        endpoint: str,
        ipc_file: os.stat_result | None,
        refused: set[str] | None = None,
    ) -> None:
        super().__init__(sock, endpoint, ipc_file)
        self._closed = False
        #: Bytes of topics each subscriber key sent, and the keys refused for sending too many.
        self._topic_bytes: Counter[str] = Counter()
        self._refused = refused if refused is not None else set()
        self._unbound = False

    @classmethod
    def bind(cls, endpoint: Endpoint, options: SocketOptions | None = None) -> ZmqPublisher:
        """Create a PUB and bind it to ``endpoint`` (tcp port 0: see ``self.endpoint``)."""
        refused: set[str] = set()
        if options is not None and isinstance(options.curve, ServerKeys):
            admission = _Refusing(options.curve.admission, refused)
            options = replace(options, curve=replace(options.curve, admission=admission))
        sock, bound, ipc_file = _bind_socket(zmq.XPUB, endpoint, options, "publisher or listener")
        publisher = cls(TrioSocket(sock), bound, ipc_file, refused)
        if endpoint.scheme == "inproc":
            _rejoin_inproc_subscribers(bound)
        return publisher

    def publish(self, frames: Sequence[bytes]) -> None:
        """Send to every subscriber that has room; the others miss this message."""
        _check_frames(frames)
        if self._closed:
            raise TransportClosed(f"publisher {self.endpoint} is closed")
        try:
            if self._unbound:
                self._sock.call_sync(self._bind_again)
            flooding = self._sock.call_sync(self._count_subscriptions)
            if flooding is not None:
                self._cut_off(flooding)
            self._sock.send_multipart_nowait(frames)
        except zmq.Again:
            return  # A PUB drops at the high-water mark rather than raising; this is for safety.
        except zmq.ZMQError as exc:
            raise TransportError(f"publish on {self.endpoint} failed: {exc.strerror}") from exc

    def _count_subscriptions(self, sock: zmq.Socket[bytes]) -> str | None:
        """Read what subscribers sent (libzmq has applied their subscriptions) and count the
        bytes of topics by the key of the subscriber that sent them ("" for one without a key).
        Returns the first key past MAX_TOPIC_BYTES, at once: libzmq takes in more of the
        waiting messages (and keeps their topics) on every call."""
        for _ in range(_SUBSCRIPTIONS_PER_PUBLISH):
            try:
                frame = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            message = frame.bytes
            if len(message) > 1 and message[:1] == _SUBSCRIBE:
                try:
                    key = str(frame.get("User-Id"))
                except zmq.ZMQError:  # no CURVE (inproc)
                    key = ""
                if key in self._refused:
                    continue  # sent before its connection was cut
                self._topic_bytes[key] += len(message) - 1
                if self._topic_bytes[key] > MAX_TOPIC_BYTES:
                    return key
        return None

    def _cut_off(self, key: str) -> None:
        """Refuse `key` from now on, and cut every connection (the others come back)."""
        who = f"the subscriber with key {fingerprint(key)}" if key else "a subscriber"
        log.warning(
            "%s sent %d bytes of topics to %s (the limit is %d): refusing it, and cutting every "
            "subscriber's connection (the others connect again)",
            who, self._topic_bytes[key], self.endpoint, MAX_TOPIC_BYTES,
        )  # fmt: skip
        if key:
            self._refused.add(key)
        self._topic_bytes.clear()  # every connection's topics go with it
        with contextlib.suppress(zmq.ZMQError):
            self._sock.call_sync(lambda s: s.unbind(self.endpoint))
        self._unbound = True
        with contextlib.suppress(zmq.ZMQError):  # the port is not always free at once
            self._sock.call_sync(self._bind_again)

    def _bind_again(self, sock: zmq.Socket[bytes]) -> None:
        sock.bind(self.endpoint)
        self._unbound = False
        if self._ipc_file is not None:
            self._ipc_file = os.stat(self.endpoint.removeprefix("ipc://"))

    async def aclose(self) -> None:
        """Unbind, wait until the endpoint can be bound again, and close the socket."""
        self._closed = True
        await super().aclose()


@dataclass(frozen=True)
class _Refusing:
    """What a publisher admits: what its keys admit, less the keys it cut off. (Read on the ZAP
    thread; a key is only ever added to `refused`.)"""

    admission: Admission
    refused: set[str]

    def admits(self, key: str) -> bool:
        return key not in self.refused and self.admission.admits(key)


_SUBSCRIBE = b"\x01"
_SUBSCRIPTIONS_PER_PUBLISH = 10_000
"""At most this many subscription messages are read per publish (~1 us each): a peer that sends
more waits for the next publish, on its own connection (libzmq's pipe holds RCVHWM)."""


class ZmqSubscription:
    """A SUB socket connected to any number of publishers: the ZeroMQ half of a Subscriber.

    libzmq reconnects a tcp or ipc SUB to a publisher that restarts, but not an inproc one
    (inproc has no reconnection); this class makes up for that: binding an inproc publisher
    reconnects this process's subscriptions to its name.
    """

    def __init__(self, sock: TrioSocket, *, curve: bool, plaintext: bool) -> None:
        self._sock = sock
        self._curve = curve
        self._plaintext = plaintext
        self._endpoints: set[str] = set()
        self._token = trio.lowlevel.current_trio_token()

    @classmethod
    def open(cls, options: SocketOptions | None = None) -> ZmqSubscription:
        """Create a SUB socket (subscribed to everything by make_socket), connected to nothing.
        Without CURVE keys it may connect within this process only (unless `plaintext`)."""
        curve = options is not None and isinstance(options.curve, ClientKeys)
        plaintext = options is not None and options.plaintext
        sock = TrioSocket(make_socket(zmq.SUB, options=options))
        return cls(sock, curve=curve, plaintext=plaintext)

    def connect(self, endpoint: Endpoint, server_key: str = "") -> None:
        """Connect to ``endpoint``, bound or not yet, pinning the publisher's CURVE key; a
        no-op if already connected to it."""
        address = str(endpoint)
        if address in self._endpoints:
            return
        if endpoint.scheme in _BEYOND_PROCESS and not self._plaintext:
            if not self._curve:
                raise EndpointError(f"cannot subscribe to {endpoint} without CURVE keys")
            if not server_key:
                raise EndpointError(f"cannot subscribe to {endpoint}: its key is not known")

        def connect(sock: zmq.Socket[bytes]) -> None:
            # Read at connect time, per connection: only bracketed addresses want IPv6, and
            # each publisher has its own key.
            sock.setsockopt(zmq.IPV6, 1 if endpoint.is_ipv6 else 0)
            if server_key and self._curve:
                set_server_key(sock, server_key)
            sock.connect(address)

        try:
            self._sock.call_sync(connect)
        except zmq.ZMQError as exc:
            raise EndpointError(f"cannot connect to {endpoint}: {exc.strerror}") from exc
        self._endpoints.add(address)
        if endpoint.scheme == "inproc":
            with _inproc_lock:
                _inproc_subscriptions.setdefault(address, set()).add(self)

    def disconnect(self, endpoint: Endpoint) -> None:
        """Disconnect from ``endpoint``; a no-op if not connected to it."""
        address = str(endpoint)
        if address not in self._endpoints:
            return
        self._endpoints.discard(address)
        self._forget_inproc(address)
        # ENOENT if libzmq already dropped the connection (an inproc publisher that closed).
        with contextlib.suppress(zmq.ZMQError):
            self._sock.call_sync(lambda sock: sock.disconnect(address))

    async def receive(self) -> list[bytes]:
        """Wait for the next message from any connected publisher (libzmq takes them in turn)."""
        try:
            return await self._sock.recv_multipart()
        except zmq.ZMQError as exc:
            raise TransportError(f"receive on a subscriber failed: {exc.strerror}") from exc

    async def receive_nowait(self) -> list[bytes] | None:
        """The next message if one is waiting, else None (still a checkpoint)."""
        try:
            return await self._sock.recv_multipart(block=False)
        except zmq.Again:
            return None
        except zmq.ZMQError as exc:
            raise TransportError(f"receive on a subscriber failed: {exc.strerror}") from exc

    async def aclose(self) -> None:
        """Close the socket; tasks waiting in receive get TransportClosed."""
        for address in self._endpoints:
            self._forget_inproc(address)
        self._endpoints.clear()
        await self._sock.aclose()

    def _rejoin(self, address: str) -> None:
        """Reconnect to an inproc publisher that has just bound ``address``."""
        if self._sock.closed or address not in self._endpoints:
            return

        def rejoin(sock: zmq.Socket[bytes]) -> None:
            # ENOENT when libzmq has already dropped the pipe to the publisher that closed.
            with contextlib.suppress(zmq.ZMQError):
                sock.disconnect(address)
            sock.connect(address)

        with contextlib.suppress(zmq.ZMQError, TransportClosed):
            self._sock.call_sync(rejoin)

    def _forget_inproc(self, address: str) -> None:
        with _inproc_lock:
            subscriptions = _inproc_subscriptions.get(address)
            if subscriptions is not None:
                subscriptions.discard(self)
                if not subscriptions:
                    del _inproc_subscriptions[address]


_inproc_subscriptions: dict[str, set[ZmqSubscription]] = {}
"""The SUB sockets of this process connected to each inproc endpoint, whatever their thread."""
_inproc_lock = threading.Lock()


def _rejoin_inproc_subscribers(address: str) -> None:
    """Reconnect every subscription to ``address`` to the publisher that has just bound it.

    An inproc SUB that connected before any publisher bound is attached by libzmq itself, but
    one whose publisher closed stays dead forever; reconnecting fixes both alike. A subscription
    of another trio run (thread) is reconnected in its own thread, as pyzmq sockets require.
    """
    with _inproc_lock:
        subscriptions = list(_inproc_subscriptions.get(address, ()))
    try:
        current: trio.lowlevel.TrioToken | None = trio.lowlevel.current_trio_token()
    except RuntimeError:
        current = None
    for subscription in subscriptions:
        if subscription._token is current:
            subscription._rejoin(address)
        else:
            with contextlib.suppress(trio.RunFinishedError):
                subscription._token.run_sync_soon(subscription._rejoin, address)


def _bind_socket(
    kind: int, endpoint: Endpoint, options: SocketOptions | None, holder: str
) -> tuple[zmq.Socket[bytes], str, os.stat_result | None]:
    """Make a socket of ``kind`` and bind it: (socket, bound endpoint, our ipc file's stat).

    ``holder`` names what may already hold an ipc path, for the error message.
    """
    if endpoint.scheme == "ipc":
        _check_ipc_path_is_free(endpoint, holder)
    # libzmq spells "any free port" as "*".
    address = str(endpoint) if endpoint.port != 0 else f"tcp://{endpoint.host}:*"
    sock = make_socket(kind, options=_keys_for(endpoint, options, ServerKeys))
    try:
        if endpoint.is_ipv6:
            sock.setsockopt(zmq.IPV6, 1)
        sock.bind(address)
    except zmq.ZMQError as exc:
        release_server(sock)
        sock.close()
        in_use = exc.errno == errno.EADDRINUSE
        hint = " (another process or socket holds it)" if in_use else ""
        raise EndpointError(f"cannot bind {endpoint}: {exc.strerror}{hint}") from exc
    bound = sock.get_string(zmq.LAST_ENDPOINT)
    ipc_file = None
    if endpoint.scheme == "ipc":
        # None for a Linux abstract address ("ipc://@name"), which has no file.
        with contextlib.suppress(FileNotFoundError):
            ipc_file = os.stat(bound.removeprefix("ipc://"))
    return sock, bound, ipc_file


async def _close_bound(sock: TrioSocket, bound: str, ipc_file: os.stat_result | None) -> None:
    """Close a socket that bound `bound`: its ipc file removed (if still ours), the endpoint
    unbound so that it can be bound again at once. Idempotent."""
    if sock.closed:
        await trio.lowlevel.checkpoint()
        return
    release_server(sock.socket)
    try:
        if ipc_file is not None:
            _remove_own_ipc_file(bound.removeprefix("ipc://"), ipc_file)
        await _unbind(sock, bound)
    finally:
        await sock.aclose()


async def _unbind(sock: TrioSocket, bound: str) -> None:
    """Unbind ``bound`` so that it can be bound again as soon as this returns.

    Closing a socket releases its endpoints asynchronously, on libzmq's I/O and reaper threads:
    binding the same tcp port or inproc name right after close() failed with EADDRINUSE about
    half the time here. unbind() releases an inproc name at once; a tcp port is free once the
    socket monitor reports the listening socket CLOSED. ipc needs nothing: a new bind replaces
    the path.
    """
    scheme = bound.partition("://")[0]
    if scheme != "tcp":
        with contextlib.suppress(zmq.ZMQError, TransportClosed):
            sock.call_sync(lambda s: s.unbind(bound))
        return
    # pyzmq's monitor module imports zmq.asyncio, and so asyncio (~8 ms): here, a command that
    # only connects does not import it.
    from zmq.utils.monitor import parse_monitor_message

    monitor_address = f"inproc://rbee-unbind-{uuid.uuid4().hex}"
    try:
        sock.call_sync(lambda s: s.monitor(monitor_address, zmq.EVENT_CLOSED))
    except (zmq.ZMQError, TransportClosed):
        return
    events = TrioSocket(make_socket(zmq.PAIR))
    try:
        events.socket.connect(monitor_address)
        try:
            sock.call_sync(lambda s: s.unbind(bound))
        except (zmq.ZMQError, TransportClosed):
            return
        with trio.move_on_after(_UNBIND_TIMEOUT_S):
            while True:
                event = parse_monitor_message(await events.recv_multipart())
                if event["event"] == zmq.EVENT_CLOSED:
                    break
    finally:
        with contextlib.suppress(zmq.ZMQError, TransportClosed):
            sock.call_sync(lambda s: s.disable_monitor())
        await events.aclose()


_BEYOND_PROCESS = frozenset({"tcp", "ipc"})
"""The schemes whose sockets other processes can reach: CURVE on every one."""


def _keys_for(
    endpoint: Endpoint, options: SocketOptions | None, kind: type[ServerKeys | ClientKeys]
) -> SocketOptions:
    """The options to make a socket for ``endpoint`` with: CURVE keys of ``kind`` beyond this
    process (EndpointError if there are none and the options do not say `plaintext`), none
    within it (inproc)."""
    opts = options if options is not None else SocketOptions()
    if endpoint.scheme not in _BEYOND_PROCESS:
        return replace(opts, curve=None) if opts.curve is not None else opts
    if not opts.plaintext and not isinstance(opts.curve, kind):
        raise EndpointError(f"{endpoint} reaches beyond this process: it needs CURVE keys")
    return replace(opts, curve=None) if opts.plaintext else opts


def _check_frames(frames: Sequence[bytes]) -> None:
    if not frames:
        raise ValueError("a message needs at least one frame")


def _check_ipc_path_is_free(endpoint: Endpoint, holder: str = "listener") -> None:
    """Refuse to bind over a live listener's ipc socket file; let a stale one be replaced.

    libzmq unlinks whatever is at the path before binding. That is what we want for a file a
    crashed process left behind (libzmq does not remove the file even on a clean close), but
    it would also silently steal the address from a listener that is still running.
    """
    path = endpoint.address
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise EndpointError(f"cannot bind {endpoint}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(mode):
        raise EndpointError(f"cannot bind {endpoint}: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return  # Nobody accepts on it: a stale file, which libzmq replaces.
        except BlockingIOError:
            pass  # Its accept backlog is full: very much alive.
        except OSError as exc:
            raise EndpointError(f"cannot bind {endpoint}: {exc.strerror}") from exc
    raise EndpointError(f"cannot bind {endpoint}: another {holder} is running on it")


def _remove_own_ipc_file(path: str, bound: os.stat_result) -> None:
    """Unlink ``path`` if it is still the socket file we bound (not a successor's)."""
    with contextlib.suppress(OSError):
        now = os.stat(path)
        if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
            os.unlink(path)
