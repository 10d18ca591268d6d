"""Connection (DEALER) and Listener (ROUTER) over ZeroMQ, for tcp://, ipc:// and inproc://.

Use open_connection/open_listener from rbee_mesh.transport.endpoints rather than these classes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Sequence
from typing import TYPE_CHECKING

import zmq

from .base import Connection, Listener
from .errors import EndpointError, PeerBusy, PeerUnreachable, TransportError
from .factory import SocketOptions, make_socket
from .zmq_trio import TrioSocket

if TYPE_CHECKING:
    from .endpoints import Endpoint


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
        sock = make_socket(zmq.DEALER, options=options)
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

    async def receive(self) -> list[bytes]:
        """Wait for the next multipart message from the listener."""
        try:
            return await self._sock.recv_multipart()
        except zmq.ZMQError as exc:
            raise TransportError(f"receive on {self.endpoint} failed: {exc.strerror}") from exc

    async def aclose(self) -> None:
        """Close the socket; unsent messages are dropped (LINGER is 0 by default)."""
        await self._sock.aclose()


class ZmqListener(Listener):
    """A ROUTER socket bound to one endpoint; peers are named by their ZeroMQ routing id."""

    def __init__(self, sock: TrioSocket, endpoint: str, ipc_file: os.stat_result | None) -> None:
        self._sock = sock
        self.endpoint = endpoint
        self._ipc_file = ipc_file

    @classmethod
    def bind(cls, endpoint: Endpoint, options: SocketOptions | None = None) -> ZmqListener:
        """Create a ROUTER and bind it to ``endpoint``.

        A tcp port 0 binds an ephemeral port; ``self.endpoint`` then names the real one.
        """
        if endpoint.scheme == "ipc":
            _check_ipc_path_is_free(endpoint)
        # libzmq spells "any free port" as "*".
        address = str(endpoint) if endpoint.port != 0 else f"tcp://{endpoint.host}:*"
        sock = make_socket(zmq.ROUTER, options=options)
        try:
            if endpoint.is_ipv6:
                sock.setsockopt(zmq.IPV6, 1)
            sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close()
            in_use = exc.errno == errno.EADDRINUSE
            hint = " (another process or listener holds it)" if in_use else ""
            raise EndpointError(f"cannot bind {endpoint}: {exc.strerror}{hint}") from exc
        bound = sock.get_string(zmq.LAST_ENDPOINT)
        ipc_file = None
        if endpoint.scheme == "ipc":
            # None for a Linux abstract address ("ipc://@name"), which has no file.
            with contextlib.suppress(FileNotFoundError):
                ipc_file = os.stat(bound.removeprefix("ipc://"))
        return cls(TrioSocket(sock), bound, ipc_file)

    async def send(self, peer: bytes, frames: Sequence[bytes]) -> None:
        """Send to ``peer`` now or fail: PeerBusy if its pipe is full, PeerUnreachable if gone."""
        _check_frames(frames)
        try:
            await self._sock.send_multipart([peer, *frames], block=False)
        except zmq.Again:
            raise PeerBusy(f"peer {peer.hex()} on {self.endpoint} is not keeping up") from None
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                message = f"peer {peer.hex()} is not connected to {self.endpoint}"
                raise PeerUnreachable(message) from None
            raise TransportError(f"send on {self.endpoint} failed: {exc.strerror}") from exc

    async def receive(self) -> tuple[bytes, list[bytes]]:
        """Wait for the next message: (peer id, frames after the identity frame)."""
        try:
            peer, *frames = await self._sock.recv_multipart()
        except zmq.ZMQError as exc:
            raise TransportError(f"receive on {self.endpoint} failed: {exc.strerror}") from exc
        return peer, frames

    async def aclose(self) -> None:
        """Close the socket and remove this listener's ipc socket file."""
        if not self._sock.closed and self._ipc_file is not None:
            _remove_own_ipc_file(self.endpoint.removeprefix("ipc://"), self._ipc_file)
        await self._sock.aclose()


def _check_frames(frames: Sequence[bytes]) -> None:
    if not frames:
        raise ValueError("a message needs at least one frame")


def _check_ipc_path_is_free(endpoint: Endpoint) -> None:
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
    raise EndpointError(f"cannot bind {endpoint}: another listener is running on it")


def _remove_own_ipc_file(path: str, bound: os.stat_result) -> None:
    """Unlink ``path`` if it is still the socket file we bound (not a successor's)."""
    with contextlib.suppress(OSError):
        now = os.stat(path)
        if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
            os.unlink(path)
