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

PUB/SUB (MemoryPublisher, MemoryInbox) behaves like ZeroMQ's instead, because heartbeats must
survive restarts: a subscriber may connect to a name nobody has bound yet, and hears whichever
publisher binds that name, now or after a restart. Each subscriber has one bounded queue per
name it subscribed to (capacity ``rcvhwm``, like libzmq's per-pipe high-water mark; there is no
separate publisher-side queue) and drops new messages when it is full. Unlike ZeroMQ there is no
slow joiner: a subscriber receives everything published after its connect() returned.

Listeners and publishers share one namespace, as ZeroMQ endpoints do.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence

import trio

from .base import Connection, Listener, Publisher
from .errors import EndpointError, PeerBusy, PeerUnreachable, TransportClosed

_listeners: dict[str, MemoryListener] = {}
"""Every bound in-memory listener of this process, by name."""

_publishers: dict[str, MemoryPublisher] = {}
"""Every bound in-memory publisher of this process, by name."""

_pipes: dict[str, dict[_Pipe, None]] = {}
"""Every subscriber's queue for a name (an ordered set), whether or not a publisher is bound."""

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
        _check_name_is_free(name)
        listener = cls(name, capacity)
        _listeners[name] = listener
        return listener

    def send_nowait(self, peer: bytes, frames: Sequence[bytes]) -> None:
        """Send to ``peer`` now or fail: PeerBusy (channel full), PeerUnreachable (gone)."""
        message = _copy_frames(frames)
        if self._closed:
            raise TransportClosed(f"{self.endpoint} is closed")
        channel = self._peers.get(peer)
        if channel is None:
            raise PeerUnreachable(f"peer {peer.hex()} is not connected to {self.endpoint}")
        try:
            channel.send_nowait(message)
        except trio.WouldBlock:
            raise PeerBusy(f"peer {peer.hex()} on {self.endpoint} is not keeping up") from None

    async def receive(self) -> tuple[bytes, list[bytes], str]:
        """Wait for the next message: (peer id, frames, "": a peer in this process has no key)."""
        try:
            peer, frames = await self._inbound.receive()
            return peer, frames, ""
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

    def send_nowait(self, frames: Sequence[bytes]) -> None:
        """Send one message now, or raise PeerBusy (the listener's inbound channel is full)."""
        message = _copy_frames(frames)
        try:
            self._outbound.send_nowait((self._peer, message))
        except trio.WouldBlock:
            raise PeerBusy(f"{self.endpoint} is not keeping up") from None
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


class MemoryPublisher(Publisher):
    """A publisher registered under a process-wide name; see the module docstring."""

    def __init__(self, name: str) -> None:
        self.endpoint = f"mem://{name}"
        self._name = name
        self._closed = False

    @classmethod
    def bind(cls, name: str) -> MemoryPublisher:
        """Register a publisher as ``mem://name``; subscribers waiting for the name hear it."""
        _check_name_is_free(name)
        publisher = cls(name)
        _publishers[name] = publisher
        return publisher

    def publish(self, frames: Sequence[bytes]) -> None:
        """Queue a copy for every subscriber of this name that has room; never waits."""
        message = _copy_frames(frames)
        if self._closed:
            raise TransportClosed(f"publisher {self.endpoint} is closed")
        # Offering only queues and wakes (no task switch), so the set cannot change under us.
        for pipe in _pipes.get(self._name, ()):
            pipe.inbox._offer(pipe, list(message))

    async def aclose(self) -> None:
        """Unregister the name; subscribers stay subscribed to it for the next publisher."""
        if not self._closed:
            self._closed = True
            del _publishers[self._name]
        await trio.lowlevel.checkpoint()


class _Pipe:
    """One subscriber's queue of messages published under one name."""

    __slots__ = ("inbox", "name", "queue")

    def __init__(self, inbox: MemoryInbox, name: str) -> None:
        self.inbox = inbox
        self.name = name
        self.queue: deque[list[bytes]] = deque()


class MemoryInbox:
    """The in-memory half of a subscriber: a bounded queue per subscribed name, read in turn.

    Synchronous: the subscriber that owns it does the waiting, and is told through ``wake``
    each time a message is queued. Reading the queues in turn (as libzmq's SUB does its pipes)
    keeps a flooding publisher from starving the heartbeats of the others.
    """

    def __init__(self, capacity: int, wake: Callable[[], None]) -> None:
        """``capacity`` bounds each queue (0: unbounded); ``wake`` is called per queued message."""
        self._capacity = _bound(capacity)
        self._wake = wake
        self._pipes: dict[str, _Pipe] = {}
        self._ready: deque[_Pipe] = deque()
        """Pipes with messages, each once, in the order they will be read."""

    @property
    def connected(self) -> bool:
        """True while subscribed to at least one name."""
        return bool(self._pipes)

    def connect(self, name: str) -> None:
        """Subscribe to ``mem://name``, bound or not; a no-op if already subscribed."""
        if name not in self._pipes:
            pipe = _Pipe(self, name)
            self._pipes[name] = pipe
            _pipes.setdefault(name, {})[pipe] = None

    def disconnect(self, name: str) -> None:
        """Unsubscribe from ``mem://name`` and drop what it queued; a no-op if not subscribed."""
        pipe = self._pipes.pop(name, None)
        if pipe is not None:
            self._detach(pipe)

    def ready(self) -> bool:
        """True if take() would return a message."""
        return bool(self._ready)

    def take(self) -> list[bytes] | None:
        """The next message, from the next name in turn that has one; None if none has."""
        if not self._ready:
            return None
        pipe = self._ready.popleft()
        message = pipe.queue.popleft()
        if pipe.queue:
            self._ready.append(pipe)
        return message

    def close(self) -> None:
        """Unsubscribe from everything."""
        for pipe in self._pipes.values():
            self._detach(pipe)
        self._pipes.clear()

    def _offer(self, pipe: _Pipe, message: list[bytes]) -> None:
        if len(pipe.queue) >= self._capacity:
            return  # Full: the message is dropped, as a PUB drops at the high-water mark.
        if not pipe.queue:
            self._ready.append(pipe)
        pipe.queue.append(message)
        self._wake()

    def _detach(self, pipe: _Pipe) -> None:
        subscribers = _pipes[pipe.name]
        del subscribers[pipe]
        if not subscribers:
            del _pipes[pipe.name]
        if pipe.queue:
            self._ready.remove(pipe)
            pipe.queue.clear()


def _check_name_is_free(name: str) -> None:
    if name in _listeners or name in _publishers:
        raise EndpointError(f"cannot bind mem://{name}: already bound in this process")


def _copy_frames(frames: Sequence[bytes]) -> list[bytes]:
    """A fresh list of immutable bytes, so sender and receiver never share mutable state."""
    if not frames:
        raise ValueError("a message needs at least one frame")
    return [bytes(frame) for frame in frames]


def _bound(capacity: int) -> float:
    """A channel size from a high-water mark, where 0 means no limit as in libzmq."""
    return capacity if capacity > 0 else math.inf
