"""Every operation of the mesh, as a typed, validated message: the one table of operations.

An operation is what a keeper asks for; it travels inside a SUBMIT frame as
`{"name": <op name>, "args": {...}}`. Each class says which actor executes it (`target`): the queen
answers from its own registries, or routes the job to a hive, which may hand it to a worker.

Each class also says how a person asks for it: `COMMAND` (the words of its `rbee-mesh` command,
or None), its docstring (the command's help) and each field's `Arg`. The keeper generates its
commands from this table, so an operation's parameters, their ranges and their help are written
once, here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from rbee_mesh.protocol.constants import (
    DEFAULT_SLOTS,
    MAX_CONTEXT_TOKENS,
    MAX_DEADLINE_S,
    MAX_GENERATED_TOKENS,
    MAX_MESH_SOURCES,
    MAX_READ_BYTES,
    MAX_SLOTS,
    MIN_CONTEXT_TOKENS,
)
from rbee_mesh.protocol.errors import ProtocolError
from rbee_mesh.protocol.fields import (
    Arg,
    Bool,
    Choice,
    Float,
    Int,
    Optional,
    Text,
    TextList,
    Turns,
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


#: A model reference: a catalog id or a hub reference "OWNER/REPO[:FILE]". Never "..": a
#: reference becomes directory and file names on a hive (which checks it again, as paths).
MODEL_REF = Text(
    max_len=256,
    min_len=1,
    pattern=re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._/-]*(:[A-Za-z0-9][A-Za-z0-9._/-]*)?"),
    hint=" (expected a model id or OWNER/REPO[:FILE], without '..')",
)
_KEY = r"[0-9a-zA-Z.:+=^!/*?&<>()\[\]{}@%$#-]{40}"
_TCP = r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}"
#: A CURVE public key in z85 (what `rbee-mesh id` prints).
PUBLIC_KEY = Text(
    max_len=40,
    min_len=40,
    pattern=re.compile(_KEY),
    hint=" (expected a 40-character public key, as `rbee-mesh id` prints it)",
)
#: A tcp endpoint another node can connect to.
TCP_ENDPOINT = Text(
    max_len=128,
    min_len=1,
    pattern=re.compile(_TCP),
    hint=" (expected tcp://HOST:PORT)",
)
#: A hive that holds a model, as a queen names it to a hive that is to fetch the model from it:
#: "NAME tcp://HOST:PORT KEY" (its name, its control endpoint, its public key).
MESH_SOURCE = Text(
    max_len=240,
    min_len=50,
    pattern=re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:/@+-]{{0,63}} {_TCP} {_KEY}"),
    hint=" (expected NAME tcp://HOST:PORT KEY)",
)
DEVICE = Text(
    max_len=16,
    min_len=1,
    pattern=re.compile(r"auto|cpu|cuda:[0-9]{1,2}"),
    hint=" (expected auto, cpu or cuda:N)",
)
#: A device a worker runs on: `auto` resolved by its hive.
WORKER_DEVICE = Text(
    max_len=16,
    min_len=1,
    pattern=re.compile(r"cpu|cuda:[0-9]{1,2}"),
    hint=" (expected cpu or cuda:N)",
)
HIVE_PIN = Optional(ident())
#: Tokens of context a worker loads a model with.
CONTEXT = Optional(Int(MIN_CONTEXT_TOKENS, MAX_CONTEXT_TOKENS))
#: The library that loads a model; `auto` takes the first that can.
BACKEND = Choice(("auto", "llama-cpp", "ctransformers"))

#: The `--hive` option of every operation that runs on a hive.
_ON_HIVE = Arg(help="Run it on this hive.", metavar="HIVE")


#: Every operation, by name, in the order they are defined here (each class adds itself).
OPERATIONS: dict[str, type[Operation]] = {}


@dataclass(frozen=True, kw_only=True)
class Operation(Validated):
    """Base of all operations. Subclasses set NAME and TARGET."""

    NAME: ClassVar[str]
    TARGET: ClassVar[Actor]
    #: Default deadline in seconds; a SUBMIT may ask for a different one.
    DEADLINE_S: ClassVar[float] = 30.0
    #: The words of the `rbee-mesh` command that submits it (None: no command of its own).
    COMMAND: ClassVar[tuple[str, ...] | None] = None
    #: Whether a queen records its frames for watchers (`job_watch`).
    RECORDED: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "NAME" in vars(cls):  # an operation, not a base of several
            OPERATIONS[cls.NAME] = cls

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


@dataclass(frozen=True, kw_only=True)
class _OnHive(Operation):
    """Runs on a hive: the one named (`--hive`), or the one that holds what it names."""

    TARGET = Actor.HIVE
    hive: str | None = spec(HIVE_PIN, None, arg=_ON_HIVE)


@dataclass(frozen=True, kw_only=True)
class _OnWorker(_OnHive):
    """Runs on a worker's hive, about one worker."""

    worker: str = spec(ident(), arg=Arg(argument=True, metavar="WORKER"))


@dataclass(frozen=True, kw_only=True)
class _OnModel(_OnHive):
    """Runs on a hive, about one model of its catalog."""

    model: str = spec(MODEL_REF, arg=Arg(argument=True, metavar="MODEL"))


@dataclass(frozen=True, kw_only=True)
class Status(Operation):
    """The whole mesh at a glance: queen, hives, jobs."""

    NAME = "status"
    COMMAND = ("status",)
    TARGET = Actor.QUEEN
    DEADLINE_S = 10.0


@dataclass(frozen=True, kw_only=True)
class Ping(Operation):
    """Check the path to the queen: it narrates COUNT pongs back.

    A diagnostic: proves the narration path end to end and measures it (the benchmarks use it).
    """

    NAME = "ping"
    TARGET = Actor.QUEEN
    COMMAND = ("ping",)
    count: int = spec(Int(1, 100_000), 1, arg=Arg("How many pongs to narrate.", short="-n"))
    interval_s: float = spec(
        Float(0.0, 10.0), 0.0, arg=Arg("Seconds between pongs.", name="interval", short="-i")
    )
    hive: str | None = spec(
        HIVE_PIN, None, arg=Arg("Ask this hive instead of the queen.", metavar="HIVE")
    )

    @property
    def target(self) -> Actor:
        return Actor.QUEEN if self.hive is None else Actor.HIVE

    @property
    def default_deadline_s(self) -> float:
        return 30.0 + self.count * self.interval_s


@dataclass(frozen=True, kw_only=True)
class HiveList(Operation):
    """Every hive the queen knows: liveness, heartbeat age, devices, workers."""

    NAME = "hive_list"
    TARGET = Actor.QUEEN
    COMMAND = ("hive", "list")


@dataclass(frozen=True, kw_only=True)
class HiveGet(Operation):
    """One hive in detail, as its last heartbeat told the queen."""

    NAME = "hive_get"
    TARGET = Actor.QUEEN
    COMMAND = ("hive", "get")
    hive: str = spec(ident(), arg=Arg(argument=True, metavar="HIVE"))


@dataclass(frozen=True, kw_only=True)
class HiveStatus(Operation):
    """Ask a hive directly for its devices, workers and models (not the queen's cached view)."""

    NAME = "hive_status"
    TARGET = Actor.HIVE
    hive: str = spec(ident())


@dataclass(frozen=True, kw_only=True)
class HiveRefresh(Operation):
    """Make a hive detect its devices again and read its model catalog afresh."""

    NAME = "hive_refresh"
    TARGET = Actor.HIVE
    COMMAND = ("hive", "refresh")
    hive: str = spec(ident(), arg=Arg(argument=True, metavar="HIVE"))


@dataclass(frozen=True, kw_only=True)
class WorkerSpawn(_OnHive):
    """Start a worker that loads MODEL; returns once it has registered with its hive."""

    NAME = "worker_spawn"
    DEADLINE_S = 300.0
    COMMAND = ("worker", "spawn")
    model: str = spec(MODEL_REF, arg=Arg("A model in the catalog.", short="-m", metavar="MODEL"))
    device: str = spec(DEVICE, "auto", arg=Arg("auto, cpu or cuda:N."))
    backend: str = spec(
        BACKEND,
        "auto",
        arg=Arg("The library that loads the model; auto takes the first that can, and says which."),
    )
    slots: int = spec(
        Int(1, MAX_SLOTS),
        DEFAULT_SLOTS,
        arg=Arg(
            "Jobs the worker runs at once, in one batch (llama-cpp; ctransformers runs one).",
        ),
    )
    ctx: int | None = spec(
        CONTEXT,
        None,
        arg=Arg(
            "Tokens of context (prompt and reply) of each slot. Default: the model's own, as "
            "far as the slots' caches fit a memory budget (docs/inference.md).",
            metavar="TOKENS",
        ),
    )


@dataclass(frozen=True, kw_only=True)
class WorkerList(_OnHive):
    """Workers on every hive (or one)."""

    NAME = "worker_list"
    COMMAND = ("worker", "list")


@dataclass(frozen=True, kw_only=True)
class WorkerGet(_OnWorker):
    """One worker in detail."""

    NAME = "worker_get"
    COMMAND = ("worker", "get")


@dataclass(frozen=True, kw_only=True)
class WorkerDelete(_OnWorker):
    """Stop a worker: gracefully, then by force after a grace period."""

    NAME = "worker_delete"
    DEADLINE_S = 60.0
    COMMAND = ("worker", "delete")


@dataclass(frozen=True, kw_only=True)
class ModelDownload(_OnHive):
    """Download a GGUF model into a hive's catalog: from another hive of the mesh that holds
    it, else from the hub (HF_ENDPOINT honoured).

    Without :FILE, a quantization is chosen in this order: Q4_K_M, Q5_K_M, Q4_0, Q8_0, F16.
    An interrupted download resumes on the next request, from whichever source; Ctrl-C
    cancels and cleans up.
    """

    NAME = "model_download"
    DEADLINE_S = 6 * 3600.0
    COMMAND = ("model", "download")
    model: str = spec(MODEL_REF, arg=Arg(argument=True, metavar="REPO[:FILE]"))
    source: str = spec(
        Choice(("auto", "mesh", "hub")),
        "auto",
        arg=Arg("Where the bytes come from: auto takes them from a hive that holds the model, "
                "else (or if they all fail) from the hub; mesh only from hives; hub only from "
                "the hub.", name="from"),
    )  # fmt: skip
    #: The hives to take it from, in order (set by the queen, from what its hives hold).
    peers: tuple[str, ...] = spec(
        TextList(MESH_SOURCE, max_items=MAX_MESH_SOURCES), (), arg=Arg(hidden=True)
    )


@dataclass(frozen=True, kw_only=True)
class ModelRead(Operation):
    """Bytes of a model of this hive's catalog, `length` of them from `offset`, as CHUNK
    frames; DONE says how many. A hive that fetches the model asks it (docs/sharing.md)."""

    NAME = "model_read"
    TARGET = Actor.HIVE
    #: Its frames are bytes of a model, which nobody watches.
    RECORDED = False
    model: str = spec(MODEL_REF)
    offset: int = spec(Int(0, 2**62))
    length: int = spec(Int(1, MAX_READ_BYTES))


@dataclass(frozen=True, kw_only=True)
class PeerTrust(Operation):
    """Sent by a queen to a hive it manages: trust the hive NAME, of key KEY, as a peer, which
    may read this hive's models (`model_read`, `model_get`) and nothing else."""

    NAME = "peer_trust"
    TARGET = Actor.HIVE
    name: str = spec(ident())
    key: str = spec(PUBLIC_KEY)


@dataclass(frozen=True, kw_only=True)
class PeerUntrust(Operation):
    """Sent by a queen to its hives when it stops trusting a hive: forget that hive as a peer
    (its key, where it is trusted as a peer and as nothing else), and cut its connections."""

    NAME = "peer_untrust"
    TARGET = Actor.HIVE
    key: str = spec(PUBLIC_KEY)


@dataclass(frozen=True, kw_only=True)
class ModelImport(_OnHive):
    """Add the GGUF file at PATH on this machine to its hive's catalog: checked (a file that is
    not GGUF, or is truncated, is refused and nothing is added), copied with its sha256, and
    listed only once whole. Its architecture, quantization, context length and parameter count
    come from the file. Only this machine's own node may ask it (the path is this machine's).
    """

    NAME = "model_import"
    DEADLINE_S = 3600.0
    #: An absolute path (`rbee-mesh model import` resolves the one typed).
    path: str = spec(Text(max_len=4096, min_len=2, pattern=re.compile(r"/[^\x00]*")))
    #: Its id in the catalog, OWNER/REPO (default: local/ and the file's name).
    name: str | None = spec(Optional(MODEL_REF), None)


@dataclass(frozen=True, kw_only=True)
class ModelList(_OnHive):
    """Models on every hive (or one)."""

    NAME = "model_list"
    COMMAND = ("model", "list")


@dataclass(frozen=True, kw_only=True)
class ModelGet(_OnModel):
    """One model's catalog entry."""

    NAME = "model_get"
    COMMAND = ("model", "get")


@dataclass(frozen=True, kw_only=True)
class ModelDelete(_OnModel):
    """Delete a model from a hive's catalog (refused while a worker uses it)."""

    NAME = "model_delete"
    COMMAND = ("model", "delete")


@dataclass(frozen=True, kw_only=True)
class Infer(Operation):
    """Generate text from PROMPT on a worker of the mesh: text to stdout as it comes,
    narration to stderr. Ctrl-C stops the generation.

    With no queen running (and no --queen), a mesh starts inside this command for the job: a
    queen, and this machine's hive (or the hive daemon running here), then stops again.
    """

    NAME = "infer"
    TARGET = Actor.WORKER
    DEADLINE_S = 600.0
    COMMAND = ("infer",)
    prompt: str = spec(Text(max_len=200_000, min_len=1), arg=Arg(argument=True, metavar="PROMPT"))
    model: str | None = spec(
        Optional(MODEL_REF),
        None,
        arg=Arg(
            "A model id, repo or file name; OWNER/REPO[:FILE] is downloaded if no hive has "
            "it. Default: any model a worker holds.",
            short="-m",
            metavar="MODEL",
        ),
    )
    hive: str | None = spec(HIVE_PIN, None, arg=_ON_HIVE)
    worker: str | None = spec(
        Optional(ident()), None, arg=Arg("Run it on this worker.", metavar="WORKER")
    )
    max_tokens: int = spec(
        Int(1, MAX_GENERATED_TOKENS), 256, arg=Arg("Tokens to generate.", short="-n")
    )
    temperature: float = spec(
        Float(0.0, 2.0), 0.8, arg=Arg("0 is greedy; higher is more varied.", short="-t")
    )
    top_p: float = spec(Float(0.0, 1.0, open_lo=True), 0.95)
    top_k: int = spec(Int(0, 1_000), 40, arg=Arg("0 disables it."))
    seed: int | None = spec(
        Optional(Int(0, 2**32 - 1)),
        None,
        arg=Arg("Same seed and parameters give the same text."),
    )
    stop: tuple[str, ...] = spec(
        TextList(Text(max_len=64, min_len=1), max_items=8),
        (),
        arg=Arg("Stop before this text. Repeatable.", metavar="TEXT"),
    )
    repeat_penalty: float = spec(Float(0.5, 2.0), 1.1)
    #: OpenAI's penalties: for a token's presence in the text so far, and per occurrence.
    presence_penalty: float = spec(Float(-2.0, 2.0), 0.0)
    frequency_penalty: float = spec(Float(-2.0, 2.0), 0.0)
    download: bool = spec(
        Bool(),
        True,
        arg=Arg("Fail rather than download a model no hive has.", negated_by="no-download"),
    )
    chat: bool = spec(
        Bool(),
        False,
        arg=Arg("A chat turn: PROMPT as the user's message, in the model's own chat template."),
    )
    system: str | None = spec(
        Optional(Text(max_len=200_000, min_len=1)),
        None,
        arg=Arg("A system message for the chat turn (implies --chat).", metavar="TEXT"),
    )
    #: The chat's earlier turns, before this one (`rbee-mesh chat`, the API's messages).
    history: tuple[tuple[str, str], ...] = spec(
        Turns(("system", "user", "assistant"), Text(max_len=200_000), max_items=256),
        (),
        arg=Arg(hidden=True),
    )


@dataclass(frozen=True, kw_only=True)
class JobList(Operation):
    """Running jobs and the most recent finished ones."""

    NAME = "job_list"
    TARGET = Actor.QUEEN
    COMMAND = ("jobs", "list")
    include_finished: bool = spec(
        Bool(), True, arg=Arg("Only jobs that are still running.", negated_by="running")
    )


@dataclass(frozen=True, kw_only=True)
class JobCancel(Operation):
    """Cancel the running job JOB_ID (any keeper's)."""

    NAME = "job_cancel"
    TARGET = Actor.QUEEN
    COMMAND = ("jobs", "cancel")
    job: str = spec(ident(), arg=Arg(argument=True, metavar="JOB_ID"))


@dataclass(frozen=True, kw_only=True)
class Top(Operation):
    """The mesh, live: hives with their devices and workers, running jobs with the end of
    their narration and text, recent failures; redrawn every --interval, until Ctrl-C (or
    --count snapshots). With --json, each snapshot is a DATA record {"kind": "snapshot", ...}:
    what the queen's dashboard shows (docs/observability.md)."""

    NAME = "top"
    TARGET = Actor.QUEEN
    COMMAND = ("top",)
    #: It lasts until its keeper leaves (or its count is reached).
    DEADLINE_S = MAX_DEADLINE_S
    #: Its frames are snapshots of the queen, which nobody replays.
    RECORDED = False
    interval_s: float = spec(
        Float(0.1, 60.0), 1.0, arg=Arg("Seconds between snapshots, at least.", name="interval",
                                       short="-i", metavar="SECONDS"),
    )  # fmt: skip
    count: int | None = spec(
        Optional(Int(1, 1_000_000)), None,
        arg=Arg("Snapshots to show, then end (default: until Ctrl-C).", short="-n"),
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class JobWatch(Operation):
    """Follow the job JOB_ID (any keeper's, running or recently finished): its narration and
    output from the start, then live, as its submitter saw them; exit with its exit code.
    Leaving (Ctrl-C) changes nothing for the job.

    The job's frames come first as a DATA record {"kind": "watch", "job", "op", "ref",
    "deadline_s"}, then as they were sent, under this job's id; this job ends as it did."""

    NAME = "job_watch"
    TARGET = Actor.QUEEN
    #: It lasts as long as the job it follows (whose own deadline ends that).
    DEADLINE_S = MAX_DEADLINE_S
    COMMAND = ("jobs", "watch")
    #: Its frames are another job's, recorded there already.
    RECORDED = False
    job: str = spec(ident(), arg=Arg(argument=True, metavar="JOB_ID"))


#: A trusted node: its name, fingerprint or key.
NODE = Text(max_len=64, min_len=1, pattern=re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+=-]*"))


@dataclass(frozen=True, kw_only=True)
class Invite(Operation):
    """Print a join token: one line, good once, until it expires. On another box,
    `rbee-mesh hive start --join TOKEN` (or `rbee-mesh keeper join TOKEN`) joins this queen with
    no other step: it pins this queen's key, and this queen trusts its key."""

    NAME = "invite"
    TARGET = Actor.QUEEN
    COMMAND = ("queen", "invite")
    role: str = spec(Choice(("hive", "keeper")), "hive", arg=Arg("Who joins with it.", name="for"))
    ttl_s: float = spec(
        Float(10.0, 7 * 86400.0), 600.0, arg=Arg("Seconds the token is good for.", name="ttl")
    )
    address: str | None = spec(
        Optional(Text(max_len=64, min_len=1, pattern=re.compile(r"[A-Za-z0-9.:\[\]-]+"))),
        None,
        arg=Arg("The queen's address as the joiner reaches it (default: this box's own).",
                metavar="HOST"),
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Join(Operation):
    """Sent with a join token's one-time key: trust this node (and, for a hive, manage it)."""

    NAME = "join"
    TARGET = Actor.QUEEN
    name: str = spec(ident())
    key: str = spec(PUBLIC_KEY)
    #: A hive's control and heartbeat endpoints, as the queen reaches them.
    control: str | None = spec(Optional(TCP_ENDPOINT), None)
    heartbeats: str | None = spec(Optional(TCP_ENDPOINT), None)


#: A pairing code as `rbee-mesh hive pair` prints it (dashes and case do not matter).
PAIRING_CODE = Text(
    max_len=16,
    min_len=10,
    pattern=re.compile(r"[A-Za-z0-9]{5}-?[A-Za-z0-9]{5}"),
    hint=" (expected the code `rbee-mesh hive pair` printed on the hive's machine)",
)


@dataclass(frozen=True, kw_only=True)
class HiveTrust(Operation):
    """Trust HIVE, found on the LAN and pending in `hive list`: with the pairing code that
    `rbee-mesh hive pair` printed on its machine, the hive trusts this queen in turn and the
    queen manages it at once. Compare the fingerprint it shows with `rbee-mesh id` there."""

    NAME = "hive_trust"
    TARGET = Actor.QUEEN
    COMMAND = ("hive", "trust")
    hive: str = spec(ident(), arg=Arg(argument=True, metavar="HIVE"))
    code: str | None = spec(
        Optional(PAIRING_CODE),
        None,
        arg=Arg("The hive's pairing code (`rbee-mesh hive pair` there).", metavar="CODE"),
    )
    fingerprint: str | None = spec(
        Optional(NODE), None, arg=Arg("Trust it only if its fingerprint is this one.")
    )


@dataclass(frozen=True, kw_only=True)
class HivePair(Operation):
    """Open a pairing window on this machine's hive: a short code, good once, for a few
    minutes, which a queen's `hive trust HIVE --code CODE` takes."""

    NAME = "hive_pair"
    TARGET = Actor.HIVE
    ttl_s: float = spec(Float(10.0, 86400.0), 600.0)


@dataclass(frozen=True, kw_only=True)
class Pair(Operation):
    """Sent by a queen with a pairing code's one-time key: the hive trusts this queen."""

    NAME = "pair"
    TARGET = Actor.HIVE
    name: str = spec(ident())
    key: str = spec(PUBLIC_KEY)


@dataclass(frozen=True, kw_only=True)
class HiveUntrust(Operation):
    """Stop trusting HIVE: the queen cuts it off at once and forgets its key."""

    NAME = "hive_untrust"
    TARGET = Actor.QUEEN
    COMMAND = ("hive", "untrust")
    hive: str = spec(NODE, arg=Arg(argument=True, metavar="HIVE"))


@dataclass(frozen=True, kw_only=True)
class KeeperList(Operation):
    """Keepers of other machines that joined this queen."""

    NAME = "keeper_list"
    TARGET = Actor.QUEEN
    COMMAND = ("keeper", "list")


@dataclass(frozen=True, kw_only=True)
class KeeperRevoke(Operation):
    """Stop trusting KEEPER (its name or fingerprint): it is cut off at once."""

    NAME = "keeper_revoke"
    TARGET = Actor.QUEEN
    COMMAND = ("keeper", "revoke")
    keeper: str = spec(NODE, arg=Arg(argument=True, metavar="KEEPER"))


@dataclass(frozen=True, kw_only=True)
class ApiKeyCreate(Operation):
    """A new key for the queen's HTTP API, for NAME (an app, a person): printed once, kept
    only as a hash. It replaces NAME's earlier key. Needed when the API serves beyond this
    machine (`queen start --api 0.0.0.0:7834`): `Authorization: Bearer KEY`."""

    NAME = "apikey_create"
    TARGET = Actor.QUEEN
    COMMAND = ("apikey", "create")
    name: str = spec(NODE, arg=Arg(argument=True, metavar="NAME"))


@dataclass(frozen=True, kw_only=True)
class ApiKeyList(Operation):
    """The API keys this queen takes (their names and fingerprints; never the keys)."""

    NAME = "apikey_list"
    TARGET = Actor.QUEEN
    COMMAND = ("apikey", "list")


@dataclass(frozen=True, kw_only=True)
class ApiKeyRevoke(Operation):
    """Revoke the API key of NAME (or of that fingerprint): refused from its next request."""

    NAME = "apikey_revoke"
    TARGET = Actor.QUEEN
    COMMAND = ("apikey", "revoke")
    name: str = spec(NODE, arg=Arg(argument=True, metavar="NAME"))


def operation_from_body(body: Any) -> Operation:
    """Build an Operation from the `op` map of a SUBMIT body, validating every argument."""
    if not isinstance(body, dict) or set(body) != {"name", "args"}:
        raise ProtocolError("op must be a map with exactly the keys name and args")
    name = body["name"]
    cls = OPERATIONS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ProtocolError(f"unknown operation {_brief(name)}")
    return cls.from_wire(body["args"], f"operation {name}")
