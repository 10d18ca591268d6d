"""Models shared between the hives of a mesh (docs/sharing.md): a hive that is to download a
model takes it from the hives that hold it, as the queen names them, and the hub serves each
model to one hive at a time.

The queen knows what every hive holds (their catalogs, `HiveRegistry.fresh_models`), so it is
the queen that picks the sources of a `model_download`: the live hives that hold the model
whole, least busy serving other hives first (their heartbeats say how many reads they serve),
then the hub (unless `--from mesh`). It introduces the fetching hive to each of them
(`peer_trust`: they let its key read their models, and nothing else), and passes them on in the
job (`peers`); the fetching hive does the rest (hive/download.py). A hive asked for a model that
another is fetching already waits for that fetch to end and then takes it from there, so
several hives that want one model at once cause one download from the hub.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from rbee_mesh.actors.jobserver import ServerJob
from rbee_mesh.actors.narration import narrate
from rbee_mesh.actors.queen.hives import HiveLink, HiveRegistry
from rbee_mesh.actors.trust import Trust
from rbee_mesh.protocol import ErrorCode, Level, MeshError, outcome
from rbee_mesh.protocol import operations as ops
from rbee_mesh.protocol.constants import MAX_MESH_SOURCES
from rbee_mesh.transport import parse_endpoint


@dataclass
class Sharing:
    hives: HiveRegistry
    trust: Trust
    #: The model a hive is fetching now, by the reference it was asked for: (hive, when done).
    fetching: dict[str, tuple[str, trio.Event]] = field(default_factory=dict)
    #: (holder, key): the holder lets that key read its models (it was told so).
    introduced: set[tuple[str, str]] = field(default_factory=set)

    async def download(self, job: ServerJob, link: HiveLink, op: ops.ModelDownload) -> Any:
        """Run `op` on `link`'s hive, with the hives to take the model from."""
        if op.source == "hub":
            return await self.hives.forward(job, replace(op, hive=link.name, peers=()), link)
        mine = (link.name, trio.Event())
        while (other := self.fetching.setdefault(op.model, mine)) is not mine:
            if other[0] == link.name:  # (its hive takes the second request itself)
                break
            narrate("download", f"hive {other[0]} is fetching {op.model} already: hive "
                    f"{link.name} takes it from there once it has it")  # fmt: skip
            await other[1].wait()
        try:
            holders = [
                h for h in await self._holders(op.model, link) if await self._introduce(h, link)
            ]
            if holders:
                then = "".join(f", then hive {h.name}" for h in holders[1:])
                hub = ", then the hub" if op.source == "auto" else ""
                narrate("download", f"hive {link.name} takes {op.model} from hive "
                        f"{holders[0].name} ({_busy(holders[0])}){then}{hub}")  # fmt: skip
            elif op.source == "mesh":
                raise MeshError(
                    ErrorCode.NOT_FOUND,
                    f"no live hive of this mesh holds {op.model} whole for hive {link.name} "
                    "to take (--from mesh)",
                )
            peers = tuple(f"{h.name} {h.endpoint} {h.key or self.trust.public}" for h in holders)
            return await self.hives.forward(job, replace(op, hive=link.name, peers=peers), link)
        finally:
            if self.fetching.get(op.model) is mine:
                del self.fetching[op.model]
            mine[1].set()

    async def provide(self, job: ServerJob, link: HiveLink, ref: str) -> None:
        """Before a worker is spawned on `link`'s hive: if it lacks `ref` and another hive
        holds it, fetch it from there first (what a hive lacks that no hive holds, it is told
        to download, as before)."""
        if any(_whole(row, ref) for row in await self.hives.fresh_models(link)):
            return
        holders = await self._holders(ref, link)
        rows = await self.hives.fresh_models(holders[0]) if holders else []
        held = next((row for row in rows if _whole(row, ref)), None)
        if held is not None:
            narrate("download", f"hive {link.name} lacks {ref}: taking it from the mesh first")
            await self.download(job, link, ops.ModelDownload(model=held["id"], hive=link.name))

    async def _holders(self, ref: str, target: HiveLink) -> list[HiveLink]:
        """The live hives other than `target` that hold `ref` whole and that `target` can
        reach, least busy first (at most MAX_MESH_SOURCES)."""
        found = []
        for link in self.hives.live():
            if link is target or not _reachable(link.endpoint, target.endpoint):
                continue
            if any(_whole(row, ref) for row in await self.hives.fresh_models(link)):
                found.append(link)
        return sorted(found, key=lambda link: (_reading(link), link.name))[:MAX_MESH_SOURCES]

    async def forget(self, key: str, name: str) -> None:
        """A hive this queen no longer trusts: every live hive forgets it as a peer."""
        self.introduced = {(holder, k) for holder, k in self.introduced if k != key}
        for link in self.hives.live():
            try:
                job = await link.client.submit(ops.PeerUntrust(key=key))
                outcome(await job.end(), link.client.server)
            except MeshError as exc:
                narrate("hive_untrust", f"hive {link.name} could not be told to forget hive "
                        f"{name} as a peer: {exc.message}", level=Level.WARN)  # fmt: skip

    async def _introduce(self, holder: HiveLink, target: HiveLink) -> bool:
        """Have `holder` let `target` read its models; whether it does."""
        key = target.key or self.trust.public
        if (holder.name, key) in self.introduced:
            return True
        try:
            job = await holder.client.submit(ops.PeerTrust(name=target.name, key=key))
            outcome(await job.end(), holder.client.server)
        except MeshError as exc:
            narrate(
                "download",
                f"hive {holder.name} would not let hive {target.name} read its models "
                f"({exc.message}): not taking it from there",
                level=Level.WARN,
            )
            return False
        self.introduced.add((holder.name, key))
        return True


def _whole(row: dict[str, Any], ref: str) -> bool:
    """Whether the catalog row is a whole model that `ref` names, as a hive's catalog resolves
    it (its id, its repo, its file or the file's name)."""
    ident = row.get("id")
    if not isinstance(ident, str) or row.get("status") != "available":
        return False
    repo, _, file = ident.partition(":")
    return ref in (ident, repo, file, file.rsplit("/", 1)[-1])


def _reading(link: HiveLink) -> int:
    """How many reads of its models the hive serves other hives now (its last heartbeat's)."""
    sharing = link.state.get("sharing")
    reading = sharing.get("reading") if isinstance(sharing, dict) else None
    return reading if isinstance(reading, int) else 0


def _busy(link: HiveLink) -> str:
    reading = _reading(link)
    return (
        f"it holds it, and serves {reading} read(s) of other hives"
        if reading
        else ("it holds it, and serves no other hive now")
    )


def _reachable(holder: str, target: str) -> bool:
    """Whether a hive at `target` can reach one whose control endpoint is `holder` (as the queen
    reaches both): tcp only, and a loopback address only from another on loopback."""
    if not holder.startswith("tcp://"):
        return False
    return not _loopback(holder) or _loopback(target)


def _loopback(endpoint: str) -> bool:
    host = (parse_endpoint(endpoint).host or "").strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
