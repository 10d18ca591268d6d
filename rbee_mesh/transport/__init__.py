"""Transports: how actors exchange multipart messages, whatever the deployment mode.

Actors open everything through two functions and see two shapes:

* ``await open_listener(endpoint)`` -> Listener (ROUTER side: many peers, by opaque id)
* ``await open_connection(endpoint)`` -> Connection (DEALER side: one listener)

Both are async context managers (``async with await open_listener(...) as listener:``).
Endpoints are ``tcp://``, ``ipc://`` and ``inproc://`` (ZeroMQ, driven by trio through
TrioSocket) or ``mem://`` (trio memory channels, for the integrated mode). Every transport
raises the same small error set: PeerUnreachable, PeerBusy, TransportClosed, EndpointError,
all TransportError. Every ZeroMQ socket is made by make_socket, the one place for socket
options (and, later, CURVE keys).
"""

from .base import Connection, Listener
from .endpoints import Endpoint, local_endpoint_for, open_connection, open_listener, parse_endpoint
from .errors import EndpointError, PeerBusy, PeerUnreachable, TransportClosed, TransportError
from .factory import DEFAULT_HWM, SocketOptions, make_socket, shared_context
from .memory import MemoryConnection, MemoryListener
from .zmq_transport import ZmqConnection, ZmqListener
from .zmq_trio import TrioSocket

__all__ = [
    "DEFAULT_HWM",
    "Connection",
    "Endpoint",
    "EndpointError",
    "Listener",
    "MemoryConnection",
    "MemoryListener",
    "PeerBusy",
    "PeerUnreachable",
    "SocketOptions",
    "TransportClosed",
    "TransportError",
    "TrioSocket",
    "ZmqConnection",
    "ZmqListener",
    "local_endpoint_for",
    "make_socket",
    "open_connection",
    "open_listener",
    "parse_endpoint",
    "shared_context",
]
