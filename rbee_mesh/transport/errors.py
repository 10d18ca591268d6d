"""The transport's error set: small and flat, like trio's.

Every transport (ZeroMQ or in-memory) raises only these, so actor code handles one set of
exceptions whatever the mode.
"""

from __future__ import annotations


class TransportError(Exception):
    """Base class of every error a transport raises."""


class PeerUnreachable(TransportError):
    """The addressed peer is not connected, or is gone (libzmq's EHOSTUNREACH)."""


class PeerBusy(TransportError):
    """The peer's outbound pipe is at its high-water mark right now; retrying later may work."""


class TransportClosed(TransportError):
    """This end of the transport was closed (by this process)."""


class EndpointError(TransportError):
    """A malformed endpoint, or a bind/connect that failed; the message names the endpoint."""
