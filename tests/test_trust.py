"""A node's keys and trust (actors/trust.py), and CURVE on the transport (transport/curve.py):
files, roles, invites, pairing codes, join tokens, and sockets that refuse what they should."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio

from rbee_mesh.actors import trust as trust_module
from rbee_mesh.actors.hive.hive import HiveConfig, running_hive
from rbee_mesh.actors.jobserver import JobServer, ServerConfig, ServerJob
from rbee_mesh.actors.keeper.client import join_queen, open_keeper
from rbee_mesh.actors.mesh import memory_endpoint, running_queen
from rbee_mesh.actors.trust import (
    KEY_FILE,
    MAX_REFUSED_KEYS,
    TRUST_FILE,
    JoinToken,
    Role,
    Trust,
    admitted,
    pairing_keypair,
)
from rbee_mesh.protocol import (
    Actor,
    Disconnect,
    Done,
    Error,
    ErrorCode,
    HiveList,
    MeshError,
    Narration,
    Ping,
    Ready,
    Status,
    WorkerSpawn,
    decode,
    encode,
)
from rbee_mesh.protocol.constants import PROTOCOL_VERSION
from rbee_mesh.protocol.operations import (
    HivePair,
    HiveTrust,
    HiveUntrust,
    Invite,
    Join,
    ModelImport,
    Pair,
)
from rbee_mesh.transport import EndpointError, SocketOptions, open_connection, open_listener
from rbee_mesh.transport.curve import ClientKeys, Keypair, ServerKeys, check_key, fingerprint
from rbee_mesh.transport.discovery import HiveAnnouncement
from tests import keyed
from tests.clitools import free_port
from tests.conftest import FAST_KEEPER, FAST_QUEEN


def test_a_node_key_is_made_once_private_and_never_shown(tmp_path: Path) -> None:
    first = Trust.load(tmp_path)
    again = Trust.load(tmp_path)
    assert first.keypair == again.keypair
    assert stat.S_IMODE(os.stat(tmp_path / KEY_FILE).st_mode) == 0o600
    assert first.keypair.secret not in repr(first.keypair)
    assert first.keypair.fingerprint == fingerprint(first.public)
    assert len(first.keypair.fingerprint) == 19  # XXXX-XXXX-XXXX-XXXX


def test_a_key_file_others_can_read_is_refused_saying_what_to_do(tmp_path: Path) -> None:
    Trust.load(tmp_path)
    os.chmod(tmp_path / KEY_FILE, 0o644)
    with pytest.raises(MeshError) as refused:
        Trust.load(tmp_path)
    assert "can be read by others" in refused.value.message and "chmod 600" in refused.value.message


def test_what_one_process_trusts_another_of_the_same_node_sees_and_neither_loses(
    tmp_path: Path,
) -> None:
    daemon, command = Trust.load(tmp_path), Trust.load(tmp_path)
    hive, keeper = Keypair.generate().public, Keypair.generate().public
    daemon.trust(hive, Role.HIVE, "gpu-box", endpoint="tcp://10.0.0.7:7835")
    command.trust(keeper, Role.KEEPER, "laptop")  # made on what the file holds now
    assert daemon.role_of(keeper) is Role.KEEPER  # an unknown key: the file is read again
    assert {t.name for t in Trust.load(tmp_path).entries()} == {"gpu-box", "laptop"}
    assert stat.S_IMODE(os.stat(tmp_path / TRUST_FILE).st_mode) == 0o600
    assert daemon.pinned("tcp://10.0.0.7:7835") == hive


def test_a_node_that_made_a_new_key_replaces_its_old_one(tmp_path: Path) -> None:
    trust = Trust.load(tmp_path)
    old, new = Keypair.generate().public, Keypair.generate().public
    trust.trust(old, Role.HIVE, "gpu-box")
    trust.trust(new, Role.HIVE, "gpu-box")
    assert trust.role_of(old) is None and trust.role_of(new) is Role.HIVE
    trust.untrust(trust.find("gpu-box", Role.HIVE))
    assert trust.role_of(new) is None


def test_an_invite_admits_one_handshake_then_only_the_connection_that_used_it() -> None:
    trust = Trust(Keypair.generate())
    invite = trust.invite(Role.HIVE)
    key = invite.keypair.public
    assert trust.admits(key) and trust.role_of(key) is Role.INVITE
    assert trust.redeem(key) == invite
    assert not trust.admits(key)  # no new handshake with it
    assert trust.role_of(key) is Role.INVITE  # the connection that redeemed it hears the answer
    with pytest.raises(MeshError) as again:
        trust.redeem(key)
    assert again.value.code is ErrorCode.CONFLICT
    expired = trust.invite(Role.KEEPER, ttl_s=-1).keypair.public
    assert not trust.admits(expired) and trust.role_of(expired) is None


def test_each_role_may_submit_only_what_is_meant_for_it() -> None:
    trust = Trust(Keypair.generate())
    key = Keypair.generate().public
    spawn, status = WorkerSpawn(model="a/b"), Status()
    invite, join = Invite(), Join(name="h", key=key)
    pair = Pair(name="q", key=key)
    allowed = {
        (actor, role, op.NAME)
        for actor in (Actor.QUEEN, Actor.HIVE, Actor.WORKER)
        for role in Role
        for op in (spawn, status, invite, join, pair, Ping())
        if trust.permits(actor, role, op)
    }
    assert (Actor.QUEEN, Role.KEEPER, "worker_spawn") in allowed
    assert (Actor.QUEEN, Role.KEEPER, "invite") not in allowed  # the owner's only
    assert (Actor.QUEEN, Role.OWNER, "invite") in allowed
    assert {op for a, r, op in allowed if (a, r) == (Actor.QUEEN, Role.HIVE)} == set()
    assert {op for a, r, op in allowed if (a, r) == (Actor.QUEEN, Role.INVITE)} == {"join"}
    assert {op for a, r, op in allowed if (a, r) == (Actor.HIVE, Role.INVITE)} == {"pair"}
    assert {op for a, r, op in allowed if (a, r) == (Actor.HIVE, Role.KEEPER)} == set()
    assert (Actor.HIVE, Role.QUEEN, "worker_spawn") in allowed
    assert {r for a, r, _ in allowed if a is Actor.WORKER} == {Role.OWNER}
    # A path of this machine: only its own node may name one, at the queen and at the hive.
    imported = ModelImport(path="/models/x.gguf")
    for actor in (Actor.QUEEN, Actor.HIVE):
        assert {r for r in Role if trust.permits(actor, r, imported)} == {Role.OWNER}


def test_a_refused_key_is_logged_once_and_counted_every_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    trust = Trust(Keypair.generate())
    stranger = Keypair.generate().public
    with caplog.at_level(logging.WARNING, "rbee_mesh.trust"):
        for _ in range(5):
            assert not trust.admits(stranger)
    assert trust.refusals == 5
    assert [r.getMessage() for r in caplog.records] == [
        f"refused a peer whose key is not trusted here: {fingerprint(stranger)}"
    ]
    for _ in range(MAX_REFUSED_KEYS + 10):  # a flood of keys: counted, not remembered
        trust.admits(Keypair.generate().public)
    assert len(trust._refused) == MAX_REFUSED_KEYS


def test_a_pairing_code_stands_for_one_keypair_at_one_hive() -> None:
    hive, other = Keypair.generate().public, Keypair.generate().public
    typed = pairing_keypair("kx7rt-m4pqa", hive)
    assert typed == pairing_keypair("KX7RTM4PQA", hive)  # dashes and case do not matter
    assert typed != pairing_keypair("KX7RT-M4PQB", hive)
    assert typed != pairing_keypair("KX7RT-M4PQA", other)


def test_a_join_token_round_trips_and_a_bad_one_says_why() -> None:
    invite = Keypair.generate()
    queen = Keypair.generate().public
    token = JoinToken(queen, ("tcp://10.0.0.5:7833",), invite, Role.HIVE, time.time() + 60)
    text = token.encode()
    assert text.startswith("rbee-join-") and "\n" not in text and len(text) < 300
    assert JoinToken.decode(f"  {text}\n") == JoinToken(
        queen, token.endpoints, invite, Role.HIVE, float(round(token.expires))
    )
    for bad in ("", "rbee-join-", "rbee-join-!!!", text[:-10], "hello"):
        with pytest.raises(MeshError) as err:
            JoinToken.decode(bad)
        assert err.value.code is ErrorCode.INVALID_REQUEST, bad
    late = JoinToken(queen, token.endpoints, invite, Role.HIVE, time.time() - 1).encode()
    with pytest.raises(MeshError) as err:
        JoinToken.decode(late)
    assert err.value.code is ErrorCode.CONFLICT and "expired" in err.value.message


# ---- CURVE on the transport ----------------------------------------------------------------------


async def test_a_socket_beyond_this_process_is_not_made_without_keys() -> None:
    for endpoint in ("tcp://127.0.0.1:0", "ipc://@rbee-test-no-keys"):
        with pytest.raises(EndpointError) as refused:
            await open_listener(endpoint)
        assert "needs CURVE keys" in str(refused.value)
    with pytest.raises(EndpointError):
        await open_connection("tcp://127.0.0.1:9")
    async with await open_listener("inproc://rbee-test-no-keys-needed"):
        pass  # within one process: none needed


async def test_a_listener_hands_up_each_message_with_its_senders_key() -> None:
    server = Trust(Keypair.generate())
    friend = Keypair.generate()
    server.trust(friend.public, Role.KEEPER, "friend")
    stranger = Keypair.generate()
    options = SocketOptions(curve=server.server_keys())
    with trio.fail_after(10):
        async with (
            await open_listener("tcp://127.0.0.1:0", options=options) as listener,
            # The stranger connects and sends first: its message must never arrive.
            await open_connection(
                listener.endpoint, options=SocketOptions(curve=ClientKeys(stranger, server.public))
            ) as theirs,
            await open_connection(
                listener.endpoint, options=SocketOptions(curve=ClientKeys(friend, server.public))
            ) as ours,
        ):
            await theirs.send([b"from", b"stranger"])
            await ours.send([b"from", b"friend"])
            first = await listener.receive()
            await ours.send([b"again"])
            second = await listener.receive()
    assert first[1:] == ([b"from", b"friend"], friend.public)
    assert second[1:] == ([b"again"], friend.public)


# ---- limits per key and per connection, and a hive cut off ---------------------------------------


async def test_a_key_may_hold_only_so_many_connections_at_once() -> None:
    config = ServerConfig(heartbeat_s=0.2, max_connections_per_key=2)
    hello = Ready(job_id="", sender="k", role=Actor.KEEPER, session="", ts=time.time())
    with trio.fail_after(10):
        async with running_queen("tcp://127.0.0.1:0", config) as queen:
            endpoint = queen.listener.endpoint
            answers = []
            async with AsyncExitStack() as stack:
                for _ in range(3):  # one after the other: each greeted before the next
                    conn = await stack.enter_async_context(await keyed.open_connection(endpoint))
                    await conn.send(encode(hello))
                    answers.append(decode(await conn.receive()))
            assert queen.server.peer_count <= 2
    assert [type(a) for a in answers] == [Ready, Ready, Disconnect]
    assert "holds 2 connections" in answers[2].reason


async def test_a_keeper_may_run_only_so_many_jobs_at_once() -> None:
    config = ServerConfig(heartbeat_s=0.2, max_jobs_per_peer=2)
    with trio.fail_after(10):
        async with (
            running_queen(memory_endpoint("queen"), config) as queen,
            open_keeper(queen.listener.endpoint, FAST_KEEPER) as keeper,
        ):
            running = [await keeper.submit(Ping(count=1_000, interval_s=0.1)) for _ in range(2)]
            third = await keeper.submit(Ping())
            refused = await third.end()
            await running[0].cancel()
            await running[0].end()
            fourth = await keeper.submit(Ping())
            ended = await fourth.end()
    assert isinstance(refused, Error) and refused.code is ErrorCode.BUSY
    assert "the most one may" in refused.message and not refused.started
    assert isinstance(ended, Done)


async def test_an_untrusted_hive_is_cut_off_at_once_with_its_jobs(tmp_path: Path) -> None:
    queen_node, hive_node = Trust(Keypair.generate()), Trust(Keypair.generate())
    hive_node.trust(queen_node.public, Role.QUEEN, "the queen")
    control = f"tcp://127.0.0.1:{free_port()}"
    queen_node.trust(hive_node.public, Role.HIVE, "h", endpoint=control)  # as a join leaves it
    hive = HiveConfig(
        state_dir=tmp_path, hive_id="h", control=control, heartbeats="tcp://127.0.0.1:0",
        server=FAST_QUEEN, trust=hive_node, announce=False,
    )  # fmt: skip
    with trio.fail_after(20):
        async with (
            running_hive(hive) as running,
            running_queen(memory_endpoint("q"), FAST_QUEEN, trust=queen_node) as queen,
            open_keeper(queen.listener.endpoint, FAST_KEEPER) as keeper,
        ):
            [link] = queen.hives.links  # linked at start, from the trust table
            assert link.source == "trusted"
            await link.client.answered.wait()
            job = await keeper.submit(Ping(count=1_000, interval_s=0.05, hive="h"))
            async for message in job:
                if isinstance(message, Narration):
                    break  # running on the hive
            untrust = await keeper.submit(HiveUntrust(hive="h"))
            gone = await untrust.end()
            lost = await job.end()
            listed = await (await keeper.submit(HiveList())).end()
            await running.server.job_count.wait_value(0)  # the hive cancelled it too
    assert isinstance(gone, Done) and gone.result["fingerprint"] == hive_node.keypair.fingerprint
    assert isinstance(lost, Error) and lost.code is ErrorCode.HIVE_LOST, lost
    assert isinstance(listed, Done) and listed.result == []
    assert queen_node.role_of(hive_node.public) is None


def test_nodes_started_at_once_make_one_key(tmp_path: Path) -> None:
    load = "import sys; from pathlib import Path; from rbee_mesh.actors.trust import Trust; "
    load += "print(Trust.load(Path(sys.argv[1])).public)"
    procs = [
        subprocess.Popen([sys.executable, "-c", load, str(tmp_path)], stdout=subprocess.PIPE)
        for _ in range(4)
    ]
    keys = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(keys) == 1 and all(p.returncode == 0 for p in procs)
    assert keys == {Trust.load(tmp_path).public.encode()}
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]  # no temporary left behind


def test_a_revocation_in_another_process_is_seen_at_the_next_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trust_module, "RELOAD_EVERY_S", 0.0)  # no waiting for the next look
    daemon, command = Trust.load(tmp_path), Trust.load(tmp_path)
    queen = Keypair.generate().public
    command.trust(queen, Role.QUEEN, "queen")
    assert daemon.admits(queen)
    command.untrust(command.find("queen", Role.QUEEN))
    assert daemon.role_of(queen) is None and not daemon.admits(queen)


def test_a_mangled_trust_file_or_key_never_breaks_the_handshakes(tmp_path: Path) -> None:
    trust = Trust.load(tmp_path)
    keeper = Keypair.generate().public
    trust.trust(keeper, Role.KEEPER, "laptop")
    for text in ('[{"key": "' + "#" * 40 + '", "role": "keeper", "name": "x"}]', "{not json"):
        (tmp_path / TRUST_FILE).write_text(text)  # by hand, badly
        assert trust.admits(keeper)  # what it held before, and no exception
        assert not trust.admits("#" * 40)
    with pytest.raises(ValueError):
        check_key("#" * 40)  # z85 text past 2**32 per group: not a key, not a crash
    with pytest.raises(MeshError):
        JoinToken.decode("rbee-join-" + "I" * 80)


def test_a_keeper_that_joined_pins_its_queen_and_lets_it_ask_nothing() -> None:
    trust = Trust(Keypair.generate())
    queen = Keypair.generate().public
    trust.trust(queen, Role.JOINED, "their-queen", endpoint="tcp://10.0.0.5:7833")
    assert trust.pinned("tcp://10.0.0.5:7833") == queen
    assert not any(Role.JOINED in admitted(actor) for actor in Actor if actor is not Actor.KEEPER)
    assert not trust.server_keys(Actor.HIVE).admission.admits(queen)
    assert not trust.heartbeat_keys().admission.admits(queen)


# ---- pairing: both sides prove the code --------------------------------------------------------


async def test_pairing_makes_queen_and_hive_trust_each_other_and_an_impostor_is_refused(
    tmp_path: Path,
) -> None:
    queen_node, hive_node = Trust(Keypair.generate()), Trust(Keypair.generate())
    control = f"tcp://127.0.0.1:{free_port()}"
    hive = HiveConfig(
        state_dir=tmp_path, hive_id="h", control=control, heartbeats="tcp://127.0.0.1:0",
        server=FAST_QUEEN, trust=hive_node, announce=False,
    )  # fmt: skip
    impostor_node = Trust(Keypair.generate())
    with trio.fail_after(30):
        async with (
            running_hive(hive),
            running_queen(memory_endpoint("q"), FAST_QUEEN, trust=queen_node) as queen,
            open_keeper(queen.listener.endpoint, FAST_KEEPER) as keeper,
            open_keeper(control, FAST_KEEPER, trust=hive_node) as at_the_hive,  # its owner
            _impostor(impostor_node) as impostor_endpoint,
        ):
            code = (await (await at_the_hive.submit(HivePair())).end()).result["code"]
            # Someone announces the hive's name with a key of its own, which admits anyone
            # and answers `pair` without knowing the code.
            queen.pending["h"] = _announced("h", impostor_endpoint, impostor_node.public)
            fooled = await (await keeper.submit(HiveTrust(hive="h", code=code))).end()
            queen.pending["h"] = _announced("h", control, hive_node.public)  # the real one
            paired = await (await keeper.submit(HiveTrust(hive="h", code=code))).end()
            again = await (await keeper.submit(HiveTrust(hive="h", code=code))).end()
            [link] = queen.hives.links
            await link.client.answered.wait()
    assert isinstance(fooled, Error) and fooled.code is ErrorCode.FORBIDDEN, fooled
    assert "did not prove it knows the code" in fooled.message
    assert queen_node.role_of(impostor_node.public) is None
    assert isinstance(paired, Done), paired
    assert queen_node.role_of(hive_node.public) is Role.HIVE
    assert hive_node.role_of(queen_node.public) is Role.QUEEN
    assert isinstance(again, Error) and again.code is ErrorCode.NOT_FOUND  # not pending now


def _announced(hive_id: str, control: str, key: str) -> HiveAnnouncement:
    port = int(control.rpartition(":")[2])
    return HiveAnnouncement(
        hive_id=hive_id, protocol=PROTOCOL_VERSION, host="127.0.0.1", control_port=port,
        heartbeat_port=port, key=key, version="0",
    )  # fmt: skip


class _Everyone:
    """An impostor's admission: whoever connects is trusted as its owner."""

    def __init__(self, node: Trust) -> None:
        self.node = node

    def admits(self, key: str) -> bool:
        if self.node.role_of(key) is None:
            self.node.trust(key, Role.OWNER, f"anyone-{len(self.node.entries())}")
        return True


@asynccontextmanager
async def _impostor(node: Trust) -> AsyncIterator[str]:
    """A job server that admits any key and answers `pair` with a made-up proof."""

    async def pair(job: ServerJob, op: Pair) -> dict[str, str]:
        return {"hive": "h", "fingerprint": node.keypair.fingerprint, "proof": "0" * 64}

    options = SocketOptions(curve=ServerKeys(node.keypair, _Everyone(node)))
    async with (
        await open_listener("tcp://127.0.0.1:0", options=options) as listener,
        trio.open_nursery() as nursery,
    ):
        server = JobServer(listener, name="h", actor=Actor.HIVE, handlers={Pair: pair}, trust=node)
        await nursery.start(server.run)
        yield listener.endpoint
        nursery.cancel_scope.cancel()


async def test_a_join_that_would_take_over_what_is_trusted_is_refused_and_keeps_its_token(
    tmp_path: Path,
) -> None:
    queen_node = Trust(Keypair.generate())
    hive_there = Keypair.generate().public
    port = free_port()
    queen_node.trust(hive_there, Role.HIVE, "there", endpoint=f"tcp://127.0.0.1:{port}")
    laptop, box = Trust.load(tmp_path / "laptop"), Trust.load(tmp_path / "box")
    with trio.fail_after(30):
        async with running_queen("tcp://127.0.0.1:0", FAST_QUEEN, trust=queen_node) as queen:
            port_of_queen = queen.listener.endpoint.rpartition(":")[2]

            def token(role: Role) -> JoinToken:
                invite = queen_node.invite(role)
                endpoint = f"tcp://127.0.0.1:{port_of_queen}"
                return JoinToken(
                    queen_node.public, (endpoint,), invite.keypair, role, invite.expires
                )

            for_keeper = token(Role.KEEPER)
            with pytest.raises(MeshError) as as_hive:  # a keeper's token naming an endpoint
                await join_queen(for_keeper, laptop, "laptop", control_port=7835)
            joined = await join_queen(for_keeper, laptop, "laptop")  # the token still works
            with pytest.raises(MeshError) as taken:  # another hive is trusted at that endpoint
                await join_queen(token(Role.HIVE), box, "box", control_port=port)
    assert as_hive.value.code is ErrorCode.INVALID_REQUEST
    assert joined["role"] == "keeper" and queen_node.role_of(laptop.public) is Role.KEEPER
    assert laptop.role_of(queen_node.public) is Role.JOINED  # pinned, and may ask nothing
    assert taken.value.code is ErrorCode.CONFLICT and "another hive" in taken.value.message
    assert queen_node.role_of(box.public) is None
    assert queen_node.pinned(f"tcp://127.0.0.1:{port}") == hive_there
