"""A Hugging Face hub on 127.0.0.1 for tests: a real HTTP server, no mocks, no network.

It answers exactly what huggingface-hub and rbee_mesh.actors.hive.download ask:

- ``GET /api/models/OWNER/REPO[/revision/REV]`` (``HfApi.model_info``): the commit and the files,
  with sizes and LFS sha256 (``?blobs=true``);
- ``HEAD`` and ``GET /OWNER/REPO/resolve/REV/FILE``: ETag, X-Linked-Etag/-Size for LFS files,
  X-Repo-Commit, Content-Length, Range (206, 416), and the error headers of the real hub
  (X-Error-Code: RepoNotFound, RevisionNotFound, EntryNotFound).

Tests steer it: refuse every request with a status, accept and never answer, drop or stall a GET
after N body bytes, serve at a limited rate, ignore Range, require a token. It records every
request (method, path, Range, Authorization) and counts the body bytes it sent.

Use the `hub` fixture: it sets HF_ENDPOINT for the test. Another process (a host of a test LAN)
runs one with ``python -m tests.hub [--host H] [--rate-bps N] DIR``: it serves every file
DIR/OWNER/REPO/NAME as NAME of repo OWNER/REPO, prints its endpoint, and serves until its stdin
closes; then it prints {"file_gets": [...]}, the paths of the file GETs it served, as one JSON
line. Import it into a test module as ``from tests import hub as fake_hub`` and ``hub =
fake_hub.hub`` (importing the name itself makes ruff see every `hub` parameter as a redefinition,
F811).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest


@dataclass
class HubFile:
    """A file of a repo. `announced_sha256` overrides the digest the hub claims (to lie)."""

    data: bytes
    lfs: bool = True
    announced_sha256: str | None = None

    @property
    def sha256(self) -> str:
        return self.announced_sha256 or hashlib.sha256(self.data).hexdigest()

    @property
    def etag(self) -> str:
        if self.lfs:
            return self.sha256
        # A plain git file's ETag is its git blob id.
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()


@dataclass(frozen=True)
class HubRequest:
    """One request the hub received."""

    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class _Repo:
    commit: str
    files: dict[str, HubFile] = field(default_factory=dict)


class FakeHub:
    """The hub; see the module docstring. Attributes below are the controls (set them freely)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        """A hub on `host` (the loopback; a multi-host test binds a namespace's address)."""
        self.repos: dict[str, _Repo] = {}
        self.requests: list[HubRequest] = []
        self.body_bytes_sent = 0
        #: Answer every request with this status (and a hub-like error body).
        self.refuse_status: int | None = None
        #: Accept every request and never answer (until the hub is closed).
        self.silent = False
        #: Serve file bodies at this many bytes per second.
        self.rate_bps: int | None = None
        #: Answer a Range request with the whole file (200), as some proxies do.
        self.ignore_range = False
        #: Refuse (401) requests without ``Authorization: Bearer <this>``.
        self.require_token: str | None = None
        self._drop: list[int] = []
        self._stall: list[int] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server = _Server(self, host)
        # A short poll interval: shutdown() waits for one, and every test closes a hub.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.01,), name="fake-hub", daemon=True
        )

    # ---- content --------------------------------------------------------------------------------

    def add_file(
        self,
        repo: str,
        name: str,
        data: bytes,
        *,
        lfs: bool = True,
        announced_sha256: str | None = None,
    ) -> HubFile:
        """Add (or replace) a file; the repo is created at a random commit if new."""
        with self._lock:
            entry = self.repos.setdefault(repo, _Repo(commit=secrets.token_hex(20)))
            file = HubFile(data, lfs=lfs, announced_sha256=announced_sha256)
            entry.files[name] = file
            return file

    def add_random_file(self, repo: str, name: str, size: int, *, seed: int = 0) -> bytes:
        """Add a file of `size` random bytes (deterministic per seed); returns them."""
        data = random.Random(seed).randbytes(size)
        self.add_file(repo, name, data)
        return data

    def new_revision(self, repo: str) -> str:
        """Move the repo to a new commit (as a push would); returns it."""
        with self._lock:
            self.repos[repo].commit = secrets.token_hex(20)
            return self.repos[repo].commit

    # ---- controls -------------------------------------------------------------------------------

    def drop_after(self, n_bytes: int) -> None:
        """The next file GET sends `n_bytes` of its body, then closes the connection."""
        with self._lock:
            self._drop.append(n_bytes)

    def stall_after(self, n_bytes: int) -> None:
        """The next file GET sends `n_bytes` of its body, then goes silent (until closed)."""
        with self._lock:
            self._stall.append(n_bytes)

    # ---- observations ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def file_gets(self) -> list[HubRequest]:
        """The GET requests for file contents, in order."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path]

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop serving: wake silent handlers, shut every connection, join the server thread."""
        self._release.set()
        self._server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            # Keep-alive connections (huggingface-hub pools them) would hold handler threads.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        self._thread.join(timeout=5)

    # ---- serving (handler threads) --------------------------------------------------------------

    def _handle(self, h: _Handler, *, head: bool) -> None:
        with self._lock:
            self.requests.append(
                HubRequest(
                    method=h.command,
                    path=h.path,
                    range=h.headers.get("Range"),
                    authorization=h.headers.get("Authorization"),
                )
            )
        if self.silent:
            self._go_silent(h)
            return
        if self.require_token and h.headers.get("Authorization") != f"Bearer {self.require_token}":
            self._error(h, 401, "Invalid username or password.", head=head)
            return
        if self.refuse_status is not None:
            self._error(h, self.refuse_status, "refused by the test", head=head)
            return
        path = unquote(urlsplit(h.path).path)
        if path.startswith("/api/models/"):
            self._model_info(h, path.removeprefix("/api/models/"), head=head)
            return
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if match is None:
            self._error(h, 404, "no such endpoint", head=head)
            return
        self._resolve(h, match[1], match[2], match[3], head=head)

    def _model_info(self, h: _Handler, rest: str, *, head: bool) -> None:
        parts = rest.split("/")
        repo_id = "/".join(parts[:2])
        with self._lock:
            repo = self.repos.get(repo_id)
        if repo is None or len(parts) not in (2, 4) or (len(parts) == 4 and parts[2] != "revision"):
            self._error(h, 404, "Repository not found", code="RepoNotFound", head=head)
            return
        if len(parts) == 4 and parts[3] not in ("main", repo.commit):
            self._error(h, 404, "Invalid rev id", code="RevisionNotFound", head=head)
            return
        siblings: list[dict[str, Any]] = []
        for name, file in sorted(repo.files.items()):
            sibling: dict[str, Any] = {"rfilename": name, "size": len(file.data)}
            sibling["blobId"] = hashlib.sha1(file.data).hexdigest()
            if file.lfs:
                sibling["lfs"] = {"size": len(file.data), "sha256": file.sha256, "pointerSize": 134}
            siblings.append(sibling)
        body = json.dumps(
            {
                "_id": repo_id,
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.commit,
                "siblings": siblings,
            }
        ).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _resolve(self, h: _Handler, repo_id: str, revision: str, name: str, *, head: bool) -> None:
        with self._lock:
            repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "Repository not found", code="RepoNotFound", head=head)
            return
        if revision not in ("main", repo.commit):
            self._error(h, 404, "Invalid rev id", code="RevisionNotFound", head=head)
            return
        file = repo.files.get(name)
        if file is None:
            self._error(
                h, 404, "Entry not found", code="EntryNotFound", head=head, commit=repo.commit
            )
            return
        size = len(file.data)
        start, end, status = 0, size - 1, 200
        wanted = h.headers.get("Range")
        if wanted and not self.ignore_range and not head:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)
            if match is None or int(match[1]) >= size:
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            start, status = int(match[1]), 206
            end = min(int(match[2]), size - 1) if match[2] else size - 1
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(end - start + 1))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", f'"{file.etag}"')
        h.send_header("X-Repo-Commit", repo.commit)
        if file.lfs:
            h.send_header("X-Linked-Etag", f'"{file.etag}"')
            h.send_header("X-Linked-Size", str(size))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        h.end_headers()
        if not head:
            self._send_body(h, file.data[start : end + 1])

    def _send_body(self, h: _Handler, body: bytes) -> None:
        with self._lock:
            drop = self._drop.pop(0) if self._drop else None
            stall = self._stall.pop(0) if self._stall else None
        limit = min(x for x in (drop, stall, len(body)) if x is not None)
        rate = self.rate_bps
        chunk = max(1024, rate // 50) if rate else 64 * 1024
        sent = 0
        try:
            while sent < limit:
                piece = body[sent : min(sent + chunk, limit)]
                h.wfile.write(piece)
                h.wfile.flush()
                sent += len(piece)
                with self._lock:
                    self.body_bytes_sent += len(piece)
                if rate:
                    # Pacing the emulated network, not synchronising the test.
                    time.sleep(len(piece) / rate)
        except OSError:
            h.close_connection = True  # the client went away
            return
        if sent < len(body):
            if stall is not None and sent == stall:
                self._go_silent(h)
            h.close_connection = True  # dropped: the client sees a body cut short

    def _go_silent(self, h: _Handler) -> None:
        self._release.wait()
        h.close_connection = True

    def _error(
        self,
        h: _Handler,
        status: int,
        message: str,
        *,
        head: bool,
        code: str | None = None,
        commit: str | None = None,
    ) -> None:
        body = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.send_header("X-Error-Message", message)
        if code:
            h.send_header("X-Error-Code", code)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.end_headers()
        if not head:
            h.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, hub: FakeHub, host: str) -> None:
        self.hub = hub
        super().__init__((host, 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive, like the real hub; every answer carries a Content-Length.
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.hub._lock:
            self.server.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.hub._lock:
            self.server.hub._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self.server.hub._handle(self, head=False)

    def do_HEAD(self) -> None:
        self.server.hub._handle(self, head=True)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the tests read `requests`; stderr noise helps nobody


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fake hub on 127.0.0.1, with HF_ENDPOINT pointing at it for the test."""
    fake = FakeHub()
    fake.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
    # A token of whoever runs the tests must not reach the requests the tests inspect.
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # huggingface-hub's user agent fetches an "agent harness" registry from the endpoint it read
    # at import (huggingface.co, not this hub) unless telemetry is off: keep tests off the network.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")  # for subprocesses
    try:
        yield fake
    finally:
        fake.close()


def main(argv: list[str] | None = None) -> None:
    """Serve the files of a directory (see the module docstring) until stdin closes."""
    parser = argparse.ArgumentParser(prog="python -m tests.hub")
    parser.add_argument("root", type=Path, help="DIR/OWNER/REPO/NAME is NAME of repo OWNER/REPO")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--rate-bps", type=int, default=None)
    args = parser.parse_args(argv)
    hub = FakeHub(args.host)
    hub.rate_bps = args.rate_bps
    for path in sorted(args.root.glob("*/*/*")):
        owner, repo = path.parent.parent.name, path.parent.name
        hub.add_file(f"{owner}/{repo}", path.name, path.read_bytes())
    hub.start()
    print(hub.endpoint, flush=True)
    sys.stdin.read()
    hub.close()
    print(json.dumps({"file_gets": [r.path for r in hub.file_gets()]}), flush=True)


if __name__ == "__main__":
    main()
