"""PUB/SUB, for broadcasts such as hive heartbeats: open_publisher and open_subscriber.

A publisher binds one endpoint; one subscriber connects to any number of publishers, over any
mix of transports, and receives from all of them through one ``receive()``::

    async with await open_publisher("tcp://0.0.0.0:7836") as publisher:
        publisher.publish(frames)  # never waits; a slow subscriber misses it

    async with await open_subscriber() as subscriber:
        await subscriber.connect("tcp://hive-a.lan:7836")
        await subscriber.connect("mem://hive-b")
        frames = await subscriber.receive()

Delivery is never guaranteed (slow joiners, high-water marks, restarts): a receiver must count
what is missing, not wait for it. What is guaranteed, on every transport, is that a subscription
outlives publishers: connect before the publisher binds, or keep a subscription across its
restart, and messages flow once a publisher is bound there.
"""

from __future__ import annotations

import trio

from .base import Publisher, Subscriber
from .endpoints import parse_connect_endpoint, parse_endpoint
from .errors import TransportClosed
from .factory import PUBSUB_OPTIONS, SocketOptions
from .memory import MemoryInbox, MemoryPublisher
from .zmq_transport import ZmqPublisher, ZmqSubscription


async def open_publisher(endpoint: str, *, options: SocketOptions | None = None) -> Publisher:
    """Bind a publisher to ``endpoint`` (mem:// in memory, everything else a ZeroMQ PUB).

    ``options`` default to PUBSUB_OPTIONS (the in-memory transport has no publisher-side queue
    and ignores them). Raises EndpointError if the endpoint is malformed or already bound, by a
    publisher or a listener.
    """
    parsed = parse_endpoint(endpoint)
    await trio.lowlevel.checkpoint()
    if parsed.scheme == "mem":
        return MemoryPublisher.bind(parsed.address)
    return ZmqPublisher.bind(parsed, options if options is not None else PUBSUB_OPTIONS)


async def open_subscriber(*, options: SocketOptions | None = None) -> Subscriber:
    """Open a subscriber connected to nothing yet; see MeshSubscriber.

    ``options`` default to PUBSUB_OPTIONS; ``rcvhwm`` bounds the queue per publisher (ZeroMQ
    and in memory alike).
    """
    await trio.lowlevel.checkpoint()
    return MeshSubscriber(options if options is not None else PUBSUB_OPTIONS)


class MeshSubscriber(Subscriber):
    """A subscriber that hears publishers on every transport at once.

    mem:// subscriptions live in a MemoryInbox; every other one on a single ZeroMQ SUB socket,
    made at the first such connect. ``receive`` takes from the two in turn when both have
    messages (and each takes its own publishers in turn), so no publisher can starve another.
    """

    def __init__(self, options: SocketOptions) -> None:
        self._options = options
        self._inbox = MemoryInbox(options.rcvhwm, self._wake_one)
        self._zmq: ZmqSubscription | None = None
        self._zmq_turn = False
        # Receivers waiting, each in a cancel scope that is cancelled to wake it: for a memory
        # message, for a new ZeroMQ socket to watch, or for close. An ordered set.
        self._waiters: dict[trio.CancelScope, None] = {}
        self._closed = False

    async def connect(self, endpoint: str, server_key: str = "") -> None:
        """Subscribe to the publisher at ``endpoint``, bound or not yet, whose CURVE key is
        ``server_key`` (beyond this process); again is a no-op."""
        parsed = parse_connect_endpoint(endpoint)
        await trio.lowlevel.checkpoint()
        self._check_open()
        if parsed.scheme == "mem":
            self._inbox.connect(parsed.address)
            return
        if self._zmq is None:
            self._zmq = ZmqSubscription.open(self._options)
            # Receivers waiting for memory messages only must now watch the SUB socket too.
            self._wake_all()
        self._zmq.connect(parsed, server_key)

    async def disconnect(self, endpoint: str) -> None:
        """Unsubscribe from ``endpoint``; a no-op if not subscribed to it."""
        parsed = parse_endpoint(endpoint)
        await trio.lowlevel.checkpoint()
        self._check_open()
        if parsed.scheme == "mem":
            self._inbox.disconnect(parsed.address)
        elif self._zmq is not None:
            self._zmq.disconnect(parsed)

    async def receive(self) -> list[bytes]:
        """Wait for the next message from any publisher this subscriber is connected to."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            self._check_open()
            zmq_first = self._zmq_turn
            self._zmq_turn = not self._zmq_turn
            if zmq_first and self._zmq is not None and self._inbox.ready():
                message = await self._zmq.receive_nowait()
                if message is not None:
                    return message
            message = self._inbox.take()
            if message is not None:
                # Shielded: the message is taken and must not be lost to a cancellation.
                await trio.lowlevel.cancel_shielded_checkpoint()
                return message
            # Nothing in memory: wait on the SUB socket (which takes a waiting message at
            # once) or, without one, for a wake-up.
            message = await self._wait()
            if message is not None:
                return message

    async def aclose(self) -> None:
        """Unsubscribe from everything and close the SUB socket; receivers get TransportClosed."""
        if not self._closed:
            self._closed = True
            self._inbox.close()
            self._wake_all()
            if self._zmq is not None:
                await self._zmq.aclose()
        await trio.lowlevel.checkpoint()

    async def _wait(self) -> list[bytes] | None:
        """Return a ZeroMQ message, or None when woken (then the caller looks again)."""
        # No checkpoint between the caller's look at the inbox and registering as a waiter,
        # so no wake-up can fall in between.
        self._check_open()
        message = None
        with trio.CancelScope() as scope:
            self._waiters[scope] = None
            try:
                if self._zmq is None:
                    await trio.sleep_forever()
                else:
                    message = await self._zmq.receive()
            finally:
                self._waiters.pop(scope, None)
        if message is not None and scope.cancel_called and self._inbox.ready():
            # Woken for a memory message, but a ZeroMQ one came first: pass the wake-up on.
            self._wake_one()
        return message

    def _wake_one(self) -> None:
        if self._waiters:
            scope = next(iter(self._waiters))
            del self._waiters[scope]
            scope.cancel()

    def _wake_all(self) -> None:
        for scope in self._waiters:
            scope.cancel()
        self._waiters.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed("subscriber is closed")
