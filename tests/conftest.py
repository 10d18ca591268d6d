"""Shared fixtures: a queen on each transport, and keepers that talk to it."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import trio

from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.actors.hive.hive import Hive, running_hive
from rbee_mesh.actors.jobclient import ClientConfig, ClientJob, JobClient
from rbee_mesh.actors.jobserver import ServerConfig
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.mesh import (
    integrated_hive_config,
    integrated_mesh,
    memory_endpoint,
    running_queen,
)
from rbee_mesh.actors.queen.api import serving_api
from rbee_mesh.actors.queen.queen import Queen
from rbee_mesh.inference.gguf_file import write_tiny_gguf
from rbee_mesh.protocol import Infer, Message
from rbee_mesh.transport import local_endpoint_for

# Tests never leave this machine: a test that reaches for the model hub without the loopback hub
# fixture gets "connection refused" from a closed local port, not the internet. Subprocesses
# inherit these settings.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# Nor do queens started by tests look for hives on this machine's LAN (mDNS on every interface):
# the multi-host tests turn discovery on inside the network namespaces they make.
os.environ["RBEE_MESH_DISCOVERY"] = "0"
# A queen's HTTP API goes on a free port: tests never fight over 7834 (or with a user's queen).
os.environ["RBEE_MESH_API"] = "127.0.0.1:0"

#: Short intervals so that liveness tests finish quickly (lost after 0.7 s of silence), but long
#: enough that a loaded two-core machine does not miss heartbeats; real time, generous bounds.
FAST_QUEEN = ServerConfig(heartbeat_s=0.2, peer_stall_s=2.0, shutdown_grace_s=1.0)
FAST_KEEPER = ClientConfig(heartbeat_s=0.2, accept_timeout_s=2.0)

TRANSPORTS = ["mem", "ipc", "tcp"]
_names = itertools.count()


def bind_endpoint(transport: str, tmp_path: Path) -> str:
    """A fresh endpoint of `transport` that a test may bind."""
    if transport == "mem":
        return f"mem://test-{os.getpid()}-{next(_names)}"
    if transport == "ipc":
        return f"ipc://{tmp_path}/queen-{next(_names)}.sock"
    return "tcp://127.0.0.1:0"


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def queen(transport: str, tmp_path: Path) -> AsyncIterator[Queen]:
    async with running_queen(bind_endpoint(transport, tmp_path), FAST_QUEEN) as q:
        yield q


def queen_address(queen: Queen) -> str:
    return local_endpoint_for(queen.listener.endpoint)


@pytest.fixture
async def keeper(queen: Queen) -> AsyncIterator[JobClient]:
    async with open_keeper(queen_address(queen), FAST_KEEPER) as k:
        yield k


async def infer_in_a_mesh(state: Path, op: Infer) -> tuple[ClientJob, list[Message]]:
    """Run `op` in a whole mesh of this process (a queen, the hive of `state`, a worker
    process): its job and every frame it streamed."""
    async with (
        integrated_mesh(state) as queen,
        open_keeper(queen.listener.endpoint, FAST_KEEPER) as keeper,
    ):
        job = await keeper.submit(op)
        return job, [m async for m in job]


@dataclass
class Served:
    """A mesh of this process (a queen, the hive of a state directory) and its HTTP API."""

    queen: Queen
    hive: Hive
    url: str

    def client(self) -> openai.OpenAI:
        """The official client (synchronous: call it in a thread), bounded by its timeout."""
        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=60)

    def finished(self) -> list[dict[str, Any]]:
        """The queen's inference jobs, running or ended."""
        jobs = self.queen.server.job_summaries(include_finished=True)
        return [j for j in jobs if j["op"] == "infer"]


@asynccontextmanager
async def serving_a_mesh(state: Path, max_queued: int = 64) -> AsyncIterator[Served]:
    """A queen and the hive of `state` in this process, its API on a free loopback port."""
    hive_config = integrated_hive_config(state, FAST_QUEEN)
    endpoint = memory_endpoint("queen")
    async with (
        running_hive(hive_config) as hive,
        running_queen(
            endpoint, FAST_QUEEN, hives=[hive_config.control], max_queued=max_queued
        ) as queen,
        serving_api(queen, "127.0.0.1:0") as url,
    ):
        with trio.fail_after(5):
            await queen.hives.links[0].client.answered.wait()
        yield Served(queen, hive, url)


#: The random-weight model in the catalog of `served`'s hive.
TINY_MODEL = "rbee-test/tiny:tiny.gguf"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """A mesh of this process serving its HTTP API, its hive holding TINY_MODEL."""
    state = tmp_path / "state"
    model = write_tiny_gguf(tmp_path / "tiny.gguf", context_length=2048)
    Catalog(state / "hive" / "models").add_file("rbee-test/tiny", "tiny.gguf", model)
    async with serving_a_mesh(state) as served:
        yield served
