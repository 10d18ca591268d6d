"""Real attackers against a secured mesh: a queen on host q, a hive on h1 that joined it with a
token, and an attacker on host a, each a network namespace of one bridge (tests/netns.py). Each
attack is refused, nothing it asked for runs (the job list, the catalog and the process table
say so), and the mesh still serves its trusted peers.

The traversal tests need no LAN: every name field of every operation, sent as raw frames by a
trusted peer (so that no client-side check stands in the way), is refused by the server before
anything reaches a disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.actors.mesh import integrated_hive_config, running_queen
from rbee_mesh.actors.trust import JoinToken, Trust
from rbee_mesh.inference.gguf_file import write_tiny_gguf
from rbee_mesh.protocol import Actor, Error, ErrorCode, Ping, Ready, Submit, decode, encode
from rbee_mesh.transport.curve import Keypair
from tests import netns
from tests.clitools import json_events
from tests.keyed import open_connection

REPO_ROOT = Path(__file__).resolve().parents[1]
SEEDED_REPO, SEEDED_FILE = "rbee-test/seeded", "tiny.gguf"
SEEDED = f"{SEEDED_REPO}:{SEEDED_FILE}"

#: The attacker: raw pyzmq, as anyone on the LAN can write it. `plaintext` offers no keys;
#: `curve SECRET` a CURVE key the mesh does not know (pinning the servers' real keys). It says
#: READY and submits to the queen (ping) and to the hive (worker_spawn), subscribes to the
#: hive's heartbeats, and reports every byte it got back within WINDOW_S.
ATTACK_SCRIPT = r"""
import json, sys, time, zmq
from rbee_mesh.protocol import Actor, Ping, Ready, Submit, WorkerSpawn, encode
from rbee_mesh.transport.curve import Keypair

mode, secret, queen, queen_key, hive, hive_key, beats, model = sys.argv[1:9]
WINDOW_S = 3.0
ctx = zmq.Context()
me = Keypair.from_secret(secret) if mode == "curve" else None

def sock(kind, endpoint, server_key):
    s = ctx.socket(kind)
    s.linger = 0
    if me is not None:
        s.curve_publickey, s.curve_secretkey = me.public.encode(), me.secret.encode()
        s.curve_serverkey = server_key.encode()
    if kind == zmq.SUB:
        s.subscribe(b"")
    s.connect(endpoint)
    return s

hello = Ready(job_id="", sender="mallory", role=Actor.KEEPER, session="m1", ts=time.time())
to_queen = sock(zmq.DEALER, queen, queen_key)
to_hive = sock(zmq.DEALER, hive, hive_key)
heartbeats = sock(zmq.SUB, beats, hive_key)
for s, op in ((to_queen, Ping(count=1)), (to_hive, WorkerSpawn(model=model, hive="h1"))):
    s.send_multipart(encode(hello))
    s.send_multipart(encode(Submit(job_id="", ref="m1", op=op)))
got = {"queen": 0, "hive": 0, "heartbeats": 0}
poller = zmq.Poller()
names = {to_queen: "queen", to_hive: "hive", heartbeats: "heartbeats"}
for s in names:
    poller.register(s, zmq.POLLIN)
deadline = time.monotonic() + WINDOW_S
while (left := deadline - time.monotonic()) > 0:
    for s, _ in poller.poll(left * 1000):
        got[names[s]] += sum(len(f) for f in s.recv_multipart())
print(json.dumps({"got": got, "fingerprint": me.fingerprint if me else ""}), flush=True)
"""

#: Announces a hive named h1 on the LAN with the attacker's own key, and counts the TCP
#: connections anyone makes to the control port it announces, until stdin closes.
IMPOSTOR_SCRIPT = r"""
import json, socket, sys, threading
from zeroconf import ServiceInfo, Zeroconf
from rbee_mesh.protocol import PROTOCOL_VERSION
from rbee_mesh.transport.curve import Keypair, fingerprint
from rbee_mesh.transport.discovery import SERVICE_TYPE, HiveAnnouncement

address = sys.argv[1]
listener = socket.create_server((address, 0))
port = listener.getsockname()[1]
connections = []
def accept():
    while True:
        try:
            conn, peer = listener.accept()
        except OSError:
            return
        connections.append(peer)
        conn.close()
threading.Thread(target=accept, daemon=True).start()
key = Keypair.generate().public
ann = HiveAnnouncement(hive_id="h1", protocol=PROTOCOL_VERSION, host=address, control_port=port,
                       heartbeat_port=port, key=key, version="0")
zc = Zeroconf(interfaces=[address])
info = ServiceInfo(SERVICE_TYPE, f"h1-twin.{SERVICE_TYPE}", port=port, properties=ann.txt(),
                   parsed_addresses=[address])
zc.register_service(info)
print(json.dumps({"fingerprint": fingerprint(key)}), flush=True)
sys.stdin.read()
zc.unregister_service(info)
zc.close()
listener.close()
print(json.dumps({"connections": len(connections)}), flush=True)
"""


@dataclass
class Secured:
    """The LAN of these tests: the queen on q, hive h1 (joined with a token), attacker a."""

    lan: netns.Lan
    root: Path
    queen_key: str = ""
    hive_key: str = ""
    used_token: str = ""

    def home(self, host: str) -> Path:
        return self.root / host

    def rbee(
        self, host: str, *args: str, home: str = "", timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """`rbee-mesh ARGS` on `host`, as the node of `home` (default: the host's own)."""
        env = {**os.environ, "RBEE_MESH_HOME": str(self.home(home or host))}
        env.pop("RBEE_MESH_QUEEN", None)
        argv = [sys.executable, "-m", "rbee_mesh", *args]
        return self.lan[host].run(argv, env=env, cwd=REPO_ROOT, timeout=timeout)

    def owner(self, *args: str) -> Any:
        """`--json ARGS` as the queen's own node, on q: the DONE event's result."""
        done = self.rbee("q", "--json", *args)
        events = json_events(done.stdout)
        assert done.returncode == 0 and events[-1]["event"] == "done", (done.stdout, done.stderr)
        return events[-1]["result"]

    @property
    def queen(self) -> str:
        return f"tcp://{self.lan['q'].address}:7833"

    def invite(self, role: str = "hive") -> str:
        result = self.owner("queen", "invite", "--for", role, "--address", self.lan["q"].address)
        return str(result["token"])

    def state(self) -> dict[str, Any]:
        """What the attacks must not change: the queen's jobs, the hive's workers, the catalog,
        the processes on h1, the nodes the queen trusts."""
        jobs = {j["id"]: j["op"] for j in self.owner("jobs", "list")}
        workers = sorted(w["id"] for w in self.owner("worker", "list"))
        catalog = sorted(p.name for p in (self.home("h1") / "hive" / "models").iterdir())
        trusted = json.loads((self.home("q") / "trust.json").read_text())
        return {
            "jobs": jobs,
            "workers": workers,
            "catalog": catalog,
            "h1 processes": len(self.lan["h1"].pids()),
            "trusted": sorted(t["key"] for t in trusted),
        }

    def assert_unchanged(self, before: dict[str, Any]) -> None:
        """Nothing changed since `before` but the jobs the owner ran to look (listings)."""
        after = self.state()
        new = {op for job, op in after.pop("jobs").items() if job not in before["jobs"]}
        assert new <= {"job_list", "worker_list", "status", "hive_list"}, new
        assert after == {k: v for k, v in before.items() if k != "jobs"}

    def attack(self, mode: str, secret: str = "x") -> dict[str, Any]:
        h1 = self.lan["h1"].address
        argv = [
            sys.executable, "-c", ATTACK_SCRIPT, mode, secret, self.queen, self.queen_key,
            f"tcp://{h1}:7835", self.hive_key, f"tcp://{h1}:7836", SEEDED,
        ]  # fmt: skip
        done = self.lan["a"].run(argv, cwd=REPO_ROOT, timeout=60)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    def hives_until(self, ok: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
        """`hive list` as the owner sees it, once `ok` holds of it: the queen is another
        process, whose state is polled (within 30 s)."""
        deadline = time.monotonic() + 30
        while not ok(rows := self.owner("hive", "list")):
            assert time.monotonic() < deadline, rows
            time.sleep(0.05)
        return rows

    def assert_serving(self) -> None:
        """The trusted mesh still works: h1 is live, heard within a second, and runs a job."""
        [row] = self.owner("hive", "list")
        assert row["liveness"] == "live" and row["heartbeat_age_s"] < 1.0, row
        assert self.owner("ping", "--hive", "h1", "-n", "2")["count"] == 2


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("secured")
    gguf = write_tiny_gguf(root / "tiny.gguf", context_length=2048)
    Catalog(root / "h1" / "hive" / "models").add_file(SEEDED_REPO, SEEDED_FILE, gguf)
    with netns.lan_or_skip(["q", "h1", "a"]) as lan:
        s = Secured(lan, root)
        try:
            started = s.rbee("q", "queen", "start", "--discovery", "--api", f"0.0.0.0:{API}")
            assert started.returncode == 0, started.stderr
            s.used_token = s.invite()
            joined = s.rbee("h1", "hive", "start", "--id", "h1", "--join", s.used_token)
            assert joined.returncode == 0, joined.stderr
            s.queen_key = Trust.load(s.home("q")).public
            s.hive_key = Trust.load(s.home("h1")).public
            s.hives_until(lambda rows: rows[0]["liveness"] == "live")
            yield s
        finally:
            for host, what in (("q", "queen"), ("h1", "hive")):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    s.rbee(host, what, "stop", timeout=20)


#: The queen's HTTP API, served to the LAN in these tests (so it needs API keys).
API = 7834
#: An HTTP client on the LAN: GET URL with an optional bearer KEY; prints the status, and the
#: body unless told not to read it (a stream of events does not end).
HTTP_SCRIPT = r"""
import sys, urllib.error, urllib.request
url, key, read = sys.argv[1], sys.argv[2], sys.argv[3] == "body"
request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
try:
    with urllib.request.urlopen(request, timeout=20) as answer:
        print(answer.status, answer.read().decode() if read else "")
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode())
"""


def test_the_api_on_the_lan_answers_only_live_api_keys(secured: Secured) -> None:
    base = f"http://{secured.lan['q'].address}:{API}"

    def get(key: str = "", path: str = "/v1/models", read: str = "body") -> tuple[int, Any]:
        argv = [sys.executable, "-c", HTTP_SCRIPT, base + path, key, read]
        done = secured.lan["a"].run(argv, timeout=30)
        assert done.returncode == 0, done.stderr
        status, _, body = done.stdout.partition(" ")
        return int(status), json.loads(body) if path.startswith("/v1") else body

    assert get()[0] == 401
    assert get("rbee-sk-guessed")[0] == 401
    # The metrics and the dashboard's events need a key too; the page itself holds nothing.
    assert get(path="/metrics")[0] == 401 and get(path="/events", read="status")[0] == 401
    assert get(path="/")[0] == 200
    key = secured.owner("apikey", "create", "notebook")["key"]
    assert key not in (secured.home("q") / "trust.json").read_text()  # only its hash is kept
    status, models = get(key)
    assert status == 200 and [m["id"] for m in models["data"]] == [SEEDED], models
    status, metrics = get(key, path="/metrics")
    assert status == 200 and "rbee_mesh_hives{" in metrics, metrics
    assert get(key, path="/events", read="status")[0] == 200
    [listed] = secured.owner("apikey", "list")
    assert listed["name"] == "notebook" and "key" not in listed
    secured.owner("apikey", "revoke", "notebook")
    status, refused = get(key)
    assert status == 401 and refused["error"]["code"] == "invalid_api_key", refused


def test_a_plaintext_peer_gets_nothing_and_changes_nothing(secured: Secured) -> None:
    before = secured.state()
    report = secured.attack("plaintext")
    assert report["got"] == {"queen": 0, "hive": 0, "heartbeats": 0}, report
    secured.assert_unchanged(before)
    secured.assert_serving()


def test_an_unknown_key_is_refused_at_the_handshake_logged_once_and_counted(
    secured: Secured,
) -> None:
    before = secured.state()
    refused_before = secured.owner("status")["queen"]["refused_handshakes"]
    secret = Keypair.generate().secret
    reports = [secured.attack("curve", secret) for _ in range(2)]
    assert all(r["got"] == {"queen": 0, "hive": 0, "heartbeats": 0} for r in reports), reports
    secured.assert_unchanged(before)
    refused = secured.owner("status")["queen"]["refused_handshakes"]
    assert refused >= refused_before + 2
    fp = reports[0]["fingerprint"]
    for log in (secured.home("q") / "queen.log", secured.home("h1") / "hive.log"):
        lines = [line for line in log.read_text().splitlines() if fp in line]
        assert len(lines) == 1 and "not trusted here" in lines[0], (log, lines)
    secured.assert_serving()


def test_a_used_or_expired_join_token_is_refused_and_trusts_nobody(secured: Secured) -> None:
    token = JoinToken.decode(secured.invite())
    before = secured.state()
    reused = secured.rbee("a", "hive", "start", "--join", secured.used_token)
    assert reused.returncode == 3, reused.stderr
    assert "used already is refused" in reused.stderr
    expired = JoinToken(token.queen_key, token.endpoints, token.invite, token.role, time.time() - 1)
    late = secured.rbee("a", "keeper", "join", expired.encode())
    assert late.returncode == 1 and "expired" in late.stderr, late.stderr
    forged = secured.rbee("a", "keeper", "join", secured.used_token[:-6] + "AAAAAA")
    assert forged.returncode in (1, 2, 3), forged.stderr
    secured.assert_unchanged(before)
    assert not (secured.home("a") / "hive.json").exists()  # no hive was started on a
    secured.assert_serving()


def test_a_revoked_keeper_is_cut_off_at_once(secured: Secured) -> None:
    joined = secured.rbee("a", "keeper", "join", secured.invite("keeper"))
    assert joined.returncode == 0, joined.stderr
    assert secured.rbee("a", "status").returncode == 0  # it talks to the queen it joined
    [keeper] = secured.owner("keeper", "list")
    env = {**os.environ, "RBEE_MESH_HOME": str(secured.home("a"))}
    long_ping = secured.lan["a"].popen(
        [sys.executable, "-m", "rbee_mesh", "--json", "ping", "-n", "100000", "-i", "0.01"],
        env=env,
        cwd=REPO_ROOT,
    )
    try:
        assert long_ping.stdout is not None
        while '"narration"' not in long_ping.stdout.readline():  # accepted, then running
            pass
        secured.owner("keeper", "revoke", keeper["name"])
        out, err = long_ping.communicate(timeout=30)  # it ends: its connection was cut
    finally:
        long_ping.kill()
    assert long_ping.returncode != 0, (out, err)
    assert secured.owner("keeper", "list") == []
    after = secured.rbee("a", "status", timeout=60)
    assert after.returncode == 3, after.stderr  # refused at the handshake from now on
    assert "ping" in secured.state()["jobs"].values()
    secured.assert_serving()


def test_each_role_may_ask_only_for_what_is_meant_for_it(secured: Secured) -> None:
    joined = secured.rbee("a", "keeper", "join", secured.invite("keeper"))
    assert joined.returncode == 0, joined.stderr
    before = secured.state()
    # A keeper of another machine: not the owner's operations, and not the hive at all.
    invite = secured.rbee("a", "queen", "invite")
    assert invite.returncode == 6 and "FORBIDDEN" in invite.stderr, invite.stderr
    revoke = secured.rbee("a", "keeper", "revoke", "anyone")
    assert revoke.returncode == 6, revoke.stderr
    direct = secured.rbee("a", "--queen", f"tcp://{secured.lan['h1'].address}:7835", "status")
    assert direct.returncode == 3, direct.stderr  # the hive does not know its key
    # A hive's key at the queen: hives submit nothing, so the queen does not even admit it.
    as_hive = secured.rbee("h1", "--queen", secured.queen, "status")
    assert as_hive.returncode == 3, as_hive.stderr
    secured.assert_unchanged(before)
    secured.assert_serving()


def test_a_hive_announcing_a_trusted_name_with_another_key_is_pending_and_sent_nothing(
    secured: Secured,
) -> None:
    impostor = secured.lan["a"].popen(
        [sys.executable, "-c", IMPOSTOR_SCRIPT, secured.lan["a"].address],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
    )
    try:
        assert impostor.stdout is not None and impostor.stdin is not None
        twin = json.loads(impostor.stdout.readline())["fingerprint"]
        rows = secured.hives_until(lambda rows: any(r["liveness"] == "pending" for r in rows))
        impostor.stdin.close()
        counted = json.loads(impostor.stdout.readline())
    finally:
        impostor.kill()
        impostor.wait()
    by_state = {r["liveness"]: r for r in rows}
    assert by_state["pending"]["hive"] == "h1" and by_state["pending"]["fingerprint"] == twin
    assert by_state["live"]["fingerprint"] != twin  # the real h1, still used
    assert counted["connections"] == 0
    log = (secured.home("q") / "queen.log").read_text()
    assert "not the one trusted for it" in log and twin in log
    secured.assert_serving()


# ---- traversal: every name field, refused before it reaches a disk ------------------------------

TRAVERSALS = ["../../escape", "/etc/passwd", "a/../../b", "x\x00y", "..", "a\\..\\b"]
#: Every field of every operation that names something: (operation, field, other arguments).
NAME_FIELDS = [
    ("model_download", "model", {}),
    ("model_get", "model", {}),
    ("model_delete", "model", {}),
    ("worker_spawn", "model", {}),
    ("infer", "model", {"prompt": "hi"}),
    ("worker_get", "worker", {}),
    ("worker_delete", "worker", {}),
    ("hive_get", "hive", {}),
    ("hive_refresh", "hive", {}),
    ("model_list", "hive", {}),
    ("job_cancel", "job", {}),
    ("hive_trust", "hive", {}),
    ("hive_untrust", "hive", {}),
    ("keeper_revoke", "keeper", {}),
    ("join", "name", {"key": "9?@gr!a]vwRHx(ETfD.?@Ya(RBnS@Eh*OPzrBpRZ"}),
    ("pair", "name", {"key": "9?@gr!a]vwRHx(ETfD.?@Ya(RBnS@Eh*OPzrBpRZ"}),
]


def _raw_submit(op: str, args: dict[str, Any]) -> list[bytes]:
    """A SUBMIT as a peer may send it: the body packed by hand, no client-side check."""
    header, kind, job_id, body = encode(Submit(job_id="", ref="t1", op=Ping()))
    fields = msgpack.unpackb(body)
    fields["op"] = {"name": op, "args": args}
    return [header, kind, job_id, msgpack.packb(fields)]


async def test_every_name_field_refuses_traversal_before_anything_reaches_a_disk(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    hive = integrated_hive_config(state)
    with trio.fail_after(60):
        async with (
            running_queen("tcp://127.0.0.1:0", integrated_hive=hive) as queen,
            await open_connection(queen.listener.endpoint) as peer,
        ):
            hello = Ready(job_id="", sender="t", role=Actor.KEEPER, session="t", ts=time.time())
            await peer.send(encode(hello))
            files = _tree(tmp_path)
            for op, name, others in NAME_FIELDS:
                for bad in TRAVERSALS:
                    await peer.send(_raw_submit(op, {**others, name: bad}))
                    answer = decode(await peer.receive())
                    while not isinstance(answer, Error):  # READY, heartbeats
                        answer = decode(await peer.receive())
                    assert answer.code is ErrorCode.INVALID_REQUEST, (op, name, bad, answer)
                    assert answer.ref == "t1" and not answer.started, answer
            ran = queen.server.job_summaries(include_finished=True)
            after = _tree(tmp_path)
    assert ran == []
    assert after == files  # not a file made, moved or removed


def _tree(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))
