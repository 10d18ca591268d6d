"""The keeper's side of the wire: a job client connected to a queen, and joining a queen.

`open_keeper(endpoint)` is the one job client (`actors/jobclient.py`) with the keeper's role:
it submits jobs and streams their frames, heartbeats, and ends its jobs with UNAVAILABLE when the
queen falls silent (instead of hanging until their deadlines). `join_queen` redeems a join token:
it proves the token to the queen (its one-time key), tells the queen this node's key, and pins
the queen's.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from rbee_mesh.actors.jobclient import ClientConfig, JobClient, ServerUnreachable, running_client
from rbee_mesh.actors.trust import JoinToken, Role, Trust
from rbee_mesh.protocol import Actor, ErrorCode, MeshError, outcome
from rbee_mesh.protocol.operations import Join
from rbee_mesh.transport import EndpointError, parse_endpoint
from rbee_mesh.transport.curve import ClientKeys

#: How long a join waits for each of the queen's endpoints in the token to answer.
JOIN_TIMEOUT_S = 3.0


@asynccontextmanager
async def open_keeper(
    endpoint: str,
    config: ClientConfig | None = None,
    trust: Trust | None = None,
    server_key: str = "",
    name: str = "",
) -> AsyncIterator[JobClient]:
    """Connect to the queen at `endpoint` for the duration of the block, as the node of `trust`
    (default: this process's), pinning the queen's key: `server_key`, else the one trusted at
    that endpoint (a queen this node joined), else this node's own (a queen of this state
    directory). `name`: how the queen's job list shows this client (default keeper-PID).

    Raises ServerUnreachable for an endpoint that cannot be connected to; a queen that does not
    answer is found out by the first `submit` (within `accept_timeout_s`).
    """
    trust = trust or Trust.for_process()
    keys = trust.client_keys(server_key or trust.pinned(endpoint) or trust.public)
    async with _client(endpoint, Actor.KEEPER, keys, config, name) as client:
        yield client


@asynccontextmanager
async def _client(
    endpoint: str, role: Actor, keys: ClientKeys, config: ClientConfig | None, name: str = ""
) -> AsyncIterator[JobClient]:
    async with AsyncExitStack() as stack:
        try:
            client = JobClient(
                endpoint,
                name=name or f"keeper-{os.getpid()}",
                role=role,
                server=f"the queen at {endpoint}",
                lost_code=ErrorCode.UNAVAILABLE,
                config=config,
                keys=keys,
            )
            await stack.enter_async_context(running_client(client))
        except EndpointError as exc:  # connecting; what the block raises is the block's
            raise ServerUnreachable(f"cannot reach the queen at {endpoint}: {exc}") from None
        yield client


#: What a queen being joined is trusted as until it has answered.
JOINING = "queen-being-joined"


async def join_queen(
    token: JoinToken, trust: Trust, name: str, control_port: int | None = None
) -> dict[str, Any]:
    """Join the queen of `token` as the node of `trust`, named `name`: a keeper, or (with
    `control_port`) a hive, which the queen then manages at this machine's address as the
    queen sees it. On success this node trusts the queen (pinned at the endpoint that
    answered); returns what the queen said (its name, the name it gave this node).

    Raises MeshError: CONFLICT (the token was used or expired), UNAVAILABLE (no endpoint of the
    token answered within JOIN_TIMEOUT_S each).
    """
    config = ClientConfig(accept_timeout_s=JOIN_TIMEOUT_S)
    keys = ClientKeys(token.invite, token.queen_key)
    # A hive obeys the queen it joined; a keeper only talks to it (its key pinned).
    role = Role.QUEEN if token.role is Role.HIVE else Role.JOINED
    # The queen connects to a hive as soon as it has taken the join, before it answers: a hive
    # that serves already must trust it by then, or its refusal at the handshake ends the
    # queen's tries for good (libzmq does not reconnect after one). Undone if the join fails.
    early = None
    if control_port is not None and trust.role_of(token.queen_key) is None:
        early = trust.trust(token.queen_key, role, JOINING)
    tried = []
    for endpoint in token.endpoints:
        control = None
        if control_port is not None:
            control = f"tcp://{_address_towards(endpoint)}:{control_port}"
        op = Join(name=name, key=trust.public, control=control)
        try:
            async with _client(endpoint, Actor(token.role), keys, config) as client:
                job = await client.submit(op)
                result: dict[str, Any] = outcome(await job.end(), f"the queen at {endpoint}")
        except ServerUnreachable as exc:
            tried.append(f"{endpoint}: {exc.message}")
            continue
        except BaseException:
            if early is not None:
                trust.untrust(early)
            raise
        trust.trust(token.queen_key, role, str(result["queen"]), endpoint=endpoint)
        return result
    if early is not None:
        trust.untrust(early)
    raise MeshError(
        ErrorCode.UNAVAILABLE,
        "the queen did not answer ("
        + "; ".join(tried)
        + "). A token that was used already is refused at the handshake: ask for a new one",
    )


def _address_towards(endpoint: str) -> str:
    """This machine's address on the route to `endpoint` (a UDP socket's connect picks it; no
    packet is sent)."""
    parsed = parse_endpoint(endpoint)
    assert parsed.host is not None and parsed.port is not None
    host = parsed.host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, parsed.port))
        address: str = probe.getsockname()[0]
    return f"[{address}]" if family == socket.AF_INET6 else address
