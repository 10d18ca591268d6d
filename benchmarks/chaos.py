"""The chaos soak: jobs of every kind on a mesh of three hosts while a nemesis breaks it.

A queen on host q and hives h1 and h2 (network namespaces, tests/netns.py, started as a person
would, tests/lanmesh.py), a fake hub on q (tests/hub.py, over real HTTP, at a limited rate so
that a download takes a while). One keeper on q (benchmarks/chaos_load.py) runs infer, control
and download jobs at once, `jobs` of each at least. Meanwhile a seeded nemesis, every
`fault_every_s`, does one of:

- kill: SIGKILL a worker process (one the kernel shows in a hive's namespace);
- freeze: SIGSTOP a hive, SIGCONT it after a hold;
- cut: make a hive's switch port drop everything, restore it after a hold.

Each fault is logged with its times. Then the soak checks what the issue asks:

- every job ended with exactly one terminal frame, and it tells the truth: DONE (an infer whose
  streamed text is its result's, a download whose file is available), BUSY, or an error named
  for a fault active around it (WORKER_LOST near a kill or a freeze of the hive, HIVE_LOST,
  UNAVAILABLE or TIMEOUT near a freeze or a cut of the hive it names); anything else is
  listed as surprising;
- no orphan: every worker process in a hive's namespace is one its hive lists, and every worker
  pid seen during the run is listed or gone; once the hives and the queen are stopped, no
  process of the mesh is left;
- no partial file published: every catalog entry of a hub file that is available has the hub's
  bytes (size and sha256), and every download that said DONE is available;
- the mesh serves an infer, a status and a download right after;

and measures, per fault, the time to detect it: from the fault to the first job it ended, and to
the first `worker list` / `hive list` answer that shows it.

`rbee-mesh bench --chaos [--jobs N] [--seconds S] [--seed N]` runs it (tests/test_chaos.py runs
a shorter one), prints a table and writes benchmarks/results/chaos.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.chaos_load import LoadSpec
from rbee_mesh.actors.hive.catalog import Catalog, ModelStatus
from tests import netns
from tests.clitools import json_events
from tests.lanmesh import QUEEN, REPO_ROOT, SEEDED, MultiHost, seed_catalogs

RESULTS = REPO_ROOT / "benchmarks" / "results"
HIVES = ("h1", "h2")
FAULT_KINDS = ("kill", "freeze", "cut")
HUB_OWNER = "chaos"
#: Codes a fault of each kind may end a job with (BUSY is a refusal any time).
FAULT_CODES = {
    "kill": {"WORKER_LOST"},
    "freeze": {"WORKER_LOST", "HIVE_LOST", "UNAVAILABLE", "TIMEOUT"},
    "cut": {"HIVE_LOST", "UNAVAILABLE", "TIMEOUT"},
}
#: After a fault is over, how long jobs may still end because of it: the hive must be seen
#: live again (heartbeats), and a job waits for a worker to be spawned in place of a dead one.
AFTERMATH_S = 10.0
#: The states of a worker that serves, or will.
SERVING = {"starting", "ready", "busy"}
_HIVE_NAMED = re.compile(r"\bhive (h\d+)\b")
_WORKER_NAMED = re.compile(r"\b(w-[0-9a-f]+)\b")


class ChaosError(RuntimeError):
    """The soak could not be set up or run (not a finding about the mesh)."""


@dataclass(frozen=True)
class ChaosPlan:
    """How much load and how many faults."""

    jobs: int = 300
    seed: int = 0
    #: A fault every this many seconds.
    fault_every_s: float = 3.0
    #: A freeze or a cut lasts between these many seconds.
    hold_s: tuple[float, float] = (1.0, 2.5)
    #: The size of each file downloaded, and the hub's rate.
    file_bytes: int = 64 * 1024
    hub_rate_bps: int = 256 * 1024
    #: The load is stopped after this long, whatever it did.
    max_seconds: float = 600.0
    infer_streams: int = 4
    download_streams: int = 3
    #: Freezes and cuts in threads of their own, overlapping other faults.
    overlap: bool = False


@dataclass
class Fault:
    kind: str
    hive: str
    start: float
    end: float
    worker: str | None = None
    pid: int | None = None
    #: The workers of the hive when the fault began (a frozen hive's workers exit).
    workers: list[str] = field(default_factory=list)


# ---- what the kernel says ----------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: it is dead, only not reaped yet)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def worker_processes(host: netns.Host) -> dict[int, str]:
    """{pid: worker id} of the worker processes in a host's namespace."""
    found = {}
    for pid in host.pids():
        argv = _cmdline(pid)
        if "rbee_mesh.actors.worker" in argv and "--worker-id" in argv:
            found[pid] = argv[argv.index("--worker-id") + 1]
    return found


# ---- the nemesis -------------------------------------------------------------------------------


class Nemesis:
    """Faults chosen by a seeded generator: one at a time, or (`overlap`) each freeze and cut in
    a thread of its own, so that faults overlap (both hives down, a kill during a freeze).
    `heal` undoes whatever is still on."""

    def __init__(self, mesh: MultiHost, plan: ChaosPlan, log: Callable[[str], None]) -> None:
        self.mesh = mesh
        self.plan = plan
        self.rng = random.Random(plan.seed)
        self.log = log
        self.faults: list[Fault] = []
        #: Every worker process seen: pid -> (hive, worker id).
        self.seen: dict[int, tuple[str, str]] = {}
        #: Faults on now, per (kind, hive): undone when the last of them ends.
        self._on: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._holds: list[threading.Thread] = []
        self._kinds: list[str] = []

    def hive_pid(self, hive: str) -> int:
        info = json.loads((self.mesh.home(hive) / "hive.json").read_text())
        return int(info["pid"])

    def look(self) -> dict[int, tuple[str, str]]:
        """The worker processes now, on every hive (remembered in `seen`)."""
        now = {}
        for hive in HIVES:
            for pid, worker in worker_processes(self.mesh.lan[hive]).items():
                now[pid] = (hive, worker)
        with self._lock:
            self.seen.update(now)
        return now

    def next_kind(self) -> str:
        if not self._kinds:  # every kind once per round, in a new order each round
            self._kinds = self.rng.sample(FAULT_KINDS, len(FAULT_KINDS))
        return self._kinds.pop()

    def strike(self, hold: Callable[[float], object]) -> None:
        """One fault; `hold(seconds)` waits while a freeze or cut lasts (returning early is
        fine): here, or in a thread of its own when faults overlap."""
        kind = self.next_kind()
        if kind == "kill":
            running = sorted(self.look().items())
            if not running:
                self.log("nemesis: no worker to kill now")
                return
            pid, (hive, worker) = self.rng.choice(running)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            at = time.time()
            self._record(Fault("kill", hive, at, at, worker=worker, pid=pid))
            return
        hive = self.rng.choice(HIVES)
        seconds = self.rng.uniform(*self.plan.hold_s)
        if not self.plan.overlap:
            self._hold(kind, hive, seconds, hold)
            return
        thread = threading.Thread(
            target=self._hold, args=(kind, hive, seconds, hold), name=f"nemesis-{kind}"
        )
        self._holds.append(thread)
        thread.start()

    def _hold(self, kind: str, hive: str, seconds: float, hold: Callable[[float], object]) -> None:
        workers = sorted(w for h, w in self.look().values() if h == hive)
        start = time.time()
        self._begin(kind, hive)
        try:
            hold(seconds)
        finally:
            self._end(kind, hive)
        self._record(Fault(kind, hive, start, time.time(), workers=workers))

    def _record(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)
        what = f" {fault.worker} (pid {fault.pid})" if fault.worker else ""
        self.log(f"nemesis: {fault.kind} {fault.hive}{what} for {fault.end - fault.start:.2f} s")

    def _begin(self, kind: str, hive: str) -> None:
        with self._lock:
            self._on[kind, hive] += 1
            if self._on[kind, hive] > 1:
                return
            if kind == "freeze":
                os.kill(self.hive_pid(hive), signal.SIGSTOP)
            else:
                self.mesh.lan.cut(self.mesh.lan[hive])

    def _end(self, kind: str, hive: str) -> None:
        with self._lock:
            self._on[kind, hive] -= 1
            if self._on[kind, hive] > 0:
                return
            if kind == "freeze":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.hive_pid(hive), signal.SIGCONT)
            else:
                self.mesh.lan.restore(self.mesh.lan[hive])

    def heal(self) -> None:
        """Wait for the faults in threads (their holds end with the load), then undo whatever
        is still on (the run was interrupted mid-fault)."""
        for thread in self._holds:
            thread.join(timeout=self.plan.hold_s[1] + 10)
        with self._lock:
            still = [key for key, n in self._on.items() if n > 0]
            for key in still:
                self._on[key] = 1  # so that one _end undoes it
        for kind, hive in still:
            self._end(kind, hive)


# ---- the mesh ----------------------------------------------------------------------------------


@dataclass
class HubFiles:
    """The files the hub serves: {model id: (size, sha256)}, and which are for the load."""

    expected: dict[str, tuple[int, str]] = field(default_factory=dict)
    for_load: list[str] = field(default_factory=list)
    for_after: list[str] = field(default_factory=list)


def make_hub_files(root: Path, plan: ChaosPlan) -> HubFiles:
    rng = random.Random(plan.seed)
    files = HubFiles()
    # Twice the jobs: downloads go on while the other kinds catch up.
    for n in range(2 * plan.jobs + len(HIVES)):
        repo, name = f"f{n:04d}", f"f{n:04d}.gguf"
        data = rng.randbytes(plan.file_bytes)
        (root / HUB_OWNER / repo).mkdir(parents=True)
        (root / HUB_OWNER / repo / name).write_bytes(data)
        model = f"{HUB_OWNER}/{repo}:{name}"
        files.expected[model] = (len(data), hashlib.sha256(data).hexdigest())
        (files.for_load if n < 2 * plan.jobs else files.for_after).append(model)
    return files


@contextlib.contextmanager
def running_mesh(
    root: Path, plan: ChaosPlan, log: Callable[[str], None]
) -> Iterator[tuple[MultiHost, HubFiles]]:
    """A queen on q with a hub, hives h1 and h2 joined to it, each with two workers."""
    seed_catalogs(root, HIVES)
    hub_files = make_hub_files(root / "hub", plan)
    with contextlib.ExitStack() as stack:
        try:
            lan = stack.enter_context(netns.open_lan(["q", *HIVES]))
        except netns.LanUnavailable as exc:
            raise ChaosError(str(exc)) from None
        mesh = MultiHost(lan, root)
        _, endpoint = mesh.start_hub(
            "q", root / "hub", bind=lan["q"].address, rate_bps=plan.hub_rate_bps
        )
        started = mesh.rbee("q", "queen", "start", "--no-discovery")
        if started.returncode != 0:
            raise ChaosError(f"queen start failed: {started.stderr}")
        for hive in HIVES:
            proc = mesh.start_hive(hive, "--join", mesh.invite(), HF_ENDPOINT=endpoint)
            _, err = proc.communicate(timeout=90)
            if proc.returncode != 0:
                raise ChaosError(f"hive start on {hive} failed: {err}")
        for hive in HIVES:
            mesh.wait_liveness(hive, "live", timeout=60)
            for _ in range(2):
                mesh.result("worker", "spawn", "-m", SEEDED, "--hive", hive, timeout=120)
        log("mesh: queen on q, hives h1 and h2 live, two workers each")
        yield mesh, hub_files
        # Closing the LAN kills every process in it, the hub too.


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class Run:
    """What a soak saw: every job's record, every fault, and the checks after."""

    plan: ChaosPlan
    jobs: list[dict[str, Any]]
    faults: list[Fault]
    seconds: float
    orphans: list[str]
    partial: list[str]
    catalogs: dict[str, dict[str, int]]
    after: dict[str, Any]
    log_problems: list[str]
    #: Whether the load ran to its end (not stopped at `max_seconds`).
    finished: bool


def drive(
    mesh: MultiHost, files: HubFiles, plan: ChaosPlan, log: Callable[[str], None]
) -> tuple[list[dict[str, Any]], Nemesis, float, bool]:
    """Run the load on q while the nemesis strikes; returns the job records, the nemesis, the
    seconds the load ran and whether it finished (not stopped at `max_seconds`)."""
    downloads = [(HIVES[n % len(HIVES)], model) for n, model in enumerate(files.for_load)]
    spec = LoadSpec(
        queen=QUEEN,
        jobs=plan.jobs,
        model=SEEDED,
        downloads=downloads,
        infer_streams=plan.infer_streams,
        download_streams=plan.download_streams,
    )
    # Its log to a file: a pipe nobody reads while the load runs could fill up and stall it.
    log_path = mesh.root / "load.log"
    with log_path.open("w") as stderr:
        load = mesh.lan["q"].popen(
            [sys.executable, "-m", "benchmarks.chaos_load", spec.to_json()],
            env=mesh.env("q"),
            cwd=REPO_ROOT,
            stderr=stderr,
        )
    records: list[dict[str, Any]] = []
    ended = threading.Event()

    def read() -> None:
        assert load.stdout is not None
        for line in load.stdout:
            event = json.loads(line)
            if event["type"] == "job":
                records.append(event)
                done = len(records)
                if done % 200 == 0:
                    log(f"load: {done} jobs ended")
        ended.set()

    reader = threading.Thread(target=read, name="chaos-load-reader", daemon=True)
    reader.start()
    nemesis = Nemesis(mesh, plan, log)
    started = time.time()
    deadline = started + plan.max_seconds
    try:
        # The schedule of faults: ended.wait returns early when the load is over.
        while not ended.wait(min(plan.fault_every_s, max(0.0, deadline - time.time()))):
            if time.time() >= deadline:
                break
            nemesis.strike(ended.wait)
    finally:
        nemesis.heal()
    finished = ended.is_set()
    if not finished:
        log(f"load: stopped after {plan.max_seconds:g} s")
        load.kill()
    load.wait(timeout=30)
    reader.join(timeout=10)
    seconds = time.time() - started
    if finished and load.returncode != 0:
        err = log_path.read_text(errors="replace")[-2000:]
        raise ChaosError(f"the load failed (exit {load.returncode}): {err}")
    return records, nemesis, seconds, finished


def soak(plan: ChaosPlan, workdir: Path, log: Callable[[str], None] = lambda _: None) -> Run:
    """Set up, run, check; every step bounded."""
    with running_mesh(workdir, plan, log) as (mesh, files):
        records, nemesis, seconds, finished = drive(mesh, files, plan, log)
        log(f"load: {len(records)} jobs in {seconds:.1f} s, {len(nemesis.faults)} faults")
        for hive in HIVES:
            mesh.wait_liveness(hive, "live", timeout=60)
        for record in records:  # the worker pids the registry showed count as seen too
            for hive, worker, pid, _ in record["claims"].get("workers", []):
                if pid:
                    nemesis.seen.setdefault(int(pid), (hive, worker))
        orphans = check_orphans(mesh, nemesis)
        partial, catalogs = check_catalogs(mesh, files, records)
        after = check_after(mesh, files)
        orphans += check_stopped(mesh)
        problems = log_problems(mesh)
    return Run(
        plan,
        records,
        sorted(nemesis.faults, key=lambda f: f.start),
        seconds,
        orphans,
        partial,
        catalogs,
        after,
        problems,
        finished,
    )


# ---- the checks after --------------------------------------------------------------------------


def check_orphans(mesh: MultiHost, nemesis: Nemesis, timeout: float = 60) -> list[str]:
    """Every worker process in a hive's namespace is listed by its hive, and every worker pid
    seen is listed or gone; asked again (a worker may be starting) until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        problems = []
        for hive in HIVES:
            listed = {
                int(w["pid"]): w["id"]
                for w in mesh.result("worker", "list", "--hive", hive, timeout=30)
                if w["state"] in SERVING
            }
            for pid, worker in worker_processes(mesh.lan[hive]).items():
                if listed.get(pid) != worker:
                    problems.append(f"{hive}: worker {worker} (pid {pid}) runs, not listed")
            for pid, (seen_on, worker) in nemesis.seen.items():
                if seen_on == hive and alive(pid) and pid not in listed:
                    problems.append(f"{hive}: worker {worker} (pid {pid}) alive, not listed")
        if not problems or time.monotonic() > deadline:
            return sorted(set(problems))
        time.sleep(0.2)  # polling another process's state under a deadline


def check_stopped(mesh: MultiHost, timeout: float = 60) -> list[str]:
    """Stop the hives and the queen as a person would: then no process of the mesh is left on
    any host (a worker that outlived its hive would be an orphan)."""
    for host, what in (*((h, "hive") for h in HIVES), ("q", "queen")):
        stopped = mesh.rbee(host, what, "stop", timeout=60)
        if stopped.returncode != 0:
            return [f"{host}: `{what} stop` failed: {stopped.stderr.strip()[-300:]}"]
    deadline = time.monotonic() + timeout
    while True:
        left = [
            f"{host.name}: pid {pid} outlived the mesh: {' '.join(_cmdline(pid))[:200]}"
            for host in mesh.lan
            for pid in host.pids()
            if "rbee_mesh" in _cmdline(pid) and alive(pid)
        ]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)  # polling other processes' exits under a deadline


def check_catalogs(
    mesh: MultiHost, files: HubFiles, records: Sequence[dict[str, Any]]
) -> tuple[list[str], dict[str, dict[str, int]]]:
    """No partial file published: what is available is whole; what said DONE is available;
    nothing is left downloading once the load is over. Also {hive: {status: entries}}, and the
    files of the hub's models on disk (whole, partial, or stray: in no entry)."""
    problems = []
    available: dict[str, set[str]] = {}
    counts: dict[str, dict[str, int]] = {}
    for hive in HIVES:
        catalog = Catalog(mesh.home(hive) / "hive" / "models")
        entries, broken = catalog.entries()
        problems += [f"{hive}: broken catalog entry: {b}" for b in broken]
        tally: Counter[str] = Counter(str(e.status) for e in entries if e.id in files.expected)
        available[hive] = set()
        listed = set()
        for entry in entries:
            if entry.id not in files.expected:
                continue
            listed.add(Path(entry.path).parent)
            if entry.status is ModelStatus.DOWNLOADING:
                problems.append(f"{hive}: {entry.id} is still downloading after the load")
            if entry.status is not ModelStatus.AVAILABLE:
                continue
            available[hive].add(entry.id)
            size, sha = files.expected[entry.id]
            path = Path(entry.path)
            if not path.is_file():
                problems.append(f"{hive}: {entry.id} is available but has no file")
            elif path.stat().st_size != size:
                problems.append(f"{hive}: {entry.id} is available at {path.stat().st_size} bytes")
            elif hashlib.sha256(path.read_bytes()).hexdigest() != sha:
                problems.append(f"{hive}: {entry.id} is available with other bytes")
        on_disk = [d for d in catalog.root.glob(f"{HUB_OWNER}--*") if d.is_dir()]
        tally["partial files"] = sum(1 for d in on_disk for _ in d.glob("*.partial"))
        tally["directories in no entry"] = sum(1 for d in on_disk if d not in listed)
        counts[hive] = dict(tally)
    for record in records:
        if record["kind"] != "download":
            continue
        hive, model = record["hive"], record["model"]
        if record["end"] == "done" and model not in available[hive]:
            problems.append(f"{hive}: {model} said DONE, is not available")
        # Said lost after it started: it may have run on, and finished (a frozen hive wakes
        # and goes on until it hears of the queen's new connection). Counted, not a lie.
        if record["end"] == "error" and record["started"] and model in available[hive]:
            counts[hive]["available after its job ended in error"] = (
                counts[hive].get("available after its job ended in error", 0) + 1
            )
        # A job that ended saying it did not start must not have run.
        if record["end"] == "error" and record["started"] is False and model in available[hive]:
            problems.append(
                f"{hive}: {model} is available, but its download ended {record['code']} "
                f"saying it did not start: {record['message']}"
            )
    return problems, counts


def check_after(mesh: MultiHost, files: HubFiles) -> dict[str, Any]:
    """The mesh serves an infer, a status and a download right after: {op: seconds or error}."""
    checks = {
        "infer": ("infer", "-m", SEEDED, "-n", "4", "-t", "0", "Hello"),
        "status": ("status",),
        "download": ("model", "download", files.for_after[0], "--hive", HIVES[0]),
    }
    outcome: dict[str, Any] = {}
    for name, args in checks.items():
        began = time.monotonic()
        done = mesh.keeper("--json", *args, timeout=120)
        events = json_events(done.stdout)
        if done.returncode == 0 and events and events[-1]["event"] == "done":
            outcome[name] = round(time.monotonic() - began, 3)
        else:
            outcome[name] = f"failed: {events[-1] if events else done.stderr[-500:]}"
    return outcome


#: What a daemon logs for its own bug: an exception in a job (logged with its traceback), a
#: frame it cannot send, a second terminal frame (LocalProtocolError).
_BUG_LINES = ("Traceback", "LocalProtocolError", "(a bug)", "INTERNAL")


def log_problems(mesh: MultiHost) -> list[str]:
    """The lines of the daemons' logs that report a bug of their own."""
    found = []
    for host, name in (("q", "queen"), *((h, "hive") for h in HIVES)):
        path = mesh.home(host) / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        for line in text.splitlines():
            if any(mark in line for mark in _BUG_LINES):
                found.append(f"{host}: {line.strip()[:300]}")
    return found


# ---- judging each job, and the times to detect --------------------------------------------------


def verdict(job: dict[str, Any], faults: Sequence[Fault]) -> str | None:
    """None if the job ended once and told the truth; else why it is surprising."""
    if job["terminals"] != 1 or job["end"] in ("hung", "unanswered"):
        return f"{job['end']} with {job['terminals']} terminal frames"
    if job["end"] == "done":
        claims = job["claims"]
        if job["kind"] == "infer" and not (claims.get("tokens") and claims.get("same_text")):
            return f"DONE, but its result is not what streamed: {claims}"
        if job["kind"] == "download" and claims.get("status") != "available":
            return f"DONE, but the model is {claims.get('status')}"
        return None
    if job["end"] != "error":
        return f"{job['end']}: {job['message']}"
    code = job["code"]
    if code == "BUSY":
        return None
    named_hive = _HIVE_NAMED.search(job["message"])
    named_worker = _WORKER_NAMED.search(job["message"])
    for fault in causes(job, faults):
        if code not in FAULT_CODES[fault.kind]:
            continue
        if named_hive and named_hive[1] != fault.hive:
            continue
        if named_worker and named_worker[1] not in (fault.worker, *fault.workers):
            continue
        return None
    return f"{code} with no fault to explain it"


def causes(job: dict[str, Any], faults: Sequence[Fault]) -> list[Fault]:
    """The faults that were on (or just over) while the job ran."""
    return [
        f for f in faults if f.start <= job["ended"] and f.end + AFTERMATH_S >= job["submitted"]
    ]


def detection(jobs: Sequence[dict[str, Any]], faults: Sequence[Fault]) -> list[dict[str, Any]]:
    """Per fault: seconds from its start to the first job it ended, and to the registry showing
    it (worker list without the worker; hive list with the hive lost), and for freezes and cuts
    from their end to the hive listed live again."""
    rows = []
    for fault in faults:
        after = [j for j in jobs if j["ended"] is not None and j["ended"] >= fault.start]
        if fault.kind == "kill":
            ended = [
                j["ended"] for j in after
                if j["code"] == "WORKER_LOST" and fault.worker in j["message"]
            ]  # fmt: skip
            shown = [
                j["ended"] for j in after
                if j["op"] == "worker_list" and j["end"] == "done" and j["submitted"] >= fault.start
                and not any(w[1] == fault.worker and w[3] in SERVING
                            for w in j["claims"]["workers"])
            ]  # fmt: skip
            back: list[float] = []
        else:
            ended = [
                j["ended"] for j in after
                if j["code"] in FAULT_CODES[fault.kind] - {"WORKER_LOST"}
                and fault.hive in (m[1] for m in _HIVE_NAMED.finditer(j["message"]))
            ]  # fmt: skip
            listings = [
                j for j in after if j["op"] == "hive_list" and j["end"] == "done"
                and j["submitted"] >= fault.start
            ]  # fmt: skip
            shown = [
                j["ended"] for j in listings
                if j["claims"]["hives"].get(fault.hive) == "lost" and j["ended"] <= fault.end + 5
            ]  # fmt: skip
            back = [
                j["ended"] - fault.end for j in listings
                if j["submitted"] >= fault.end and j["claims"]["hives"].get(fault.hive) == "live"
            ]  # fmt: skip
        rows.append(
            {
                **asdict(fault),
                "held_s": round(fault.end - fault.start, 3),
                "job_ended_after_s": _first(ended, fault.start),
                "registry_after_s": _first(shown, fault.start),
                "live_again_after_s": round(min(back), 3) if back else None,
            }
        )
    return rows


def _first(times: Sequence[float], since: float) -> float | None:
    return round(min(times) - since, 3) if times else None


def summarise(run: Run) -> dict[str, Any]:
    """The numbers of a run: jobs, outcomes, faults, detection times, surprises, checks."""
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    surprising = []
    for job in run.jobs:
        outcomes[job["kind"]][job["code"] or job["end"].upper()] += 1
        why = verdict(job, run.faults)
        if why is not None:
            surprising.append({"why": why, **{k: job[k] for k in ("kind", "op", "job_id",
                               "hive", "submitted", "ended", "code", "message")}})  # fmt: skip
    detected = detection(run.jobs, run.faults)
    times: dict[str, dict[str, Any]] = {}
    for kind in FAULT_KINDS:
        rows = [r for r in detected if r["kind"] == kind]
        times[kind] = {"faults": len(rows)}
        for measure in ("job_ended_after_s", "registry_after_s", "live_again_after_s"):
            values = sorted(r[measure] for r in rows if r[measure] is not None)
            times[kind][measure] = _stats(values)
    return {
        "plan": asdict(run.plan),
        "seconds": round(run.seconds, 1),
        "finished": run.finished,
        "load_ended": max((j["ended"] or 0.0 for j in run.jobs), default=0.0),
        "jobs": dict(Counter(j["kind"] for j in run.jobs)),
        "outcomes": {k: dict(v.most_common()) for k, v in sorted(outcomes.items())},
        "faults": dict(Counter(f.kind for f in run.faults)),
        "detection": times,
        "surprising": surprising,
        "orphans": run.orphans,
        "partial": run.partial,
        "catalogs": run.catalogs,
        "after": run.after,
        "log_problems": run.log_problems,
        "faults_log": detected,
    }


def _stats(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": values[0],
        "median": round(statistics.median(values), 3),
        "max": values[-1],
    }


def table(summary: dict[str, Any]) -> str:
    """The run as text: jobs and outcomes per kind, faults and detection times, the checks."""
    lines = [f"chaos soak: {summary['seconds']} s, seed {summary['plan']['seed']}", ""]
    lines.append(f"{'kind':9s} {'jobs':>5s}  outcomes")
    for kind, count in sorted(summary["jobs"].items()):
        outcomes = ", ".join(f"{c} {n}" for c, n in summary["outcomes"][kind].items())
        lines.append(f"{kind:9s} {count:5d}  {outcomes}")
    lines += [
        "",
        f"{'fault':7s} {'n':>3s}  {'job ended (s)':22s} {'registry (s)':22s} live again (s)",
    ]

    def cell(s: dict[str, Any]) -> str:
        if not s["n"]:
            return "-"
        return f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}] n={s['n']}"

    for kind, t in summary["detection"].items():
        lines.append(
            f"{kind:7s} {t['faults']:3d}  {cell(t['job_ended_after_s']):22s} "
            f"{cell(t['registry_after_s']):22s} {cell(t['live_again_after_s'])}"
        )
    lines.append("")
    for name in ("surprising", "orphans", "partial", "log_problems"):
        found = summary[name]
        lines.append(f"{name}: {len(found) if found else 'none'}")
        lines += [f"  {json.dumps(item)}" for item in found[:10]]
    lines.append(f"catalogs (hub models): {summary['catalogs']}")
    lines.append(f"after: {summary['after']}")
    return "\n".join(lines)


# ---- the command -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, prog: str = "rbee-mesh bench --chaos") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A chaos soak: a queen and two hives in network namespaces (needs root), "
        "jobs of every kind (infer, control, downloads) while a seeded nemesis kills workers, "
        "freezes hives and cuts their links; checks every job's end, orphans, catalogs and "
        "the mesh after, and measures the time to detect each fault. Prints a table and writes "
        "chaos.json.",
    )
    parser.add_argument("--jobs", type=int, default=300, help="at least this many of each kind")
    parser.add_argument("--seconds", type=float, default=600.0, help="stop the load after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=float, default=3.0, help="seconds between faults")
    parser.add_argument(
        "--hold",
        default="1.0,2.5",
        metavar="MIN,MAX",
        help="seconds a freeze or a cut lasts, drawn between these",
    )
    parser.add_argument(
        "--overlap", action="store_true", help="faults overlap (each freeze and cut in a thread)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--json", dest="as_json", action="store_true")
    args = parser.parse_args(argv)
    try:
        low, high = (float(x) for x in args.hold.split(","))
    except ValueError:
        parser.error(f"--hold takes MIN,MAX in seconds, not {args.hold!r}")
    if args.jobs < 1 or args.seconds <= 0 or args.every <= 0:
        parser.error("--jobs, --seconds and --every must be positive")
    if not 0 < low <= high:
        parser.error(f"--hold takes MIN,MAX with 0 < MIN <= MAX, not {args.hold!r}")
    plan = ChaosPlan(
        jobs=args.jobs,
        seed=args.seed,
        fault_every_s=args.every,
        hold_s=(low, high),
        max_seconds=args.seconds,
        overlap=args.overlap,
    )

    def progress(text: str) -> None:
        print(f"chaos: {text}", file=sys.stderr, flush=True)

    started = time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="rbee-chaos-") as tmp:
            run = soak(plan, Path(tmp), progress)
    except ChaosError as exc:
        print(f"rbee-mesh bench --chaos failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rbee-mesh bench --chaos: interrupted", file=sys.stderr)
        return 130
    summary = {"benchmark": "chaos", "started": started, **summarise(run)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chaos.json").write_text(json.dumps(summary, indent=2) + "\n")
    with (args.out / "chaos-jobs.jsonl").open("w") as jobs:
        jobs.writelines(json.dumps(job) + "\n" for job in run.jobs)
    print(json.dumps(summary, indent=2) if args.as_json else table(summary))
    print(f"written: {args.out / 'chaos.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
