"""Transports: how actors exchange multipart messages, whatever the deployment mode.

Actors open everything through four functions and see four shapes:

* ``await open_listener(endpoint)`` -> Listener (ROUTER side: many peers, by opaque id)
* ``await open_connection(endpoint)`` -> Connection (DEALER side: one listener)
* ``await open_publisher(endpoint)`` -> Publisher (PUB side: binds; ``publish`` never waits and
  drops for a subscriber that is not keeping up)
* ``await open_subscriber()`` -> Subscriber (SUB side: ``connect`` to any number of
  publishers, on any transports, and ``receive`` from all of them)

All are async context managers (``async with await open_listener(...) as listener:``).
Endpoints are ``tcp://``, ``ipc://`` and ``inproc://`` (ZeroMQ, driven by trio through
TrioSocket) or ``mem://`` (trio memory channels and queues, for the integrated mode). Every
transport raises the same small error set: PeerUnreachable, PeerBusy, TransportClosed,
EndpointError, all TransportError. Every ZeroMQ socket is made by make_socket, the one place
for socket options (and, later, CURVE keys); PUB and SUB sockets default to PUBSUB_OPTIONS.

PUB/SUB delivers nothing reliably (a subscriber misses what is published before it has joined,
and what overflows its queue), but a subscription outlives its publisher on every transport:
it may be made before the publisher binds, and hears a publisher that restarts on the same
endpoint without a new connect. Heartbeats over it are counted, never awaited.

Endpoints and errors are imported with the package, the rest (trio, zmq) when one of its names
is first read (`rbee_mesh/lazy.py`): parsing an endpoint, as the command line does, needs no zmq.
"""

from typing import TYPE_CHECKING

from rbee_mesh.lazy import lazy_attributes

from .endpoints import Endpoint, HttpBind, local_endpoint_for, parse_endpoint, parse_http_bind
from .errors import EndpointError, PeerBusy, PeerUnreachable, TransportClosed, TransportError

if TYPE_CHECKING:
    from .base import Connection, Listener, Publisher, Subscriber
    from .factory import (
        DEFAULT_HWM,
        PUBSUB_HWM,
        PUBSUB_OPTIONS,
        SocketOptions,
        make_socket,
        shared_context,
    )
    from .memory import MemoryConnection, MemoryListener, MemoryPublisher
    from .pubsub import MeshSubscriber, open_publisher, open_subscriber
    from .reqrep import open_connection, open_listener
    from .zmq_transport import ZmqConnection, ZmqListener, ZmqPublisher
    from .zmq_trio import TrioSocket
else:  # each module imported when one of its names is first read
    __getattr__ = lazy_attributes(__name__)

__all__ = [
    "DEFAULT_HWM",
    "PUBSUB_HWM",
    "PUBSUB_OPTIONS",
    "Connection",
    "Endpoint",
    "EndpointError",
    "HttpBind",
    "Listener",
    "MemoryConnection",
    "MemoryListener",
    "MemoryPublisher",
    "MeshSubscriber",
    "PeerBusy",
    "PeerUnreachable",
    "Publisher",
    "SocketOptions",
    "Subscriber",
    "TransportClosed",
    "TransportError",
    "TrioSocket",
    "ZmqConnection",
    "ZmqListener",
    "ZmqPublisher",
    "local_endpoint_for",
    "make_socket",
    "open_connection",
    "open_listener",
    "open_publisher",
    "open_subscriber",
    "parse_endpoint",
    "parse_http_bind",
    "shared_context",
]
