"""The shapes every transport provides: a Connection (DEALER side) and a Listener (ROUTER side)
for request and reply, and a Publisher (PUB) and a Subscriber (SUB) for broadcasts such as
heartbeats.

Frames are the application frames only, as ``bytes``; the ROUTER identity envelope never reaches
actor code. All are async context managers that close on exit, used the trio way::

    async with await open_listener("tcp://0.0.0.0:7833") as listener:
        peer, frames, key = await listener.receive()

Implementations inherit ``__aenter__``/``__aexit__`` by subclassing these protocols explicitly;
a structural implementation (a test fake) must define them itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Protocol, Self

import trio


class Closing(Protocol):
    """Every transport object: closed by `aclose`, or by leaving its `async with` block."""

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class Connection(Closing, Protocol):
    """The DEALER side: one connection to one listener."""

    endpoint: str
    """The endpoint this connection was opened to."""

    async def send(self, frames: Sequence[bytes]) -> None:
        """Send one multipart message, waiting while the outbound pipe is full (backpressure).

        Cancel-safe: if cancelled, the message was either sent whole or not at all.
        Raises PeerUnreachable (in-memory transport: the listener is gone) or TransportClosed.
        """
        ...

    def send_nowait(self, frames: Sequence[bytes]) -> None:
        """Send one multipart message now, never waiting: PeerBusy if the pipe is full right
        now (heartbeats are skipped rather than queued behind a stalled peer)."""
        ...

    async def receive(self) -> list[bytes]:
        """Wait for the next multipart message from the listener."""
        ...

    async def aclose(self) -> None:
        """Close this end; pending and later calls raise TransportClosed. Idempotent."""
        ...


class Listener(Closing, Protocol):
    """The ROUTER side: many peers, each identified by opaque bytes."""

    endpoint: str
    """The endpoint actually bound (a tcp port 0 is resolved to the real port)."""

    def send_nowait(self, peer: bytes, frames: Sequence[bytes]) -> None:
        """Send one multipart message to ``peer`` now, never waiting for that peer.

        Raises PeerBusy if the peer's pipe is full right now, PeerUnreachable if the peer is
        unknown or gone, TransportClosed if this listener was closed.
        """
        ...

    async def send(self, peer: bytes, frames: Sequence[bytes]) -> None:
        """`send_nowait`, then a checkpoint (so a loop of sends lets other tasks run)."""
        self.send_nowait(peer, frames)
        await trio.lowlevel.checkpoint()

    async def receive(self) -> tuple[bytes, list[bytes], str]:
        """Wait for the next message: (peer id, frames without the identity frame, the
        sender's CURVE public key in z85; "" for a peer in this process, which has none).

        The key is that of the message, not of the connection's first: a server checks it
        against what it trusts now, so a key revoked since the handshake is refused."""
        ...

    async def aclose(self) -> None:
        """Stop listening; pending and later calls raise TransportClosed. Idempotent."""
        ...


class Publisher(Closing, Protocol):
    """The PUB side: broadcasts each message to whoever is subscribed right now, or to nobody.

    PUB/SUB promises no delivery. A subscriber that connects misses what was published before
    its subscription reached the publisher (the "slow joiner"), and a subscriber that does not
    keep up loses messages once its queue is full. Nothing may depend on one message arriving:
    a heartbeat's receiver counts misses instead.
    """

    endpoint: str
    """The endpoint actually bound (a tcp port 0 is resolved to the real port)."""

    def publish(self, frames: Sequence[bytes]) -> None:
        """Hand one multipart message to every current subscriber, never waiting for any.

        A subscriber whose queue is full (at its high-water mark) silently misses this message:
        that is PUB semantics, not an error. Raises TransportClosed after aclose.
        """
        ...

    async def aclose(self) -> None:
        """Unbind and close; once this returns the endpoint may be bound again. Idempotent."""
        ...


class Subscriber(Closing, Protocol):
    """The SUB side: one inbox for the messages of any number of publishers.

    A subscription outlives its publisher: connecting before anything is bound at the endpoint
    works, and when a publisher goes away and another binds the same endpoint, messages flow
    again without a new connect (after libzmq's reconnect interval, 100 ms, over tcp and ipc).
    """

    async def connect(self, endpoint: str, server_key: str = "") -> None:
        """Subscribe to the publisher at ``endpoint`` too; connecting twice is a no-op.
        ``server_key``: the publisher's CURVE key, pinned (needed beyond this process).

        Raises EndpointError for a malformed endpoint, one naming no particular host:port, or
        one beyond this process without a key.
        """
        ...

    async def disconnect(self, endpoint: str) -> None:
        """Stop receiving from ``endpoint``'s publisher (a no-op if not connected to it).

        Messages it published after this call are never delivered; some published before may
        still be.
        """
        ...

    async def receive(self) -> list[bytes]:
        """Wait for the next message from any connected publisher, taking publishers in turn."""
        ...

    async def aclose(self) -> None:
        """Close; pending and later calls raise TransportClosed. Idempotent."""
        ...
