"""A mesh across machines: a queen and two hives, each in a network namespace of its own.

Real processes, real TCP between real network stacks, started as a person would: only the start
commands; the queen finds the hives by mDNS. The LAN comes from tests/netns.py; its `cut` makes a
host's switch port silent, so liveness is tested against silence, not resets.

Times are measured and printed (`pytest -s` shows them).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import netns
from tests.clitools import json_events
from tests.lanmesh import REPO_ROOT, SEEDED, MultiHost, read_line, seed_catalogs

pytestmark = pytest.mark.slow

#: Only on h1's hub, to download.
HUB_REPO = "rbee-test/tiny-llama-GGUF"
HUB_FILE = "tiny-llama.Q4_K_M.gguf"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiHost]:
    root = tmp_path_factory.mktemp("multihost")
    gguf = seed_catalogs(root, ("h1", "h2"))
    with netns.lan_or_skip(["q", "h1", "h2"]) as lan:
        m = MultiHost(lan, root)
        try:
            yield from _start(m, gguf)
        finally:
            for host, what in (("q", "queen"), ("h1", "hive"), ("h2", "hive")):
                # Whatever does not stop in time, the LAN's cleanup kills.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    m.rbee(host, what, "stop", timeout=20)


def _start(m: MultiHost, gguf: Path) -> Iterator[MultiHost]:
    files = m.root / "hub" / HUB_REPO
    files.mkdir(parents=True)
    shutil.copyfile(gguf, files / HUB_FILE)
    hub, m.hub_endpoint = m.start_hub("h1", m.root / "hub")
    assert m.hub_endpoint.startswith("http://127.0.0.1:"), m.hub_endpoint

    # Nothing configured but the start commands and a join token for each hive.
    queen = m.rbee("q", "queen", "start", "--discovery")
    assert queen.returncode == 0, queen.stderr
    tokens = {host: m.invite() for host in ("h1", "h2")}

    # One keeper asking `hive list` every 20 ms, from before the hives start: when each is
    # first listed live, to within a poll.
    poller = m.poll_hives(seconds=60)
    started = time.time()
    hives = {
        "h1": m.start_hive("h1", "--join", tokens["h1"], HF_ENDPOINT=m.hub_endpoint),
        "h2": m.start_hive("h2", "--join", tokens["h2"]),
    }
    returned: dict[str, float] = {}
    deadline = time.time() + 60
    while len(returned) < len(hives) and time.time() < deadline:
        for host, proc in hives.items():
            if host not in returned and proc.poll() is not None:
                returned[host] = time.time()
        time.sleep(0.01)
    for proc in hives.values():
        _, err = proc.communicate(timeout=1)  # TimeoutExpired: it did not return in 60 s
        assert proc.returncode == 0, err
    live: dict[str, float] = {}
    for answered, rows in poller.answers(timeout=30):
        for host in hives:
            if rows.get(host, {}).get("liveness") == "live":
                live.setdefault(host, answered)
        if len(live) == len(hives):
            break
    poller.stop()
    assert live.keys() == hives.keys(), f"hives never listed live: {sorted(hives.keys() - live)}"
    for host in hives:
        m.timings[f"{host}: `hive start` issued to listed live"] = live[host] - started
        m.timings[f"{host}: `hive start` returned to listed live"] = live[host] - returned[host]
    yield m
    assert hub.stdin is not None
    hub.stdin.close()
    hub.wait(timeout=10)


def test_both_remote_hives_are_listed_live(mesh: MultiHost) -> None:
    rows = mesh.result("hive", "list")
    assert sorted((r["hive"], r["source"], r["endpoint"], r["liveness"]) for r in rows) == [
        ("h1", "joined", f"tcp://{mesh.lan['h1'].address}:7835", "live"),
        ("h2", "joined", f"tcp://{mesh.lan['h2'].address}:7835", "live"),
    ]
    for row in rows:
        assert row["heartbeat_age_s"] is not None and row["heartbeat_age_s"] < 1.0, row
    # Negative "returned" times: the queen listed the hive before `hive start` itself returned
    # (the command's own status check comes after the hive has answered the queen).
    for name, seconds in mesh.timings.items():
        print(f"\n{name}: {seconds:+.3f} s", end="")
    # A queen says READY to an unknown hive every second: live within ~1 s of the hive answering
    # (plus slack for a loaded box).
    for host in ("h1", "h2"):
        assert mesh.timings[f"{host}: `hive start` returned to listed live"] < 5


def test_a_remote_hive_downloads_from_a_hub_on_its_own_machine(mesh: MultiHost) -> None:
    download = mesh.keeper("model", "download", HUB_REPO, "--hive", "h1", timeout=120)
    assert download.returncode == 0, download.stderr
    assert "available" in download.stdout

    models = mesh.result("model", "list")
    assert {"hive": "h1", "id": f"{HUB_REPO}:{HUB_FILE}", "status": "available"}.items() <= next(
        r for r in models if r["id"] == f"{HUB_REPO}:{HUB_FILE}"
    ).items(), models
    assert not any(r["id"].startswith(HUB_REPO) and r["hive"] == "h2" for r in models)
    # The hosts share one file system: the bytes landed in h1's catalog, checked and whole.
    entry = next((mesh.home("h1") / "hive" / "models").glob("rbee-test--tiny-llama-GGUF--*"))
    assert (entry / HUB_FILE).read_bytes() == (mesh.root / "tiny.gguf").read_bytes()


def test_a_worker_spawns_and_infers_on_the_chosen_remote_hive(mesh: MultiHost) -> None:
    spawned = mesh.result("worker", "spawn", "-m", SEEDED, "--hive", "h2", timeout=120)
    assert spawned["state"] == "ready", spawned
    # The worker process runs on h2's machine: the kernel says so.
    assert spawned["pid"] in mesh.lan["h2"].pids()
    assert spawned["pid"] not in mesh.lan["h1"].pids()

    proc = mesh.keeper_popen("--json", "infer", "-m", SEEDED, "--hive", "h2", "-n", "400",
                             "-t", "0", "Hello")  # fmt: skip
    arrivals: list[tuple[float, dict[str, Any]]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = read_line(proc, deadline - time.monotonic())
        if not line:
            break
        arrivals.append((time.monotonic(), json.loads(line)))
    proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    kinds = [event["event"] for _, event in arrivals]
    assert kinds[-1] == "done" and kinds.count("token") > 1, kinds
    tokens = [(t, e) for t, e in arrivals if e["event"] == "token"]
    first_token, done = tokens[0][0], arrivals[-1][0]
    assert kinds.index("token") < kinds.index("done")
    result = arrivals[-1][1]["result"]
    assert result["worker"] == spawned["id"], result  # the worker on h2, not a new one
    assert result["usage"]["generated_tokens"] == 400, result
    assert result["text"] == "".join(str(e["text"]) for _, e in tokens)
    print(
        f"\n{result['usage']['generated_tokens']} tokens from h2 in {len(tokens)} token events; "
        f"the first arrived {done - first_token:.3f} s before done",
        end="",
    )


def test_a_cut_hive_goes_suspect_then_lost_ends_its_job_and_comes_back(mesh: MultiHost) -> None:
    lan = mesh.lan
    assert mesh.liveness() == {"h1": "live", "h2": "live"}
    job = mesh.keeper_popen("--json", "ping", "--hive", "h1", "-n", "100000", "-i", "0.01")
    # Running on h1 once its narration streams back.
    for _ in range(100):
        event = json.loads(read_line(job, 30))
        if event["event"] == "narration":
            break
    poller = mesh.poll_hives(seconds=30)
    _, first = next(poller.answers(timeout=30))  # polling has begun
    assert first["h1"]["liveness"] == "live"

    cut = time.time()
    lan.cut(lan["h1"])
    try:
        seen: list[tuple[float, str, float]] = []  # (answered - cut, liveness, heartbeat age)
        for answered, rows in poller.answers(timeout=10):
            assert rows["h2"]["liveness"] == "live", rows  # the other hive is untouched
            h1 = rows["h1"]
            if not seen or seen[-1][1] != h1["liveness"]:
                seen.append((answered - cut, h1["liveness"], h1["heartbeat_age_s"]))
            if h1["liveness"] == "lost":
                break
        poller.stop()

        states = [s for _, s, _ in seen]
        assert states[-1:] == ["lost"], seen
        # Only forward, never back, and never skipping a state: the queen checks each hive twice
        # per its heartbeat interval, and suspect lasts two intervals (0.3 to 0.7 s of silence).
        assert states in (["suspect", "lost"], ["live", "suspect", "lost"]), seen
        lost_after = next(t for t, s, _ in seen if s == "lost")
        # Lost means silent for over 3.5 intervals (0.7 s): within ~0.8 s of the cut, 3 s allowed
        # for a loaded box.
        assert lost_after < 3.0, seen
        for t, state, age in seen:
            print(f"\n{state:8s} {t:.3f} s after the cut (heartbeat age {age} s)", end="")

        out, err = job.communicate(timeout=15)
        assert job.returncode == 1, (out, err)
        last = json_events(out)[-1]
        assert last["event"] == "error" and last["code"] == "HIVE_LOST", last
        assert "hive h1 stopped answering" in str(last["message"])
    finally:  # the next tests use h1 too
        lan.restore(lan["h1"])
        restored = time.monotonic()

    back = mesh.wait_liveness("h1", "live", timeout=30)
    print(f"\nlive again {back - restored:.3f} s after the link was restored", end="")
    # The same queen, not restarted, serves jobs on h1 again.
    pong = mesh.keeper("ping", "--hive", "h1", "-n", "2", timeout=30)
    assert pong.returncode == 0, pong.stderr

    # The cut-off hive gave the job up (its queen silent) before the queen reported it lost.
    def ended(jobs: list[dict[str, Any]]) -> dict[str, Any]:
        [record] = [j for j in jobs if j["id"] == last["job_id"]]
        return {"state": record["state"], "at": record["created"] + record["duration_s"]}

    on_hive = ended(mesh.result("hive", "status", "h1")["jobs"])
    on_queen = ended(mesh.result("jobs", "list"))
    assert (on_hive["state"], on_queen["state"]) == ("cancelled", "failed"), (on_hive, on_queen)
    assert on_hive["at"] < on_queen["at"], (on_hive, on_queen)


# ---- discovery: nothing configured but the start commands -------------------------------------


@pytest.fixture
def lan() -> Iterator[netns.Lan]:
    with netns.lan_or_skip(["q", "h1", "h2"]) as made:
        yield made


def test_hives_found_on_the_lan_are_pending_until_paired_then_dropped_on_goodbye(
    lan: netns.Lan, tmp_path: Path
) -> None:
    m = MultiHost(lan, tmp_path)
    queen = lan["q"].run(
        [sys.executable, "-m", "rbee_mesh", "queen", "start", "--discovery"],
        env=m.env("q"),
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert queen.returncode == 0, queen.stderr
    poller = m.poll_hives(seconds=90)
    started = time.time()
    for host in ("h1", "h2"):
        proc = m.start_hive(host)  # no token: found by mDNS, trusted by nobody yet
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    ids = {host: json_events(m.rbee(host, "--json", "id").stdout)[-1] for host in ("h1", "h2")}
    pending: dict[str, float] = {}
    for answered, rows in poller.answers(timeout=30):
        for host in ("h1", "h2"):
            row = rows.get(host)
            if row and row["liveness"] == "pending":
                # Listed with the key it announced: the one `rbee-mesh id` shows on its machine.
                assert row["fingerprint"] == ids[host]["fingerprint"], row
                assert row["endpoint"] == f"tcp://{lan[host].address}:7835", row
                pending.setdefault(host, answered - started)
        if len(pending) == 2:
            break
    print(f"\nlisted pending after {pending} s from the first hive start", end="")
    doctor = m.rbee("q", "--json", "doctor", "--discovery")
    checks = {c["check"]: c for c in json_events(doctor.stdout)}
    assert doctor.returncode == 1 and not checks["hive h1"]["ok"], checks
    assert "hive trust h1" in checks["hive h1"]["advice"], checks

    # A wrong code: refused at the hive's handshake; nothing is trusted on either side.
    wrong = m.rbee("q", "hive", "trust", "h1", "--code", "AAAAA-AAAAA")
    assert wrong.returncode == 6, (wrong.stdout, wrong.stderr)
    assert "did not take the pairing code" in wrong.stderr
    for host in ("h1", "h2"):
        code = m.rbee(host, "hive", "pair")
        assert code.returncode == 0, code.stderr
        trusted = m.rbee("q", "hive", "trust", host, "--code", code.stdout.strip())
        assert trusted.returncode == 0, trusted.stderr
        assert ids[host]["fingerprint"] in trusted.stderr  # shown before it is trusted
    found: dict[str, float] = {}
    for answered, rows in poller.answers(timeout=30):
        for host in ("h1", "h2"):
            row = rows.get(host)
            if row and row["liveness"] == "live":
                assert row["source"] == "mdns", row
                found.setdefault(host, answered - started)
        if len(found) == 2:
            break

    doctor = m.rbee("q", "--json", "doctor", "--discovery")
    checks = {c["check"]: c for c in json_events(doctor.stdout)}
    assert doctor.returncode == 0, doctor.stdout
    assert checks["mdns"]["ok"] and "h1, h2" in checks["mdns"]["message"], checks
    assert checks["hive h1"]["ok"] and checks["hive h2"]["ok"], checks

    stopping = time.time()
    assert m.rbee("h2", "hive", "stop").returncode == 0  # a goodbye on the LAN
    gone = 0.0
    for answered, rows in poller.answers(timeout=30):
        if "h2" not in rows:
            gone = answered
            break
    poller.stop()
    print(f"\ndropped {gone - stopping:.3f} s after `hive stop`", end="")
    assert "h1" in rows and rows["h1"]["liveness"] == "live"
    m.rbee("q", "queen", "stop")
    m.rbee("h1", "hive", "stop")


def test_a_job_sent_to_a_cut_hive_never_runs_there_and_an_unpinned_one_runs_elsewhere(
    mesh: MultiHost,
) -> None:
    """A hive whose link is cut: a job pinned to it ends with the truth (it did not run, or
    the hive was lost) and never runs there afterwards, not even when the link comes back;
    a job free to go anywhere runs on the other hive; the worker serves the next job."""
    lan = mesh.lan
    assert mesh.liveness() == {"h1": "live", "h2": "live"}
    workers = {row["hive"]: row for row in mesh.result("worker", "list")}
    for host in ("h1", "h2"):
        if host not in workers:
            workers[host] = {"hive": host, **mesh.result("worker", "spawn", "-m", SEEDED,
                                                         "--hive", host, timeout=120)}  # fmt: skip
    w1 = workers["h1"]["id"]
    # The queen lists a worker spawned through it at once, before the hive's next heartbeat.
    assert w1 in {w["id"] for w in mesh.result("hive", "get", "h1")["workers"]}

    lan.cut(lan["h1"])
    try:
        pinned = mesh.keeper("--json", "infer", "-m", SEEDED, "--hive", "h1", "--worker", w1,
                             "-n", "4", "-t", "0", "Hello", timeout=60)  # fmt: skip
        free = mesh.keeper("--json", "infer", "-m", SEEDED, "-n", "4", "-t", "0", "Hello",
                           timeout=60)  # fmt: skip
    finally:
        lan.restore(lan["h1"])
    pinned_events = json_events(pinned.stdout)
    assert pinned.returncode != 0, pinned.stdout
    assert pinned_events[-1]["event"] == "error", pinned_events[-1]
    assert pinned_events[-1]["code"] in ("UNAVAILABLE", "HIVE_LOST"), pinned_events[-1]
    assert "h1" in str(pinned_events[-1]["message"])
    free_events = json_events(free.stdout)
    assert free.returncode == 0, free.stdout
    assert free_events[-1]["result"]["worker"] == workers["h2"]["id"]

    mesh.wait_liveness("h1", "live", timeout=30)
    # h1's own record of what it ran: neither job, whatever reached it late.
    seen_by_h1 = mesh.result("hive", "status", "h1")
    job_ids = {e["job_id"] for e in (*pinned_events, *free_events) if e["job_id"]}
    assert job_ids and not job_ids & {j["id"] for j in seen_by_h1["jobs"]}, seen_by_h1["jobs"]
    [worker] = [w for w in seen_by_h1["workers"] if w["id"] == w1]
    assert (worker["state"], worker["busy"]) == ("ready", 0)
    again = mesh.result("infer", "-m", SEEDED, "--hive", "h1", "--worker", w1, "-n", "4",
                        "-t", "0", "Hello", timeout=60)  # fmt: skip
    assert again["worker"] == w1
