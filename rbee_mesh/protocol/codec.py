"""The one place where frames are built and parsed.

A message is four frames: ``[header, kind, job_id, body]``.

- header: the magic ``b"RBEE"`` followed by one byte, the protocol version;
- kind: one byte, a `Kind`;
- job_id: ASCII, at most 64 bytes, empty for connection-level messages;
- body: a msgpack map, at most MAX_BODY_BYTES, decoded with explicit limits and no extension types.

`decode` raises `ProtocolError` and nothing else, whatever bytes it is given. `peek_route` reads
only the first three frames, for relays that forward a body they never unpack. `decode_heartbeat`
leaves a heartbeat's state packed, for a receiver of many heartbeats that reads few states;
`decode_state` finishes the job, with the same checks as `decode`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from rbee_mesh.protocol.errors import ErrorCode, ProtocolError
from rbee_mesh.protocol.fields import Value
from rbee_mesh.protocol.messages import (
    JOB_ID_MAX,
    MESSAGE_TYPES,
    Heartbeat,
    Kind,
    Message,
    check_job_id,
)

MAGIC = b"RBEE"
PROTOCOL_VERSION = 1
HEADER = MAGIC + bytes([PROTOCOL_VERSION])
FRAME_COUNT = 4

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_ARRAY_LEN = 100_000
MAX_MAP_LEN = 10_000

_KINDS = {kind.value: kind for kind in Kind}


def encode(message: Message) -> list[bytes]:
    """Frames for `message`. Raises ProtocolError if the body would exceed MAX_BODY_BYTES."""
    body = msgpack.packb(message.to_wire(), use_bin_type=True)
    if len(body) > MAX_BODY_BYTES:
        raise ProtocolError(
            f"{message.KIND.name} body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}"
        )
    return [HEADER, bytes([message.KIND]), message.job_id.encode("ascii"), body]


def peek_route(frames: Sequence[bytes]) -> tuple[Kind, str]:
    """The kind and job id of a message, checked, without unpacking its body."""
    if len(frames) != FRAME_COUNT:
        raise ProtocolError(f"expected {FRAME_COUNT} frames, got {len(frames)}")
    header, kind_frame, job_frame, _ = frames
    _check_header(header)
    if len(kind_frame) != 1:
        raise ProtocolError(f"the kind frame must be 1 byte, got {len(kind_frame)}")
    kind = _KINDS.get(kind_frame[0])
    if kind is None:
        raise ProtocolError(f"unknown message kind {kind_frame[0]}")
    if len(job_frame) > JOB_ID_MAX:
        raise ProtocolError(
            f"the job id frame is {len(job_frame)} bytes; the limit is {JOB_ID_MAX}"
        )
    try:
        job_id = bytes(job_frame).decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("the job id frame is not ASCII") from None
    check_job_id(job_id, required=False, what=kind.name)
    return kind, job_id


def decode(frames: Sequence[bytes]) -> Message:
    """The message these frames carry, validated in full. Raises only ProtocolError."""
    kind, job_id = peek_route(frames)
    body = _unpack(frames[3])
    try:
        return MESSAGE_TYPES[kind].from_wire(body, kind.name, job_id=job_id)
    except ProtocolError as exc:
        # Let the receiver address its rejection to the submission it refuses, where it can.
        ref = body.get("ref") if isinstance(body, dict) else None
        exc.ref = ref if isinstance(ref, str) and 0 < len(ref) <= JOB_ID_MAX else ""
        raise


def decode_heartbeat(frames: Sequence[bytes]) -> tuple[Heartbeat, bytes]:
    """A HEARTBEAT whose state is left packed: (the message, with an empty state; the state's
    msgpack bytes, for `decode_state`). Everything but the state is checked as `decode` checks
    it. Raises only ProtocolError, also for a frame of another kind.

    The state is most of a hive's heartbeat (6.8 KB with 8 workers) and most of its cost:
    unpacking and validating it took 200 us, skipping it 21 us; and the queen that takes 1,000
    heartbeats a second reads few of their states.
    """
    kind, job_id = peek_route(frames)
    if kind is not Kind.HEARTBEAT:
        raise ProtocolError(f"expected a HEARTBEAT, got {kind.name}")
    body = _sized(bytes(frames[3]))
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
    return Heartbeat.from_wire(fields, kind.name, job_id=job_id), state


def decode_state(packed: bytes) -> dict[str, Any]:
    """A state left packed by `decode_heartbeat`, unpacked and validated. Raises ProtocolError."""
    state: dict[str, Any] = _STATE.load("state", _unpack(packed))
    return state


_EMPTY_MAP = msgpack.packb({})
_STATE = Value(mapping=True)


def _check_header(header: bytes) -> None:
    if bytes(header[: len(MAGIC)]) != MAGIC:
        raise ProtocolError("not an rbee-mesh message (bad magic)")
    if len(header) != len(HEADER):
        raise ProtocolError(f"the header frame must be {len(HEADER)} bytes, got {len(header)}")
    version = header[len(MAGIC)]
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"the peer speaks protocol version {version}; this build speaks {PROTOCOL_VERSION}",
            ErrorCode.UNSUPPORTED_VERSION,
        )


#: How every body is unpacked: no bytes or extension types, and explicit limits.
_UNPACK_OPTIONS: dict[str, Any] = {
    "raw": False,
    "strict_map_key": True,
    "use_list": True,
    "max_str_len": MAX_BODY_BYTES,
    "max_bin_len": 0,
    "max_ext_len": 0,
    "max_array_len": MAX_ARRAY_LEN,
    "max_map_len": MAX_MAP_LEN,
}


def _sized(body: bytes) -> bytes:
    if len(body) > MAX_BODY_BYTES:
        raise ProtocolError(f"the body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    return body


def _unpack(body: bytes) -> Any:
    body = _sized(body)
    try:
        return msgpack.unpackb(body, **_UNPACK_OPTIONS)
    except Exception as exc:  # msgpack raises several types (ValueError, ExtraData, ...)
        raise ProtocolError(f"the body is not valid msgpack: {type(exc).__name__}") from None
