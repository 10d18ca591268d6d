"""A pyzmq socket driven by trio, safe for many concurrent senders and receivers.

Why this is subtle: the descriptor behind zmq.FD is not "readable while a message is waiting".
It signals that libzmq has commands to process, and *any* libzmq call on the socket (send, recv,
reading EVENTS) may process them and so consume the signal. The naive loop "try NOBLOCK; on
EAGAIN wait_readable(FD)" therefore hangs under bursts: another call swallowed the signal and
the FD never becomes readable again although EVENTS shows a message waiting.

The rules this module follows:

* Always try the operation with NOBLOCK first.
* Wait on the FD only right after a fresh EVENTS read said "not ready", with no checkpoint in
  between, so no signal can be missed in the gap.
* Only one task waits on the FD (trio allows one reader per descriptor); other waiting tasks
  park in a ParkingLot per direction.
* After every libzmq call made while someone is waiting, re-read EVENTS and wake whoever's
  condition now holds: parked tasks are unparked, the FD waiter is woken by cancelling the
  CancelScope around its wait_readable. Readiness only changes when libzmq processes commands
  or when we send/recv ourselves, so this catches every signal another call swallowed.
* The task waiting on the FD gives the job up when its own condition holds (or it is cancelled)
  and then unparks everybody, so a parked task never waits with nobody watching the FD.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar, cast

import trio
import zmq

from .errors import TransportClosed

_T = TypeVar("_T")

# libzmq reports a closed socket or a terminated context with these.
_CLOSED_ERRNOS = frozenset({errno.ENOTSOCK, zmq.ETERM})

# pyzmq's constants are enum flags, and each `&` or `|` on them builds a new enum object, several
# per message (pyzmq's own send_multipart and recv_multipart do it per frame). The hot paths use
# plain ints.
_POLLIN, _POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)
_EVENTS, _RCVMORE = int(zmq.EVENTS), int(zmq.RCVMORE)


def _send_now(sock: zmq.Socket[bytes], frames: Sequence[bytes]) -> None:
    """`send_multipart(frames, NOBLOCK)` with int flags. libzmq queues a multipart message
    atomically: only its first frame can fail with EAGAIN."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, _NOBLOCK | _SNDMORE if i < last else _NOBLOCK)


def _recv_now(sock: zmq.Socket[bytes]) -> list[bytes]:
    """`recv_multipart(NOBLOCK)` with int flags: once the first frame is there, all are."""
    frames = [sock.recv(_NOBLOCK)]
    while sock.get(_RCVMORE):
        frames.append(sock.recv(_NOBLOCK))
    return frames


def _recv_keyed_now(sock: zmq.Socket[bytes]) -> tuple[str, list[bytes]]:
    """`_recv_now` on a CURVE server socket, with the sender's key: the User-Id its ZAP
    handler gave the connection (pyzmq's zmq.auth: the client's public key in z85)."""
    first = sock.recv(_NOBLOCK, copy=False)
    frames = [first.bytes]
    while sock.get(_RCVMORE):
        frames.append(sock.recv(_NOBLOCK))
    return str(first.get("User-Id")), frames


class TrioSocket:
    """Wrap ``sock`` (made by make_socket) for use from any number of trio tasks.

    All methods are cancel-safe: cancellation only happens while no libzmq call is in progress,
    and a multipart message is sent or received by one synchronous call, so a cancelled task
    never leaves half a message behind and the socket stays usable.
    """

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self._sock = sock
        self._fd = sock.fileno()  # zmq.FD
        self._closed = False
        self._parked: dict[int, trio.lowlevel.ParkingLot] = {
            _POLLIN: trio.lowlevel.ParkingLot(),
            _POLLOUT: trio.lowlevel.ParkingLot(),
        }
        # The scope around the single wait_readable(FD), and the event its task waits for.
        self._fd_waiter: trio.CancelScope | None = None
        self._fd_waiter_wants = 0

    @property
    def socket(self) -> zmq.Socket[bytes]:
        """The wrapped pyzmq socket, for options and bind/connect; do not send or receive on it."""
        return self._sock

    @property
    def closed(self) -> bool:
        """True once aclose() was called."""
        return self._closed

    async def send_multipart(self, frames: Sequence[bytes], *, block: bool = True) -> None:
        """Send ``frames`` as one multipart message.

        With ``block=True`` wait while the socket reports no room (POLLOUT clear). With
        ``block=False`` raise zmq.Again instead: use that for ROUTER sockets, whose POLLOUT
        (under ROUTER_MANDATORY) means "some peer has room", not "the addressed peer has room".
        Other libzmq errors (EHOSTUNREACH for an unknown ROUTER peer, ...) propagate as
        zmq.ZMQError; TransportClosed if the socket is or gets closed.
        """

        def send() -> None:
            _send_now(self._sock, frames)

        await self._perform(send, _POLLOUT, block=block)

    def send_multipart_nowait(self, frames: Sequence[bytes]) -> None:
        """Send ``frames`` now or raise zmq.Again: the synchronous form of ``block=False``, for
        callers that must not yield (a server answering inside its dispatch)."""
        self._check_open()
        try:
            _send_now(self._sock, frames)
        except zmq.ZMQError as exc:
            if exc.errno in _CLOSED_ERRNOS:
                raise TransportClosed("socket closed") from exc
            raise
        finally:
            if not self._closed:
                self._after_call()

    async def recv_multipart(self, *, block: bool = True) -> list[bytes]:
        """Wait for and return the next multipart message.

        With ``block=False`` raise zmq.Again at once if no message is waiting.
        """

        def recv() -> list[bytes]:
            return _recv_now(self._sock)

        return await self._perform(recv, _POLLIN, block=block)

    async def recv_multipart_keyed(self) -> tuple[str, list[bytes]]:
        """`recv_multipart` on a CURVE server socket: (the sender's key, the frames)."""
        return await self._perform(partial(_recv_keyed_now, self._sock), _POLLIN, block=True)

    def call_sync(self, op: Callable[[zmq.Socket[bytes]], _T]) -> _T:
        """Run ``op(socket)`` (connect, disconnect, unbind, an option...) while tasks may wait.

        Any libzmq call may process the socket's pending commands and so consume the FD signal
        a waiting task needs; this re-reads EVENTS afterwards and wakes whoever is ready, as
        send and receive do. Raises TransportClosed if the socket is closed; errors of ``op``
        propagate.
        """
        self._check_open()
        try:
            return op(self._sock)
        finally:
            if not self._closed:
                self._after_call()

    async def aclose(self) -> None:
        """Close the socket; every task waiting in it gets TransportClosed. Idempotent."""
        if not self._closed:
            self._closed = True
            # Tell trio first: the task in wait_readable gets ClosedResourceError instead of
            # waiting on a descriptor that libzmq is about to close (and may reuse).
            trio.lowlevel.notify_closing(self._fd)
            self._sock.close()
            self._unpark_all()
        await trio.lowlevel.checkpoint()

    async def _perform(self, op: Callable[[], _T], wants: int, *, block: bool) -> _T:
        """Run the non-blocking ``op`` until it does not raise zmq.Again (or once, if not block).

        ``wants`` is the EVENTS bit that makes ``op`` worth retrying.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            self._check_open()
            try:
                result = op()
            except zmq.Again:
                if not block:
                    self._after_call()
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    raise
            except zmq.ZMQError as exc:
                self._after_call()
                await trio.lowlevel.cancel_shielded_checkpoint()
                if exc.errno in _CLOSED_ERRNOS:
                    raise TransportClosed("socket closed") from exc
                raise
            else:
                self._after_call()
                if not waited:
                    # Shielded: the message is already sent/received and must not be lost to a
                    # cancellation now; we still yield so a busy loop cannot starve other tasks.
                    # A call that waited has let the others run already: one scheduler round
                    # (and its epoll) fewer per message that had to be waited for.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return result
            # EAGAIN and block=True. Waiting out here, not in the except block, keeps later
            # errors (Cancelled included) from being chained to that Again.
            await self._wait(wants)
            waited = True

    async def _wait(self, wants: int) -> None:
        """Return when an operation that just failed with EAGAIN is worth retrying."""
        events = self._refresh()
        if events & wants:
            # Ready already (or a ROUTER's POLLOUT for another peer): retry after a schedule
            # point so that a retry loop can never starve the other tasks.
            await trio.lowlevel.checkpoint()
            return
        if self._fd_waiter is not None:
            await self._parked[wants].park()
            return
        try:
            while not events & wants:
                with trio.CancelScope() as self._fd_waiter:
                    self._fd_waiter_wants = wants
                    try:
                        await trio.lowlevel.wait_readable(self._fd)
                    except trio.ClosedResourceError:
                        raise TransportClosed("socket closed") from None
                # Woken by the FD or by another task's _refresh: re-read; this also wakes the
                # parked tasks of the other direction if the FD signal was for them.
                events = self._refresh()
        finally:
            self._fd_waiter = None
            # Hand the FD over: parked tasks retry and one of them becomes the next waiter.
            self._unpark_all()

    def _after_call(self) -> None:
        """After a libzmq call: wake anyone whose FD signal that call may have consumed."""
        if self._fd_waiter is not None or self._parked[_POLLIN] or self._parked[_POLLOUT]:
            self._refresh()

    def _refresh(self) -> int:
        """Read EVENTS (processing libzmq's pending commands) and wake the tasks now ready."""
        self._check_open()
        events = cast(int, self._sock.get(_EVENTS))
        for flag, lot in self._parked.items():
            if events & flag:
                lot.unpark_all()
        if self._fd_waiter is not None and events & self._fd_waiter_wants:
            self._fd_waiter.cancel()
        return events

    def _unpark_all(self) -> None:
        for lot in self._parked.values():
            lot.unpark_all()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed("socket closed")
