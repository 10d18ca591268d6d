"""The two shapes every transport provides: a Connection (DEALER side) and a Listener (ROUTER side).

Frames are the application frames only, as ``bytes``; the ROUTER identity envelope never reaches
actor code. Both are async context managers that close on exit, used the trio way::

    async with await open_listener("tcp://0.0.0.0:7833") as listener:
        peer, frames = await listener.receive()

Implementations inherit ``__aenter__``/``__aexit__`` by subclassing these protocols explicitly;
a structural implementation (a test fake) must define them itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Protocol, Self


class Connection(Protocol):
    """The DEALER side: one connection to one listener."""

    endpoint: str
    """The endpoint this connection was opened to."""

    async def send(self, frames: Sequence[bytes]) -> None:
        """Send one multipart message, waiting while the outbound pipe is full (backpressure).

        Cancel-safe: if cancelled, the message was either sent whole or not at all.
        Raises PeerUnreachable (in-memory transport: the listener is gone) or TransportClosed.
        """
        ...

    async def receive(self) -> list[bytes]:
        """Wait for the next multipart message from the listener."""
        ...

    async def aclose(self) -> None:
        """Close this end; pending and later calls raise TransportClosed. Idempotent."""
        ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class Listener(Protocol):
    """The ROUTER side: many peers, each identified by opaque bytes."""

    endpoint: str
    """The endpoint actually bound (a tcp port 0 is resolved to the real port)."""

    async def send(self, peer: bytes, frames: Sequence[bytes]) -> None:
        """Send one multipart message to ``peer`` without ever waiting for that peer.

        Raises PeerBusy if the peer's pipe is full right now, PeerUnreachable if the peer is
        unknown or gone, TransportClosed if this listener was closed.
        """
        ...

    async def receive(self) -> tuple[bytes, list[bytes]]:
        """Wait for the next message: (peer id, frames without the identity frame)."""
        ...

    async def aclose(self) -> None:
        """Stop listening; pending and later calls raise TransportClosed. Idempotent."""
        ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
