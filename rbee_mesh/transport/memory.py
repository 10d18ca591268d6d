"""The in-memory transport ("mem://NAME") for the integrated mode: queen and hive in one process.

Same Connection/Listener interface and the same errors as the ZeroMQ transport, built on trio
memory channels, so actor code cannot tell the two apart. Each direction of each connection
is one bounded channel, whose capacity plays the role of the high-water mark.

Differences from ZeroMQ, all in the direction of failing sooner:

* Connecting to a name nobody has bound raises PeerUnreachable; ZeroMQ would queue messages
  until a listener appears.
* When the listener closes, its connections' send raises PeerUnreachable and their receive
  raises it once the messages already delivered are drained; ZeroMQ would wait and reconnect.
* A closed connection is unreachable for the listener at once; ZeroMQ notices a little later
  (and until then silently drops what is sent to it).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import trio

from .base import Connection, Listener
from .errors import EndpointError, PeerBusy, PeerUnreachable, TransportClosed

_listeners: dict[str, MemoryListener] = {}
"""Every bound in-memory listener of this process, by name."""

_Inbound = tuple[bytes, list[bytes]]


class MemoryListener(Listener):
    """A listener registered under a process-wide name."""

    def __init__(self, name: str, capacity: int) -> None:
        self.endpoint = f"mem://{name}"
        self._name = name
        self._to_self, self._inbound = trio.open_memory_channel[_Inbound](_bound(capacity))
        self._peers: dict[bytes, trio.MemorySendChannel[list[bytes]]] = {}
        # Five bytes like libzmq's generated routing ids; never reused, so a reconnecting
        # peer gets a new id exactly as over ZeroMQ.
        self._peer_ids = (b"\x00" + n.to_bytes(4, "big") for n in itertools.count(1))
        self._closed = False

    @classmethod
    def bind(cls, name: str, *, capacity: int) -> MemoryListener:
        """Register a listener as ``mem://name``; ``capacity`` bounds its inbound channel
        (0: unbounded, as a high-water mark of 0 means in libzmq)."""
        if name in _listeners:
            raise EndpointError(f"cannot bind mem://{name}: already bound in this process")
        listener = cls(name, capacity)
        _listeners[name] = listener
        return listener

    async def send(self, peer: bytes, frames: Sequence[bytes]) -> None:
        """Send to ``peer`` now or fail: PeerBusy (channel full), PeerUnreachable (gone)."""
        message = _copy_frames(frames)
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise TransportClosed(f"{self.endpoint} is closed")
        channel = self._peers.get(peer)
        if channel is None:
            raise PeerUnreachable(f"peer {peer.hex()} is not connected to {self.endpoint}")
        try:
            channel.send_nowait(message)
        except trio.WouldBlock:
            raise PeerBusy(f"peer {peer.hex()} on {self.endpoint} is not keeping up") from None

    async def receive(self) -> tuple[bytes, list[bytes]]:
        """Wait for the next message: (peer id, frames)."""
        try:
            return await self._inbound.receive()
        except trio.ClosedResourceError:
            raise TransportClosed(f"{self.endpoint} is closed") from None

    async def aclose(self) -> None:
        """Unregister the name and cut every connection off."""
        if not self._closed:
            self._closed = True
            del _listeners[self._name]
            self._inbound.close()
            self._to_self.close()
            for channel in self._peers.values():
                channel.close()
            self._peers.clear()
        await trio.lowlevel.checkpoint()

    def _accept(self, capacity: int) -> tuple[bytes, trio.MemoryReceiveChannel[list[bytes]]]:
        """Register a new peer; return its id and the channel it receives on."""
        peer = next(self._peer_ids)
        self._peers[peer], inbound = trio.open_memory_channel[list[bytes]](_bound(capacity))
        return peer, inbound

    def _forget(self, peer: bytes) -> None:
        channel = self._peers.pop(peer, None)
        if channel is not None:
            channel.close()


class MemoryConnection(Connection):
    """A connection to a MemoryListener of this process."""

    def __init__(self, listener: MemoryListener, capacity: int) -> None:
        self.endpoint = listener.endpoint
        self._listener = listener
        self._peer, self._inbound = listener._accept(capacity)
        # A clone of our own, so closing it wakes only this connection's blocked senders.
        self._outbound = listener._to_self.clone()

    @classmethod
    def connect(cls, name: str, *, capacity: int) -> MemoryConnection:
        """Connect to the listener bound as ``mem://name``; ``capacity`` bounds our inbound.

        Raises PeerUnreachable if nothing is bound under that name (ZeroMQ would wait).
        """
        listener = _listeners.get(name)
        if listener is None:
            raise PeerUnreachable(f"nothing is bound at mem://{name}")
        return cls(listener, capacity)

    async def send(self, frames: Sequence[bytes]) -> None:
        """Send one message, waiting while the listener's inbound channel is full."""
        message = _copy_frames(frames)
        try:
            await self._outbound.send((self._peer, message))
        except trio.ClosedResourceError:
            raise TransportClosed(f"connection to {self.endpoint} is closed") from None
        except trio.BrokenResourceError:
            raise PeerUnreachable(f"{self.endpoint} is closed") from None

    async def receive(self) -> list[bytes]:
        """Wait for the next message from the listener."""
        try:
            return await self._inbound.receive()
        except trio.ClosedResourceError:
            raise TransportClosed(f"connection to {self.endpoint} is closed") from None
        except trio.EndOfChannel:
            raise PeerUnreachable(f"{self.endpoint} is closed") from None

    async def aclose(self) -> None:
        """Close both directions; the listener forgets this peer at once."""
        self._outbound.close()
        self._inbound.close()
        self._listener._forget(self._peer)
        await trio.lowlevel.checkpoint()


def _copy_frames(frames: Sequence[bytes]) -> list[bytes]:
    """A fresh list of immutable bytes, so sender and receiver never share mutable state."""
    if not frames:
        raise ValueError("a message needs at least one frame")
    return [bytes(frame) for frame in frames]


def _bound(capacity: int) -> float:
    """A channel size from a high-water mark, where 0 means no limit as in libzmq."""
    return capacity if capacity > 0 else math.inf
