"""CURVE on ZeroMQ sockets: keypairs, the keys a server or a client socket is made with, and the
ZAP handler that admits a client's key or refuses it at the handshake.

Every tcp or ipc socket of the mesh is a CURVE server (listeners, publishers) or a CURVE client
(connections, subscriptions); inproc:// and mem:// stay within one process and need none. CURVE
alone admits any client that knows the server's public key; what stops a stranger is the ZAP
handler, pyzmq's `zmq.auth` (a thread of its own, one per process), which asks the server
socket's `Admission` about each client key. Each server socket has a ZAP domain of its own, so
the actors of one process (a test, the integrated mode) each admit their own peers. ZAP runs at
the handshake only: a key revoked later must be refused per message, which is why a listener
hands each message's key up with it (`Listener.receive`).

Keys are z85 text (40 characters), as libzmq takes them. A fingerprint is what a person compares.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import zmq
from zmq.utils import z85

if TYPE_CHECKING:  # pyzmq's zmq.auth imports asyncio (~8 ms): a server needs it, a client not
    from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("rbee_mesh.transport")

KEY_CHARS = 40
"""A CURVE key in z85, as libzmq takes it: 32 bytes in 40 characters."""


class Admission(Protocol):
    """What a server socket admits. Called from the ZAP thread: must not block, must not touch
    trio, and must be safe to call while the actor's thread changes what it admits."""

    def admits(self, key: str) -> bool: ...


@dataclass(frozen=True)
class Keypair:
    """A CURVE keypair in z85. The secret never appears in a repr, a log or a frame."""

    public: str
    secret: str = field(repr=False)

    @classmethod
    def generate(cls) -> Keypair:
        public, secret = zmq.curve_keypair()
        return cls(public.decode("ascii"), secret.decode("ascii"))

    @classmethod
    def from_secret(cls, secret: str) -> Keypair:
        """The keypair of ``secret``; ValueError if it is not a z85 CURVE key."""
        check_key(secret)
        return cls(zmq.curve_public(secret.encode("ascii")).decode("ascii"), secret)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)


def check_key(key: str) -> str:
    """``key`` if it is a z85 CURVE key (40 characters), else ValueError."""
    if not isinstance(key, str) or len(key) != KEY_CHARS:
        raise ValueError(f"a key is {KEY_CHARS} z85 characters")
    try:
        z85.decode(key.encode("ascii"))
    except Exception:  # UnicodeEncodeError, KeyError, struct.error (a value past 2**32)...
        raise ValueError("not a z85 key") from None
    return key


def fingerprint(public: str) -> str:
    """A short form of a public key for people to compare: 80 bits of its SHA-256, base32, in
    four groups (``ABCD-EFGH-IJKL-MNOP``)."""
    digest = hashlib.sha256(z85.decode(public.encode("ascii"))).digest()
    text = base64.b32encode(digest[:10]).decode("ascii")
    return "-".join(text[i : i + 4] for i in range(0, 16, 4))


@dataclass(frozen=True)
class ServerKeys:
    """What a CURVE server socket (a listener, a publisher) is made with."""

    keypair: Keypair
    admission: Admission = field(repr=False)


@dataclass(frozen=True)
class ClientKeys:
    """What a CURVE client socket is made with: its own keypair and the server's public key,
    pinned (a server with another key fails the handshake). A subscriber, which connects to
    many servers, leaves `server_key` empty and names each server's key at its connect."""

    keypair: Keypair
    server_key: str = ""


# ---- applying keys to sockets --------------------------------------------------------------------


def apply_server(sock: zmq.Socket[bytes], keys: ServerKeys) -> None:
    """Make ``sock`` a CURVE server that admits whom ``keys.admission`` admits."""
    domain = _zap.register(keys.admission, sock.context)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.keypair.secret.encode("ascii"))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.keypair.public.encode("ascii"))
    sock.setsockopt_string(zmq.ZAP_DOMAIN, domain)
    # With no ZAP handler answering, libzmq would admit every client: refuse them instead.
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def apply_client(sock: zmq.Socket[bytes], keys: ClientKeys) -> None:
    """Make ``sock`` a CURVE client of the server whose key is ``keys.server_key``."""
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.keypair.secret.encode("ascii"))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.keypair.public.encode("ascii"))
    if keys.server_key:
        set_server_key(sock, keys.server_key)


def set_server_key(sock: zmq.Socket[bytes], server_key: str) -> None:
    """The server key the next `connect` of ``sock`` pins (a SUB connects to many servers)."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode("ascii"))


def release_server(sock: zmq.Socket[bytes]) -> None:
    """Forget the admission of a CURVE server socket that is being closed."""
    try:
        domain = sock.getsockopt_string(zmq.ZAP_DOMAIN)
    except zmq.ZMQError:
        return
    _zap.release(domain)


class _ZapHandler:
    """The process's ZAP handler: pyzmq's ThreadAuthenticator on the shared context, started
    with the first CURVE server socket, asking each domain's Admission."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._auth: ThreadAuthenticator | None = None
        self._admissions: dict[str, Admission] = {}
        self._domains = itertools.count(1)

    def register(self, admission: Admission, ctx: zmq.Context[zmq.Socket[bytes]]) -> str:
        with self._lock:
            if self._auth is None:
                from zmq.auth.thread import ThreadAuthenticator

                auth = ThreadAuthenticator(ctx)
                auth.start()
                self._auth = auth
            elif self._auth.context is not ctx:
                raise RuntimeError("CURVE servers are made on the shared context only")
            domain = f"rbee-{next(self._domains)}"
            self._admissions[domain] = admission
            self._auth.configure_curve_callback(domain, credentials_provider=self)
            return domain

    def release(self, domain: str) -> None:
        """Forget a domain's admission. Its provider stays registered with pyzmq (removing it
        could race with the ZAP thread's lookup); with no admission it refuses everyone."""
        with self._lock:
            self._admissions.pop(domain, None)

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook: is ``key`` (z85) admitted in ``domain``? Never
        raises: an exception would end the ZAP thread, and every handshake of the process."""
        try:
            admission = self._admissions.get(domain)
            return admission is not None and admission.admits(key.decode("ascii"))
        except Exception:
            log.exception("the ZAP check of a key failed; refusing it")
            return False


_zap = _ZapHandler()
