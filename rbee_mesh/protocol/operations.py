"""Every operation of the mesh, as a typed, validated message.

An operation is what a keeper asks for; it travels inside a SUBMIT frame as
`{"name": <op name>, "args": {...}}`. Each class says which actor executes it (`target`): the queen
answers from its own registries, or routes the job to a hive, which may hand it to a worker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from rbee_mesh.protocol.errors import ProtocolError
from rbee_mesh.protocol.fields import (
    Bool,
    Float,
    Int,
    Optional,
    Text,
    TextList,
    Validated,
    _brief,
    ident,
    spec,
)


class Actor(StrEnum):
    """The four kinds of actor in a mesh."""

    KEEPER = "keeper"
    QUEEN = "queen"
    HIVE = "hive"
    WORKER = "worker"


#: A model reference: a catalog id or a hub reference "OWNER/REPO[:FILE]".
MODEL_REF = Text(
    max_len=256,
    min_len=1,
    pattern=re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*(:[A-Za-z0-9][A-Za-z0-9._/-]*)?"),
    hint=" (expected a model id or OWNER/REPO[:FILE])",
)
DEVICE = Text(
    max_len=16,
    min_len=1,
    pattern=re.compile(r"auto|cpu|cuda:[0-9]{1,2}"),
    hint=" (expected auto, cpu or cuda:N)",
)
HIVE_PIN = Optional(ident())
BACKEND = Text(
    max_len=16,
    min_len=1,
    pattern=re.compile(r"auto|llama-cpp|ctransformers"),
    hint=" (expected auto, llama-cpp or ctransformers)",
)


@dataclass(frozen=True)
class Operation(Validated):
    """Base of all operations. Subclasses set NAME and TARGET."""

    NAME: ClassVar[str]
    TARGET: ClassVar[Actor]
    #: Default deadline in seconds; a SUBMIT may ask for a different one.
    DEADLINE_S: ClassVar[float] = 30.0

    @property
    def target(self) -> Actor:
        return self.TARGET

    @property
    def default_deadline_s(self) -> float:
        """How long a job running this operation may take unless its SUBMIT says otherwise."""
        return self.DEADLINE_S

    @property
    def hive_pin(self) -> str | None:
        """The hive this operation is pinned to, if any."""
        hive = getattr(self, "hive", None)
        return hive if isinstance(hive, str) else None

    def to_body(self) -> dict[str, Any]:
        return {"name": self.NAME, "args": self.to_wire()}


@dataclass(frozen=True)
class Status(Operation):
    """The whole mesh at a glance: queen, hives, workers, jobs."""

    NAME = "status"
    TARGET = Actor.QUEEN
    DEADLINE_S = 10.0


@dataclass(frozen=True)
class Ping(Operation):
    """Narrate `count` pongs, `interval_s` apart, from the queen or a pinned hive.

    A diagnostic: proves the narration path end to end and measures it (the benchmarks use it).
    """

    NAME = "ping"
    TARGET = Actor.QUEEN
    count: int = spec(Int(1, 100_000), 1)
    interval_s: float = spec(Float(0.0, 10.0), 0.0)
    hive: str | None = spec(HIVE_PIN, None)

    @property
    def target(self) -> Actor:
        return Actor.QUEEN if self.hive is None else Actor.HIVE

    @property
    def default_deadline_s(self) -> float:
        return 30.0 + self.count * self.interval_s


@dataclass(frozen=True)
class HiveList(Operation):
    NAME = "hive_list"
    TARGET = Actor.QUEEN


@dataclass(frozen=True)
class HiveGet(Operation):
    NAME = "hive_get"
    TARGET = Actor.QUEEN
    hive: str = spec(ident())


@dataclass(frozen=True)
class HiveStatus(Operation):
    """Ask a hive directly for its devices, workers and models (not the queen's cached view)."""

    NAME = "hive_status"
    TARGET = Actor.HIVE
    hive: str = spec(ident())


@dataclass(frozen=True)
class HiveRefresh(Operation):
    """Make a hive re-detect its devices and rescan its model catalog."""

    NAME = "hive_refresh"
    TARGET = Actor.HIVE
    hive: str = spec(ident())


@dataclass(frozen=True)
class WorkerSpawn(Operation):
    NAME = "worker_spawn"
    TARGET = Actor.HIVE
    DEADLINE_S = 300.0
    model: str = spec(MODEL_REF)
    hive: str | None = spec(HIVE_PIN, None)
    device: str = spec(DEVICE, "auto")
    #: Which library loads the model; `auto` takes the first that can and says which.
    backend: str = spec(BACKEND, "auto")
    #: How many jobs the worker runs at once.
    slots: int = spec(Int(1, 64), 1)


@dataclass(frozen=True)
class WorkerList(Operation):
    NAME = "worker_list"
    TARGET = Actor.HIVE
    hive: str | None = spec(HIVE_PIN, None)


@dataclass(frozen=True)
class WorkerGet(Operation):
    NAME = "worker_get"
    TARGET = Actor.HIVE
    worker: str = spec(ident())
    hive: str | None = spec(HIVE_PIN, None)


@dataclass(frozen=True)
class WorkerDelete(Operation):
    NAME = "worker_delete"
    TARGET = Actor.HIVE
    DEADLINE_S = 60.0
    worker: str = spec(ident())
    hive: str | None = spec(HIVE_PIN, None)


@dataclass(frozen=True)
class ModelDownload(Operation):
    NAME = "model_download"
    TARGET = Actor.HIVE
    DEADLINE_S = 6 * 3600.0
    model: str = spec(MODEL_REF)
    hive: str | None = spec(HIVE_PIN, None)


@dataclass(frozen=True)
class ModelList(Operation):
    NAME = "model_list"
    TARGET = Actor.HIVE
    hive: str | None = spec(HIVE_PIN, None)


@dataclass(frozen=True)
class ModelGet(Operation):
    NAME = "model_get"
    TARGET = Actor.HIVE
    model: str = spec(MODEL_REF)
    hive: str | None = spec(HIVE_PIN, None)


@dataclass(frozen=True)
class ModelDelete(Operation):
    NAME = "model_delete"
    TARGET = Actor.HIVE
    model: str = spec(MODEL_REF)
    hive: str | None = spec(HIVE_PIN, None)


@dataclass(frozen=True)
class Infer(Operation):
    """Generate text. Ranges are checked here, before any work starts."""

    NAME = "infer"
    TARGET = Actor.WORKER
    DEADLINE_S = 600.0
    prompt: str = spec(Text(max_len=200_000, min_len=1))
    model: str | None = spec(Optional(MODEL_REF), None)
    max_tokens: int = spec(Int(1, 32_768), 256)
    temperature: float = spec(Float(0.0, 2.0), 0.8)
    top_p: float = spec(Float(0.0, 1.0, open_lo=True), 0.95)
    top_k: int = spec(Int(0, 1_000), 40)
    seed: int | None = spec(Optional(Int(0, 2**32 - 1)), None)
    stop: tuple[str, ...] = spec(TextList(Text(max_len=64, min_len=1), max_items=8), ())
    repeat_penalty: float = spec(Float(0.5, 2.0), 1.1)
    hive: str | None = spec(HIVE_PIN, None)
    worker: str | None = spec(Optional(ident()), None)


@dataclass(frozen=True)
class JobList(Operation):
    NAME = "job_list"
    TARGET = Actor.QUEEN
    include_finished: bool = spec(Bool(), True)


@dataclass(frozen=True)
class JobCancel(Operation):
    NAME = "job_cancel"
    TARGET = Actor.QUEEN
    job: str = spec(ident())


OPERATIONS: dict[str, type[Operation]] = {
    cls.NAME: cls
    for cls in (
        Status,
        Ping,
        HiveList,
        HiveGet,
        HiveStatus,
        HiveRefresh,
        WorkerSpawn,
        WorkerList,
        WorkerGet,
        WorkerDelete,
        ModelDownload,
        ModelList,
        ModelGet,
        ModelDelete,
        Infer,
        JobList,
        JobCancel,
    )
}


def operation_from_body(body: Any) -> Operation:
    """Build an Operation from the `op` map of a SUBMIT body, validating every argument."""
    if not isinstance(body, dict) or set(body) != {"name", "args"}:
        raise ProtocolError("op must be a map with exactly the keys name and args")
    name = body["name"]
    cls = OPERATIONS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ProtocolError(f"unknown operation {_brief(name)}")
    return cls.from_wire(body["args"], f"operation {name}")
