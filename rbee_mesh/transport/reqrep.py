"""Request and reply: open_listener (the ROUTER side) and open_connection (the DEALER side).

Both return objects that close when used as async context managers::

    async with await open_listener("tcp://0.0.0.0:7833") as listener: ...
    async with await open_connection("tcp://127.0.0.1:7833") as connection: ...

The endpoint's scheme picks the transport: mem:// in memory, everything else over ZeroMQ.
"""

from __future__ import annotations

import trio

from .base import Connection, Listener
from .endpoints import parse_connect_endpoint, parse_endpoint
from .factory import SocketOptions
from .memory import MemoryConnection, MemoryListener
from .zmq_transport import ZmqConnection, ZmqListener


async def open_listener(endpoint: str, *, options: SocketOptions | None = None) -> Listener:
    """Bind a listener to ``endpoint`` (mem:// in memory, everything else over ZeroMQ).

    ``options`` default to SocketOptions(); the in-memory transport uses only ``rcvhwm``, as
    the capacity of the listener's inbound channel. Raises EndpointError if the endpoint is
    malformed or cannot be bound.
    """
    parsed = parse_endpoint(endpoint)
    opts = await _options(options)
    if parsed.scheme == "mem":
        return MemoryListener.bind(parsed.address, capacity=opts.rcvhwm)
    return ZmqListener.bind(parsed, opts)


async def open_connection(endpoint: str, *, options: SocketOptions | None = None) -> Connection:
    """Connect to the listener at ``endpoint`` (mem:// in memory, everything else over ZeroMQ).

    ``options`` as for open_listener (in memory, ``rcvhwm`` bounds this connection's inbound
    channel). Raises EndpointError for a malformed endpoint, and PeerUnreachable for a mem://
    name nobody has bound; a ZeroMQ connection instead queues until its listener appears.
    """
    parsed = parse_connect_endpoint(endpoint)
    opts = await _options(options)
    if parsed.scheme == "mem":
        return MemoryConnection.connect(parsed.address, capacity=opts.rcvhwm)
    return ZmqConnection.connect(parsed, opts)


async def _options(options: SocketOptions | None) -> SocketOptions:
    """The options to open with (the defaults if none), after a checkpoint: opening is an
    async operation even where it does not wait, as trio's are."""
    await trio.lowlevel.checkpoint()
    return options if options is not None else SocketOptions()
