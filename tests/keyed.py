"""The transport's open functions as the tests call them: as the node of this process
(`Trust.for_process()`, the one the actors of a test run as unless given another), so that a
tcp or ipc socket gets CURVE keys as every socket of the mesh does. The options a test gives are
kept; only the keys are added. A subscriber pins this node's key for every publisher unless its
`connect` names another.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rbee_mesh.actors.trust import Role, Trust
from rbee_mesh.transport import (
    PUBSUB_OPTIONS,
    Connection,
    Listener,
    Publisher,
    SocketOptions,
    Subscriber,
    pubsub,
    reqrep,
)

NODE = Trust.for_process()


async def open_listener(endpoint: str, *, options: SocketOptions | None = None) -> Listener:
    return await reqrep.open_listener(endpoint, options=_with(options, server=True))


async def open_connection(
    endpoint: str,
    *,
    options: SocketOptions | None = None,
    server_key: str = "",
    node: Trust = NODE,
) -> Connection:
    """As `node` (this process's by default), to the server whose key is `server_key` (by
    default `node`'s own)."""
    keys = node.client_keys(server_key or node.public)
    return await reqrep.open_connection(
        endpoint, options=replace(options or SocketOptions(), curve=keys)
    )


async def open_publisher(endpoint: str, *, options: SocketOptions | None = None) -> Publisher:
    return await pubsub.open_publisher(
        endpoint, options=_with(options or PUBSUB_OPTIONS, server=True)
    )


async def open_subscriber(*, options: SocketOptions | None = None) -> Subscriber:
    subscriber = await pubsub.open_subscriber(
        options=_with(options or PUBSUB_OPTIONS, server=False)
    )
    return _Pinning(subscriber)  # type: ignore[return-value]


class _Pinning:
    """A subscriber whose `connect` pins this node's key unless told another."""

    def __init__(self, subscriber: Subscriber) -> None:
        self._subscriber = subscriber

    async def connect(self, endpoint: str, server_key: str = "") -> None:
        await self._subscriber.connect(endpoint, server_key or NODE.public)

    def __getattr__(self, name: str) -> object:
        return getattr(self._subscriber, name)

    async def __aenter__(self) -> _Pinning:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._subscriber.aclose()


def _with(options: SocketOptions | None, *, server: bool) -> SocketOptions:
    keys = NODE.server_keys() if server else NODE.client_keys()
    return replace(options or SocketOptions(), curve=keys)


def pair(state_dir: Path) -> str:
    """Make the node of `state_dir` (a hive process's) trust this process's node as its queen,
    as `hive start --join` would; return that node's key, for this process's queen to pin."""
    node = Trust.load(state_dir)
    node.trust(NODE.public, Role.QUEEN, "the test's queen")
    return node.public
