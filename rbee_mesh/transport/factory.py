"""The one place where ZeroMQ sockets are made, so every socket gets the same safety options,
CURVE keys included: a socket that reaches beyond this process (tcp, ipc) is made with keys
(`SocketOptions.curve`), or explicitly `plaintext` (benchmarks measuring what CURVE costs).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import zmq

from .curve import ClientKeys, ServerKeys, apply_client, apply_server

DEFAULT_HWM = 10_000
"""Messages queued per pipe and direction before senders wait (or get PeerBusy)."""

PUBSUB_HWM = 100
"""Messages queued per publisher-subscriber pipe, on each side, before a PUB drops.

Heartbeats are worth something only while fresh, and a queen subscribes to every hive: a
deep queue would only hold stale heartbeats, up to DEFAULT_HWM per hive, in the queen's
memory. 100 is 100 s of heartbeats at 1 Hz; beyond that a PUB drops, which PUB/SUB users
must tolerate anyway (slow joiners, reconnects).
"""


@dataclass(frozen=True)
class SocketOptions:
    """Per-socket options; the defaults suit a LAN mesh."""

    linger_ms: int = 0
    """Unsent messages are dropped at close: a closing actor must never hang on a dead peer."""
    sndhwm: int = DEFAULT_HWM
    """Outbound messages queued per peer before a send waits or raises PeerBusy (0: no limit)."""
    rcvhwm: int = DEFAULT_HWM
    """Inbound messages queued per peer before that peer's sends stall (0: no limit)."""
    max_msg_size: int = 16 * 1024 * 1024
    """A peer sending a larger frame is disconnected (tcp/ipc only: libzmq does not check
    inproc)."""
    handshake_ivl_ms: int = 10_000
    """A peer that connects but never completes the ZMTP handshake is dropped after this."""
    tcp_keepalive: bool = True
    """Let the kernel notice a vanished host (idle 30 s, then 3 probes 10 s apart)."""
    tcp_keepalive_idle_s: int = 30
    tcp_keepalive_intvl_s: int = 10
    tcp_keepalive_cnt: int = 3
    reconnect_ivl_ms: int = 100
    """How soon a failed or lost connection is tried again (libzmq's default), every time."""
    routing_id: bytes | None = None
    """A DEALER's identity at the ROUTER it connects to (None: libzmq makes one per connection).
    With one, a connection that libzmq re-establishes after a blip is the same peer to the
    ROUTER, which hands the identity over to it (ROUTER_HANDOVER)."""
    curve: ServerKeys | ClientKeys | None = None
    """CURVE keys: a listener's or publisher's own (ServerKeys), a connection's or subscriber's
    (ClientKeys; a subscriber's server key is given at each connect). Required beyond one
    process (tcp, ipc) unless `plaintext`."""
    plaintext: bool = False
    """Allow a tcp or ipc socket without CURVE: only for measuring what CURVE costs."""


PUBSUB_OPTIONS = SocketOptions(sndhwm=PUBSUB_HWM, rcvhwm=PUBSUB_HWM)
"""The options PUB and SUB sockets get when none are given (see PUBSUB_HWM)."""

MAX_SUBSCRIPTION_BYTES = 1_024
"""The largest message a publisher takes from a subscriber. What a SUB sends a PUB is its
subscriptions: one byte and a topic (ours use the empty topic). libzmq applies the limit to the
handshake's commands too, and CURVE's are several hundred bytes (its INITIATE carries the
client's vouch and metadata); a larger message is a peer's attempt to make the publisher store
megabytes of topics, and libzmq drops that peer's connection."""

MAX_TOPIC_BYTES = 64 * 1_024
"""Bytes of topics one subscriber's key may send a publisher, in all. Ours send none: they
subscribe to everything. libzmq keeps each topic a subscriber sends until its connection ends
(some 25 bytes of memory per byte of topic; 1,600 random topics of 1 KB took 40 MiB), so a
subscriber that sends many could grow the publisher without bound. Past this its key is refused
by that publisher from then on, and its connection is cut."""

_PUBSUB_KINDS = frozenset({zmq.PUB, zmq.SUB, zmq.XPUB, zmq.XSUB})


def shared_context() -> zmq.Context[zmq.Socket[bytes]]:
    """Return the process-wide context (pyzmq's singleton).

    inproc:// endpoints only connect sockets of one context, and pyzmq helpers such as
    zmq.auth default to this same instance.

    A queen holds a socket per hive (its DEALER) and three file descriptors (that socket's, its
    connection, and a connection of its SUB), so the first call lifts the two limits a mesh of
    hundreds of hives meets first: libzmq's 1,023 sockets per context, and the usual soft limit
    of 1,024 open files.
    """
    global _configured
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    if not _configured:
        _configured = True
        ctx.set(zmq.MAX_SOCKETS, ctx.get(zmq.SOCKET_LIMIT))
        raise_open_file_limit()
    return ctx


_configured = False


def raise_open_file_limit() -> int:
    """Lift this process's soft limit on open files to its hard limit; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 65_536)
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def make_socket(
    kind: int,
    *,
    ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
    options: SocketOptions | None = None,
) -> zmq.Socket[bytes]:
    """Create a socket of ``kind`` (zmq.ROUTER, zmq.DEALER, ...) with ``options`` applied.

    ROUTER sockets always get ROUTER_MANDATORY, because a ROUTER otherwise drops frames for an
    unknown peer silently; with it, sending to such a peer fails with EHOSTUNREACH.

    PUB and SUB sockets default to PUBSUB_OPTIONS (shallow queues) instead of SocketOptions().
    SUB sockets subscribe to every message: our frames start with the protocol magic, not a
    topic, so filtering by prefix would mean nothing. CONFLATE is deliberately not used: it
    keeps only the last *frame*, which breaks multipart messages.
    """
    if options is not None:
        opts = options
    else:
        opts = PUBSUB_OPTIONS if kind in _PUBSUB_KINDS else SocketOptions()
    sock = (ctx if ctx is not None else shared_context()).socket(kind)
    try:
        sock.setsockopt(zmq.LINGER, opts.linger_ms)
        sock.setsockopt(zmq.SNDHWM, opts.sndhwm)
        sock.setsockopt(zmq.RCVHWM, opts.rcvhwm)
        sock.setsockopt(zmq.MAXMSGSIZE, opts.max_msg_size)
        sock.setsockopt(zmq.HANDSHAKE_IVL, opts.handshake_ivl_ms)
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1 if opts.tcp_keepalive else 0)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, opts.tcp_keepalive_idle_s)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, opts.tcp_keepalive_intvl_s)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, opts.tcp_keepalive_cnt)
        sock.setsockopt(zmq.RECONNECT_IVL, opts.reconnect_ivl_ms)
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if kind == zmq.DEALER and opts.routing_id is not None:
            sock.setsockopt(zmq.ROUTING_ID, opts.routing_id)
        if kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        if kind == zmq.XPUB:
            # Every subscription is passed up (not only a topic's first), to be counted.
            sock.setsockopt(zmq.XPUB_VERBOSE, 1)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_BYTES)
        if isinstance(opts.curve, ServerKeys):
            apply_server(sock, opts.curve)
        elif isinstance(opts.curve, ClientKeys):
            apply_client(sock, opts.curve)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock
