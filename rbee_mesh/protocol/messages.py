"""The message kinds exchanged between actors, as frozen, validated dataclasses.

Every message has a `job_id` (empty for messages about a connection rather than a job); it travels
in its own frame so that a relay can route without unpacking the body. See docs/protocol.md.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Annotated, Any, ClassVar, Self

from rbee_mesh.protocol.constants import (
    MAX_BATCH,
    MAX_CHUNK_BYTES,
    MAX_DEADLINE_S,
    MAX_HEARTBEAT_S,
    MAX_JOB_ID,
    MAX_SENTENCE,
    MIN_HEARTBEAT_S,
)
from rbee_mesh.protocol.errors import ErrorCode, ProtocolError
from rbee_mesh.protocol.fields import (
    Blob,
    Bool,
    Float,
    Int,
    OneOf,
    Optional,
    Spec,
    Text,
    Validated,
    Value,
    c_path_built,
    ident,
    spec,
)
from rbee_mesh.protocol.operations import Actor, Operation, operation_from_body

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


class Kind(IntEnum):
    """The message kind: one byte on the wire."""

    SUBMIT = 1
    ACCEPTED = 2
    NARRATION = 3
    DATA = 4
    TOKEN = 5
    DONE = 6
    ERROR = 7
    CANCEL = 8
    CANCELLED = 9
    HEARTBEAT = 10
    READY = 11
    DISCONNECT = 12
    BATCH = 13
    CHUNK = 14


class Level(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"


class _OperationSpec(Spec):
    """The `op` of a SUBMIT: an Operation instance in memory, {name, args} on the wire."""

    def load(self, name: str, value: Any) -> Operation:
        if isinstance(value, Operation):
            return value
        return operation_from_body(value)

    def dump(self, value: Any) -> Any:
        assert isinstance(value, Operation)
        return value.to_body()


@dataclass(frozen=True)
class Message(Validated):
    """Base of all message kinds."""

    KIND: ClassVar[Kind]
    #: Whether the job id frame must be set (True) or may be empty (False).
    NEEDS_JOB: ClassVar[bool] = True
    WIRE_EXCLUDE = frozenset({"job_id"})

    job_id: str

    def __post_init__(self) -> None:
        self._checked()
        super().__post_init__()

    def _checked(self) -> None:
        if type(self.job_id) is not str or self.job_id not in _VALID_JOB_IDS:  # (ids seen lately)
            check_job_id(self.job_id, required=self.NEEDS_JOB, what=self.KIND.name)

    @property
    def is_terminal(self) -> bool:
        return self.KIND in TERMINAL_KINDS


def sentence(text: str) -> str:
    """`text` cut to fit a frame's sentence for a person (MAX_SENTENCE), marked where cut."""
    return text if len(text) <= MAX_SENTENCE else text[: MAX_SENTENCE - 1] + "…"


def check_job_id(job_id: Any, *, required: bool, what: str) -> str:
    if type(job_id) is str and job_id in _VALID_JOB_IDS:
        return job_id
    if not isinstance(job_id, str):
        raise ProtocolError(f"{what}: job id must be a string")
    if not job_id:
        if required:
            raise ProtocolError(f"{what} must carry a job id")
        return job_id
    if len(job_id) > MAX_JOB_ID or not _JOB_ID.fullmatch(job_id):
        raise ProtocolError(f"{what}: job id {job_id[:80]!r} is not valid")
    if len(_VALID_JOB_IDS) >= _VALID_REMEMBERED:
        _VALID_JOB_IDS.clear()
    _VALID_JOB_IDS.add(job_id)
    return job_id


#: Job ids checked lately: every frame of a job carries its id, and is checked where it is read
#: and where it is built; a set lookup instead of the pattern (a bounded memory, cleared whole).
_VALID_JOB_IDS: set[str] = set()
_VALID_REMEMBERED = 4_096


@dataclass(frozen=True)
class Submit(Message):
    """Start a job. `ref` is the submitter's own tag, echoed in ACCEPTED so it can match them.

    A keeper leaves `job_id` empty and the queen assigns one; the queen forwarding a job to a hive
    sets it, so that narration from the hive is routed under the same id. `accept_by` is the
    latest time (the sender's clock, epoch seconds) the job may still be accepted: a SUBMIT that
    arrives later has waited on a cut link or a frozen peer, its sender has given up on it, and
    it is refused (docs/protocol.md, "At most once"). `keep`: the job runs on if its submitter
    disconnects (`infer --detach`; `jobs watch` follows it); otherwise that cancels it.
    """

    KIND = Kind.SUBMIT
    NEEDS_JOB = False
    ref: str = spec(ident())
    op: Operation = spec(_OperationSpec())
    timeout_s: float | None = spec(Optional(Float(0.0, MAX_DEADLINE_S, open_lo=True)), None)
    accept_by: float | None = spec(Optional(Float(0.0, 1e11)), None)
    keep: bool = spec(Bool(), False)


@dataclass(frozen=True)
class Accepted(Message):
    """The job exists: it will get exactly one terminal frame, by `deadline_s` at the latest."""

    KIND = Kind.ACCEPTED
    ref: str = spec(ident())
    op: str = spec(ident(32))
    deadline_s: float = spec(Float(0.0, MAX_DEADLINE_S, open_lo=True))


@dataclass(frozen=True)
class Narration(Message):
    """One human-readable progress event of a job, from whichever actor is working on it."""

    KIND = Kind.NARRATION
    actor: str = spec(Text(max_len=32, min_len=1))
    action: str = spec(Text(max_len=32, min_len=1))
    human: str = spec(Text(max_len=MAX_SENTENCE))
    level: Level = spec(OneOf(Level), Level.INFO)
    ts: float = spec(Float(0.0, 1e11), 0.0)
    target: str = spec(Text(max_len=256), "")
    hive_id: str = spec(Text(max_len=64), "")
    worker_id: str = spec(Text(max_len=64), "")


@dataclass(frozen=True)
class Data(Message):
    """A structured record produced while a job runs (for example: download progress)."""

    KIND = Kind.DATA
    record: dict[str, Any] = spec(Value(mapping=True))


class _Batched(Spec):
    """The frames of a BATCH: NARRATION and DATA messages in memory; on the wire, a list of
    [kind, body] pairs (turned into messages by the BATCH, which knows their job)."""

    def load(self, name: str, value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise ProtocolError(f"{name} must be a list, got {type(value).__name__}")
        if not 1 <= len(value) <= MAX_BATCH:
            raise ProtocolError(f"{name} must hold 1 to {MAX_BATCH} frames, got {len(value)}")
        for i, item in enumerate(value):
            if isinstance(item, Narration | Data):
                continue
            pair = isinstance(item, list | tuple) and len(item) == 2
            if not (pair and type(item[0]) is int and item[0] in _BATCHED):
                raise ProtocolError(f"{name}[{i}] must be a NARRATION or DATA as [kind, body]")
        return tuple(value)

    def dump(self, value: Any) -> Any:
        return [[int(m.KIND), m.to_wire()] for m in value]


@dataclass(frozen=True)
class Batch(Message):
    """Several NARRATION and DATA frames of one job, in order, as one frame: what a job says
    faster than COALESCE_S apart travels so (docs/protocol.md, "Coalescing"). A receiver hands
    on its `messages` one by one; nothing reads a BATCH as such."""

    KIND = Kind.BATCH
    messages: tuple[Narration | Data, ...] = spec(_Batched())

    @classmethod
    def from_body(
        cls, body: bytes, what: str, unpack: Callable[[bytes], Any], **extra: Any
    ) -> Self:
        """Each frame decoded by its own class (in C, where it can), straight from its bytes in
        the BATCH's; anything refused is decoded again the slow way, which says why."""
        if not c_path_built(Narration):  # (a few frames: not worth importing msgspec for)
            return super().from_body(body, what, unpack, **extra)
        job_id = extra["job_id"]
        try:
            frames = _batch_decoder().decode(body).messages
            messages = tuple(
                _BATCHED[kind].from_body(bytes(raw), what, unpack, job_id=job_id)
                for kind, raw in frames
            )
        except (ProtocolError, KeyError, ValueError):  # (msgspec's errors are ValueErrors)
            return super().from_body(body, what, unpack, **extra)
        return cls(job_id=job_id, messages=messages)

    def __post_init__(self) -> None:
        super().__post_init__()
        messages = []
        items: tuple[Any, ...] = self.messages  # as they came: messages, or [kind, body] pairs
        for i, item in enumerate(items):
            if isinstance(item, Message):
                if item.job_id != self.job_id:
                    raise ProtocolError(f"BATCH: messages[{i}] is of another job")
                messages.append(item)
                continue
            cls = _BATCHED[item[0]]
            what = f"BATCH messages[{i}] ({cls.KIND.name})"
            try:
                messages.append(cls.from_wire(item[1], what, job_id=self.job_id))
            except ProtocolError as exc:
                if exc.message.startswith(what):
                    raise
                raise ProtocolError(f"{what}: {exc.message}") from None
        object.__setattr__(self, "messages", tuple(messages))


@dataclass(frozen=True)
class Token(Message):
    """Generated text. `seq` is the index of the first token in `text`; `count` how many it holds.

    Tokens that arrive faster than about one per millisecond are coalesced into one frame.
    """

    KIND = Kind.TOKEN
    seq: int = spec(Int(0, 2**31))
    text: str = spec(Text(max_len=1_000_000))
    count: int = spec(Int(1, 1_000_000), 1)


@dataclass(frozen=True)
class Chunk(Message):
    """Bytes of a file, from `offset` on: what a `model_read` job streams (one hive fetching a
    model from another). Never relayed by a queen, never shown to a person."""

    KIND = Kind.CHUNK
    offset: int = spec(Int(0, 2**62))
    data: bytes = spec(Blob(MAX_CHUNK_BYTES))


@dataclass(frozen=True)
class Done(Message):
    """The job succeeded. `result` is the operation's answer (a map, a list, or nothing)."""

    KIND = Kind.DONE
    result: Any = spec(Value(), None)


@dataclass(frozen=True)
class Error(Message):
    """The job failed, or (with an empty job id) a frame was rejected before it became a job."""

    KIND = Kind.ERROR
    NEEDS_JOB = False
    code: ErrorCode = spec(OneOf(ErrorCode))
    message: str = spec(Text(max_len=MAX_SENTENCE))
    ref: str = spec(Text(max_len=64), "")
    #: False when the job is known not to have begun anything: it may be placed again.
    started: bool = spec(Bool(), True)


@dataclass(frozen=True)
class Cancel(Message):
    KIND = Kind.CANCEL
    reason: str = spec(Text(max_len=MAX_SENTENCE), "")


@dataclass(frozen=True)
class Cancelled(Message):
    KIND = Kind.CANCELLED
    reason: str = spec(Text(max_len=MAX_SENTENCE), "")


@dataclass(frozen=True)
class Heartbeat(Message):
    """`sender` is alive and will say so again within `interval_s`. `state` is actor-specific."""

    KIND = Kind.HEARTBEAT
    NEEDS_JOB = False
    sender: str = spec(ident())
    seq: int = spec(Int(0, 2**63 - 1))
    interval_s: float = spec(Float(MIN_HEARTBEAT_S, MAX_HEARTBEAT_S))
    ts: float = spec(Float(0.0, 1e11), 0.0)
    state: dict[str, Any] = spec(Value(mapping=True), factory=dict)


@dataclass(frozen=True)
class Ready(Message):
    """A client announces itself to a server, which answers with its own READY.

    A client's `session` stays the same for its life; `epoch` grows each time it gives up on the
    server and connects again. A server that hears a newer epoch of a session on a new
    connection fences the older connection: its jobs end, its late frames are refused.
    """

    KIND = Kind.READY
    NEEDS_JOB = False
    sender: str = spec(ident())
    role: Actor = spec(OneOf(Actor))
    info: dict[str, Any] = spec(Value(mapping=True), factory=dict)
    session: str = spec(Text(max_len=64), "")
    epoch: int = spec(Int(0, 2**31), 0)
    ts: float = spec(Float(0.0, 1e11), 0.0)
    #: The sender's heartbeat interval (0: not said): its silence is judged by it from the start
    #: (at least MIN_HEARTBEAT_S).
    interval_s: float = spec(Float(0.0, MAX_HEARTBEAT_S), 0.0)


@dataclass(frozen=True)
class Disconnect(Message):
    """`sender` is leaving on purpose: forget it now instead of waiting for missed heartbeats."""

    KIND = Kind.DISCONNECT
    NEEDS_JOB = False
    sender: str = spec(ident())
    reason: str = spec(Text(max_len=MAX_SENTENCE), "")


#: Every message kind's class, by kind.
MESSAGE_TYPES: dict[Kind, type[Message]] = {cls.KIND: cls for cls in Message.__subclasses__()}

#: The kinds a BATCH holds, by their byte.
_BATCHED: dict[int, type[Narration | Data]] = {Kind.NARRATION: Narration, Kind.DATA: Data}


@functools.cache
def _batch_decoder() -> Any:
    """A BATCH body's shape, its frames' bodies left as bytes (msgspec's Raw)."""
    import msgspec

    frames = Annotated[
        list[tuple[int, msgspec.Raw]], msgspec.Meta(min_length=1, max_length=MAX_BATCH)
    ]
    shape = msgspec.defstruct("BatchWire", [("messages", frames)], forbid_unknown_fields=True)
    return msgspec.msgpack.Decoder(shape)


TERMINAL_KINDS = frozenset({Kind.DONE, Kind.ERROR, Kind.CANCELLED})
