"""Model downloads against a real HTTP hub on loopback (tests/hub.py): no mocks, no network."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from rbee_mesh.actors.hive.catalog import Catalog, ModelStatus
from rbee_mesh.actors.hive.download import QUANT_ORDER, choose_gguf, download_model
from rbee_mesh.actors.narration import JobContext, current_job
from rbee_mesh.inference.gguf_file import read_gguf_info, write_tiny_gguf
from rbee_mesh.protocol import Data, ErrorCode, MeshError, Message, Narration
from tests import hub as fake_hub
from tests.hub import FakeHub
from tests.skips import skip_or_fail

hub = fake_hub.hub  # the fixture, used by name

REPO = "TheOwner/tiny-model"
FILE = "tiny.Q4_K_M.gguf"
REF = f"{REPO}:{FILE}"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class FakeJob:
    """What a job would send to its keeper: every narration and DATA record, as they come."""

    messages: list[Message] = field(default_factory=list)
    got_bytes: trio.Event = field(default_factory=trio.Event)

    def emit(self, message: Message) -> None:
        self.messages.append(message)
        if isinstance(message, Data) and message.record["bytes"] > 0:
            self.got_bytes.set()

    def narrations(self) -> list[Narration]:
        return [m for m in self.messages if isinstance(m, Narration)]

    def records(self) -> list[dict[str, Any]]:
        return [m.record for m in self.messages if isinstance(m, Data)]


@contextmanager
def job_context() -> Iterator[FakeJob]:
    """Run the block as if inside a hive job: narration goes to a FakeJob."""
    job = FakeJob()
    token = current_job.set(JobContext(job_id="job-1", actor="hive", emit=job.emit))
    try:
        yield job
    finally:
        current_job.reset(token)


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(tmp_path / "models")


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


async def failed_download(catalog: Catalog, ref: str = REF, **kwargs: Any) -> MeshError:
    with pytest.raises(MeshError) as caught:
        await download_model(catalog, ref, **kwargs)
    return caught.value


# ---- choosing a file ---------------------------------------------------------------------------


def test_quantizations_are_chosen_in_the_documented_order() -> None:
    files = [f"m.{q}.gguf" for q in reversed(QUANT_ORDER)] + ["m.Q6_K.gguf", "README.md"]
    for quant in QUANT_ORDER:
        choice = choose_gguf(files)
        assert choice is not None and choice[0] == f"m.{quant}.gguf" and quant in choice[1]
        files.remove(f"m.{quant}.gguf")
    last = choose_gguf(files)
    assert last is not None and last[0] == "m.Q6_K.gguf" and "alphabetically" in last[1]


def test_quantization_names_match_whole_tokens_only() -> None:
    files = ["m-BF16.gguf", "m-IQ4_K_M.gguf", "m-Q4_0_4_4.gguf", "mmproj-m-F16.gguf", "z-q4_0.gguf"]
    assert choose_gguf(files) == (
        "z-q4_0.gguf",
        "Q4_0 is the first of " + ", ".join(QUANT_ORDER) + " that the repo has",
    )
    other = choose_gguf(["b.gguf", "a.gguf", "mmproj-F16.gguf"])
    assert other is not None and other[0] == "a.gguf" and "alphabetically" in other[1]
    assert choose_gguf(["README.md", "mmproj-F16.gguf"]) is None


# ---- the happy paths ---------------------------------------------------------------------------


async def test_a_downloaded_gguf_file_has_its_facts_in_the_catalog(
    hub: FakeHub, catalog: Catalog, tmp_path: Path
) -> None:
    tiny = write_tiny_gguf(tmp_path / "t.gguf", context_length=1024)
    hub.add_file(REPO, FILE, tiny.read_bytes())
    with job_context(), trio.fail_after(10):
        entry = await download_model(catalog, REF)
    assert entry.gguf == {
        "architecture": "llama", "quantization": "F16", "context_length": 1024,
        "parameters": read_gguf_info(tiny).parameter_count, "chat_template": False,
    }  # fmt: skip
    assert catalog.get(REF).gguf == entry.gguf  # kept in its model.json


async def test_download_verifies_the_file_before_it_becomes_available(
    hub: FakeHub, catalog: Catalog
) -> None:
    data = hub.add_random_file(REPO, FILE, 300_000)
    with job_context() as job, trio.fail_after(10):
        entry = await download_model(catalog, REF)
    assert entry.status is ModelStatus.AVAILABLE and entry.id == REF
    assert entry.path.read_bytes() == data
    assert entry.size == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
    assert entry.revision == hub.repos[REPO].commit
    assert entry.gguf is None  # random bytes: no GGUF facts to record
    assert catalog.entries() == ([entry], [])
    assert files_under(catalog.root) == [
        f"{entry.path.parent.name}/model.json",
        f"{entry.path.parent.name}/{FILE}",
    ]
    assert "verified size and sha256" in " ".join(n.human for n in job.narrations())


async def test_file_without_lfs_digest_is_verified_by_size_only(
    hub: FakeHub, catalog: Catalog
) -> None:
    hub.add_file(REPO, "tiny.gguf", b"GGUF" + bytes(100), lfs=False)
    with job_context() as job, trio.fail_after(10):
        entry = await download_model(catalog, f"{REPO}:tiny.gguf")
    assert entry.status is ModelStatus.AVAILABLE and entry.sha256 is None and entry.size == 104
    assert any("verified size (the hub gave no sha256)" in n.human for n in job.narrations())


async def test_bare_repo_downloads_the_best_quantization_and_says_why(
    hub: FakeHub, catalog: Catalog
) -> None:
    for name in ["m.Q8_0.gguf", "m.Q4_0.gguf", "m.F16.gguf", "m.Q5_K_M.gguf", "mmproj-F16.gguf"]:
        hub.add_random_file(REPO, name, 1000)
    hub.add_file(REPO, "README.md", b"# tiny", lfs=False)
    with job_context() as job, trio.fail_after(10):
        entry = await download_model(catalog, REPO)
    assert entry.id == f"{REPO}:m.Q5_K_M.gguf" and entry.status is ModelStatus.AVAILABLE
    chose = [n.human for n in job.narrations() if "chose" in n.human]
    assert chose == [
        f"{REPO}: chose m.Q5_K_M.gguf (Q5_K_M is the first of "
        f"{', '.join(QUANT_ORDER)} that the repo has)"
    ]


async def test_repo_without_gguf_is_not_found_listing_its_files(
    hub: FakeHub, catalog: Catalog
) -> None:
    hub.add_file(REPO, "model.safetensors", b"x" * 10)
    hub.add_file(REPO, "README.md", b"# tiny", lfs=False)
    with trio.fail_after(10):
        error = await failed_download(catalog, REPO)
    assert error.code is ErrorCode.NOT_FOUND
    assert "no GGUF file" in error.message and "README.md, model.safetensors" in error.message
    assert files_under(catalog.root) == []


async def test_unknown_file_is_not_found_listing_the_repo_files(
    hub: FakeHub, catalog: Catalog
) -> None:
    hub.add_random_file(REPO, FILE, 10)
    with trio.fail_after(10):
        error = await failed_download(catalog, f"{REPO}:nope.gguf")
    assert error.code is ErrorCode.NOT_FOUND and FILE in error.message


async def test_already_available_model_returns_at_once_without_asking_the_hub(
    hub: FakeHub, catalog: Catalog
) -> None:
    hub.add_random_file(REPO, FILE, 10_000)
    with trio.fail_after(10):
        first = await download_model(catalog, REF)
        asked = len(hub.requests)
        with job_context() as job:
            again = await download_model(Catalog(catalog.root), REF)
    assert again == first and len(hub.requests) == asked
    assert [n.human for n in job.narrations()] == [
        f"{REF} is already here (9.8 KiB, revision {first.revision[:12]})"
    ]


async def test_token_is_sent_to_the_hub_as_bearer_auth(hub: FakeHub, catalog: Catalog) -> None:
    hub.add_random_file(REPO, FILE, 1000)
    hub.require_token = "hf_secret"
    with trio.fail_after(10):
        refused = await failed_download(catalog)
        await download_model(catalog, REF, token="hf_secret")
    assert refused.code is ErrorCode.NOT_FOUND and "token" in refused.message
    assert hub.requests[-1].authorization == "Bearer hf_secret"


# ---- progress ----------------------------------------------------------------------------------


async def test_progress_is_narrated_and_emitted_every_interval_with_rate_and_eta(
    hub: FakeHub, catalog: Catalog
) -> None:
    hub.add_random_file(REPO, FILE, 200_000)
    hub.rate_bps = 250_000  # about 0.8 s
    interval = 0.1
    with job_context() as job, trio.fail_after(10):
        await download_model(catalog, REF, progress_interval_s=interval)
    progress = [n for n in job.narrations() if "%" in n.human]
    gaps = [b.ts - a.ts for a, b in itertools.pairwise(progress)]
    assert len(progress) >= 5 and max(gaps) < interval * 2.5, gaps
    records = job.records()
    assert len(records) == len(progress)
    assert all(
        set(r) == {"kind", "model", "bytes", "total", "rate_bps", "eta_s", "source"}
        and r["kind"] == "progress"
        and r["source"] == f"the hub at {hub.endpoint}"
        and r["model"] == REF
        and r["total"] == 200_000
        for r in records
    )
    assert [r["bytes"] for r in records] == sorted(r["bytes"] for r in records)
    assert records[-1]["bytes"] == 200_000 and records[-1]["eta_s"] == 0
    middle = [r for r in records if 0 < r["bytes"] < 200_000 and r["rate_bps"] > 0]
    assert middle and all(r["eta_s"] > 0 for r in middle)
    assert any("/s, ETA" in n.human for n in progress)


# ---- interruptions -----------------------------------------------------------------------------


async def test_dropped_connection_keeps_the_partial_and_the_next_download_resumes_with_range(
    hub: FakeHub, catalog: Catalog
) -> None:
    data = hub.add_random_file(REPO, FILE, 1_000_000)
    hub.drop_after(400_000)
    with trio.fail_after(10):
        error = await failed_download(catalog)
    assert error.code is ErrorCode.UNAVAILABLE and "dropped after" in error.message
    failed = catalog.lookup(REF)
    assert failed is not None and failed.status is ModelStatus.FAILED
    assert failed.error is not None and "resume" in failed.error
    partial = catalog.partial_path(REPO, FILE)
    assert partial.stat().st_size == 400_000
    with trio.fail_after(10):
        entry = await download_model(catalog, REF)
    assert entry.status is ModelStatus.AVAILABLE and entry.path.read_bytes() == data
    assert [r.range for r in hub.file_gets()] == [None, "bytes=400000-"]
    assert hub.body_bytes_sent == len(data)
    assert not partial.exists()


# A download in its own process, killed with SIGKILL once bytes are on disk.
_KILLED_DOWNLOAD = """
import sys
from pathlib import Path

import trio

from rbee_mesh.actors.narration import JobContext, current_job
from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.actors.hive.download import download_model
from rbee_mesh.protocol import Data


def emit(message):
    if isinstance(message, Data) and message.record["bytes"] > 0:
        print("bytes", message.record["bytes"], flush=True)


async def main():
    current_job.set(JobContext(job_id="job-1", actor="hive", emit=emit))
    await download_model(Catalog(Path(sys.argv[1])), sys.argv[2], progress_interval_s=0.05)


trio.run(main)
"""


async def test_download_killed_mid_transfer_resumes_in_a_new_process_from_its_partial(
    hub: FakeHub, catalog: Catalog
) -> None:
    data = hub.add_random_file(REPO, FILE, 600_000)
    hub.rate_bps = 300_000  # 2 s: plenty of time to kill it in the middle
    with trio.fail_after(20):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", _KILLED_DOWNLOAD, str(catalog.root), REF],
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
        )
        assert process.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some(1)
            assert chunk, "the download process ended before any progress"
            line += chunk
        process.send_signal(signal.SIGKILL)
        await process.wait()
        await process.stdout.aclose()
        hub.rate_bps = None
        # What the killed hive left: its entry, still "downloading", and its partial bytes.
        restarted = Catalog(catalog.root)
        left = restarted.lookup(REF)
        assert left is not None and left.status is ModelStatus.DOWNLOADING
        kept = restarted.partial_path(REPO, FILE).stat().st_size
        assert 0 < int(line.split()[1]) <= kept < len(data)
        entry = await download_model(restarted, REF)
    assert entry.status is ModelStatus.AVAILABLE and entry.path.read_bytes() == data
    assert [r.range for r in hub.file_gets()] == [None, f"bytes={kept}-"]
    # Only what was in flight when the process died (not yet on its disk) was sent twice.
    assert hub.body_bytes_sent - len(data) < 100_000


async def test_hub_that_ignores_range_restarts_the_file_cleanly(
    hub: FakeHub, catalog: Catalog
) -> None:
    data = hub.add_random_file(REPO, FILE, 500_000)
    hub.drop_after(200_000)
    with trio.fail_after(10):
        await failed_download(catalog)
        hub.ignore_range = True
        with job_context() as job:
            entry = await download_model(catalog, REF)
    assert entry.path.read_bytes() == data
    assert [r.range for r in hub.file_gets()] == [None, "bytes=200000-"]
    assert any("ignored the resume" in n.human for n in job.narrations())


async def test_new_revision_on_the_hub_discards_the_stale_partial(
    hub: FakeHub, catalog: Catalog
) -> None:
    hub.add_random_file(REPO, FILE, 300_000, seed=1)
    hub.drop_after(100_000)
    with trio.fail_after(10):
        await failed_download(catalog)
        hub.new_revision(REPO)
        data = hub.add_random_file(REPO, FILE, 300_000, seed=2)
        entry = await download_model(catalog, REF)
    assert entry.path.read_bytes() == data and entry.revision == hub.repos[REPO].commit
    assert [r.range for r in hub.file_gets()] == [None, None]


async def test_cancelled_download_leaves_no_debris(hub: FakeHub, catalog: Catalog) -> None:
    hub.add_random_file(REPO, FILE, 1_000_000)
    hub.rate_bps = 200_000  # 5 s: cancelled long before the end
    with job_context() as job, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(download_model, catalog, REF, progress_interval_s=0.05))
            await job.got_bytes.wait()
            assert catalog.partial_path(REPO, FILE).stat().st_size > 0
            nursery.cancel_scope.cancel()
    assert files_under(catalog.root) == []
    assert any("cancelled" in n.human for n in job.narrations())


async def test_job_deadline_mid_transfer_keeps_the_partial_for_a_resume(
    hub: FakeHub, catalog: Catalog
) -> None:
    hub.add_random_file(REPO, FILE, 1_000_000)
    hub.rate_bps = 200_000
    with job_context() as job, trio.fail_after(10), trio.CancelScope() as job_scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(download_model, catalog, REF, progress_interval_s=0.05))
            await job.got_bytes.wait()
            job_scope.deadline = trio.current_time()  # the job's deadline passes now
    assert job_scope.cancelled_caught
    entry = catalog.lookup(REF)
    assert entry is not None and entry.status is ModelStatus.FAILED
    assert entry.error is not None and "deadline passed after" in entry.error
    assert catalog.partial_path(REPO, FILE).stat().st_size > 0


async def test_second_download_of_the_same_model_is_refused_while_the_first_runs(
    hub: FakeHub, catalog: Catalog
) -> None:
    hub.add_random_file(REPO, FILE, 1_000_000)
    hub.rate_bps = 200_000
    with job_context() as job, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(download_model, catalog, REF, progress_interval_s=0.05))
            await job.got_bytes.wait()
            error = await failed_download(catalog)
            nursery.cancel_scope.cancel()
    assert error.code is ErrorCode.CONFLICT and "being downloaded" in error.message


# ---- verification and refusals -----------------------------------------------------------------


async def test_sha256_mismatch_fails_the_entry_and_removes_the_bad_file(
    hub: FakeHub, catalog: Catalog
) -> None:
    hub.add_file(REPO, FILE, os.urandom(50_000), announced_sha256="0" * 64)
    with trio.fail_after(10):
        error = await failed_download(catalog)
    assert error.code is ErrorCode.UNAVAILABLE and "sha256" in error.message
    entry = catalog.lookup(REF)
    assert entry is not None and entry.status is ModelStatus.FAILED
    assert entry.error is not None and "0" * 64 in entry.error
    assert files_under(catalog.root) == [f"{entry.path.parent.name}/model.json"]


@pytest.mark.parametrize(
    ("status", "code", "words"),
    [
        (401, ErrorCode.NOT_FOUND, "refused access (HTTP 401)"),
        (403, ErrorCode.NOT_FOUND, "refused access (HTTP 403)"),
        (404, ErrorCode.NOT_FOUND, "not found"),
        (500, ErrorCode.UNAVAILABLE, "answered HTTP 500"),
        (503, ErrorCode.UNAVAILABLE, "answered HTTP 503"),
    ],
)
async def test_refusing_hub_fails_at_once_with_a_clear_error(
    hub: FakeHub, catalog: Catalog, status: int, code: ErrorCode, words: str
) -> None:
    hub.add_random_file(REPO, FILE, 1000)
    hub.refuse_status = status
    with trio.fail_after(5):
        error = await failed_download(catalog)
    assert error.code is code and words in error.message and hub.endpoint in error.message
    assert len(hub.requests) == 1  # no retries behind our back
    assert files_under(catalog.root) == []


async def test_silent_hub_fails_with_timeout_within_the_idle_timeout(
    hub: FakeHub, catalog: Catalog
) -> None:
    hub.add_random_file(REPO, FILE, 1000)
    hub.silent = True
    start = trio.current_time()
    with trio.fail_after(5):
        error = await failed_download(catalog, connect_timeout_s=0.5, idle_timeout_s=0.5)
    assert error.code is ErrorCode.TIMEOUT and "sent nothing for 0.5s" in error.message
    assert 0.5 <= trio.current_time() - start < 1.5
    assert files_under(catalog.root) == []


async def test_hub_going_silent_mid_transfer_times_out_and_keeps_the_partial(
    hub: FakeHub, catalog: Catalog
) -> None:
    hub.add_random_file(REPO, FILE, 500_000)
    hub.stall_after(100_000)
    with trio.fail_after(5):
        error = await failed_download(catalog, idle_timeout_s=0.5)
    assert error.code is ErrorCode.TIMEOUT
    assert "after 97.7 KiB of 488.3 KiB; those bytes are kept" in error.message
    assert catalog.partial_path(REPO, FILE).stat().st_size == 100_000


async def test_unreachable_hub_is_unavailable(hub: FakeHub, catalog: Catalog) -> None:
    with socket_that_refuses() as endpoint, trio.fail_after(5):
        error = await failed_download(catalog, endpoint=endpoint, connect_timeout_s=1)
    assert error.code is ErrorCode.UNAVAILABLE and "cannot connect" in error.message


@contextmanager
def socket_that_refuses() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield f"http://127.0.0.1:{port}"  # bound then closed: connections are refused


# ---- a full disk -------------------------------------------------------------------------------

# Inside its own user and mount namespace, on a 512 KiB tmpfs: first a file that cannot fit
# (refused before any byte is written), then one that fits until the disk fills up under it.
_FULL_DISK = """
import json, os, sys
from pathlib import Path

import trio

from rbee_mesh.actors.narration import JobContext, current_job
from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.actors.hive.download import download_model
from rbee_mesh.protocol import Data, MeshError

root = Path(sys.argv[1]) / "models"
filler = Path(sys.argv[1]) / "filler"


def fill_the_disk(message):
    if isinstance(message, Data) and message.record["bytes"] > 0 and not filler.exists():
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        for size in (65536, 4096, 1):
            try:
                while os.write(fd, bytes(size)):
                    pass
            except OSError:
                pass
        os.close(fd)


async def attempt(ref, emit):
    current_job.set(JobContext(job_id="job-1", actor="hive", emit=emit))
    catalog = Catalog(root)
    try:
        await download_model(catalog, ref, progress_interval_s=0.05)
        error = None
    except MeshError as exc:
        error = {"code": str(exc.code), "message": exc.message}
    entries, _ = catalog.entries()
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return {"error": error, "entries": [e.to_record() for e in entries], "files": files}


async def main():
    big = await attempt(sys.argv[2], lambda message: None)
    filling = await attempt(sys.argv[3], fill_the_disk)
    print(json.dumps({"big": big, "filling": filling}))


trio.run(main)
"""


def _can_mount_a_small_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d"',
        ],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


async def test_full_disk_fails_with_no_space_and_nothing_becomes_available(
    hub: FakeHub, tmp_path: Path
) -> None:
    if not _can_mount_a_small_tmpfs():
        skip_or_fail("needs unprivileged user+mount namespaces (unshare) to mount a tiny tmpfs")
    hub.add_random_file(REPO, "big.gguf", 2_000_000)
    hub.add_random_file(REPO, "filling.gguf", 300_000)
    hub.rate_bps = 500_000
    small = tmp_path / "small"
    small.mkdir()
    command = [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
        'mount -t tmpfs -o size=512k tmpfs "$1" && exec "$2" -c "$3" "$1" "$4" "$5"',
        "sh",
        str(small),
        sys.executable,
        _FULL_DISK,
        f"{REPO}:big.gguf",
        f"{REPO}:filling.gguf",
    ]
    with trio.fail_after(20):
        done = await trio.run_process(command, capture_stdout=True, cwd=REPO_ROOT)
    result = json.loads(done.stdout)
    for case, file in (("big", "big.gguf"), ("filling", "filling.gguf")):
        outcome = result[case]
        assert outcome["error"]["code"] == "UNAVAILABLE", outcome
        assert f"no space left on device at {small}/models/" in outcome["error"]["message"]
        entry = next(e for e in outcome["entries"] if e["file"] == file)
        assert entry["status"] == "failed" and "no space left" in entry["error"]
        assert not any(f.endswith((f"/{file}", ".partial")) for f in outcome["files"]), outcome
    assert "removed the partial download (0 B)" in result["big"]["error"]["message"]
    assert "removed the partial download (0 B)" not in result["filling"]["error"]["message"]
