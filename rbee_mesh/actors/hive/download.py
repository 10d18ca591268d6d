"""Model downloads from a Hugging Face hub (or a compatible mirror) into a hive's catalog.

huggingface-hub does what is specific to the hub: the file listing of a repo with sizes and LFS
digests (`HfApi.model_info`), a file's metadata (`get_hf_file_metadata`: commit, size, ETag /
X-Linked-Etag), URLs (`hf_hub_url`, honouring the endpoint) and auth headers (`build_hf_headers`).
Those calls are synchronous, so they run in a thread under a deadline of our own.

The byte stream is ours, read with huggingface-hub's async client (httpx2, which runs natively on
trio), because `hf_hub_download` is synchronous (a thread trio cannot cancel), retries on its own
schedule (a silent hub holds it for minutes), writes into its own cache layout and reports
through tqdm. Here:

- a download resumes from its ``.partial`` file with an HTTP Range request, also after the hive
  was killed; the partial belongs to the entry's revision, size and sha256 (the URL is pinned to
  the commit, so the bytes at that URL never change);
- cancellation (the job cancelled) removes the partial and the entry; a crash leaves both for
  the next request to resume; a dropped connection, a silent hub or the job's deadline marks the
  entry failed and keeps the partial;
- the file is checked (size, and sha256 where the hub gives one) before it becomes available;
- progress is narrated, and emitted as DATA records, every `progress_interval_s`, stalls included.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TypeVar

import trio

# rbee-mesh sends no telemetry: without this, huggingface-hub's first request in a process also
# calls its home server to build a user agent. Read when huggingface-hub is imported (lazily).
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from rbee_mesh.actors.hive.catalog import (
    Catalog,
    ModelEntry,
    ModelStatus,
    model_id,
    parse_ref,
)
from rbee_mesh.actors.jobclient import ClientConfig, ClientJob, JobClient, running_client
from rbee_mesh.actors.narration import emit_record, narrate
from rbee_mesh.actors.runtime import SHUTDOWN_REASON
from rbee_mesh.actors.trust import Trust
from rbee_mesh.files import fsync_dir
from rbee_mesh.protocol import Actor, Chunk, Level, Message, ModelGet, ModelRead, outcome
from rbee_mesh.protocol.constants import MAX_CHUNK_BYTES
from rbee_mesh.protocol.errors import ErrorCode, MeshError
from rbee_mesh.transport import EndpointError
from rbee_mesh.units import human_bytes, human_duration

if TYPE_CHECKING:
    import httpx2

log = logging.getLogger("rbee_mesh.actors.hive.download")

T = TypeVar("T")

#: GGUF quantizations in the order a bare OWNER/REPO picks them: Q4_K_M is the usual balance of
#: size and quality, then better (Q5_K_M), older/simpler (Q4_0), near-lossless (Q8_0), unquantized.
QUANT_ORDER = ("Q4_K_M", "Q5_K_M", "Q4_0", "Q8_0", "F16")
_QUANT_PATTERNS = {
    # Bounded so that Q4_0 is not Q4_0_4_4, F16 is not BF16, Q4_K_M is not IQ4_K_M.
    quant: re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", re.IGNORECASE)
    for quant in QUANT_ORDER
}
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: A revision as a hub names one (a commit), or "local" for a file imported by hand.
_REVISION = re.compile(r"[0-9A-Za-z._-]{1,100}")
#: Bytes gathered before a write (in a worker thread): few thread hops, little lost on a crash.
_FLUSH_BYTES = 1 << 20
_HASH_CHUNK = 1 << 20
#: Progress rate is measured over this much recent history: responsive, yet not jumpy.
_RATE_WINDOW_S = 5.0
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


async def download_model(
    catalog: Catalog,
    ref: str,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    mesh: Mesh | None = None,
    use_hub: bool = True,
    meter: Callable[[int], None] | None = None,
    progress_interval_s: float = 1.0,
    connect_timeout_s: float = 10.0,
    idle_timeout_s: float = 30.0,
) -> ModelEntry:
    """Download `ref` (``OWNER/REPO[:FILE]``) into `catalog` and return its available entry.

    From the hives of `mesh` that hold it, in their order, where one does; else, or if each fails
    (with `use_hub`), from the hub, resuming from the bytes already here whatever their source;
    `meter` is told of the bytes as they arrive. Without FILE, a GGUF file is chosen in the order
    of `QUANT_ORDER` (by the hub; a hive of the mesh takes its one file of that repo). `endpoint`
    defaults to ``$HF_ENDPOINT``, read at each call, else huggingface.co; `token` defaults to the
    one huggingface-hub finds (``$HF_TOKEN`` or a saved login). The hub may not stay silent longer
    than `idle_timeout_s`; connecting for the transfer may take `connect_timeout_s`, and each
    metadata request at most `connect_timeout_s + idle_timeout_s` in all.

    Raises MeshError: INVALID_REQUEST for a malformed ref; NOT_FOUND when the hub has no such
    repo or file, or refuses access (or, without `use_hub`, no hive holds it); UNAVAILABLE when
    the hub fails, the connection drops, the file does not verify, or the disk is full; TIMEOUT
    when the hub is silent; CONFLICT when another job is downloading the same model.
    """
    repo, file = parse_ref(ref)
    if file is not None and (ready := _already_here(catalog, model_id(repo, file))) is not None:
        return ready
    hub = _Hub(
        endpoint=_hub_endpoint(endpoint),
        token=token,
        connect_timeout_s=connect_timeout_s,
        idle_timeout_s=idle_timeout_s,
    )
    remote, sources = None, list[_Source]()
    if mesh is not None and mesh.peers:
        remote, holders = await _locate_in_mesh(mesh, ref, connect_timeout_s + idle_timeout_s)
        sources += holders
    if remote is None:
        if not use_hub:
            raise MeshError(ErrorCode.NOT_FOUND, f"no hive of the mesh has {ref} to give")
        narrate("download", f"asking {hub.endpoint} about {repo}", target=ref)
        remote = await hub.locate(repo, file)
    if use_hub:
        sources.append(hub)
    with catalog.download_lock(remote.id):
        # Checked again under the lock: another job may have just finished the same model.
        if (ready := _already_here(catalog, remote.id)) is not None:
            return ready
        progress = _Progress(remote.id, remote.size, progress_interval_s, meter=meter)
        return await _download(catalog, sources, remote, progress)


def choose_gguf(files: Iterable[str]) -> tuple[str, str] | None:
    """Pick the GGUF file a bare OWNER/REPO means: (file, why), or None if there is none.

    The first quantization of `QUANT_ORDER` present wins (alphabetically first among its files),
    else the alphabetically first .gguf. Vision projectors (mmproj-*) are never picked: they
    accompany a model, they are not one.
    """
    ggufs = sorted(
        f
        for f in files
        if f.lower().endswith(".gguf") and not PurePosixPath(f).name.lower().startswith("mmproj")
    )
    if not ggufs:
        return None
    order = ", ".join(QUANT_ORDER)
    for quant, pattern in _QUANT_PATTERNS.items():
        matches = [f for f in ggufs if pattern.search(f)]
        if matches:
            why = f"{quant} is the first of {order} that the repo has"
            if len(matches) > 1:
                why += f"; first of {len(matches)} {quant} files"
            return matches[0], why
    return ggufs[0], f"none of {order} is there; first of {len(ggufs)} GGUF files alphabetically"


# ---- the hub -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RemoteFile:
    """A file of a hub repo, pinned to a commit (its bytes never change): as the hub lists it,
    or as a hive of the mesh that downloaded it from the hub holds it."""

    repo: str
    file: str
    revision: str
    size: int
    sha256: str | None

    @property
    def id(self) -> str:
        return model_id(self.repo, self.file)


def _hub_endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    # huggingface-hub reads HF_ENDPOINT once, when it is imported; read it at each call instead,
    # so that the environment of the moment counts (and tests can point at a local hub).
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


@dataclass(frozen=True)
class _Hub:
    endpoint: str
    token: str | None
    connect_timeout_s: float
    idle_timeout_s: float

    async def locate(self, repo: str, file: str | None) -> _RemoteFile:
        """Resolve (repo, file) to one file at the current commit, with its size and digest."""
        from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

        subject = f"model repo {repo}"
        # One call lists every file with its size and LFS sha256, and names the commit.
        info = await self._call(
            subject,
            partial(
                HfApi(endpoint=self.endpoint).model_info,
                repo,
                files_metadata=True,
                token=self.token,
                timeout=self.idle_timeout_s,
            ),
        )
        if not info.sha:
            raise MeshError(
                ErrorCode.UNAVAILABLE, f"{subject}: {self.name} did not say which commit it is at"
            )
        siblings = {s.rfilename: s for s in info.siblings or []}
        if file is None:
            choice = choose_gguf(siblings)
            if choice is None:
                raise MeshError(
                    ErrorCode.NOT_FOUND,
                    f"{repo} has no GGUF file at {info.sha[:12]}; it has: {_listing(siblings)}",
                )
            file, why = choice
            narrate("download", f"{repo}: chose {file} ({why})", target=model_id(repo, file))
        sibling = siblings.get(file)
        if sibling is None:
            raise MeshError(
                ErrorCode.NOT_FOUND,
                f"{repo} has no file {file} at {info.sha[:12]}; it has: {_listing(siblings)}",
            )
        url = hf_hub_url(repo, file, revision=info.sha, endpoint=self.endpoint)
        meta = await self._call(
            f"file {file} of {repo}",
            partial(
                get_hf_file_metadata,
                url,
                token=self.token,
                timeout=self.idle_timeout_s,
                endpoint=self.endpoint,
            ),
        )
        # For an LFS file the listing's LFS record is authoritative; the HEAD answer's ETag is
        # the same sha256 (X-Linked-Etag), and for a plain git file it is a git sha1 instead.
        if sibling.lfs is not None:
            size: int | None = sibling.lfs.size
            sha256: str | None = sibling.lfs.sha256
        else:
            size = meta.size if meta.size is not None else sibling.size
            sha256 = meta.etag if meta.etag and _SHA256.fullmatch(meta.etag) else None
        if size is None:
            raise MeshError(
                ErrorCode.UNAVAILABLE, f"{self.name} did not say how large {file} of {repo} is"
            )
        return _RemoteFile(repo, file, meta.commit_hash or info.sha, size, sha256)

    @property
    def name(self) -> str:
        return f"the hub at {self.endpoint}"

    async def stream(self, remote: _RemoteFile, sink: _PartialFile, progress: _Progress) -> None:
        """Append the rest of `remote` to `sink`, from the hub."""
        await _stream(self, remote, sink, progress)

    async def _call(self, subject: str, call: Callable[[], T]) -> T:
        """Run a blocking huggingface-hub call in a thread, under our own deadline.

        huggingface-hub takes one `timeout` (the idle timeout here) for each connect and each
        read, and does not retry these calls; a hub that trickles bytes could still hold one,
        so the whole call is bounded too. On cancellation or deadline the thread is abandoned;
        its own socket timeout ends it soon after.
        """
        budget = self.connect_timeout_s + self.idle_timeout_s
        with trio.move_on_after(budget):
            try:
                return await trio.to_thread.run_sync(call, abandon_on_cancel=True)
            except Exception as exc:
                raise self.error(subject, exc) from exc
        raise MeshError(
            ErrorCode.TIMEOUT, f"{subject}: {self.name} did not answer within {budget:g}s"
        )

    @asynccontextmanager
    async def open_stream(self, url: str, offset: int) -> AsyncIterator[httpx2.Response]:
        """GET `url` from byte `offset` on, as a stream (status not checked)."""
        import httpx2
        from huggingface_hub.utils import build_hf_headers, get_async_session

        # In a thread: it reads the saved token, and the first call in a process may fetch
        # huggingface-hub's "agent harness" registry for its user agent (3 s timeout).
        headers = await trio.to_thread.run_sync(partial(build_hf_headers, token=self.token))
        # A compressed body has no byte offsets to resume at (and some CDNs ignore Range then).
        headers["Accept-Encoding"] = "identity"
        if offset:
            headers["Range"] = f"bytes={offset}-"
        timeout = httpx2.Timeout(self.idle_timeout_s, connect=self.connect_timeout_s)
        # The client follows redirects (to a CDN) and drops the auth header when leaving the hub.
        async with (
            get_async_session() as client,
            client.stream("GET", url, headers=headers, timeout=timeout) as response,
        ):
            yield response

    def check_status(self, subject: str, response: httpx2.Response) -> None:
        """Raise the MeshError that an error status of the hub means."""
        from huggingface_hub import hf_raise_for_status

        try:
            hf_raise_for_status(response)
        except Exception as exc:
            raise self.error(subject, exc) from exc

    def error(self, subject: str, exc: BaseException, done: str = "") -> MeshError:
        """Translate a failure of huggingface-hub or httpx2 into a MeshError for a person.

        `done` says how far a transfer got, for errors in the middle of one.
        """
        import httpx2
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled

        if isinstance(exc, MeshError):
            return exc
        status: int | None = None
        if isinstance(exc, HfHubHTTPError | httpx2.HTTPStatusError):
            status = exc.response.status_code
        if status is not None:
            if status in (401, 403) or isinstance(exc, GatedRepoError):
                return MeshError(
                    ErrorCode.NOT_FOUND,
                    f"{subject}: {self.name} refused access (HTTP {status}); the repo does not "
                    "exist, or it is private or gated and needs a token with access (HF_TOKEN)",
                )
            if status == 404:
                return MeshError(ErrorCode.NOT_FOUND, f"{subject}: not found at {self.name}")
            return MeshError(
                ErrorCode.UNAVAILABLE,
                f"{subject}: {self.name} answered HTTP {status}; try again later",
            )
        if isinstance(exc, httpx2.UnsupportedProtocol | httpx2.InvalidURL):
            return MeshError(
                ErrorCode.UNAVAILABLE,
                f"{subject}: the hub endpoint {self.endpoint!r} is not "
                "an http(s) URL (check HF_ENDPOINT or the hive's hub endpoint)",
            )
        resume = f" after {done}; those bytes are kept, download again to resume" if done else ""
        if isinstance(exc, httpx2.ConnectTimeout):
            return MeshError(
                ErrorCode.TIMEOUT,
                f"{subject}: could not connect to {self.name} in time{resume}",
            )
        if isinstance(exc, httpx2.TimeoutException):
            return MeshError(
                ErrorCode.TIMEOUT,
                f"{subject}: {self.name} sent nothing for {self.idle_timeout_s:g}s{resume}",
            )
        if isinstance(exc, httpx2.ConnectError):
            return MeshError(
                ErrorCode.UNAVAILABLE, f"{subject}: cannot connect to {self.name}: {exc}"
            )
        if isinstance(exc, httpx2.TransportError):
            return MeshError(
                ErrorCode.UNAVAILABLE,
                f"{subject}: the connection to {self.name} dropped{resume} ({exc})",
            )
        if isinstance(exc, OfflineModeIsEnabled):
            return MeshError(
                ErrorCode.UNAVAILABLE,
                f"{subject}: HF_HUB_OFFLINE is set on this hive, so nothing can be downloaded",
            )
        if isinstance(exc, ValueError | KeyError | TypeError):
            # A server that is not a hub (a captive portal, a wrong HF_ENDPOINT) lands here.
            return MeshError(
                ErrorCode.UNAVAILABLE,
                f"{subject}: {self.name} did not answer like a Hugging Face hub "
                f"({type(exc).__name__}: {exc})",
            )
        return MeshError(
            ErrorCode.INTERNAL, f"{subject}: unexpected {type(exc).__name__} from the hub: {exc}"
        )


def _listing(siblings: Iterable[str]) -> str:
    names = sorted(siblings)
    if not names:
        return "no files"
    return ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")


# ---- the mesh ----------------------------------------------------------------------------------


class _Source(Protocol):
    """Where a model's bytes come from: the hub, or a hive of the mesh that holds the model."""

    @property
    def name(self) -> str: ...

    async def stream(self, remote: _RemoteFile, sink: _PartialFile, progress: _Progress) -> None:
        """Append the rest of `remote` (from `sink.size` on) to `sink`; MeshError if it fails."""


@dataclass(frozen=True)
class MeshPeer:
    """A hive of the mesh that holds a model, as a queen names it (operations.MESH_SOURCE:
    "NAME tcp://HOST:PORT KEY", checked when the frame was read)."""

    hive: str
    endpoint: str
    key: str

    @classmethod
    def parse(cls, text: str) -> MeshPeer:
        hive, endpoint, key = text.split(" ")
        return cls(hive, endpoint, key)


@dataclass(frozen=True)
class Mesh:
    """The hives to take a model from, in order, and who this hive is to them; how long one
    may send nothing before it counts as failed."""

    peers: tuple[MeshPeer, ...]
    trust: Trust
    hive_id: str
    idle_timeout_s: float = 30.0


#: `model_read` jobs a fetching hive keeps in flight to one holder, and the bytes each asks
#: for: the credit of the transfer (docs/sharing.md). The holder never has more than
#: READS_IN_FLIGHT * READ_BYTES of it unsent, however slow this hive writes.
READS_IN_FLIGHT = 4
READ_BYTES = 4 * MAX_CHUNK_BYTES


async def _locate_in_mesh(
    mesh: Mesh, ref: str, timeout_s: float
) -> tuple[_RemoteFile | None, list[_Source]]:
    """The file `ref` names, as the first peer that holds it whole (with a sha256) says, and
    the peers that hold that same file; (None, []) where none does."""
    remote: _RemoteFile | None = None
    holders: list[_Source] = []
    for peer in mesh.peers:
        source = _PeerSource(peer, mesh)
        try:
            with trio.fail_after(timeout_s):
                async with source.client() as client:
                    job = await client.submit(ModelGet(model=ref))
                    found = _remote_file(outcome(await job.end(), source.name), ref)
        except trio.TooSlowError:
            narrate("download", f"{source.name} did not say within {timeout_s:g}s whether it "
                    f"has {ref}", level=Level.WARN)  # fmt: skip
            continue
        except MeshError as exc:
            narrate("download", f"{source.name}: {exc.message}", level=Level.WARN)
            continue
        if remote is None:
            remote = found
            narrate("download", f"{source.name} holds {found.id} ({human_bytes(found.size)}, "
                    f"revision {found.revision[:12]})", target=found.id)  # fmt: skip
        if found == remote:
            holders.append(source)
        else:
            narrate("download", f"{source.name} holds another revision of {found.id}",
                    level=Level.WARN)  # fmt: skip
    return remote, holders


def _remote_file(record: Any, ref: str) -> _RemoteFile:
    """The file a peer's catalog entry describes, if it is whole, has a sha256, and is what
    `ref` names; MeshError otherwise. (What a peer says is checked as any frame is.)"""
    if not isinstance(record, dict):
        raise MeshError(ErrorCode.UNAVAILABLE, "it answered model_get with no entry")
    id_, size, revision = record.get("id"), record.get("size"), record.get("revision")
    sha256, status = record.get("sha256"), record.get("status")
    if not (isinstance(id_, str) and isinstance(size, int) and isinstance(revision, str)):
        raise MeshError(ErrorCode.UNAVAILABLE, "its catalog entry lacks an id, size or revision")
    repo, file = parse_ref(id_)
    asked_repo, asked_file = parse_ref(ref)
    if file is None or repo != asked_repo or asked_file not in (None, file):
        raise MeshError(ErrorCode.UNAVAILABLE, f"it answered with {id_}, not {ref}")
    if status != str(ModelStatus.AVAILABLE):
        raise MeshError(ErrorCode.UNAVAILABLE, f"its copy of {id_} is {status}, not whole")
    if not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
        raise MeshError(ErrorCode.UNAVAILABLE, f"its copy of {id_} has no sha256 to check it by")
    if size < 0 or not _REVISION.fullmatch(revision):
        raise MeshError(ErrorCode.UNAVAILABLE, f"its entry of {id_} has a size or revision "
                        "that no hub gives")  # fmt: skip
    return _RemoteFile(repo, file, revision, size, sha256)


class _PeerSource:
    """A hive of the mesh that holds the model, as a source of its bytes."""

    def __init__(self, peer: MeshPeer, mesh: Mesh) -> None:
        self.peer, self.mesh = peer, mesh
        self.name = f"hive {peer.hive}"

    @asynccontextmanager
    async def client(self) -> AsyncIterator[JobClient]:
        """A connection to the peer, as this hive (its key, pinning the peer's)."""
        async with AsyncExitStack() as stack:
            try:
                client = JobClient(
                    self.peer.endpoint,
                    name=self.mesh.hive_id,
                    role=Actor.HIVE,
                    server=self.name,
                    lost_code=ErrorCode.HIVE_LOST,
                    # A read's frames, and a few more: what it asked for, no more, is buffered.
                    config=ClientConfig(job_buffer=READ_BYTES // MAX_CHUNK_BYTES + 4),
                    keys=self.mesh.trust.client_keys(self.peer.key),
                )
                await stack.enter_async_context(running_client(client))
            except EndpointError as exc:
                raise MeshError(ErrorCode.UNAVAILABLE, f"cannot reach {self.name}: {exc}") from None
            yield client

    async def stream(self, remote: _RemoteFile, sink: _PartialFile, progress: _Progress) -> None:
        """`model_read` jobs, READS_IN_FLIGHT at a time, their CHUNKs written in order: a
        new read is asked for only once the oldest one's bytes are on disk. Bytes other than
        those asked for, or none for `idle_timeout_s`, fail it (MeshError)."""
        async with self.client() as client:
            reads: deque[tuple[int, int, ClientJob]] = deque()
            asked = sink.size
            while asked < remote.size or reads:
                while asked < remote.size and len(reads) < READS_IN_FLIGHT:
                    length = min(READ_BYTES, remote.size - asked)
                    op = ModelRead(model=remote.id, offset=asked, length=length)
                    reads.append((asked, length, await client.submit(op)))
                    asked += length
                offset, length, job = reads.popleft()
                while (message := await self._next(job)) is not None:
                    if isinstance(message, Chunk):
                        end = message.offset + len(message.data)
                        if message.offset != sink.size or end > offset + length:
                            raise MeshError(ErrorCode.UNAVAILABLE, f"{self.name} sent bytes "
                                            f"{message.offset}-{end}, not from {sink.size} "
                                            f"up to {offset + length}")  # fmt: skip
                        await trio.to_thread.run_sync(sink.write, message.data)
                        progress.update(sink.size)
                outcome(await job.end(), self.name)
                if sink.size != offset + length:
                    got = sink.size - offset
                    raise MeshError(
                        ErrorCode.UNAVAILABLE, f"{self.name} sent {got} of the {length} bytes asked"
                    )

    async def _next(self, job: ClientJob) -> Message | None:
        """The job's next frame (None after its last), or TIMEOUT if none comes in time."""
        with trio.move_on_after(self.mesh.idle_timeout_s):
            try:
                return await job.__anext__()
            except StopAsyncIteration:
                return None
        raise MeshError(
            ErrorCode.TIMEOUT, f"{self.name} sent nothing for {self.mesh.idle_timeout_s:g}s"
        )


# ---- one download ------------------------------------------------------------------------------


def _already_here(catalog: Catalog, id_: str) -> ModelEntry | None:
    entry = catalog.lookup(id_)
    if entry is None or entry.status is not ModelStatus.AVAILABLE:
        return None
    try:
        on_disk = entry.path.stat().st_size
    except OSError:
        return None
    if on_disk != entry.size:
        return None
    narrate(
        "download",
        f"{entry.id} is already here ({human_bytes(entry.size)}, revision {entry.revision[:12]})",
        target=entry.id,
    )
    return entry


#: Files up to this size are imported without progress reports (they take well under a second).
_QUIET_IMPORT_BYTES = 64 * 1024 * 1024


async def import_model(
    catalog: Catalog, source: Path, repo: str, file: str, *, progress_interval_s: float = 1.0
) -> ModelEntry:
    """Copy the GGUF file `source` into `catalog` as `repo:file`, hashed on the way, with
    progress for a large file; the entry appears only once the copy is whole.

    Raises MeshError: NOT_FOUND (no such file), INVALID_REQUEST (not GGUF, truncated or
    corrupt: nothing is added), CONFLICT (the catalog has that model already), UNAVAILABLE (it
    cannot be read, or the disk is full: nothing is left behind). Cancelling stops the copy and
    removes what it wrote.
    """
    id_ = model_id(repo, file)
    existing = catalog.lookup(id_)
    if existing is not None and existing.status is ModelStatus.AVAILABLE:
        raise MeshError(ErrorCode.CONFLICT, f"the catalog has {id_} already; --name another")
    facts, size = await trio.to_thread.run_sync(_inspect, source)  # refuses what is not GGUF
    narrate(
        "import",
        f"{source} is a {facts['architecture']} model ({facts['quantization'] or 'unknown'} "
        f"quantization, {facts['parameters']:,} parameters): copying {human_bytes(size)} "
        f"into the catalog as {id_}",
        target=id_,
    )
    report = _Progress(id_, size, progress_interval_s, action="import")
    report.start(0)
    stopped = threading.Event()

    def copied(done: int) -> None:
        report.update(done)
        if stopped.is_set():
            raise _Stopped

    def copy() -> ModelEntry:
        return catalog.add_file(repo, file, source, gguf=facts, progress=copied)

    made: list[ModelEntry] = []

    async def work() -> None:
        try:
            # Abandoned on cancel: the thread stops at its next chunk (`stopped`) and removes
            # what it wrote, while the job ends at once.
            made.append(await trio.to_thread.run_sync(copy, abandon_on_cancel=True))
        except OSError as exc:
            full = exc.errno in _NO_SPACE
            why = "no space left on device" if full else f"cannot copy it: {exc.strerror or exc}"
            raise MeshError(ErrorCode.UNAVAILABLE, f"{source}: {why}; nothing was added") from None

    try:
        if size <= _QUIET_IMPORT_BYTES:
            await work()
        else:
            await _with_progress(report, work)
    except trio.Cancelled:
        stopped.set()
        raise
    [entry] = made
    narrate("import", f"{id_}: available, sha256 {entry.sha256}", target=id_)
    return entry


def _inspect(source: Path) -> tuple[dict[str, Any], int]:
    """The facts of the GGUF file `source` and its size; NOT_FOUND, or INVALID_REQUEST."""
    if not source.is_file():
        raise MeshError(ErrorCode.NOT_FOUND, f"no file {source}")
    return _model_facts(source), source.stat().st_size


def _model_facts(path: Path) -> dict[str, Any]:
    """`gguf_file.model_facts`, imported when a file is first read: gguf and numpy take 0.1 s
    to import, which nothing that merely imports the hive (the command line) should pay."""
    from rbee_mesh.inference.gguf_file import model_facts

    return model_facts(path)


class _Stopped(Exception):
    """An import was cancelled: raised in the copying thread to stop it."""


def _facts_or_none(path: Path) -> dict[str, Any] | None:
    try:
        return _model_facts(path)
    except MeshError as exc:
        log.warning("%s", exc.message)
        return None


class _BadFile(Exception):
    """The downloaded bytes are not the file the hub announced; they must not be resumed from."""


async def _download(
    catalog: Catalog, sources: Sequence[_Source], remote: _RemoteFile, progress: _Progress
) -> ModelEntry:
    previous = catalog.lookup(remote.id)
    now = time.time()
    entry = ModelEntry(
        id=remote.id,
        repo=remote.repo,
        file=remote.file,
        revision=remote.revision,
        size=remote.size,
        sha256=remote.sha256,
        status=ModelStatus.DOWNLOADING,
        error=None,
        added=previous.added if previous else now,
        last_used=previous.last_used if previous else now,
        path=catalog.model_path(remote.repo, remote.file),
    )
    partial_path = catalog.partial_path(remote.repo, remote.file)
    sink = _PartialFile(partial_path, hash_it=remote.sha256 is not None)
    # Catalog writes fsync, which can wait for a busy disk: they run in threads, not in the loop.
    try:
        same = previous is not None and (previous.revision, previous.size, previous.sha256) == (
            remote.revision,
            remote.size,
            remote.sha256,
        )
        if not same and partial_path.exists():
            narrate(
                "download",
                f"{remote.id}: the partial download is not of the hub's current file "
                f"(revision {remote.revision[:12]}); starting over",
            )
            await trio.to_thread.run_sync(_remove, partial_path)
        await trio.to_thread.run_sync(catalog.put, entry)
        await _fetch(sources, remote, sink, progress)
        await trio.to_thread.run_sync(_publish, partial_path, entry.path)
        facts = await trio.to_thread.run_sync(_facts_or_none, entry.path)
        done = replace(entry, status=ModelStatus.AVAILABLE, gguf=facts)
        await trio.to_thread.run_sync(catalog.put, done)
    except trio.Cancelled as exc:
        sink.close()
        with trio.CancelScope(shield=True):
            if exc.source == "deadline" or exc.reason == SHUTDOWN_REASON:
                # The job ran out of time, or the hive is stopping: not a person changing their
                # mind. Like a dropped connection, it keeps the bytes for the next request.
                got = f"{human_bytes(sink.size)} of {human_bytes(remote.size)}"
                timed_out = exc.source == "deadline"
                why = "the job's deadline passed" if timed_out else "the hive stopped"
                await _record_failure(
                    catalog, entry, f"{why} after {got}; download again to resume"
                )
            else:
                # Cancelled: leave nothing behind. (A crash never gets here: it leaves the
                # partial for the next request to resume from.)
                await trio.to_thread.run_sync(catalog.discard, remote.id)
                narrate(
                    "download",
                    f"{remote.id}: cancelled; removed its partial download",
                    level=Level.WARN,
                )
        raise
    except _BadFile as exc:
        sink.close()
        await trio.to_thread.run_sync(_remove, partial_path)
        message = f"{exc}; removed the bad file, download again to retry"
        await _record_failure(catalog, entry, message)
        raise MeshError(ErrorCode.UNAVAILABLE, message) from None
    except OSError as exc:
        sink.close()
        if exc.errno in _NO_SPACE:
            kept = await trio.to_thread.run_sync(_remove, partial_path)
            message = (
                f"no space left on device at {partial_path.parent}: {remote.file} needs "
                f"{human_bytes(remote.size)}, {human_bytes(_free(partial_path.parent))} is free; "
                f"removed the partial download ({human_bytes(kept)}) to give the space back"
            )
        else:
            message = f"cannot write {exc.filename or partial_path}: {exc.strerror or exc}"
        await _record_failure(catalog, entry, message)
        raise MeshError(ErrorCode.UNAVAILABLE, message) from None
    except MeshError as exc:
        sink.close()
        await _record_failure(catalog, entry, exc.message)
        raise
    except Exception as exc:
        sink.close()
        await _record_failure(catalog, entry, f"{type(exc).__name__}: {exc}")
        raise
    narrate("download", f"{done.id} is available ({human_bytes(done.size)})", target=done.id)
    return done


async def _fetch(
    sources: Sequence[_Source], remote: _RemoteFile, sink: _PartialFile, progress: _Progress
) -> None:
    """Bring the partial file to the full, verified file (not yet published): from the first
    of `sources`, and from the next where one fails, from the bytes it left (or, where what it
    gave does not verify, from the start)."""
    offset = await trio.to_thread.run_sync(sink.open, remote.size)
    if offset and sink.hasher is not None:
        narrate("download", f"{remote.id}: checking the {human_bytes(offset)} already downloaded")
        await trio.to_thread.run_sync(sink.hash_existing)
    if remote.size - offset > _free(sink.path.parent):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(sink.path.parent))
    left = deque(sources)
    again = True  # the last source, once more from the start, if another's bytes spoilt it
    while left:
        source = left.popleft()
        following = left[0] if left else None
        started_at = sink.size
        verb = f"resuming at {human_bytes(sink.size)} of" if sink.size else "downloading"
        narrate("download", f"{remote.id}: {verb} {human_bytes(remote.size)} from {source.name}")
        progress.start(sink.size, source.name)
        try:
            if sink.size < remote.size:
                await _with_progress(progress, partial(source.stream, remote, sink, progress))
            progress.report()
            _verify(remote, sink, source)
            break
        except _BadFile as exc:
            if following is None and not (again and started_at):
                raise
            if following is None:  # the bytes before `started_at` were another source's
                again, following = False, source
                left.appendleft(source)
            narrate("download", f"{exc}; discarding those bytes, and taking {remote.id} "
                    f"from {following.name}, from the start", level=Level.WARN)  # fmt: skip
            await trio.to_thread.run_sync(sink.truncate)
        except MeshError as exc:
            if following is None:
                raise
            got = f" after {human_bytes(sink.size)}" if sink.size else ""
            narrate("download", f"{source.name} failed{got} ({exc.message}); going on from "
                    f"{following.name}", level=Level.WARN)  # fmt: skip
    await trio.to_thread.run_sync(sink.finish)
    checked = "size and sha256" if remote.sha256 else "size (the hub gave no sha256)"
    narrate("download", f"{remote.id}: verified {checked}")


def _verify(remote: _RemoteFile, sink: _PartialFile, source: _Source) -> None:
    """Raise _BadFile unless `sink` holds `remote`, as far as its size and sha256 tell."""
    if sink.size != remote.size:
        raise _BadFile(
            f"{remote.file}: received {sink.size} bytes from {source.name}, expected {remote.size}"
        )
    if sink.hasher is not None and sink.hasher.hexdigest() != remote.sha256:
        raise _BadFile(
            f"{remote.file}: the bytes from {source.name} have sha256 {sink.hasher.hexdigest()}, "
            f"not {remote.sha256}"
        )


async def _stream(hub: _Hub, remote: _RemoteFile, sink: _PartialFile, progress: _Progress) -> None:
    import httpx2
    from huggingface_hub import hf_hub_url

    subject = f"file {remote.file} of {remote.repo}"
    offset = sink.size
    url = hf_hub_url(remote.repo, remote.file, revision=remote.revision, endpoint=hub.endpoint)
    try:
        async with hub.open_stream(url, offset) as response:
            if offset and response.status_code == 416:
                # The hub's metadata and its bytes disagree; resuming cannot be trusted.
                raise _BadFile(f"{subject}: the hub cannot serve bytes {offset}- of it")
            hub.check_status(subject, response)
            if offset and response.status_code != 206:
                # The hub (or a proxy) ignored Range and sends the whole file: take it.
                narrate("download", f"{remote.id}: the hub ignored the resume; starting over")
                await _restart(sink, progress)
            elif offset:
                _check_range(subject, response, offset, remote.size)
            _check_length(response, sink.size, remote)
            await _copy(response, sink, progress)
    except httpx2.HTTPError as exc:
        done = f"{human_bytes(sink.size)} of {human_bytes(remote.size)}" if sink.size else ""
        raise hub.error(subject, exc, done=done) from exc


def _check_range(subject: str, response: httpx2.Response, offset: int, size: int) -> None:
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", ""))
    if match is None or int(match[1]) != offset or match[3] not in ("*", str(size)):
        raise _BadFile(
            f"{subject}: asked the hub for bytes {offset}- of {size} and got "
            f"{response.headers.get('Content-Range')!r}"
        )


def _check_length(response: httpx2.Response, offset: int, remote: _RemoteFile) -> None:
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    if encoding != "identity":
        raise MeshError(
            ErrorCode.UNAVAILABLE,
            f"{remote.file}: the hub sent it {encoding}-encoded although asked not to",
        )
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit() and offset + int(length) != remote.size:
        raise _BadFile(
            f"{remote.file}: the hub serves {offset + int(length)} bytes, "
            f"but announced {remote.size}"
        )


async def _restart(sink: _PartialFile, progress: _Progress) -> None:
    await trio.to_thread.run_sync(sink.truncate)
    progress.start(0)


async def _copy(response: httpx2.Response, sink: _PartialFile, progress: _Progress) -> None:
    """Append the body to the partial file, in batches written by a worker thread."""
    import httpx2

    buffer = bytearray()
    last_write = trio.current_time()

    async def write() -> None:
        nonlocal last_write
        data = bytes(buffer)
        buffer.clear()
        last_write = trio.current_time()
        if data:
            await trio.to_thread.run_sync(sink.write, data)
            progress.update(sink.size)

    try:
        async for chunk in response.aiter_raw():
            buffer += chunk
            # By time too, so a slow hub's bytes reach the disk (and the progress) steadily.
            if (
                len(buffer) >= _FLUSH_BYTES
                or trio.current_time() - last_write >= progress.interval_s
            ):
                await write()
    except httpx2.HTTPError:
        await write()  # what arrived is good: keep it for the resume
        raise
    await write()


# ---- the partial file --------------------------------------------------------------------------


class _PartialFile:
    """The bytes downloaded so far, and their running sha256. Blocking: call from a thread."""

    def __init__(self, path: Path, *, hash_it: bool) -> None:
        self.path = path
        self.hasher: hashlib._Hash | None = hashlib.sha256() if hash_it else None
        self.size = 0
        self._file: BinaryIO | None = None

    def open(self, expected: int) -> int:
        """Open for appending; returns how many bytes are already there (0 if unusable)."""
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed by close()/finish()
        self.size = os.fstat(self._file.fileno()).st_size
        if self.size > expected:
            self.truncate()
        return self.size

    def hash_existing(self) -> None:
        """Feed the bytes already on disk to the hasher (after a restart of the download)."""
        if self.hasher is None:
            return
        with open(self.path, "rb") as f:
            left = self.size
            while left:
                trio.from_thread.check_cancelled()
                chunk = f.read(min(_HASH_CHUNK, left))
                if not chunk:
                    raise _BadFile(f"{self.path} shrank while being read")
                self.hasher.update(chunk)
                left -= len(chunk)

    def truncate(self) -> None:
        assert self._file is not None
        self._file.truncate(0)
        self.size = 0
        if self.hasher is not None:
            self.hasher = hashlib.sha256()

    def write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        # Flushed at once: what the kernel has survives the hive being killed.
        self._file.flush()
        self.size += len(data)
        if self.hasher is not None:
            self.hasher.update(data)

    def finish(self) -> None:
        """Make the bytes durable before the file is published."""
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self.close()

    def close(self) -> None:
        if self._file is not None:
            with suppress(OSError):
                self._file.close()
            self._file = None


def _publish(partial_path: Path, final: Path) -> None:
    os.replace(partial_path, final)
    fsync_dir(final.parent)


def _remove(path: Path) -> int:
    """Remove `path` if it exists; returns how many bytes it held."""
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


def _free(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 0


async def _record_failure(catalog: Catalog, entry: ModelEntry, message: str) -> None:
    try:
        failed = replace(entry, status=ModelStatus.FAILED, error=message)
        await trio.to_thread.run_sync(catalog.put, failed)
    except (OSError, MeshError) as exc:
        # The disk may be full or gone; the entry then stays `downloading`, which the next
        # download (or Catalog.mark_interrupted at start) handles the same way.
        log.warning("could not record the failure of %s: %s", entry.id, exc)


# ---- progress ----------------------------------------------------------------------------------


@dataclass
class _Progress:
    """Narrates and emits the progress of one download, every interval, stalls included; tells
    `meter` of the bytes as they come."""

    model: str
    total: int
    interval_s: float
    action: str = "download"
    meter: Callable[[int], None] | None = None
    #: Bytes so far, and where they come from now.
    done: int = 0
    source: str = ""
    _started_at: int = 0
    _samples: deque[tuple[float, int]] = field(default_factory=deque)

    def start(self, done: int, source: str = "") -> None:
        """(Again) from `done` bytes, taken from `source` (what the reports name, if anything)."""
        self.source = source
        self.done = self._started_at = done
        self._samples.clear()
        self._samples.append((trio.current_time(), done))

    def update(self, done: int) -> None:
        if self.meter is not None and done > self.done:
            self.meter(done - self.done)
        self.done = done

    def report(self) -> None:
        now = trio.current_time()
        while len(self._samples) > 1 and now - self._samples[1][0] >= _RATE_WINDOW_S:
            self._samples.popleft()
        then, done_then = self._samples[0] if self._samples else (now, self.done)
        rate = (self.done - done_then) / (now - then) if now > then else 0.0
        self._samples.append((now, self.done))
        left = self.total - self.done
        eta = 0.0 if left <= 0 else (left / rate if rate > 0 else None)
        percent = 100.0 * self.done / self.total if self.total else 100.0
        if left <= 0:
            eta_text = "done"
        elif eta is not None:
            eta_text = f"ETA {human_duration(eta)}"
        else:
            eta_text = "stalled" if self.done > self._started_at else "waiting for the first bytes"
        source = f" from {self.source}" if self.source else ""
        narrate(
            self.action,
            f"{self.model}: {human_bytes(self.done)} of {human_bytes(self.total)} "
            f"({percent:.1f}%){source}, {human_bytes(rate)}/s, {eta_text}",
            target=self.model,
        )
        emit_record(
            {
                "kind": "progress",
                "model": self.model,
                "bytes": self.done,
                "total": self.total,
                "rate_bps": round(rate, 1),
                "eta_s": None if eta is None else round(eta, 1),
                "source": self.source or None,
            }
        )

    async def run(self, stop: trio.Event) -> None:
        """Report every interval until `stop` is set."""
        while True:
            with trio.move_on_after(self.interval_s):
                await stop.wait()
            if stop.is_set():
                return
            self.report()


async def _with_progress(progress: _Progress, work: Callable[[], Awaitable[None]]) -> None:
    """Run `work` while `progress` reports; its exception comes out as itself, not in a group."""
    stop = trio.Event()
    with _single_exception():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(progress.run, stop)
            try:
                await work()
            finally:
                stop.set()


@contextmanager
def _single_exception() -> Iterator[None]:
    # The nursery wraps even one exception in a group (strict exception groups); the callers
    # handle Cancelled, MeshError and OSError by type. Cancellation wins: if the job was
    # cancelled, both tasks raise Cancelled and it must be handled as a cancellation.
    try:
        yield
    except BaseExceptionGroup as group:
        cancelled, rest = group.split(trio.Cancelled)
        leaves = _leaves(cancelled) if cancelled is not None else _leaves(rest)
        if len(leaves) == 1 or cancelled is not None:
            raise leaves[0] from None
        raise


def _leaves(exc: BaseException | None) -> list[BaseException]:
    if exc is None:
        return []
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
