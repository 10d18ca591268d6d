"""The keeper's side of the wire: a job client connected to a queen.

`open_keeper(endpoint)` is the one job client (`actors/jobclient.py`) with the keeper's role:
it submits jobs and streams their frames, heartbeats, and ends its jobs with UNAVAILABLE when the
queen falls silent (instead of hanging until their deadlines).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from rbee_mesh.actors.jobclient import ClientConfig, JobClient, ServerUnreachable, running_client
from rbee_mesh.protocol import Actor, ErrorCode
from rbee_mesh.transport import EndpointError


@asynccontextmanager
async def open_keeper(
    endpoint: str, config: ClientConfig | None = None
) -> AsyncIterator[JobClient]:
    """Connect to the queen at `endpoint` for the duration of the block.

    Raises ServerUnreachable for an endpoint that cannot be connected to; a queen that does not
    answer is found out by the first `submit` (within `accept_timeout_s`).
    """
    try:
        client = JobClient(
            endpoint,
            name=f"keeper-{os.getpid()}",
            role=Actor.KEEPER,
            server=f"the queen at {endpoint}",
            lost_code=ErrorCode.UNAVAILABLE,
            config=config,
        )
        async with running_client(client):
            yield client
    except EndpointError as exc:
        raise ServerUnreachable(f"cannot reach the queen at {endpoint}: {exc}") from None
