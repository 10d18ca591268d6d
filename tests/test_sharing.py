"""Models shared between hives across machines (docs/sharing.md): a queen and three hives, each in
a network namespace of its own, and two fake hubs. Hub A is on h1's loopback: only h1 reaches it.
Hub B is on q's LAN address, the hub of h2 and h3 (each hive has one hub: HF_ENDPOINT).

What a hive takes from another travels over the mesh's own authenticated connections (CURVE),
hive to hive; the tests look at what each hive ends up holding, byte for byte, at what the hubs
served, and at what the narration says of where the bytes came from.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.inference.gguf_file import write_tiny_gguf
from tests import netns
from tests.lanmesh import MultiHost, read_line

pytestmark = pytest.mark.slow

#: On hub A only (h1's).
REPO_A, FILE_A = "rbee-test/shared-GGUF", "shared.Q4_K_M.gguf"
#: On hub A only, large enough to be stopped halfway over a slowed link with more of it left
#: than can be in flight then (the fetcher's credit, 16 MiB, and the kernel's buffers).
REPO_C, FILE_C = "rbee-test/large-GGUF", "large.Q8_0.gguf"
LARGE = 64 << 20
#: On hub B only (h2's and h3's), served slowly: both ask for it at once.
REPO_B, FILE_B = "rbee-test/wanted-GGUF", "wanted.Q4_K_M.gguf"
#: The hubs' processes, while the module's mesh runs.
HUBS: dict[str, subprocess.Popen[str]] = {}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiHost]:
    root = tmp_path_factory.mktemp("sharing")
    hubs = {name: root / f"hub-{name}" for name in ("a", "b")}
    _put(hubs["a"], REPO_A, FILE_A, write_tiny_gguf(root / "tiny.gguf").read_bytes())
    _put(hubs["a"], REPO_C, FILE_C, random.Random(3).randbytes(LARGE))
    _put(hubs["b"], REPO_B, FILE_B, random.Random(4).randbytes(1 << 20))
    with netns.lan_or_skip(["q", "h1", "h2", "h3"]) as lan:
        m = MultiHost(lan, root)
        hub_a, endpoint_a = m.start_hub("h1", hubs["a"])
        # 1 MiB at 250 kB/s: the second hive asks while the first still downloads.
        hub_b, endpoint_b = m.start_hub("q", hubs["b"], bind=lan["q"].address, rate_bps=250_000)
        HUBS.update(a=hub_a, b=hub_b)
        try:
            assert m.rbee("q", "queen", "start", "--no-discovery").returncode == 0
            hives = {
                host: m.start_hive(host, "--join", m.invite(),
                                   HF_ENDPOINT=endpoint_a if host == "h1" else endpoint_b)
                for host in ("h1", "h2", "h3")
            }  # fmt: skip
            for host, proc in hives.items():
                _, err = proc.communicate(timeout=60)
                assert proc.returncode == 0, f"{host}: {err}"
                m.wait_liveness(host, "live", timeout=30)
            yield m
        finally:
            for host, what in (("q", "queen"), ("h1", "hive"), ("h2", "hive"), ("h3", "hive")):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    m.rbee(host, what, "stop", timeout=20)
            for hub in (hub_a, hub_b):
                if hub.poll() is None:
                    served_by(hub)


def _put(hub: Path, repo: str, file: str, data: bytes) -> None:
    (hub / repo).mkdir(parents=True)
    (hub / repo / file).write_bytes(data)


def served_by(hub: subprocess.Popen[str]) -> list[str]:
    """Stop the hub; the file GETs it served."""
    assert hub.stdin is not None
    hub.stdin.close()
    return list(json.loads(read_line(hub, 10))["file_gets"])


def hub_bytes(mesh: MultiHost, hub: str, repo: str, file: str) -> bytes:
    return (mesh.root / f"hub-{hub}" / repo / file).read_bytes()


def held(mesh: MultiHost, host: str, repo: str, file: str) -> bytes:
    """The bytes of the model in `host`'s catalog (the hosts share one file system)."""
    return Catalog(mesh.home(host) / "hive" / "models").model_path(repo, file).read_bytes()


def download(mesh: MultiHost, host: str, ref: str, *args: str) -> str:
    """`model download REF --hive HOST`; what it narrated."""
    done = mesh.keeper("model", "download", ref, "--hive", host, *args, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr + done.stdout


def test_hives_that_cannot_reach_the_hub_take_the_model_from_one_that_holds_it(
    mesh: MultiHost,
) -> None:
    said = download(mesh, "h1", REPO_A)
    assert "from the hub at http://127.0.0.1:" in said

    said = download(mesh, "h2", REPO_A)
    assert f"hive h2 takes {REPO_A} from hive h1" in said
    assert f"{REPO_A}:{FILE_A}: downloading" in said and "from hive h1" in said
    said = download(mesh, "h3", REPO_A, "--from", "mesh")
    assert f"hive h3 takes {REPO_A} from hive h1" in said and ", then hive h2" in said
    assert "then the hub" not in said  # --from mesh

    for host in ("h1", "h2", "h3"):
        assert held(mesh, host, REPO_A, FILE_A) == hub_bytes(mesh, "a", REPO_A, FILE_A)
    copies = [r["hive"] for r in mesh.result("model", "list") if r["id"] == f"{REPO_A}:{FILE_A}"]
    assert sorted(copies) == ["h1", "h2", "h3"]  # where each copy lives


def test_a_model_no_hive_holds_is_not_found_with_from_mesh(mesh: MultiHost) -> None:
    done = mesh.keeper("model", "download", REPO_B, "--hive", "h1", "--from", "mesh")
    assert done.returncode == 4, done.stderr
    assert f"no live hive of this mesh holds {REPO_B}" in done.stderr


def test_hives_that_want_one_model_at_once_cause_one_hub_download(mesh: MultiHost) -> None:
    keepers = [
        mesh.keeper_popen("model", "download", REPO_B, "--hive", host) for host in ("h2", "h3")
    ]
    for keeper in keepers:
        _, err = keeper.communicate(timeout=120)
        assert keeper.returncode == 0, err
    for host in ("h2", "h3"):
        assert held(mesh, host, REPO_B, FILE_B) == hub_bytes(mesh, "b", REPO_B, FILE_B)
    gets = served_by(HUBS["b"])
    assert len(gets) == 1, gets


def test_a_copy_that_does_not_match_its_sha256_is_rejected_and_taken_from_another_hive(
    mesh: MultiHost,
) -> None:
    original = hub_bytes(mesh, "a", REPO_A, FILE_A)
    assert mesh.keeper("model", "delete", f"{REPO_A}:{FILE_A}", "--hive", "h3").returncode == 0
    h1_copy = Catalog(mesh.home("h1") / "hive" / "models").model_path(REPO_A, FILE_A)
    corrupt = bytearray(original)
    corrupt[len(corrupt) // 2] ^= 0xFF  # one bit flipped on h1's disk: same size, other bytes
    h1_copy.write_bytes(bytes(corrupt))
    try:
        said = download(mesh, "h3", REPO_A)
    finally:
        h1_copy.write_bytes(original)
    assert "the bytes from hive h1 have sha256" in said
    assert f"taking {REPO_A}:{FILE_A} from hive h2, from the start" in said
    assert held(mesh, "h3", REPO_A, FILE_A) == original


def test_a_worker_spawned_on_a_hive_that_lacks_its_model_takes_it_from_the_mesh_first(
    mesh: MultiHost,
) -> None:
    model = f"{REPO_A}:{FILE_A}"
    assert mesh.keeper("model", "delete", model, "--hive", "h2").returncode == 0
    spawned = mesh.keeper("--json", "worker", "spawn", "-m", model, "--hive", "h2", timeout=120)
    assert spawned.returncode == 0, spawned.stderr
    assert f"hive h2 lacks {model}: taking it from the mesh first" in spawned.stdout
    assert held(mesh, "h2", REPO_A, FILE_A) == hub_bytes(mesh, "a", REPO_A, FILE_A)
    worker = json.loads(spawned.stdout.splitlines()[-1])["result"]
    assert worker["state"] == "ready", worker
    assert mesh.keeper("worker", "delete", worker["id"], "--hive", "h2").returncode == 0


def test_an_infer_on_a_hive_that_lacks_its_model_takes_it_from_the_mesh(mesh: MultiHost) -> None:
    model = f"{REPO_A}:{FILE_A}"
    assert mesh.keeper("model", "delete", model, "--hive", "h3").returncode == 0
    inferred = mesh.keeper("infer", "-m", model, "--hive", "h3", "-n", "4", "--seed", "1",
                           "Once upon a time", timeout=120)  # fmt: skip
    assert inferred.returncode == 0, inferred.stderr
    assert f"hive h3 takes {model} from hive" in inferred.stderr
    assert held(mesh, "h3", REPO_A, FILE_A) == hub_bytes(mesh, "a", REPO_A, FILE_A)


def test_a_transfer_whose_source_dies_halfway_resumes_from_another_hive(mesh: MultiHost) -> None:
    download(mesh, "h1", REPO_C)  # from hub A
    download(mesh, "h2", REPO_C)  # from h1
    partial = Catalog(mesh.home("h3") / "hive" / "models").partial_path(REPO_C, FILE_C)
    for host in ("h1", "h2"):  # 64 MiB at 200 Mbit/s: about 3 s from either
        mesh.lan.shape(mesh.lan[host], "200mbit")
    try:
        keeper = mesh.keeper_popen("model", "download", REPO_C, "--hive", "h3")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _size(partial) < LARGE // 2:
            assert keeper.poll() is None, keeper.communicate()
            time.sleep(0.02)  # (another process's file: a bounded poll)
        h1_pid = json.loads((mesh.home("h1") / "hive.json").read_text())["pid"]
        os.kill(h1_pid, 9)
        out, err = keeper.communicate(timeout=120)
    finally:
        for host in ("h1", "h2"):
            mesh.lan.unshape(mesh.lan[host])
    assert keeper.returncode == 0, err
    said = out + err
    assert "hive h1 failed after" in said, said
    assert any("resuming at" in line and "from hive h2" in line for line in said.splitlines())
    assert held(mesh, "h3", REPO_C, FILE_C) == hub_bytes(mesh, "a", REPO_C, FILE_C)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def test_a_hive_the_queen_no_longer_trusts_is_forgotten_as_a_peer(mesh: MultiHost) -> None:
    def peers_of(host: str) -> list[str]:
        trusted = json.loads((mesh.home(host) / "trust.json").read_text())
        return [t["name"] for t in trusted if t["role"] == "peer"]

    assert "h3" in peers_of("h2")  # h3 took models from h2 above
    assert mesh.keeper("hive", "untrust", "h3").returncode == 0
    assert "h3" not in peers_of("h2")
