"""Hostile frames, for the fuzz tests (tests/test_fuzz.py): what a peer that passed the handshake,
or one that did not, may send to a socket of the mesh.

Every frame is drawn from a seeded `random.Random`, so a seed gives the same frames in the same
order on every machine. What they are made from (valid messages of every kind, every operation
and field) is drawn once by hypothesis, derandomized, from the strategies that the codec's own
property tests use (tests/test_protocol_codec.py): a new message kind or field is fuzzed without
editing this file.

A frame that happens to decode as a valid message the fuzzer must not send as a trusted client
(one that ends its connection, claims another session or role, or submits a real operation) is
drawn again: `admissible` says which. Goodbyes and submissions of real work are not hostile input;
they are the peer's right.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import random
import string
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
from hypothesis import HealthCheck, Phase, given, settings

from rbee_mesh.protocol import (
    MESSAGE_TYPES,
    Actor,
    Disconnect,
    Kind,
    Message,
    Ping,
    Ready,
    RemoteProtocolError,
    Submit,
    decode,
    encode,
)
from rbee_mesh.protocol.codec import HEADER
from rbee_mesh.protocol.constants import (
    MAGIC,
    MAX_BODY_BYTES,
    MAX_BODY_VALUES,
    MAX_JOB_ID,
    MAX_VALUE_DEPTH,
    PROTOCOL_VERSION,
)
from tests.test_protocol_codec import any_message

Frames = list[bytes]
Draw = Callable[[random.Random], Frames]

#: Valid messages drawn by hypothesis to build hostile frames from.
POOL_SIZE = 400


@functools.cache
def pool() -> tuple[Message, ...]:
    """Valid messages of every kind, drawn by hypothesis with a fixed seed (`derandomize`)."""
    drawn: list[Message] = []

    @settings(
        derandomize=True, database=None, max_examples=POOL_SIZE, deadline=None,
        phases=[Phase.generate], suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(any_message())
    def collect(message: Message) -> None:
        try:
            encode(message)
        except Exception:  # too large to send: no use as a base
            return
        drawn.append(message)

    collect()
    return tuple(drawn)


def _message(rng: random.Random) -> Message:
    return rng.choice(pool())


def _wire(rng: random.Random) -> tuple[Kind, bytes, dict[str, Any]]:
    message = _message(rng)
    return message.KIND, message.job_id.encode(), copy.deepcopy(message.to_wire())


def _frames(kind: int, job_id: bytes, body: bytes) -> Frames:
    return [HEADER, bytes([kind]), job_id, body]


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


# ---- values of the wrong type ------------------------------------------------------------------

_WRONG: list[Callable[[random.Random], Any]] = [
    lambda rng: None,
    lambda rng: rng.choice([True, False]),
    lambda rng: rng.randrange(-(2**63), 2**64),
    lambda rng: rng.choice([float("nan"), float("inf"), -float("inf"), -0.0, 1e308]),
    lambda rng: rng.randbytes(rng.randrange(0, 40)),
    lambda rng: "".join(rng.choices(string.printable, k=rng.randrange(0, 40))),
    lambda rng: "\x00\u202e" * rng.randrange(1, 5),
    lambda rng: [rng.randrange(256) for _ in range(rng.randrange(0, 6))],
    lambda rng: {str(rng.randrange(9)): rng.random() for _ in range(rng.randrange(0, 4))},
    lambda rng: msgpack.ExtType(rng.randrange(128), rng.randbytes(4)),
    lambda rng: {rng.randrange(9): 1},  # a map key that is not a string
]


def _wrong(rng: random.Random) -> Any:
    return rng.choice(_WRONG)(rng)


def _all_field_names() -> list[str]:
    names = {f.name for cls in MESSAGE_TYPES.values() for f in dataclasses.fields(cls)}
    return sorted(names | {"op", "name", "kind", "job_id", "state"})


FIELD_NAMES = _all_field_names()


# ---- the categories ----------------------------------------------------------------------------


def random_bytes(rng: random.Random) -> Frames:
    sizes = [0, 1, 4, 5, 16, 64, 300, 2048]
    return [rng.randbytes(rng.choice(sizes)) for _ in range(rng.randrange(1, 7))]


def truncated_msgpack(rng: random.Random) -> Frames:
    frames = encode(_message(rng))
    body = frames[3]
    cut = rng.randrange(0, len(body)) if body else 0
    if rng.random() < 0.2:  # or fewer frames than a message has
        return frames[: rng.randrange(1, 4)]
    return [*frames[:3], body[:cut]]


def wrong_types(rng: random.Random) -> Frames:
    kind, job_id, wire = _wire(rng)
    if not wire or rng.random() < 0.2:
        return _frames(kind, job_id, _pack(_wrong(rng)))  # a body that is not a map
    for key in rng.sample(sorted(wire), rng.randrange(1, min(3, len(wire)) + 1)):
        target = wire
        if key == "op" and isinstance(wire[key], dict) and len(wire[key]) > 1:
            target = wire[key]  # a parameter of the operation
            key = rng.choice(sorted(target))
        target[key] = _wrong(rng)
    return _frames(kind, job_id, _pack(wire))


_HUGE_HEADERS = [b"\xdb", b"\xc6", b"\xdd", b"\xdf", b"\xc9", b"\xd9", b"\xda", b"\xc5", b"\xdc"]


def huge_lengths(rng: random.Random) -> Frames:
    """Containers and strings that declare far more than follows (up to 4 GiB)."""
    kind, job_id, wire = _wire(rng)
    prefix = rng.choice(_HUGE_HEADERS)
    width = {b"\xd9": 1, b"\xda": 2, b"\xc5": 2, b"\xdc": 2}.get(prefix, 4)
    declared = rng.choice([2 ** (8 * width) - 1, 2 ** (8 * width - 1), MAX_BODY_BYTES + 1])
    declared = min(declared, 2 ** (8 * width) - 1)
    lie = prefix + declared.to_bytes(width, "big")
    if prefix == b"\xc9":
        lie += b"\x01"  # an ext32's type
    lie += rng.randbytes(rng.randrange(0, 32))
    if wire and rng.random() < 0.7:  # as a field's value, after valid ones
        head = dict(list(wire.items())[: rng.randrange(0, len(wire))])
        packed = _pack(head)
        count = len(head) + 1
        return _frames(
            kind, job_id, b"\xdf" + count.to_bytes(4, "big") + packed[1:] + b"\xa6result" + lie
        )
    return _frames(kind, job_id, lie)


def deep_nesting(rng: random.Random) -> Frames:
    depth = rng.choice([MAX_VALUE_DEPTH + 1, MAX_VALUE_DEPTH + 2, 100, 1_000, 10_000, 200_000])
    inner = rng.choice([b"\x91", b"\x81\xa1k"]) * depth + b"\xc0"
    kind = rng.choice([Kind.SUBMIT, Kind.DONE, Kind.READY, Kind.HEARTBEAT, Kind.DATA])
    field = {Kind.SUBMIT: b"\xa2op", Kind.DONE: b"\xa6result", Kind.READY: b"\xa4info"}.get(
        kind, b"\xa5state"
    )
    return _frames(
        kind, b"job-1" if kind in (Kind.DONE, Kind.DATA) else b"", b"\x81" + field + inner
    )


def unknown_kinds(rng: random.Random) -> Frames:
    frames = encode(_message(rng))
    known = {k.value for k in Kind}
    choice = rng.randrange(5)
    if choice == 0:
        frames[1] = bytes([rng.choice([b for b in range(256) if b not in known])])
    elif choice == 1:
        frames[1] = rng.choice([b"", rng.randbytes(rng.randrange(2, 9))])
    elif choice == 2:
        version = rng.choice([v for v in range(256) if v != PROTOCOL_VERSION])
        frames[0] = MAGIC + bytes([version])
    elif choice == 3:
        frames[0] = rng.choice(
            [b"", b"RBE", MAGIC, HEADER + b"\x00", b"rbee\x03", rng.randbytes(5)]
        )
    else:  # a kind of the protocol, but another's body
        frames[1] = bytes([rng.choice(sorted(known))])
    return frames


def extra_and_missing_fields(rng: random.Random) -> Frames:
    kind, job_id, wire = _wire(rng)
    for _ in range(rng.randrange(1, 4)):
        if wire and rng.random() < 0.5:
            del wire[rng.choice(sorted(wire))]
        else:
            key: Any = rng.choice(
                [rng.choice(FIELD_NAMES), "".join(rng.choices(string.ascii_letters, k=6)), ""]
            )
            wire[key] = (
                _wrong(rng) if rng.random() < 0.5 else rng.choice(list(wire.values()) or [1])
            )
    if isinstance(wire.get("op"), dict) and rng.random() < 0.5:
        op = wire["op"]
        if len(op) > 1 and rng.random() < 0.5:
            del op[rng.choice(sorted(k for k in op if k != "name"))]
        else:
            op[rng.choice(FIELD_NAMES)] = _wrong(rng)
    if rng.random() < 0.05:  # keys msgpack may refuse to decode as a map's
        return _frames(kind, job_id, b"\x81\xc4\x01k\x01")
    return _frames(kind, job_id, _pack(wire))


def oversize_frames(rng: random.Random) -> Frames:
    frames = encode(_message(rng))
    part = rng.randrange(4)
    if part == 3:
        frames[3] = b"\xdb" + (MAX_BODY_BYTES + 1).to_bytes(4, "big") + b"x" * (MAX_BODY_BYTES + 1)
    elif part == 2:
        frames[2] = b"j" * rng.choice([MAX_JOB_ID + 1, 1_000, 100_000])
    else:
        frames[part] = frames[part] + rng.randbytes(rng.choice([1, 1_000, 100_000]))
    return frames


def value_bombs(rng: random.Random) -> Frames:
    """Past MAX_BODY_VALUES in values, each a byte or two."""
    count = MAX_BODY_VALUES + rng.randrange(1, 4 * MAX_BODY_VALUES)
    item = rng.choice([b"\x01", b"\x90", b"\x80"])
    body = b"\x81\xa6result\xdd" + count.to_bytes(4, "big") + item * count
    return _frames(Kind.DONE, b"job-1", body)


def many_parts(rng: random.Random) -> Frames:
    frames = encode(_message(rng))
    count = rng.choice([5, 6, 8, 64, 1_000])
    extra = [rng.randbytes(rng.randrange(0, 8)) for _ in range(count - len(frames))]
    return rng.choice([frames + extra, extra + frames, [HEADER] * count])


def bad_job_ids(rng: random.Random) -> Frames:
    frames = encode(_message(rng))
    frames[2] = rng.choice(
        [b"\xff\xfe", "jöb".encode(), b"job id", b"-job", b"job\x00", b".", b"j" * (MAX_JOB_ID + 1)]
    )
    return frames


def valid_frames(rng: random.Random) -> Frames:
    """Valid messages, most out of place (a DONE sent to a server, a CANCEL of nobody's job)."""
    return encode(_message(rng))


#: Every category, and how often it is drawn (of 1,000). Oversize frames and value bombs are
#: megabytes each: a few of them per connection make the point.
CATEGORIES: dict[str, tuple[Draw, int]] = {
    "random bytes": (random_bytes, 140),
    "truncated msgpack": (truncated_msgpack, 130),
    "right magic, wrong types": (wrong_types, 150),
    "huge declared lengths": (huge_lengths, 100),
    "deep nesting": (deep_nesting, 60),
    "unknown message kinds": (unknown_kinds, 100),
    "extra and missing fields": (extra_and_missing_fields, 150),
    "oversize frames": (oversize_frames, 3),
    "value bombs": (value_bombs, 2),
    "many-part messages": (many_parts, 60),
    "bad job ids": (bad_job_ids, 40),
    "valid, out of place": (valid_frames, 65),
}


def admissible(frames: Frames, *, safe_ops: tuple[type, ...] = (Ping,)) -> bool:
    """Whether a trusted fuzzer may send `frames`: anything the receiver must refuse, and valid
    messages that neither end the fuzzer's connection (DISCONNECT, a READY of a session or a
    role), nor submit more than a short ping."""
    try:
        message = decode(frames)
    except RemoteProtocolError:
        return True
    match message:
        case Disconnect():
            return False
        case Ready():
            return not message.session and message.role is not Actor.HIVE
        case Submit():
            op = message.op
            return (
                isinstance(op, safe_ops)
                and getattr(op, "count", 1) <= 3
                and (getattr(op, "interval_s", 0.0) <= 0.01)
                and getattr(op, "hive", None) is None
            )
    return True


def hostile_frames(seed: int, count: int) -> Iterator[tuple[str, Frames]]:
    """`count` hostile messages (category, frames), the same for the same seed."""
    rng = random.Random(seed)
    names = list(CATEGORIES)
    weights = [CATEGORIES[name][1] for name in names]
    made = 0
    while made < count:
        name = rng.choices(names, weights)[0]
        frames = CATEGORIES[name][0](rng)
        if frames and admissible(frames):
            made += 1
            yield name, frames


# ---- what a subscriber sends a publisher ---------------------------------------------------------

#: What our subscribers send, the one subscription a publisher admits: never drawn, so that a
#: fuzzer may end with it and know, from the first message it then receives, that the publisher
#: read everything before it.
SUBSCRIBE_ALL = b"\x01"


def subscriber_messages(seed: int, count: int, *, limit: int) -> Iterator[tuple[str, Frames]]:
    """`count` hostile messages for a publisher (category, frames), each frame under `limit`
    bytes. None is a subscription or an unsubscription (a first byte 1 or 0): libzmq's XSUB keeps
    those, and sends an unsubscription only of what it subscribed to; the topics a publisher is
    sent are `topic_flood`'s."""
    rng = random.Random(seed)

    def not_a_subscription(frame: bytes) -> bytes:
        return (
            bytes([rng.randrange(2, 256)]) + frame[1:] if frame[:1] in (b"\x00", b"\x01") else frame
        )

    ours = (
        frames
        for _, frames in hostile_frames(seed, 100 * count)
        if all(len(frame) < limit for frame in frames)
    )
    draws: dict[str, Callable[[], Frames]] = {
        "random bytes": lambda: [not_a_subscription(rng.randbytes(rng.randrange(1, limit)))],
        "empty": lambda: [b""],
        "many-part messages": lambda: (
            [b"x"] + [rng.randbytes(rng.randrange(0, 64))] * rng.choice([2, 8, 64])
        ),
        "our frames": lambda: (lambda f: [not_a_subscription(f[0]), *f[1:]])(next(ours)),
    }

    names = list(draws)
    for _ in range(count):
        name = rng.choice(names)
        yield name, draws[name]()


def topic_flood(seed: int, count: int, *, size: int) -> Iterator[Frames]:
    """Subscriptions to `count` distinct random topics of `size` bytes."""
    rng = random.Random(seed)
    for _ in range(count):
        yield [SUBSCRIBE_ALL + rng.randbytes(size)]


def oversize_subscriptions(limit: int) -> list[Frames]:
    """Messages past `limit`: 12 MiB (a topic that long took a hive from 474 MB to 1.2 GB when a
    PUB kept it; as a subscription it overflows the stack of libzmq's XSUB that sends it, so it
    goes as another message), a topic just past the limit, a many-part message of such frames."""
    return [[b"x" * (12 * 2**20)], [b"\x01" + b"y" * limit], [b"x" * (limit + 1)] * 3]


# ---- what a client sends the queen's HTTP API ----------------------------------------------------

#: The paths a request goes to: the API's own, with what a client could make of them.
_PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/x", "/health"]
_JSON_PATHS = _PATHS[:2]


def _http(method: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """One HTTP/1.1 request that asks the server to close the connection after its answer."""
    head = {"Host": "127.0.0.1", "Connection": "close", "Content-Type": "application/json",
            "Content-Length": str(len(body)), **(headers or {})}  # fmt: skip
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _request_body(rng: random.Random) -> dict[str, Any]:
    """A request body whose each field has a plausible value, and one that no request may have
    (max_tokens 0): a drawn body is refused before any work, whatever else is wrong with it."""
    body: dict[str, Any] = {
        "model": rng.choice(["m", "rbee-test/tiny-GGUF", "x" * 300, "../../etc/passwd"]),
        "messages": [{"role": "user", "content": "hi"}],
        "prompt": "hi",
        "max_tokens": 0,
        "stream": rng.choice([True, False]),
    }
    return body


def _wrong_json_types(rng: random.Random) -> bytes:
    body = _request_body(rng)
    for key in rng.sample(sorted(set(body) - {"max_tokens"}), rng.randrange(1, len(body) - 1)):
        value = _wrong(rng)
        body[key] = value if isinstance(value, (int, float, str, list, dict, type(None))) else None
    return _to(rng, _json_safe(body))


def _json_safe(body: dict[str, Any]) -> bytes:
    return json.dumps(body, default=repr, allow_nan=True).encode()


def _to(rng: random.Random, body: bytes, **headers: str) -> bytes:
    return _http("POST", rng.choice(_JSON_PATHS), body, headers)


def _cut_short(rng: random.Random) -> bytes:
    return _to(rng, _json(_request_body(rng)))[: rng.randrange(1, 120)]


def _truncated_json(rng: random.Random) -> bytes:
    body = _json(_request_body(rng))
    return _to(rng, body[: rng.randrange(len(body))])


def _deep(rng: random.Random) -> bytes:
    depth = rng.choice([100, 10_000, 100_000])
    return _to(rng, b"[" * depth + b"]" * rng.choice([0, depth]))


def _extra_and_missing(rng: random.Random) -> bytes:
    kept = {k: v for k, v in _request_body(rng).items() if rng.random() < 0.5}
    extra = {f"x{rng.randrange(10**6)}": rng.random() for _ in range(rng.randrange(0, 50))}
    return _to(rng, _json({**kept, **extra, "max_tokens": 0}))


def _elsewhere(rng: random.Random) -> bytes:
    method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO"])
    path = rng.choice([*_PATHS, "/", "/v2", "/v1/models/" + "a/" * 500, "/%00", "/..%2f..%2f"])
    return _http(method, path, b"")


def _content_type(rng: random.Random) -> bytes:
    kind = rng.choice(["text/plain", "", "application/x-msgpack", "a" * 5000])
    return _to(rng, _json(_request_body(rng)), **{"Content-Type": kind})


def _headers(rng: random.Random) -> bytes:
    count, size = rng.choice([(200, 10), (4, 10_000), (1, 100_000)])
    many = {f"X-{n}": "v" * size for n in range(count)}
    return _http("GET", "/health", b"", many)


def _foreign(rng: random.Random) -> bytes:
    """A request of a web page whose name was rebound to 127.0.0.1 (its Host is its own)."""
    body = _json(_request_body(rng))
    length = rng.choice([str(len(body)), "1000000"])  # and one that never sends all its body
    return _to(rng, body, Host="rebound.example", **{"Content-Length": length})


#: Each category, and how often it is drawn (a 4 MiB body costs more than the others).
HTTP_CATEGORIES: dict[str, tuple[Callable[[random.Random], bytes], int]] = {
    "random bytes": (lambda rng: rng.randbytes(rng.randrange(1, 2_000)), 10),
    "a request cut short": (_cut_short, 10),
    "not JSON": (lambda rng: _to(rng, rng.randbytes(rng.randrange(0, 500))), 10),
    "truncated JSON": (_truncated_json, 10),
    "wrong types": (_wrong_json_types, 10),
    "deep nesting": (_deep, 10),
    "extra and missing fields": (_extra_and_missing, 10),
    "huge declared length": (
        lambda rng: _to(rng, b"{}", **{"Content-Length": str(rng.choice([10**12, 2**63]))}),
        10,
    ),
    "oversize body": (lambda rng: _to(rng, _json({"prompt": "a" * (MAX_BODY_BYTES + 10)})), 1),
    "wrong methods and paths": (_elsewhere, 10),
    "wrong content types": (_content_type, 10),
    "many and huge headers": (_headers, 10),
    "a foreign host": (_foreign, 5),
}


def hostile_requests(seed: int, count: int) -> Iterator[tuple[str, bytes]]:
    """`count` hostile HTTP requests (category, bytes), the same for the same seed. None of them
    is a request the API may run: each is malformed, or asks for what no request may have."""
    rng = random.Random(seed)
    names = list(HTTP_CATEGORIES)
    weights = [HTTP_CATEGORIES[name][1] for name in names]
    for _ in range(count):
        name = rng.choices(names, weights)[0]
        yield name, HTTP_CATEGORIES[name][0](rng)
