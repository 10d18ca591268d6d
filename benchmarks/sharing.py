"""A model from one hive to another over the LAN (docs/sharing.md), against `cat` over a plain
TCP socket on the same link, in one run.

Two hosts of a test LAN (tests/netns.py). h1 holds a model of SIZE random bytes in its catalog
and runs its hive; h2 fetches it as a hive does (`download_model` with h1 as its one peer:
CURVE, CHUNK frames with credit, sha256, fsync, publish), into an empty catalog. In turn, the
baseline: `cat FILE > /dev/tcp/H2/PORT` on h1, into a receiver on h2 that writes the bytes to a
file and fsyncs it (the same work on h2's disk, none of the rest). And the floor under the mesh:
the same bytes as 1 MiB messages from a ZeroMQ ROUTER on h1 to a DEALER on h2, nothing else
done with them, with CURVE (what encryption alone allows) and without. Each RUNS times,
alternating, on the link as it is (veth: what the machine's CPUs can push) and shaped to
1 Gbit/s (tbf on each host's interface: a usual LAN). Prints a table, writes
benchmarks/results/sharing.json.

    .venv/bin/python -m benchmarks.sharing [--size-mib 256] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.actors.trust import Role, Trust
from tests import netns
from tests.lanmesh import REPO_ROOT, read_line

RESULTS = REPO_ROOT / "benchmarks" / "results"
REPO, FILE = "bench/shared-GGUF", "shared.Q8_0.gguf"
PORT = 7900
LINKS = {"veth": None, "1 Gbit/s": "1gbit"}

#: On h2: fetch the model from h1 as a hive does; prints the seconds it took.
FETCH = r"""
import pathlib, sys, time, trio
from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.actors.hive.download import Mesh, MeshPeer, download_model
from rbee_mesh.actors.trust import Trust

home, endpoint, key, ref, into = sys.argv[1:6]

async def main() -> None:
    mesh = Mesh((MeshPeer("h1", endpoint, key),), Trust.load(pathlib.Path(home)), "h2")
    started = time.perf_counter()
    await download_model(Catalog(pathlib.Path(into)), ref, mesh=mesh, use_hub=False)
    print(time.perf_counter() - started, flush=True)

trio.run(main)
"""

#: On h2: take one TCP connection's bytes into a file, fsynced; prints the seconds and bytes.
RECEIVE = r"""
import os, socket, sys, time
port, into = int(sys.argv[1]), sys.argv[2]
server = socket.create_server(("0.0.0.0", port))
print("ready", flush=True)
conn, _ = server.accept()
started, got = time.perf_counter(), 0
with open(into, "wb") as f:
    while data := conn.recv(1 << 20):
        f.write(data)
        got += len(data)
    f.flush()
    os.fsync(f.fileno())
print(time.perf_counter() - started, got, flush=True)
"""


#: On h1 (serve) and h2 (take): SIZE bytes as 1 MiB messages, ROUTER to DEALER, with CURVE
#: (keys made for the run, on stdin) or without; the taker prints the seconds from its first
#: message's request to the last.
ZMQ = r"""
import sys, time, zmq
role, endpoint, size, curve = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "curve"
keys = [k.encode() for k in sys.stdin.read().split()]
SERVER, CLIENT = (keys[0], keys[1]), (keys[2], keys[3])
sock = zmq.Context().socket(zmq.ROUTER if role == "serve" else zmq.DEALER)
if curve and role == "serve":
    sock.curve_server, (sock.curve_publickey, sock.curve_secretkey) = True, SERVER
elif curve:
    sock.curve_serverkey = SERVER[0]
    sock.curve_publickey, sock.curve_secretkey = CLIENT
if role == "serve":
    sock.bind(endpoint)
    print("ready", flush=True)
    ident, _ = sock.recv_multipart()
    data = bytes(1 << 20)
    for _ in range(size >> 20):
        sock.send_multipart([ident, data])
    sock.recv_multipart()
else:
    sock.connect(endpoint)
    started = time.perf_counter()
    sock.send(b"go")
    for _ in range(size >> 20):
        sock.recv(copy=False)
    print(time.perf_counter() - started, flush=True)
    sock.send(b"done")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mib << 20
    with (
        tempfile.TemporaryDirectory(prefix="rbee-sharing-") as tmp,
        netns.open_lan(["h1", "h2"]) as lan,
    ):
        rows = measure(lan, Path(tmp), size, args.runs)
    report(rows, size, args.runs)


def measure(lan: netns.Lan, root: Path, size: int, runs: int) -> list[dict[str, Any]]:
    model = root / "model.bin"
    with open(model, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    homes = {host: root / host for host in ("h1", "h2")}
    keys = {host: Trust.load(_made(home)) for host, home in homes.items()}
    keys["h1"].trust(keys["h2"].public, Role.PEER, "h2")
    Catalog(homes["h1"] / "hive" / "models").add_file(REPO, FILE, model)
    h1, h2 = lan["h1"], lan["h2"]
    endpoint = f"tcp://{h1.address}:7835"
    env = {**os.environ, "RBEE_MESH_HOME": str(homes["h1"])}
    hive = h1.popen(
        [sys.executable, "-m", "rbee_mesh", "hive", "start", "--foreground", "--id", "h1",
         "--bind", endpoint, "--heartbeat-bind", f"tcp://{h1.address}:7836"],
        env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    _wait_for(homes["h1"] / "hive.json", hive)
    rows = []
    try:
        for link, rate in LINKS.items():
            for host in (h1, h2):
                if rate:
                    lan.shape(host, rate)
            for _ in range(runs):
                into = root / "fetched"
                shutil.rmtree(into, ignore_errors=True)
                done = h2.run(
                    [sys.executable, "-c", FETCH, str(homes["h2"]), endpoint,
                     keys["h1"].public, f"{REPO}:{FILE}", str(into)],
                    cwd=REPO_ROOT, timeout=600,
                )  # fmt: skip
                assert done.returncode == 0, done.stderr
                rows.append({"link": link, "how": "mesh", "seconds": float(done.stdout)})
                rows.append({"link": link, "how": "cat", "seconds": _cat(h1, h2, model, root)})
                for curve in ("curve", "plain"):
                    seconds = _zmq(h1, h2, size, curve)
                    rows.append({"link": link, "how": f"zmq {curve}", "seconds": seconds})
            for host in (h1, h2):
                if rate:
                    lan.unshape(host)
    finally:
        hive.terminate()
        hive.wait(timeout=30)
    return rows


def _cat(h1: netns.Host, h2: netns.Host, model: Path, root: Path) -> float:
    into = root / "received"
    receiver = h2.popen([sys.executable, "-c", RECEIVE, str(PORT), str(into)], cwd=REPO_ROOT)
    assert read_line(receiver, 30).strip() == "ready"
    sent = h1.run(["bash", "-c", f"cat {model} > /dev/tcp/{h2.address}/{PORT}"], timeout=600)
    assert sent.returncode == 0, sent.stderr
    seconds, got = read_line(receiver, 600).split()
    receiver.wait(timeout=30)
    assert int(got) == model.stat().st_size
    into.unlink()
    return float(seconds)


def _zmq(h1: netns.Host, h2: netns.Host, size: int, curve: str) -> float:
    endpoint = f"tcp://{h1.address}:{PORT + 1}"
    keys = " ".join(k.decode() for pair in (zmq.curve_keypair(), zmq.curve_keypair()) for k in pair)
    server = h1.popen(
        [sys.executable, "-c", ZMQ, "serve", endpoint, str(size), curve], stdin=subprocess.PIPE
    )
    assert server.stdin is not None
    server.stdin.write(keys)
    server.stdin.close()
    assert read_line(server, 30).strip() == "ready"
    taken = h2.run(
        [sys.executable, "-c", ZMQ, "take", endpoint, str(size), curve], input=keys, timeout=600
    )
    server.wait(timeout=30)
    assert taken.returncode == 0, taken.stderr
    return float(taken.stdout)


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _wait_for(path: Path, process: subprocess.Popen[str], timeout_s: float = 30) -> None:
    """Until the hive records that it serves (another process: a bounded poll)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the hive did not start: {process.communicate()}")
        time.sleep(0.05)


def report(rows: list[dict[str, Any]], size: int, runs: int) -> None:
    hows = ("mesh", "cat", "zmq curve", "zmq plain")
    table = []
    for link in LINKS:
        rate = {
            how: statistics.median(
                size / r["seconds"] for r in rows if r["link"] == link and r["how"] == how
            )
            / 1e6
            for how in hows
        }
        table.append({"link": link, **{f"{how} MB/s": rate[how] for how in hows},
                      "mesh/cat": rate["mesh"] / rate["cat"]})  # fmt: skip
    print(f"{size >> 20} MiB, median of {runs} runs each, alternating; goal: mesh >= 0.80x cat")
    print(f"{'link':<10}" + "".join(f"{how + ' MB/s':>16}" for how in hows) + f"{'mesh/cat':>10}")
    for row in table:
        verdict = "met" if row["mesh/cat"] >= 0.8 else "MISSED"
        print(f"{row['link']:<10}" + "".join(f"{row[how + ' MB/s']:>16.1f}" for how in hows)
              + f"{row['mesh/cat']:>9.2f}x  {verdict}")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "sharing.json"
    out.write_text(json.dumps({"size": size, "runs": rows, "table": table}, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
