"""The one place where frames are built and parsed.

A message is four frames: ``[header, kind, job_id, body]``.

- header: the magic ``b"RBEE"`` followed by one byte, the protocol version;
- kind: one byte, a `Kind`;
- job_id: ASCII, at most 64 bytes, empty for connection-level messages;
- body: a msgpack map, at most MAX_BODY_BYTES and MAX_BODY_VALUES, decoded with explicit limits
  and no extension types.

`decode` raises `RemoteProtocolError` and nothing else, whatever bytes it is given, and costs at
most a few milliseconds whatever they are. `encode` raises `LocalProtocolError` (`TooLarge` for a
body over the limit): what this process cannot send is its own problem, never a peer's.
`peek_route` reads only the first three frames, for relays that forward a body they never
unpack. `encode_batch` joins frames already encoded into one BATCH, without packing them again.
`decode_heartbeat` leaves a heartbeat's state packed, for a receiver of many heartbeats that
reads few states; `decode_state` finishes the job, with the same checks as `decode`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from rbee_mesh.protocol.constants import (
    FRAME_COUNT,
    MAGIC,
    MAX_BODY_BYTES,
    MAX_BODY_VALUES,
    MAX_CHUNK_BYTES,
    MAX_JOB_ID,
    PROTOCOL_VERSION,
)
from rbee_mesh.protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    TooLarge,
)
from rbee_mesh.protocol.fields import Value
from rbee_mesh.protocol.messages import MESSAGE_TYPES, Heartbeat, Kind, Message, check_job_id

HEADER = MAGIC + bytes([PROTOCOL_VERSION])

_KINDS = {kind.value: kind for kind in Kind}


def encode(message: Message) -> list[bytes]:
    """Frames for `message`. Raises TooLarge if the body would exceed MAX_BODY_BYTES, and
    LocalProtocolError if msgpack cannot pack it."""
    body = message.body  # made as it was built, where its class checks in C
    if body is None:
        try:
            body = msgpack.packb(message.to_wire(), use_bin_type=True)
        except (ValueError, TypeError, OverflowError) as exc:  # nested past msgpack's own limit
            raise LocalProtocolError(f"{message.KIND.name} cannot be packed: {exc}") from None
    if len(body) > MAX_BODY_BYTES:
        raise TooLarge(
            f"{message.KIND.name} body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}"
        )
    return [HEADER, bytes([message.KIND]), message.job_id.encode("ascii"), body]


def encode_batch(job_id: str, frames: Sequence[tuple[Kind, bytes]]) -> list[bytes]:
    """One BATCH of a job's NARRATION and DATA frames, given as (kind, body) as `encode` made
    them: at most MAX_BATCH of them, their bodies at most BATCH_BYTES in all (the sender's
    duty: both keep a BATCH within what a receiver decodes at once)."""
    packer = msgpack.Packer()
    parts = [_BATCH_HEAD, packer.pack_array_header(len(frames))]
    for kind, body in frames:
        parts += (_PAIR_HEAD, packer.pack(int(kind)), body)
    return [HEADER, _BATCH_KIND, job_id.encode("ascii"), b"".join(parts)]


def batch_length(body: bytes) -> int:
    """How many frames a BATCH body holds, read from its start alone (1 if it cannot be read:
    it is ours, from `encode_batch`, or it would not have been kept)."""
    unpacker = msgpack.Unpacker()
    unpacker.feed(body[:32])
    try:
        unpacker.read_map_header()
        unpacker.skip()
        return max(int(unpacker.read_array_header()), 1)
    except Exception:  # msgpack raises several types
        return 1


#: A BATCH body is {"messages": [[kind, body], ...]}: its start, and each pair's.
_BATCH_HEAD = msgpack.packb({"messages": 0})[:-1]
_PAIR_HEAD = msgpack.Packer().pack_array_header(2)
_BATCH_KIND = bytes([Kind.BATCH])


def peek_route(frames: Sequence[bytes]) -> tuple[Kind, str]:
    """The kind and job id of a message, checked, without unpacking its body.

    Raises RemoteProtocolError (a hot path: every frame passes here, once)."""
    if len(frames) != FRAME_COUNT:
        raise RemoteProtocolError(f"expected {FRAME_COUNT} frames, got {len(frames)}")
    header, kind_frame, job_frame, _ = frames
    _check_header(header)
    if len(kind_frame) != 1:
        raise RemoteProtocolError(f"the kind frame must be 1 byte, got {len(kind_frame)}")
    kind = _KINDS.get(kind_frame[0])
    if kind is None:
        raise RemoteProtocolError(f"unknown message kind {kind_frame[0]}")
    if not job_frame:
        return kind, ""
    if len(job_frame) > MAX_JOB_ID:
        raise RemoteProtocolError(
            f"the job id frame is {len(job_frame)} bytes; the limit is {MAX_JOB_ID}"
        )
    try:
        job_id = bytes(job_frame).decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError("the job id frame is not ASCII") from None
    try:
        check_job_id(job_id, required=False, what="the job id frame")
    except ProtocolError as exc:
        raise _remote(exc) from None
    return kind, job_id


def decode(frames: Sequence[bytes], route: tuple[Kind, str] | None = None) -> Message:
    """The message these frames carry, validated in full. Raises only RemoteProtocolError.

    `route`: what `peek_route` already said of these frames, so as not to read them twice.
    """
    kind, job_id = route if route is not None else peek_route(frames)
    body = bytes(frames[3])
    try:
        return MESSAGE_TYPES[kind].from_body(body, kind.name, _unpack, job_id=job_id)
    except ProtocolError as exc:
        remote = _remote(exc)
        # Let the receiver address its rejection to the submission it refuses, where it can.
        remote.ref = _ref_of(body) if kind is Kind.SUBMIT else ""
        raise remote from None


def _ref_of(body: bytes) -> str:
    """The `ref` of a refused SUBMIT's body, where it can be read."""
    try:
        fields = _unpack(body)
    except ProtocolError:
        return ""
    ref = fields.get("ref") if isinstance(fields, dict) else None
    return ref if isinstance(ref, str) and 0 < len(ref) <= MAX_JOB_ID else ""


def decode_heartbeat(frames: Sequence[bytes]) -> tuple[Heartbeat, bytes]:
    """A HEARTBEAT whose state is left packed: (the message, with an empty state; the state's
    msgpack bytes, for `decode_state`). Everything but the state is checked as `decode` checks
    it. Raises only ProtocolError, also for a frame of another kind.

    The state is most of a hive's heartbeat (6.8 KB with 8 workers) and most of its cost:
    unpacking and validating it took 200 us, skipping it 21 us; and the queen that takes 1,000
    heartbeats a second reads few of their states.
    """
    kind, job_id = peek_route(frames)
    try:
        if kind is not Kind.HEARTBEAT:
            raise ProtocolError(f"expected a HEARTBEAT, got {kind.name}")
        body = _sized(bytes(frames[3]))
        fields, state = _split_state(body)
        return Heartbeat.from_wire(fields, kind.name, job_id=job_id), state
    except ProtocolError as exc:
        raise _remote(exc) from None


def _split_state(body: bytes) -> tuple[dict[str, Any], bytes]:
    unpacker = msgpack.Unpacker(max_buffer_size=MAX_BODY_BYTES, **_UNPACK_OPTIONS)
    unpacker.feed(body)
    fields: dict[str, Any] = {}
    state = _EMPTY_MAP
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if not isinstance(key, str):
                raise ProtocolError("HEARTBEAT has a map key that is not a string")
            if key == "state":
                start = unpacker.tell()
                unpacker.skip()
                state = body[start : unpacker.tell()]
            else:
                fields[key] = unpacker.unpack()
        if unpacker.tell() != len(body):
            raise ProtocolError("the body has bytes after its map")
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several types (ValueError, OutOfData, ...)
        raise ProtocolError(f"the body is not valid msgpack: {type(exc).__name__}") from None
    return fields, state


def decode_state(packed: bytes) -> dict[str, Any]:
    """A state left packed by `decode_heartbeat`, unpacked and validated.

    Raises RemoteProtocolError."""
    try:
        state: dict[str, Any] = _STATE.load("state", _unpack(packed))
    except ProtocolError as exc:
        raise _remote(exc) from None
    return state


_EMPTY_MAP = msgpack.packb({})
_STATE = Value(mapping=True)


def _remote(exc: ProtocolError) -> RemoteProtocolError:
    """`exc` as the peer's fault: whatever the input broke, it came off the wire."""
    if isinstance(exc, RemoteProtocolError):
        return exc
    code = exc.code if exc.code is ErrorCode.UNSUPPORTED_VERSION else ErrorCode.INVALID_REQUEST
    remote = RemoteProtocolError(exc.message, code)
    remote.ref = exc.ref
    return remote


def _check_header(header: bytes) -> None:
    if header == HEADER:
        return
    if bytes(header[: len(MAGIC)]) != MAGIC:
        raise RemoteProtocolError("not an rbee-mesh message (bad magic)")
    if len(header) != len(HEADER):
        raise RemoteProtocolError(
            f"the header frame must be {len(HEADER)} bytes, got {len(header)}"
        )
    version = header[len(MAGIC)]
    raise RemoteProtocolError(
        f"the peer speaks protocol version {version}; this build speaks {PROTOCOL_VERSION}",
        ErrorCode.UNSUPPORTED_VERSION,
    )


#: How every body is unpacked: no extension types, bytes no longer than a CHUNK's (only its
#: `data` takes bytes: every other field, free-form values too, refuses them), explicit limits.
_UNPACK_OPTIONS: dict[str, Any] = {
    "raw": False,
    "strict_map_key": True,
    "use_list": True,
    "max_str_len": MAX_BODY_BYTES,
    "max_bin_len": MAX_CHUNK_BYTES,
    "max_ext_len": 0,
    "max_array_len": MAX_BODY_VALUES,
    "max_map_len": MAX_BODY_VALUES,
}


class _Budget:
    """Counts the values msgpack builds and stops it past MAX_BODY_VALUES.

    msgpack calls the hooks once per array and map it has built, so a body of a million tiny
    values stops after MAX_BODY_VALUES of them (well under a millisecond) instead of being built
    whole (40 ms for 4 MB here) and then walked (a second or more)."""

    def __init__(self) -> None:
        self.left = MAX_BODY_VALUES

    def __call__(self, built: Any) -> Any:
        self.left -= len(built) + 1  # its items, and itself: an empty one costs a value too
        if self.left < 0:
            raise TooLarge(f"the body holds more than {MAX_BODY_VALUES} values")
        return built


def _sized(body: bytes) -> bytes:
    if len(body) > MAX_BODY_BYTES:
        raise ProtocolError(f"the body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    return body


def _unpack(body: bytes) -> Any:
    body = _sized(body)
    # A body this small holds at most this many values: no budget needed (it costs ~30%).
    hooks: dict[str, Any] = {}
    if len(body) > MAX_BODY_VALUES:
        budget = _Budget()
        hooks = {"list_hook": budget, "object_hook": budget}
    try:
        return msgpack.unpackb(body, **_UNPACK_OPTIONS, **hooks)
    except TooLarge:
        raise
    except Exception as exc:  # msgpack raises several types (ValueError, ExtraData, ...)
        raise ProtocolError(f"the body is not valid msgpack: {type(exc).__name__}") from None
