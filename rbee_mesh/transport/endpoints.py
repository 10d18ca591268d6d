"""Endpoint strings: parsing and checking them, without opening anything.

Endpoints:

* ``tcp://HOST:PORT`` -- HOST is an IPv4 address, a name, ``[IPv6]`` or ``*`` (all interfaces,
  for binding); PORT 0 binds an ephemeral port.
* ``ipc:///path/to/socket`` -- a Unix socket file (``ipc://@name``: Linux abstract namespace).
* ``inproc://NAME`` -- ZeroMQ within this process (shared context).
* ``mem://NAME`` -- the in-memory transport within this process (see memory.py).

reqrep.py opens listeners and connections on them, pubsub.py publishers and subscribers.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal, cast, get_args

from .errors import EndpointError

Scheme = Literal["tcp", "ipc", "inproc", "mem"]

# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
_MAX_IPC_PATH = 107


@dataclass(frozen=True)
class Endpoint:
    """A parsed endpoint. ``str(endpoint)`` gives it back in canonical form."""

    scheme: Scheme
    address: str
    """Everything after "scheme://": host:port, a path or a name."""
    host: str | None = None
    """tcp only; an IPv6 address keeps its brackets."""
    port: int | None = None
    """tcp only."""

    @property
    def is_ipv6(self) -> bool:
        """True for a tcp endpoint whose host is a bracketed IPv6 address."""
        return self.host is not None and self.host.startswith("[")

    def __str__(self) -> str:
        return f"{self.scheme}://{self.address}"


def parse_endpoint(endpoint: str) -> Endpoint:
    """Parse and validate ``endpoint``; raise EndpointError saying what is wrong with it."""
    scheme, sep, address = endpoint.partition("://")
    if not sep:
        raise EndpointError(f"malformed endpoint {endpoint!r}: expected scheme://address")
    if scheme not in get_args(Scheme):
        known = ", ".join(f"{s}://" for s in get_args(Scheme))
        raise EndpointError(f"unsupported scheme in {endpoint!r}: use one of {known}")
    if not address:
        raise EndpointError(f"malformed endpoint {endpoint!r}: nothing after {scheme}://")
    if any(c.isspace() for c in address):
        raise EndpointError(f"malformed endpoint {endpoint!r}: whitespace in address")
    if scheme == "tcp":
        host, port = _parse_host_port(endpoint, address)
        return Endpoint("tcp", address, host, port)
    if scheme == "ipc" and len(address.encode()) > _MAX_IPC_PATH:
        raise EndpointError(
            f"ipc path too long in {endpoint!r}: {len(address.encode())} bytes, "
            f"the limit is {_MAX_IPC_PATH}"
        )
    return Endpoint(cast(Scheme, scheme), address)


def _parse_host_port(endpoint: str, address: str) -> tuple[str, int]:
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text:
        raise EndpointError(f"missing port in {endpoint!r}: expected tcp://HOST:PORT")
    if not host:
        raise EndpointError(f"missing host in {endpoint!r}: expected tcp://HOST:PORT")
    if not port_text.isdecimal() or not 0 <= int(port_text) <= 65535:
        raise EndpointError(f"bad port in {endpoint!r}: expected a number from 0 to 65535")
    if ":" in host or "[" in host or "]" in host:
        bracketed = host.startswith("[") and host.endswith("]")
        try:
            ipaddress.IPv6Address(host[1:-1] if bracketed else host)
        except ValueError:
            raise EndpointError(f"bad host in {endpoint!r}") from None
        if not bracketed:
            raise EndpointError(f"bad host in {endpoint!r}: write IPv6 addresses as [addr]")
    return host, int(port_text)


def parse_connect_endpoint(endpoint: str) -> Endpoint:
    """Parse an endpoint to connect to: like parse_endpoint, but refuse a tcp endpoint that
    names no particular host:port (port 0 or host ``*``, which only make sense for binding)."""
    parsed = parse_endpoint(endpoint)
    if parsed.scheme == "tcp" and (parsed.port == 0 or parsed.host == "*"):
        raise EndpointError(f"cannot connect to {endpoint!r}: it names no particular host:port")
    return parsed


def local_endpoint_for(bound: str) -> str:
    """Turn a bound endpoint into one a client on this machine can connect to.

    Only wildcard hosts change: ``tcp://0.0.0.0:7833`` and ``tcp://*:7833`` become
    ``tcp://127.0.0.1:7833``, ``tcp://[::]:7833`` becomes ``tcp://[::1]:7833``.
    """
    endpoint = parse_endpoint(bound)
    if endpoint.host in ("0.0.0.0", "*"):
        return f"tcp://127.0.0.1:{endpoint.port}"
    if endpoint.host == "[::]":
        return f"tcp://[::1]:{endpoint.port}"
    return str(endpoint)


@dataclass(frozen=True)
class HttpBind:
    """Where an HTTP server listens (`queen start --api HOST:PORT`); port 0 picks a free one."""

    host: str
    port: int

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach it."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_http_bind(text: str) -> HttpBind:
    """HOST:PORT, an IPv6 host in brackets; EndpointError says what is wrong."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise EndpointError(f"expected HOST:PORT (such as 127.0.0.1:7834), got {text!r}")
    return HttpBind(host, int(port))
