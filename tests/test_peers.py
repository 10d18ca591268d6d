"""Hives reading each other's models (docs/sharing.md), on loopback: two real hives, each a node
of its own (a state directory, a key), one holding a model. The holder lets a peer's key read
its models (`peer_trust`, as its queen asks), and nothing else; the other fetches the model
from it over CURVE, in CHUNK frames, several reads in flight, into its own catalog.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from rbee_mesh.actors.hive.catalog import Catalog, ModelStatus
from rbee_mesh.actors.hive.download import READ_BYTES, Mesh, MeshPeer, download_model
from rbee_mesh.actors.hive.hive import Hive, HiveConfig, running_hive
from rbee_mesh.actors.jobclient import JobClient, ServerUnreachable, running_client
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.mesh import running_queen
from rbee_mesh.actors.trust import Role, Trust
from rbee_mesh.protocol import Actor, Chunk, Done, Error, ErrorCode, MeshError, ModelRead
from rbee_mesh.protocol.operations import PeerTrust, PeerUntrust, WorkerSpawn
from tests.conftest import FAST_KEEPER, FAST_QUEEN, bind_endpoint, queen_address
from tests.test_download import job_context

REPO, FILE = "rbee-test/peer-GGUF", "peer.Q8_0.gguf"
MODEL = f"{REPO}:{FILE}"
#: More than two reads' worth, and not a whole number of chunks.
SIZE = 2 * READ_BYTES + 12_345


def node(path: Path) -> Trust:
    path.mkdir(parents=True, exist_ok=True)
    return Trust.load(path)


@asynccontextmanager
async def hive(tmp_path: Path, name: str) -> AsyncIterator[Hive]:
    config = HiveConfig(
        state_dir=tmp_path / name,
        hive_id=name,
        control=bind_endpoint("tcp", tmp_path),
        heartbeats=bind_endpoint("tcp", tmp_path),
        server=FAST_QUEEN,
        announce=False,
        trust=node(tmp_path / name),
    )
    async with running_hive(config) as running:
        yield running


@asynccontextmanager
async def client_of(server: Hive, me: Trust) -> AsyncIterator[JobClient]:
    client = JobClient(
        server.server.listener.endpoint, name="peer", role=Actor.HIVE, server=server.id,
        lost_code=ErrorCode.HIVE_LOST, config=FAST_KEEPER,
        keys=me.client_keys(server.config.trust.public),
    )  # fmt: skip
    async with running_client(client):
        yield client


@pytest.fixture
def model_file(tmp_path: Path) -> bytes:
    data = random.Random(7).randbytes(SIZE)
    (tmp_path / "model.bin").write_bytes(data)
    return data


async def test_a_peer_reads_a_model_in_chunks_and_may_ask_nothing_else(
    tmp_path: Path, model_file: bytes
) -> None:
    me = node(tmp_path / "me")
    with trio.fail_after(30):
        async with hive(tmp_path, "holder") as holder:
            holder.catalog.add_file(REPO, FILE, tmp_path / "model.bin")
            holder.config.trust.trust(me.public, Role.PEER, "me")
            async with client_of(holder, me) as client:
                job = await client.submit(ModelRead(model=MODEL, offset=100, length=SIZE - 100))
                chunks = [m async for m in job if isinstance(m, Chunk)]
                refused = [
                    await (await client.submit(op)).end()
                    for op in (
                        WorkerSpawn(model=MODEL),
                        PeerTrust(name="other", key=me.public),
                        ModelRead(model=MODEL, offset=SIZE - 10, length=11),
                    )
                ]
    assert isinstance(job.terminal, Done), job.terminal
    assert b"".join(c.data for c in chunks) == model_file[100:]
    assert [c.offset for c in chunks] == list(range(100, SIZE, 1 << 20))
    assert [getattr(r, "code", None) for r in refused] == [
        ErrorCode.FORBIDDEN, ErrorCode.FORBIDDEN, ErrorCode.INVALID_REQUEST,
    ]  # fmt: skip


async def test_a_peer_forgotten_is_cut_off_and_a_queen_keeps_its_role(tmp_path: Path) -> None:
    me, queen = node(tmp_path / "me"), node(tmp_path / "queen")
    with trio.fail_after(30):
        async with hive(tmp_path, "holder") as holder:
            trust = holder.config.trust
            trust.trust(me.public, Role.PEER, "me")
            trust.trust(queen.public, Role.QUEEN, "queen")
            async with client_of(holder, trust) as owner:  # (its own node: the owner)
                forgot = [
                    await (await owner.submit(PeerUntrust(key=key))).end()
                    for key in (me.public, queen.public)
                ]
            async with client_of(holder, me) as client:
                with pytest.raises(ServerUnreachable):
                    await client.submit(ModelRead(model=MODEL, offset=0, length=1))
    assert [getattr(end, "result", None) for end in forgot] == [
        {"forgotten": True, "hive": "me"}, {"forgotten": False},
    ]  # fmt: skip
    assert trust.role_of(me.public) is None and trust.role_of(queen.public) is Role.QUEEN


async def test_a_key_nobody_introduced_is_refused_at_the_handshake(tmp_path: Path) -> None:
    stranger = node(tmp_path / "stranger")
    with trio.fail_after(30):
        async with hive(tmp_path, "holder") as holder, client_of(holder, stranger) as client:
            with pytest.raises(ServerUnreachable):
                await client.submit(ModelRead(model=MODEL, offset=0, length=1))
            assert holder.config.trust.refusals >= 1


async def test_a_hive_fetches_a_model_from_its_peer_and_verifies_it(
    tmp_path: Path, model_file: bytes
) -> None:
    with trio.fail_after(60):
        async with hive(tmp_path, "holder") as holder, hive(tmp_path, "taker") as taker:
            holder.catalog.add_file(REPO, FILE, tmp_path / "model.bin")
            taker_key = taker.config.trust.public
            holder.config.trust.trust(taker_key, Role.PEER, "taker")
            peer = MeshPeer("holder", holder.server.listener.endpoint, holder.config.trust.public)
            mesh = Mesh((peer,), taker.config.trust, "taker")
            with job_context() as job:
                entry = await download_model(taker.catalog, REPO, mesh=mesh, use_hub=False)
            with pytest.raises(MeshError) as nowhere:
                await download_model(
                    Catalog(tmp_path / "empty"), "rbee-test/other", mesh=mesh, use_hub=False
                )
    assert entry.id == MODEL and entry.path.read_bytes() == model_file
    assert entry.sha256 == holder.catalog.get(MODEL).sha256
    said = [n.human for n in job.narrations()]
    assert any(f"downloading {SIZE / 2**20:.1f} MiB from hive holder" in s for s in said), said
    assert holder.served_bytes == SIZE
    assert nowhere.value.code is ErrorCode.NOT_FOUND


async def fetch_after_interruption(tmp_path: Path, partial: bytes) -> tuple[int, list[str]]:
    """A taker that was interrupted fetching MODEL, with `partial` written, takes it from its
    holder once started again: (the bytes the holder served, what the fetch narrated)."""
    with trio.fail_after(60):
        async with hive(tmp_path, "holder") as holder, hive(tmp_path, "taker") as taker:
            held = holder.catalog.add_file(REPO, FILE, tmp_path / "model.bin")
            holder.config.trust.trust(taker.config.trust.public, Role.PEER, "taker")
            # What a taker killed mid-transfer leaves: its entry, and the bytes it had written.
            path = taker.catalog.model_path(REPO, FILE)
            taker.catalog.put(replace(held, status=ModelStatus.DOWNLOADING, path=path))
            taker.catalog.partial_path(REPO, FILE).write_bytes(partial)
            taker.catalog.mark_interrupted()  # as a hive starting again does
            peer = MeshPeer("holder", holder.server.listener.endpoint, holder.config.trust.public)
            mesh = Mesh((peer,), taker.config.trust, "taker")
            with job_context() as job:
                entry = await download_model(taker.catalog, MODEL, mesh=mesh, use_hub=False)
            assert entry.path.read_bytes() == (tmp_path / "model.bin").read_bytes()
    return holder.served_bytes, [n.human for n in job.narrations()]


async def test_a_fetch_a_restart_interrupted_resumes_from_its_offset(
    tmp_path: Path, model_file: bytes
) -> None:
    half = SIZE // 2 + 7
    served, said = await fetch_after_interruption(tmp_path, model_file[:half])
    assert served == SIZE - half  # only what was missing
    assert any(f"resuming at {half / 2**20:.1f} MiB" in s and "from hive holder" in s for s in said)


async def test_resumed_bytes_that_spoil_the_file_are_taken_again_from_the_start(
    tmp_path: Path, model_file: bytes
) -> None:
    # A partial left by another source whose bytes were wrong (a disk that lied).
    half = SIZE // 2
    served, said = await fetch_after_interruption(tmp_path, bytes(half))
    assert served == (SIZE - half) + SIZE  # the rest, then all of it again
    assert any("discarding those bytes" in s and "from hive holder, from the start" in s
               for s in said), said  # fmt: skip


async def test_the_queen_runs_no_hive_to_hive_operation(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with (
            running_queen(bind_endpoint("tcp", tmp_path), FAST_QUEEN) as queen,
            open_keeper(queen_address(queen), FAST_KEEPER) as keeper,
        ):
            ends = [
                await (await keeper.submit(op)).end()
                for op in (
                    ModelRead(model=MODEL, offset=0, length=1),
                    PeerTrust(name="x", key=Trust.for_process().public),
                )
            ]
    assert all(isinstance(e, Error) and e.code is ErrorCode.INVALID_REQUEST for e in ends), ends
