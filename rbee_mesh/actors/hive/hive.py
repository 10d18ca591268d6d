"""The hive: one per machine. Its devices, its model catalog and downloads, its worker processes.

A hive serves jobs on its control ROUTER with the one job server, as the queen and its workers do,
adopting the queen's job ids so its narration needs no translation on the way back. Every
`heartbeat_s` it publishes a HEARTBEAT on its PUB socket carrying its state: its devices (with free
memory and utilisation), its workers (a short row each), what it downloads and serves other hives,
and a digest of its catalog, which a queen that sees it change asks for in full (`model_list`). So
the heartbeat stays small whatever the catalog holds, carries no path of this machine, and is built
from memory (the catalog is read from disk only when it changed). It answers READY with its id,
where its heartbeats are, and the same state. When it can be reached from other machines it
announces itself on the LAN (mDNS). Infer jobs run on its workers, picked by the queen or idle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from rbee_mesh import __version__
from rbee_mesh.actors.hive.catalog import Catalog, ModelEntry, ModelStatus, model_id, parse_ref
from rbee_mesh.actors.hive.devices import DeviceReport, detect_devices
from rbee_mesh.actors.hive.download import Mesh, MeshPeer, download_model, import_model
from rbee_mesh.actors.hive.worker_pool import (
    ModelUnloadable,
    WorkerPool,
    WorkerRecord,
    WorkerState,
    open_worker_pool,
)
from rbee_mesh.actors.jobserver import Handler, JobServer, Peer, ServerConfig, ServerJob
from rbee_mesh.actors.narration import narrate
from rbee_mesh.actors.runtime import run_ping, single_errors
from rbee_mesh.actors.trust import (
    Role,
    Trust,
    new_pairing_code,
    pairing_keypair,
    pairing_proof,
)
from rbee_mesh.inference.sizing import estimated_memory
from rbee_mesh.protocol import (
    PROTOCOL_VERSION,
    Actor,
    Chunk,
    ErrorCode,
    Heartbeat,
    Level,
    Liveness,
    MeshError,
    encode,
)
from rbee_mesh.protocol import operations as ops
from rbee_mesh.protocol.constants import HEARTBEAT_PORT, HIVE_PORT, MAX_CHUNK_BYTES
from rbee_mesh.transport import (
    PUBSUB_OPTIONS,
    Listener,
    Publisher,
    SocketOptions,
    open_listener,
    open_publisher,
    parse_endpoint,
)
from rbee_mesh.transport.discovery import SERVICE_TYPE, HiveAnnouncement, announcing
from rbee_mesh.units import human_bytes

log = logging.getLogger("rbee_mesh.hive")

#: `model_read` jobs one peer runs here at once; more are refused (BUSY). An honest peer keeps
#: fewer in flight (download.READS_IN_FLIGHT); this bounds what one that asks for more makes
#: this hive read ahead of its sending.
READS_PER_PEER = 8


def default_hive_id() -> str:
    """This machine's name, made a valid identifier."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-.") or "hive"
    return name[:64]


@dataclass(frozen=True)
class HiveConfig:
    state_dir: Path
    hive_id: str = field(default_factory=default_hive_id)
    control: str = f"tcp://127.0.0.1:{HIVE_PORT}"
    heartbeats: str = f"tcp://127.0.0.1:{HEARTBEAT_PORT}"
    server: ServerConfig = field(default_factory=ServerConfig)
    #: The model hub (None: huggingface-hub's default, which honours HF_ENDPOINT).
    hub_endpoint: str | None = None
    #: Announce the hive on the LAN (mDNS) when its control endpoint is reachable from there.
    announce: bool = True
    #: This node's keys and whom it admits (its queen, its own node); see actors/trust.py.
    trust: Trust = field(default_factory=Trust.for_process)

    @property
    def worker_sockets(self) -> str:
        """Where this hive's workers serve it: `<this>.<worker id>`, Linux abstract sockets (no
        file to go stale, no path-length trouble in deep state directories), one set per hive
        and state directory."""
        place = hashlib.sha256(str(self.state_dir.resolve()).encode()).hexdigest()[:12]
        return f"ipc://@rbee-mesh/{self.hive_id}/{place}"


class Hive:
    """One per machine. Build with `running_hive`."""

    def __init__(
        self,
        config: HiveConfig,
        control: Listener,
        publisher: Publisher,
        pool: WorkerPool,
        catalog: Catalog,
    ) -> None:
        self.config = config
        self.id = config.hive_id
        self.publisher = publisher
        self.pool = pool
        self.catalog = catalog
        self.started = time.time()
        self.devices: DeviceReport = detect_devices()
        handlers: dict[type[ops.Operation], Handler] = {
            ops.Ping: self._op_ping,
            ops.HiveStatus: self._op_hive_status,
            ops.HiveRefresh: self._op_hive_refresh,
            ops.ModelDownload: self._op_model_download,
            ops.ModelList: self._op_model_list,
            ops.ModelImport: self._op_model_import,
            ops.ModelGet: self._op_model_get,
            ops.ModelDelete: self._op_model_delete,
            ops.WorkerSpawn: self._op_worker_spawn,
            ops.WorkerList: self._op_worker_list,
            ops.WorkerGet: self._op_worker_get,
            ops.WorkerDelete: self._op_worker_delete,
            ops.Infer: self._op_infer,
            ops.HivePair: self._op_hive_pair,
            ops.Pair: self._op_pair,
            ops.ModelRead: self._op_model_read,
            ops.PeerTrust: self._op_peer_trust,
            ops.PeerUntrust: self._op_peer_untrust,
        }
        self.server = JobServer(
            control,
            name=self.id,
            actor=Actor.HIVE,
            handlers=handlers,
            config=config.server,
            assigns_job_ids=False,
            ready_info=self._ready_info,
            peer_label="client",
            hive_id=self.id,
            trust=config.trust,
        )
        self.server.schedule.add(self)
        self._beats = 0
        self._catalog_error = ""
        #: Reads of this hive's models that other hives run at once, by their key; and the
        #: bytes sent them in all.
        self._reads: Counter[str] = Counter()
        self.served_bytes = 0
        #: Downloads running, and the bytes all downloads brought since it started.
        self.downloads = 0
        self.downloaded_bytes = 0

    # The hive's own heartbeat is a link on its server's heartbeat schedule: one it only sends.

    @property
    def liveness(self) -> None:
        return None

    beat_interval_s = None  # its server's interval

    def beat(self) -> None:
        """Publish a HEARTBEAT with this hive's state."""
        self.devices = self.devices.refreshed()
        self._beats += 1
        beat = Heartbeat(
            job_id="",
            sender=self.id,
            seq=self._beats,
            interval_s=self.config.server.heartbeat_s,
            ts=time.time(),
            state=self.state(),
        )
        self.publisher.publish(encode(beat))

    def liveness_changed(self, was: Liveness, now: Liveness) -> None:  # pragma: no cover
        raise AssertionError("the hive's own heartbeat has no liveness to watch")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve and publish heartbeats until `stop()` or cancellation."""
        async with trio.open_nursery() as nursery:
            announcement = self.announcement()
            if announcement is not None:
                nursery.start_soon(self._announce, announcement)
            await self.server.run(task_status=task_status)
            nursery.cancel_scope.cancel()

    def announcement(self) -> HiveAnnouncement | None:
        """What to announce on the LAN, or None when no other machine could reach this hive
        (announcing is off, or it listens on loopback or in memory)."""
        control = parse_endpoint(self.server.listener.endpoint)
        beats = parse_endpoint(self.publisher.endpoint)
        if not self.config.announce or control.scheme != "tcp" or beats.scheme != "tcp":
            return None
        assert control.host is not None and control.port is not None and beats.port is not None
        host = control.host.strip("[]")
        if host in ("*", "::"):
            host = "0.0.0.0"
        if host == "localhost" or host.startswith("127.") or host == "::1":
            return None
        return HiveAnnouncement(
            hive_id=self.id,
            protocol=PROTOCOL_VERSION,
            host=host,
            control_port=control.port,
            heartbeat_port=beats.port,
            key=self.config.trust.public,
            version=__version__,
        )

    async def _announce(self, announcement: HiveAnnouncement) -> None:
        """Stay announced while the hive serves; a goodbye goes out when it stops."""
        interfaces = None if announcement.host == "0.0.0.0" else [announcement.host]
        try:
            async with announcing(announcement, interfaces=interfaces):
                log.info("hive %s announced on the LAN as %s", self.id, SERVICE_TYPE)
                await trio.sleep_forever()
        except (MeshError, OSError) as exc:
            # No multicast here, or the name is taken: the hive still serves static peers.
            log.warning("hive %s could not announce itself on the LAN: %s", self.id, exc)

    async def stop(self, reason: str = "the hive is shutting down") -> None:
        await self.server.stop(reason)

    # ---- what the hive tells the queen ---------------------------------------------------------

    def _ready_info(self, peer: Peer) -> dict[str, Any]:
        return {
            "hive_id": self.id,
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "control": self.server.listener.endpoint,
            "heartbeat": self.publisher.endpoint,
            "state": self.state(),
        }

    def state(self) -> dict[str, Any]:
        """What every heartbeat carries: devices, a row per worker, and the catalog's digest.
        Bounded whatever this hive holds (MAX_WORKERS_PER_HIVE running workers and as many that
        exited; models by count)."""
        try:
            listing = self.catalog.listing()
            models = {"count": len(listing.entries), "digest": listing.digest}
        except OSError as exc:
            # Its directory gone or unreadable: the hive still runs its workers and says so.
            if str(exc) != self._catalog_error:
                log.error("hive %s cannot read its model catalog: %s", self.id, exc)
            self._catalog_error = str(exc)
            models = {"count": 0, "digest": ""}
        else:
            self._catalog_error = ""
        return {
            "version": __version__,
            "devices": [d.to_record() for d in self.devices.devices],
            "workers": [w.summary() for w in self.pool.list()],
            "models": models,
            "sharing": {"reading": self._reading(), "served_bytes": self.served_bytes},
            "downloads": {"running": self.downloads, "bytes": self.downloaded_bytes},
        }

    # ---- operations --------------------------------------------------------------------------

    async def _op_ping(self, job: ServerJob, op: ops.Ping) -> dict[str, Any]:
        return await run_ping(op)

    async def _op_hive_status(self, job: ServerJob, op: ops.HiveStatus) -> dict[str, Any]:
        narrate("hive_status", self._summary())
        self._narrate_dead("hive_status")
        return {
            "hive": self.id,
            "fingerprint": self.config.trust.keypair.fingerprint,
            "refused_handshakes": self.config.trust.refusals,
            "uptime_s": round(time.time() - self.started, 3),
            "endpoints": {
                "control": self.server.listener.endpoint,
                "heartbeat": self.publisher.endpoint,
            },
            "jobs_running": len(self.server.running_jobs),
            "devices_note": self.devices.note,
            "version": __version__,
            "devices": [d.to_record() for d in self.devices.devices],
            "workers": [w.to_record() for w in self.pool.list()],
            "models": [
                {"id": e.id, "status": str(e.status), "size": e.size}
                for e in self.catalog.listing().entries
            ],
            # The hive's own record of the jobs it ran (the queen keeps its own).
            "jobs": self.server.job_summaries(include_finished=True),
        }

    async def _op_hive_refresh(self, job: ServerJob, op: ops.HiveRefresh) -> dict[str, Any]:
        before = {d.id for d in self.devices.devices}
        self.devices = detect_devices()
        after = {d.id for d in self.devices.devices}
        for added in sorted(after - before):
            narrate("hive_refresh", f"new device {added}")
        for gone in sorted(before - after):
            narrate("hive_refresh", f"device {gone} is gone", level=Level.WARN)
        _, problems = self.catalog.entries()
        for problem in problems:
            narrate("hive_refresh", f"skipped a catalog entry: {problem}", level=Level.WARN)
        narrate("hive_refresh", self._summary())
        return await self._op_hive_status(job, ops.HiveStatus(hive=self.id))

    def _summary(self) -> str:
        entries = self.catalog.listing().entries
        devices = ", ".join(d.id for d in self.devices.devices)
        note = f" ({self.devices.note})" if self.devices.note else ""
        return f"{devices}{note}; {len(self.pool.list())} worker(s); {len(entries)} model(s)"

    async def _op_model_download(self, job: ServerJob, op: ops.ModelDownload) -> dict[str, Any]:
        mesh = Mesh(tuple(map(MeshPeer.parse, op.peers)), self.config.trust, self.id)
        self.downloads += 1
        try:
            entry = await download_model(
                self.catalog, op.model, endpoint=self.config.hub_endpoint, mesh=mesh,
                use_hub=op.source != "mesh", meter=self._downloaded,
            )  # fmt: skip
        finally:
            self.downloads -= 1
        return entry.to_record()

    def _downloaded(self, n: int) -> None:
        self.downloaded_bytes += n

    async def _op_model_read(self, job: ServerJob, op: ops.ModelRead) -> dict[str, Any]:
        """Bytes of a whole model, as CHUNKs: the asking hive's credit bounds what is unsent
        (docs/sharing.md); more than READS_PER_PEER reads of one peer at once are refused, and
        a read waits while the peer's frames queue (ZeroMQ's queue to it full)."""
        # The exact id (a peer reads what its model_get named): one entry read, no catalog scan.
        entry = await trio.to_thread.run_sync(self.catalog.lookup, op.model)
        if entry is None or entry.status is not ModelStatus.AVAILABLE:
            held = "not here" if entry is None else str(entry.status)
            raise MeshError(ErrorCode.NOT_FOUND, f"{op.model} is {held} on hive {self.id}")
        if op.offset + op.length > entry.size:
            raise MeshError(
                ErrorCode.INVALID_REQUEST,
                f"{entry.id} is {entry.size} bytes; asked for {op.length} from {op.offset}",
            )
        if self._reads[job.peer.key] >= READS_PER_PEER:
            raise MeshError(ErrorCode.BUSY, f"hive {self.id} runs {READS_PER_PEER} reads of "
                            "yours already", started=False)  # fmt: skip
        self._reads[job.peer.key] += 1
        try:
            await self._read(job, entry, op.offset, op.offset + op.length)
        except OSError as exc:
            raise MeshError(ErrorCode.UNAVAILABLE, f"cannot read {entry.id} on hive {self.id}: "
                            f"{exc.strerror or exc}") from None  # fmt: skip
        finally:
            self._reads[job.peer.key] -= 1
            if not self._reads[job.peer.key]:
                del self._reads[job.peer.key]
        return {"model": entry.id, "bytes": op.length}

    async def _read(self, job: ServerJob, entry: ModelEntry, offset: int, end: int) -> None:
        with await trio.to_thread.run_sync(open, entry.path, "rb") as f:
            while offset < end:
                n = min(MAX_CHUNK_BYTES, end - offset)
                data = await trio.to_thread.run_sync(os.pread, f.fileno(), n, offset)
                if len(data) != n:
                    raise MeshError(ErrorCode.UNAVAILABLE, f"{entry.id} on hive {self.id} is "
                                    "shorter than its catalog entry says")  # fmt: skip
                await job.peer.writable(0)  # (ZeroMQ's queue to it is full: wait)
                job.emit(Chunk(job_id=job.id, offset=offset, data=data))
                offset += n
                self.served_bytes += n

    def _reading(self) -> int:
        return sum(self._reads.values())

    async def _op_peer_trust(self, job: ServerJob, op: ops.PeerTrust) -> dict[str, Any]:
        """Trust another hive of this queen's as a peer (what it may do: trust.PEERS); a key
        trusted already, in whatever role, keeps that role."""
        trust = self.config.trust
        role = trust.role_of(op.key)
        if role is None:
            entry = await trio.to_thread.run_sync(trust.trust, op.key, Role.PEER, op.name)
            narrate("peer_trust", f"hive {self.id} now lets hive {op.name} ({entry.fingerprint}) "
                    "read its models")  # fmt: skip
        return {"hive": op.name, "role": str(role or Role.PEER)}

    async def _op_peer_untrust(self, job: ServerJob, op: ops.PeerUntrust) -> dict[str, Any]:
        """Forget a peer (a key trusted in another role keeps it), and cut it off."""
        trust = self.config.trust
        if trust.role_of(op.key) is not Role.PEER:
            return {"forgotten": False}
        entry = trust.find(op.key, Role.PEER)
        await trio.to_thread.run_sync(trust.untrust, entry)
        cut = self.server.drop_peers_with_key(op.key, "it is no longer trusted")
        narrate("peer_untrust", f"hive {self.id} no longer lets hive {entry.name} "
                f"({entry.fingerprint}) read its models; {cut} connection(s) cut")  # fmt: skip
        return {"forgotten": True, "hive": entry.name}

    async def _op_model_import(self, job: ServerJob, op: ops.ModelImport) -> dict[str, Any]:
        source = Path(op.path)
        file = _catalog_name(source.name, "model.gguf")
        repo = op.name or f"local/{_catalog_name(source.stem, 'model')}"
        if ":" in repo:
            raise MeshError(ErrorCode.INVALID_REQUEST, f"--name is OWNER/REPO, not {repo!r}")
        parse_ref(model_id(repo, file))  # refuses what cannot be an id
        entry = await import_model(self.catalog, source, repo, file)
        return entry.to_record()

    async def _op_model_list(self, job: ServerJob, op: ops.ModelList) -> list[dict[str, Any]]:
        entries, problems = self.catalog.entries()
        for problem in problems:
            narrate("model_list", f"skipped a catalog entry: {problem}", level=Level.WARN)
        narrate("model_list", f"{len(entries)} model(s) on hive {self.id}")
        return [e.to_record() for e in entries]

    async def _op_model_get(self, job: ServerJob, op: ops.ModelGet) -> dict[str, Any]:
        return self.catalog.get(op.model).to_record()

    async def _op_model_delete(self, job: ServerJob, op: ops.ModelDelete) -> dict[str, Any]:
        entry = self.catalog.get(op.model)
        users = self.pool.workers_using(entry.id)
        if users:
            raise MeshError(
                ErrorCode.CONFLICT,
                f"model {entry.id} is in use by worker(s) {', '.join(users)}; "
                "delete them first (rbee-mesh worker delete ID)",
            )
        self.catalog.delete(entry.id, in_use=lambda model: bool(self.pool.workers_using(model)))
        narrate("model_delete", f"deleted {entry.id} ({entry.size} bytes freed)")
        return {"model": entry.id, "deleted": True}

    async def _op_worker_spawn(self, job: ServerJob, op: ops.WorkerSpawn) -> dict[str, Any]:
        entry = self.catalog.get(op.model)
        if entry.status not in (ModelStatus.AVAILABLE, ModelStatus.UNLOADABLE):
            raise MeshError(
                ErrorCode.CONFLICT,
                f"model {entry.id} is {entry.status}{': ' + entry.error if entry.error else ''}; "
                "only an available model can be loaded",
            )
        if entry.status is ModelStatus.UNLOADABLE:
            narrate("worker_spawn", f"{entry.id} did not load before ({entry.error}); again")
        device = self._device_for(op.device, entry.size)
        # With the backend left to the mesh, a file no backend loads is marked so; a backend
        # named that will not load it says nothing of the others.
        auto = op.backend == "auto"
        try:
            # What the file's metadata rules out, before a process starts for it.
            from rbee_mesh.inference.backends import backends_for  # gguf, numpy: on first use

            _, refusals = await trio.to_thread.run_sync(backends_for, entry.path, op.backend)
        except MeshError as exc:
            if auto and exc.code is ErrorCode.INVALID_REQUEST:
                self._unloadable(entry, exc.message)
            raise
        for refusal in refusals:
            narrate("worker_spawn", refusal)
        try:
            record = await self.pool.spawn(
                model_id=entry.id,
                model_path=entry.path,
                device=device,
                backend=op.backend,
                slots=op.slots,
                ctx=op.ctx,
            )
        except ModelUnloadable as exc:
            if auto:
                self._unloadable(entry, exc.message)
            raise
        if entry.status is ModelStatus.UNLOADABLE:  # it loads now (a backend came, memory...)
            self._mark(entry, ModelStatus.AVAILABLE, None)
        self.catalog.touch(entry.id)
        return record.to_record()

    def _mark(self, entry: ModelEntry, status: ModelStatus, error: str | None) -> bool:
        """Give `entry` this status, if the catalog still holds that same file (not deleted,
        imported or downloaded again meanwhile); whether it did."""
        current = self.catalog.lookup(entry.id)
        if current is None or (current.sha256, current.added) != (entry.sha256, entry.added):
            return False
        self.catalog.put(replace(current, status=status, error=error))
        return True

    def _unloadable(self, entry: ModelEntry, why: str) -> None:
        """Mark `entry` as a file no backend here loads: jobs stop trying it (and downloading
        it again); `worker spawn` tries it again."""
        reason = why.splitlines()[0] if why else "it could not be loaded"
        if not self._mark(entry, ModelStatus.UNLOADABLE, reason):
            return
        narrate(
            "worker_spawn",
            f"{entry.id} is marked unloadable: jobs will not try it again "
            f"(`rbee-mesh worker spawn -m {entry.id}` does)",
            level=Level.WARN,
        )

    def _device_for(self, wanted: str, size: int) -> str:
        """The device a model of `size` bytes goes on: `auto` is the GPU with the most free
        memory that fits it, else the CPU; a device too small is a clear out-of-memory error."""
        need = estimated_memory(size)
        if wanted == "auto":
            fitting = [g for g in self.devices.gpus if g.memory_free >= need]
            if fitting:
                return max(fitting, key=lambda g: g.memory_free).id
            wanted = "cpu"
        device = self.devices.get(wanted)
        if device is None:
            ids = ", ".join(d.id for d in self.devices.devices)
            raise MeshError(ErrorCode.NOT_FOUND, f"hive {self.id} has no device {wanted} ({ids})")
        if device.memory_free < need:
            raise MeshError(
                ErrorCode.UNAVAILABLE,
                f"out of memory: the model needs about {human_bytes(need)} and {device.id} on "
                f"hive {self.id} has {human_bytes(device.memory_free)} free",
            )
        return device.id

    async def _op_infer(self, job: ServerJob, op: ops.Infer) -> Any:
        worker = self._worker_for(op)
        narrate("infer", f"worker {worker.id} ({worker.model}) takes the job")
        return await self.pool.run_job(worker.id, job.id, op, job.relay, job.time_left_s)

    def _worker_for(self, op: ops.Infer) -> WorkerRecord:
        """The pinned worker, or an idle one holding the model (any model if none is named)."""
        if op.worker is not None:
            return self.pool.get(op.worker)
        model = self.catalog.get(op.model).id if op.model is not None else None
        idle = [w for w in self.pool.idle_workers(model)]
        if idle:
            return idle[0]
        held = [w for w in self.pool.list() if model is None or w.model == model]
        raise MeshError(
            ErrorCode.BUSY if held else ErrorCode.NOT_FOUND,
            f"every worker of hive {self.id} with {model or 'a model'} is busy"
            if held
            else f"hive {self.id} has no worker with {model or 'a model'}; "
            "spawn one (rbee-mesh worker spawn -m MODEL)",
            started=False,
        )

    async def _op_hive_pair(self, job: ServerJob, op: ops.HivePair) -> dict[str, Any]:
        trust = self.config.trust
        code = new_pairing_code()
        invite = trust.invite(Role.QUEEN, op.ttl_s, pairing_keypair(code, trust.public))
        narrate(
            "hive_pair",
            f"pairing code for hive {self.id} (fingerprint {trust.keypair.fingerprint}), good "
            f"once for {op.ttl_s:g} s: on the queen, rbee-mesh hive trust {self.id} --code {code}",
        )
        return {
            "hive": self.id,
            "code": code,
            "expires": invite.expires,
            "fingerprint": trust.keypair.fingerprint,
        }

    async def _op_pair(self, job: ServerJob, op: ops.Pair) -> dict[str, Any]:
        trust = self.config.trust
        known = trust.role_of(op.key)
        if op.key in (job.peer.key, trust.public) or known not in (None, Role.QUEEN):
            raise MeshError(ErrorCode.CONFLICT, "that key cannot be this hive's queen")
        invite = trust.redeem(job.peer.key)
        entry = trust.trust(op.key, Role.QUEEN, op.name)
        narrate("pair", f"hive {self.id} now trusts queen {op.name} ({entry.fingerprint})")
        # The code's secret proves to the queen that this is the hive that printed the code.
        proof = pairing_proof(invite.keypair, op.key, trust.public)
        return {"hive": self.id, "fingerprint": trust.keypair.fingerprint, "proof": proof}

    async def _op_worker_list(self, job: ServerJob, op: ops.WorkerList) -> list[dict[str, Any]]:
        workers = self.pool.list()
        narrate("worker_list", f"{len(workers)} worker(s) on hive {self.id}")
        self._narrate_dead("worker_list")
        return [w.to_record() for w in workers]

    def _narrate_dead(self, action: str) -> None:
        """Say which workers died and why: a death outside any job is only seen this way."""
        for w in self.pool.list():
            if w.state is WorkerState.DEAD:
                narrate(
                    action,
                    f"worker {w.id} ({w.model}) died: {w.reason}; `worker delete {w.id}` clears it",
                    level=Level.WARN,
                )

    async def _op_worker_get(self, job: ServerJob, op: ops.WorkerGet) -> dict[str, Any]:
        return self.pool.get(op.worker).to_record()

    async def _op_worker_delete(self, job: ServerJob, op: ops.WorkerDelete) -> dict[str, Any]:
        record = await self.pool.delete(op.worker)
        return record.to_record()


def _catalog_name(name: str, default: str) -> str:
    """`name` as a catalog id allows it: letters, digits, '.', '_' and '-', no '--' or '..'."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    clean = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", clean)).strip("-.")
    return clean[:95] or default


@asynccontextmanager
async def running_hive(config: HiveConfig) -> AsyncIterator[Hive]:
    """A hive serving for the duration of the block; on exit its jobs end, its workers stop."""
    hive_dir = config.state_dir / "hive"
    catalog = Catalog(hive_dir / "models")
    for entry in catalog.mark_interrupted():
        log.warning("model %s: its download was interrupted; download it again to resume", entry.id)
    keys = config.trust.server_keys(Actor.HIVE)
    pubsub_keys = replace(PUBSUB_OPTIONS, curve=config.trust.heartbeat_keys())
    with single_errors():
        async with (
            await open_listener(config.control, options=SocketOptions(curve=keys)) as control,
            await open_publisher(config.heartbeats, options=pubsub_keys) as publisher,
            open_worker_pool(
                config.worker_sockets,
                keypair=config.trust.keypair,
                heartbeat_s=config.server.heartbeat_s,
                log_dir=hive_dir / "logs",
                name=config.hive_id,
            ) as pool,
            trio.open_nursery() as nursery,
        ):
            hive = Hive(config, control, publisher, pool, catalog)
            await nursery.start(hive.run)
            log.info("hive %s: %s", hive.id, hive.devices.note or hive._summary())
            try:
                yield hive
            finally:
                with trio.CancelScope(shield=True):
                    await hive.stop()
