"""Where an inference job runs: a pure decision over what the hives last said.

Input: the job's Infer operation, each candidate hive as the queen knows it (devices with free
memory and workers with their slots from its last heartbeat, its catalog), and how many jobs
this queen has in flight on each worker (the queen's own count is exact; a heartbeat may be a
second old). The queen passes only hives that are live now: a suspect one is not chosen while
another can serve.

The rules, in order:

1. an idle worker that holds the model (a free slot) runs it: `use`;
2. a pinned worker that is busy, or a worker with the model that is busy, means waiting: `wait`
   (unless a hive could spawn another worker for it, see 3);
3. a hive that holds the model, with enough free memory on some device, spawns a worker for it:
   `spawn`, on the hive with the most free memory; on the CPU only if the hive's cores are not
   all taken by busy workers (threads, `sizing.threads_for`): two workers sharing cores both
   crawl, so the job waits for one instead;
4. a model no hive holds, named as a hub reference (OWNER/REPO[:FILE]), is downloaded by the hive
   with the most free memory, unless the job says not to: `download` (then the rules run again);
5. otherwise the job fails, saying why: no such model, not enough memory anywhere, a model
   file that failed to load before (`unloadable`: not tried again for every job), or a hive
   whose catalog the queen has never read (it did not answer for it: it may hold the model,
   so the job is neither told the model is missing nor downloads it, but is UNAVAILABLE).

Every decision carries a sentence saying why, which the queen narrates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Any

from rbee_mesh.inference.sizing import estimated_memory, threads_for
from rbee_mesh.protocol import ErrorCode, Infer, MeshError
from rbee_mesh.units import human_bytes

#: A worker in one of these states can take jobs (when it has a free slot).
_SERVING = frozenset({"ready", "busy"})


@dataclass(frozen=True)
class HiveView:
    """One hive as the queen knows it: its workers and devices (as its last heartbeat listed
    them) and its models (its catalog)."""

    name: str
    workers: Sequence[Mapping[str, Any]]
    models: Sequence[Mapping[str, Any]]
    devices: Sequence[Mapping[str, Any]]
    #: Models whose workers are being spawned there now (one entry per worker): busy already.
    starting: Sequence[str] = ()
    #: Why the queen has never read this hive's catalog ("" once it has): `models` is empty,
    #: but the hive may hold any model.
    models_unread: str = ""

    @property
    def most_free_memory(self) -> int:
        return max((int(d.get("memory_free", 0)) for d in self.devices), default=0)

    def can_compute(self, model: Mapping[str, Any], inflight: Mapping[str, int]) -> bool:
        """Whether a new worker for `model` would have compute of its own: a GPU with room for
        it, or CPU cores that busy workers do not take (threads of each, by its model's size).
        A hive that does not say its cores is not limited by them."""
        needed = estimated_memory(int(model["size"]))
        if any(d.get("kind") != "cpu" and int(d.get("memory_free", 0)) >= needed
               for d in self.devices):  # fmt: skip
            return True
        cores = next((int(d.get("cores", 0)) for d in self.devices if d.get("kind") == "cpu"), 0)
        if not cores:
            return True
        sizes = {str(m.get("id")): int(m.get("size", 0)) for m in self.models}
        busy = [
            str(w.get("model"))
            for w in self.workers
            if w.get("device") == "cpu"
            and w.get("state") in _SERVING
            and (inflight.get(str(w.get("id")), 0) > 0 or int(w.get("busy", 0)) > 0)
        ]
        taken = sum(threads_for(sizes.get(m, 0), cores) for m in [*busy, *self.starting])
        return taken + threads_for(int(model["size"]), cores) <= cores


class Action(StrEnum):
    """What the queen does for a job: run it on a worker, or first spawn one, download the
    model, or wait for a slot."""

    USE = "use"
    SPAWN = "spawn"
    DOWNLOAD = "download"
    WAIT = "wait"


@dataclass(frozen=True)
class Decision:
    action: Action
    hive: str
    model: str | None
    reason: str
    worker: str | None = None


def matches(model_id: str, ref: str) -> bool:
    """Whether a catalog id (OWNER/REPO:FILE) is what `ref` names: the id, its file, or repo."""
    repo, _, file = model_id.partition(":")
    return ref in (model_id, repo, file, PurePosixPath(file).name)


def place(op: Infer, hives: Sequence[HiveView], inflight: Mapping[str, int]) -> Decision:
    """Decide where `op` runs. `inflight` counts this queen's jobs per worker id."""
    if not hives:
        raise MeshError(ErrorCode.UNAVAILABLE, "no hive is live to run the job")

    def wanted(model: str) -> bool:
        return op.model is None or matches(model, op.model)

    serving = [
        (hive, w)
        for hive in hives
        for w in hive.workers
        if w.get("state") in _SERVING
        and wanted(str(w.get("model", "")))
        and (op.worker is None or w.get("id") == op.worker)
    ]
    free = [
        (hive, w)
        for hive, w in serving
        if int(w.get("slots", 1)) - inflight.get(str(w["id"]), 0) > 0
    ]
    if free:
        hive, w = min(free, key=lambda hw: inflight.get(str(hw[1]["id"]), 0))
        return Decision(
            Action.USE,
            hive.name,
            str(w["model"]),
            f"worker {w['id']} on hive {hive.name} is idle and holds {w['model']}",
            worker=str(w["id"]),
        )
    if op.worker is not None:
        if serving:
            return Decision(
                Action.WAIT, serving[0][0].name, str(serving[0][1]["model"]),
                f"worker {op.worker} is busy",
            )  # fmt: skip
        raise MeshError(ErrorCode.NOT_FOUND, f"no worker {op.worker} is serving on a live hive")

    holders = [
        (hive, m)
        for hive in hives
        for m in hive.models
        if m.get("status") == "available" and wanted(str(m.get("id", "")))
    ]
    fitting = [
        (hive, m)
        for hive, m in holders
        if hive.most_free_memory >= estimated_memory(int(m["size"]))
    ]
    runnable = [(hive, m) for hive, m in fitting if hive.can_compute(m, inflight)]
    if runnable:
        hive, m = max(runnable, key=lambda hm: hm[0].most_free_memory)
        why = "no worker holds it" if not serving else "every worker holding it is busy"
        return Decision(
            Action.SPAWN,
            hive.name,
            str(m["id"]),
            f"{why}; hive {hive.name} has {m['id']} and {human_bytes(hive.most_free_memory)} "
            "free: spawning a worker there",
        )
    if serving or fitting:
        hive, model = (
            (serving[0][0], str(serving[0][1]["model"]))
            if serving
            else (fitting[0][0], str(fitting[0][1]["id"]))
        )
        why = f"every worker holding {model} is busy" if serving else f"no worker holds {model}"
        room = (
            f"the CPU cores of hive {hive.name} are taken by busy (or starting) workers"
            if fitting
            else "no hive has room for another"
        )
        return Decision(Action.WAIT, hive.name, model, f"{why}, and {room}")
    if holders:
        hive, m = max(holders, key=lambda hm: hm[0].most_free_memory)
        raise MeshError(
            ErrorCode.UNAVAILABLE,
            f"out of memory: {m['id']} needs about {human_bytes(estimated_memory(int(m['size'])))}"
            f"; the most free on any hive is {human_bytes(hive.most_free_memory)} on {hive.name}",
        )
    unloadable = [
        (hive, m)
        for hive in hives
        for m in hive.models
        if m.get("status") == "unloadable" and wanted(str(m.get("id", "")))
    ]
    if unloadable:  # tried, and it failed: not again for every job (nor downloaded again)
        hive, m = unloadable[0]
        raise MeshError(
            ErrorCode.INVALID_REQUEST,
            f"{m['id']} on hive {hive.name} cannot be loaded: {m.get('error')} "
            f"(`rbee-mesh worker spawn -m {m['id']}` tries again)",
        )
    unread = [hive for hive in hives if hive.models_unread]
    if unread:  # neither missing (NOT_FOUND) nor to download: it may be there
        hive = unread[0]
        raise MeshError(
            ErrorCode.UNAVAILABLE,
            f"hive {hive.name} has not listed its models ({hive.models_unread}); it may hold "
            f"{op.model or 'one'}: try again",
        )
    if op.model is None:
        raise MeshError(
            ErrorCode.NOT_FOUND, "no hive holds any model; name one with -m OWNER/REPO[:FILE]"
        )
    if "/" in op.model and op.download:
        hive = max(hives, key=lambda h: h.most_free_memory)
        return Decision(
            Action.DOWNLOAD,
            hive.name,
            op.model,
            f"no hive holds {op.model}; hive {hive.name} downloads it",
        )
    raise MeshError(
        ErrorCode.NOT_FOUND,
        f"no hive holds a model named {op.model!r}"
        + ("" if not op.download else "; name it as OWNER/REPO[:FILE] to download it"),
    )
