"""The model catalog of one hive: which models it holds on disk, and in what state.

Layout, under the root the hive gives (``<state>/hive/models``)::

    OWNER--REPO--FILE/          one directory per model, named by a readable slug of its id
        model.json              the entry (schema below), replaced atomically on every change
        FILE                    the model file, present once the entry is available
        FILE.partial            the bytes of an unfinished download (see download.py)
    .OWNER--REPO--FILE.lock     held (flock) while that model is being downloaded
    .deleting-*                 a deleted entry on its way out (renamed first, then removed)

Why so: one directory per model makes delete one rename and makes a half-written entry affect
only itself; readers never see a half-written ``model.json`` because every write goes to a
temporary file that is fsynced and renamed over it. A corrupt, unreadable or schema-invalid
``model.json`` is reported as a `CatalogProblem` and skipped, never raised: the hive lists every
healthy model even when one directory is broken.

Everything here is synchronous and fast (small files, no hashing): the hive calls it directly.
The listing is kept in memory between changes made through this object (`listing`), so that a
heartbeat every second reads nothing from disk; `entries` reads the disk afresh.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any

from rbee_mesh.files import fsync_dir, write_atomic
from rbee_mesh.protocol.errors import ErrorCode, MeshError

SCHEMA_VERSION = 1
METADATA_NAME = "model.json"
PARTIAL_SUFFIX = ".partial"
#: A model.json is a few hundred bytes; anything far larger is not one (and is not read whole).
MAX_METADATA_BYTES = 64 * 1024
#: Room for the slug inside NAME_MAX (255) with the lock-file prefix and suffix around it.
MAX_SLUG_LEN = 200

# Hugging Face repo ids: letters, digits, `.`, `_`, `-`; no `--` or `..` (the hub refuses them
# too), which keeps the `--` separators of the slug unambiguous.
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_FILE_PART = re.compile(r"[A-Za-z0-9._+@=-]{1,200}")
_TRASH_PREFIX = ".deleting-"


class ModelStatus(StrEnum):
    """Where a model is in its life on this hive."""

    #: Its file is coming (`size` is the expected length).
    DOWNLOADING = "downloading"
    #: Its file is whole: workers may load it.
    AVAILABLE = "available"
    #: Its download failed (`error` says why); downloading it again resumes or retries.
    FAILED = "failed"
    #: The file is whole, but no backend here loads it (`error` says why). Jobs do not try it
    #: again (nor download it again); an explicit `worker spawn` does.
    UNLOADABLE = "unloadable"


@dataclass(frozen=True)
class ModelEntry:
    """One model of the catalog.

    `id` is the canonical reference ``OWNER/REPO:FILE``; `revision` the commit the file came
    from; `size` its length in bytes (the expected length while downloading); `sha256` its
    digest when the hub gave one; `error` the reason when `status` is failed; `added` and
    `last_used` are epoch seconds; `path` is where the model file is (or will be).
    """

    id: str
    repo: str
    file: str
    revision: str
    size: int
    sha256: str | None
    status: ModelStatus
    error: str | None
    added: float
    last_used: float
    path: Path
    #: What the GGUF file says of the model (`gguf_file.model_facts`), read once when it came.
    gguf: dict[str, Any] | None = None

    def to_record(self) -> dict[str, Any]:
        """The entry as a plain map (msgpack and JSON friendly), for job results."""
        return {
            "id": self.id,
            "repo": self.repo,
            "file": self.file,
            "revision": self.revision,
            "size": self.size,
            "sha256": self.sha256,
            "status": str(self.status),
            "error": self.error,
            "added": self.added,
            "last_used": self.last_used,
            "path": str(self.path),
            "gguf": self.gguf,
        }

    def _to_json(self) -> dict[str, Any]:
        record = self.to_record()
        # The path is derived from where the entry lives; storing it would let the two disagree.
        del record["path"]
        return {"schema": SCHEMA_VERSION, **record}


@dataclass(frozen=True)
class CatalogProblem:
    """A catalog directory that could not be read as an entry, and why."""

    dir: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.dir}: {self.reason}"


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split ``OWNER/REPO[:FILE]`` into (repo, file), refusing anything unsafe as a path.

    Raises MeshError INVALID_REQUEST naming what is wrong: ids become directory names, so ``..``,
    absolute paths, backslashes and control characters never get that far.
    """
    repo, sep, file = ref.partition(":")
    owner, slash, name = repo.partition("/")
    if not slash or not _valid_name(owner) or not _valid_name(name):
        raise MeshError(
            ErrorCode.INVALID_REQUEST,
            f"model {ref!r} is not OWNER/REPO[:FILE] (OWNER and REPO: letters, digits, '.', '_', "
            "'-', no '--' or '..')",
        )
    if not sep:
        return repo, None
    parts = file.split("/")
    if not all(_FILE_PART.fullmatch(p) and p not in (".", "..") for p in parts):
        raise MeshError(
            ErrorCode.INVALID_REQUEST,
            f"model {ref!r}: FILE must be a relative path in the repo (letters, digits, "
            "'._+@=-', folders separated by '/', no '..')",
        )
    if len(_slug(repo, file)) > MAX_SLUG_LEN:
        raise MeshError(ErrorCode.INVALID_REQUEST, f"model {ref!r} is too long")
    return repo, file


def model_id(repo: str, file: str) -> str:
    """The canonical id of FILE in REPO: ``OWNER/REPO:FILE``."""
    return f"{repo}:{file}"


def _valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and "--" not in name and ".." not in name


def _slug(repo: str, file: str) -> str:
    return "--".join([*repo.split("/"), *file.split("/")])


def _split_id(id_: str) -> tuple[str, str]:
    repo, file = parse_ref(id_)
    if file is None:
        raise MeshError(ErrorCode.INVALID_REQUEST, f"{id_!r} is not a model id (OWNER/REPO:FILE)")
    return repo, file


@dataclass(frozen=True)
class Listing:
    """The catalog at one moment: its entries, the directories that are not entries, and a
    digest of what a queen schedules by (id, status and size of each entry), which changes
    whenever any of that does."""

    entries: list[ModelEntry]
    problems: list[CatalogProblem]

    @functools.cached_property
    def digest(self) -> str:
        text = "\n".join(f"{e.id} {e.status} {e.size}" for e in self.entries)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Catalog:
    """The models of one hive, on disk under `root` (created if missing)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        # A delete that crashed after its rename left a tombstone: finish it.
        for leftover in root.glob(f"{_TRASH_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        #: The last listing read from disk; None once something here changed the catalog.
        #: (Replaced whole, never changed in place: downloads write from threads.)
        self._listing: Listing | None = None

    # ---- paths ---------------------------------------------------------------------------------

    def entry_dir(self, repo: str, file: str) -> Path:
        """The directory that holds the entry of FILE in REPO."""
        return self.root / _slug(repo, file)

    def model_path(self, repo: str, file: str) -> Path:
        """Where the model file of FILE in REPO lives once available."""
        return self.entry_dir(repo, file) / PurePosixPath(file).name

    def partial_path(self, repo: str, file: str) -> Path:
        """Where the bytes of an unfinished download of FILE in REPO are kept for resuming."""
        path = self.model_path(repo, file)
        return path.with_name(path.name + PARTIAL_SUFFIX)

    # ---- reading -------------------------------------------------------------------------------

    def entries(self) -> tuple[list[ModelEntry], list[CatalogProblem]]:
        """Every readable entry (sorted by id), and every directory that is not one, with why,
        read from disk now.

        Never raises for a broken entry; only an unreadable root raises (OSError).
        """
        listing = self._scan()
        return listing.entries, listing.problems

    def listing(self) -> Listing:
        """The catalog as last read, read again only if it was changed through this object
        since (or another process changed it and `entries` has been called since)."""
        listing = self._listing
        return listing if listing is not None else self._scan()

    def _scan(self) -> Listing:
        entries: list[ModelEntry] = []
        problems: list[CatalogProblem] = []
        for child in sorted(self.root.iterdir()):
            if child.name.startswith(".") or not child.is_dir():
                continue
            try:
                entries.append(self._read(child))
            except _Corrupt as exc:
                problems.append(CatalogProblem(child, str(exc)))
        entries.sort(key=lambda e: e.id)
        listing = Listing(entries, problems)
        self._listing = listing
        return listing

    def lookup(self, id_: str) -> ModelEntry | None:
        """The entry with exactly this id, or None if there is none (or it is unreadable)."""
        repo, file = _split_id(id_)
        directory = self.entry_dir(repo, file)
        if not directory.is_dir():
            return None
        try:
            entry = self._read(directory)
        except _Corrupt:
            return None
        return entry if entry.id == id_ else None

    def get(self, ref: str) -> ModelEntry:
        """Resolve `ref`: an exact id, else the one entry whose FILE (or its name) or REPO is `ref`.

        Raises MeshError NOT_FOUND when nothing matches and INVALID_REQUEST when several do.
        """
        entries, _ = self.entries()
        for entry in entries:
            if entry.id == ref:
                return entry
        matches = [
            e for e in entries if ref in (e.file, PurePosixPath(e.file).name) or ref == e.repo
        ]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise MeshError(
                ErrorCode.INVALID_REQUEST,
                f"model {ref!r} is ambiguous: it matches {', '.join(e.id for e in matches)}; "
                "name one of them",
            )
        known = ", ".join(e.id for e in entries[:10]) + (", ..." if len(entries) > 10 else "")
        raise MeshError(
            ErrorCode.NOT_FOUND,
            f"model {ref!r} is not in this hive's catalog "
            f"({'it holds ' + known if entries else 'it holds no models'}); "
            "download it first (model download OWNER/REPO[:FILE])",
        )

    # ---- writing -------------------------------------------------------------------------------

    def put(self, entry: ModelEntry) -> None:
        """Write `entry` (atomically: the old entry or the new one, never half of either)."""
        repo, file = _split_id(entry.id)
        if (entry.repo, entry.file) != (repo, file) or entry.path != self.model_path(repo, file):
            raise ValueError(f"entry {entry.id} does not match its repo, file or path")
        directory = self.entry_dir(repo, file)
        existing = directory / METADATA_NAME
        if existing.exists():
            # Two ids can share a slug only if FILE has '--' where another has '/'.
            with contextlib.suppress(_Corrupt):
                other = self._read(directory)
                if other.id != entry.id:
                    raise MeshError(
                        ErrorCode.CONFLICT,
                        f"model {entry.id} would share directory {directory} with {other.id}",
                    )
        directory.mkdir(parents=True, exist_ok=True)
        data = json.dumps(entry._to_json(), indent=2, sort_keys=True).encode() + b"\n"
        write_atomic(directory / METADATA_NAME, data)
        self._listing = None

    def add_file(
        self,
        repo: str,
        file: str,
        source: Path,
        *,
        revision: str = "local",
        gguf: dict[str, Any] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> ModelEntry:
        """Take a model file already on this machine into the catalog, available at once.

        The file is copied (and hashed on the way) to a temporary name beside its final place,
        fsynced and renamed, so a crash leaves no half-copied model behind an available entry.
        `progress` is told the bytes copied so far after each MiB; what it raises stops the
        copy (the temporary file is removed). `gguf`: the file's facts, for the entry.
        """
        id_ = model_id(repo, file)
        path = self.model_path(repo, file)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()

        def hashed() -> Iterator[bytes]:
            copied = 0
            with source.open("rb") as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    yield chunk
                    copied += len(chunk)
                    if progress is not None:
                        progress(copied)

        write_atomic(path, hashed())
        now = time.time()
        entry = ModelEntry(
            id=id_,
            repo=repo,
            file=file,
            revision=revision,
            size=path.stat().st_size,
            sha256=digest.hexdigest(),
            status=ModelStatus.AVAILABLE,
            error=None,
            added=now,
            last_used=now,
            path=path,
            gguf=gguf,
        )
        self.put(entry)
        return entry

    def touch(self, id_: str) -> ModelEntry:
        """Record that the model was just used (for example: loaded by a worker)."""
        entry = self.lookup(id_)
        if entry is None:
            raise MeshError(ErrorCode.NOT_FOUND, f"model {id_} is not in this hive's catalog")
        touched = replace(entry, last_used=time.time())
        self.put(touched)
        return touched

    def delete(self, ref: str, *, in_use: Callable[[str], bool]) -> ModelEntry | None:
        """Remove a model and everything of it on disk; returns the entry removed.

        `in_use(id)` says whether a worker holds the model: then nothing is removed and
        MeshError CONFLICT says so. A model being downloaded is refused the same way. An exact id
        whose directory is corrupt is removed too (and None returned), so a broken entry can
        always be cleaned up by name.
        """
        try:
            entry = self.get(ref)
        except MeshError:
            orphan = self._orphan_dir(ref)
            if orphan is None:
                raise
            with self._locked(ref, doing="deleted"):
                self._remove_dir(orphan)
            return None
        if in_use(entry.id):
            raise MeshError(
                ErrorCode.CONFLICT,
                f"model {entry.id} is in use by worker(s) on this hive; delete them first",
            )
        with self._locked(entry.id, doing="deleted"):
            self._remove_dir(self.entry_dir(entry.repo, entry.file))
        return entry

    def discard(self, id_: str) -> None:
        """Remove everything of `id_` on disk, whatever its state (a cancelled download's debris).

        The caller holds the model's download lock, or knows nobody else touches the model.
        """
        repo, file = _split_id(id_)
        directory = self.entry_dir(repo, file)
        if directory.exists():
            self._remove_dir(directory)

    def mark_interrupted(self) -> list[ModelEntry]:
        """Turn entries left `downloading` by a hive that died into `failed`; returns them.

        Their partial files stay: downloading the model again resumes from them. Entries whose
        download is still running (its lock is held) are left alone.
        """
        marked: list[ModelEntry] = []
        entries, _ = self.entries()
        for entry in entries:
            if entry.status is not ModelStatus.DOWNLOADING:
                continue
            try:
                with self.download_lock(entry.id):
                    failed = replace(
                        entry,
                        status=ModelStatus.FAILED,
                        error="the download was interrupted (the hive stopped); download the "
                        "model again to resume it",
                    )
                    self.put(failed)
                    marked.append(failed)
            except MeshError:
                continue
        return marked

    @contextlib.contextmanager
    def download_lock(self, id_: str) -> Iterator[None]:
        """Hold the download lock of `id_`: MeshError CONFLICT if another download holds it.

        An flock, so that it also keeps two processes on one state directory apart, and is
        released by the kernel when a hive dies.
        """
        with self._locked(id_, doing="downloaded"):
            yield

    # ---- internals -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, id_: str, *, doing: str) -> Iterator[None]:
        repo, file = _split_id(id_)
        path = self.root / f".{_slug(repo, file)}.lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise MeshError(
                    ErrorCode.CONFLICT,
                    f"model {id_} is being downloaded by another job; it cannot be {doing} "
                    "until that job ends (cancel it, or wait)",
                ) from None
            # The holder before us unlinks the file while holding it; if we locked that old
            # inode, the lock guards nothing: try again on the current file.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            yield
        finally:
            # Unlink while still holding it, so no lock files are left behind.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            os.close(fd)

    def _orphan_dir(self, ref: str) -> Path | None:
        try:
            repo, file = parse_ref(ref)
        except MeshError:
            return None
        if file is None:
            return None
        directory = self.entry_dir(repo, file)
        return directory if directory.is_dir() else None

    def _remove_dir(self, directory: Path) -> None:
        # Rename first: atomic, so a crash mid-removal leaves a tombstone (finished at the next
        # start) rather than a half-deleted entry that would be reported as corrupt.
        trash = self.root / f"{_TRASH_PREFIX}{directory.name}-{secrets.token_hex(4)}"
        os.replace(directory, trash)
        self._listing = None
        fsync_dir(self.root)
        shutil.rmtree(trash)

    def _read(self, directory: Path) -> ModelEntry:
        path = directory / METADATA_NAME
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _Corrupt(f"no {METADATA_NAME} (an interrupted download or write?)") from None
        except OSError as exc:
            raise _Corrupt(f"cannot open {METADATA_NAME}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "rb") as f:
                raw = f.read(MAX_METADATA_BYTES + 1)
        except OSError as exc:
            raise _Corrupt(f"cannot read {METADATA_NAME}: {exc.strerror}") from None
        if len(raw) > MAX_METADATA_BYTES:
            raise _Corrupt(f"{METADATA_NAME} is larger than {MAX_METADATA_BYTES} bytes")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _Corrupt(f"{METADATA_NAME} is not valid JSON ({exc}); half-written?") from None
        entry = _entry_from_json(data, self)
        if entry.path.parent != directory:
            raise _Corrupt(f"{METADATA_NAME} describes {entry.id}, which belongs elsewhere")
        return entry


class _Corrupt(Exception):
    """A model.json that is not a valid entry; the message says why."""


def _entry_from_json(data: Any, catalog: Catalog) -> ModelEntry:
    if not isinstance(data, dict):
        raise _Corrupt(f"{METADATA_NAME} is not a JSON object")
    if data.get("schema") != SCHEMA_VERSION:
        raise _Corrupt(f"{METADATA_NAME} has schema {data.get('schema')!r}, not {SCHEMA_VERSION}")
    id_ = _field(data, "id", str)
    try:
        repo, file = _split_id(id_)
    except MeshError as exc:
        raise _Corrupt(f"bad id: {exc.message}") from None
    if (_field(data, "repo", str), _field(data, "file", str)) != (repo, file):
        raise _Corrupt(f"repo and file do not match id {id_}")
    size = _field(data, "size", int)
    sha256 = _field(data, "sha256", str, optional=True)
    if size < 0 or (sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256)):
        raise _Corrupt("size or sha256 out of range")
    try:
        status = ModelStatus(_field(data, "status", str))
    except ValueError:
        raise _Corrupt(f"unknown status {data['status']!r}") from None
    return ModelEntry(
        id=id_,
        repo=repo,
        file=file,
        revision=_field(data, "revision", str),
        size=size,
        sha256=sha256,
        status=status,
        error=_field(data, "error", str, optional=True),
        added=float(_field(data, "added", (int, float))),
        last_used=float(_field(data, "last_used", (int, float))),
        path=catalog.model_path(repo, file),
        gguf=_facts(data.get("gguf")),
    )


#: The facts an entry may carry of its GGUF file, and their types.
_FACTS: dict[str, Any] = {
    "architecture": str, "quantization": (str, type(None)), "context_length": (int, type(None)),
    "parameters": int, "chat_template": bool,
}  # fmt: skip


def _facts(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None  # an entry of before they were recorded
    if not isinstance(value, dict) or set(value) != set(_FACTS):
        raise _Corrupt("field 'gguf' is not the facts of a GGUF file")
    for key, kind in _FACTS.items():
        if (isinstance(value[key], bool) and kind is not bool) or not isinstance(value[key], kind):
            raise _Corrupt(f"field 'gguf.{key}' has the wrong type")
    return value


def _field(data: dict[str, Any], key: str, kind: Any, *, optional: bool = False) -> Any:
    if key not in data:
        raise _Corrupt(f"missing field {key!r}")
    value = data[key]
    if value is None and optional:
        return None
    # bool is an int in Python; a size of `true` is still wrong.
    if isinstance(value, bool) or not isinstance(value, kind):
        raise _Corrupt(f"field {key!r} has the wrong type ({type(value).__name__})")
    return value
