"""Property and example tests for the wire codec (rbee_mesh/protocol/codec.py) and field validation.

Valid messages are generated generically from the field specs (`metadata["spec"]` of every
dataclass field), so a new message kind, operation or field is covered without editing this file;
a spec type the generator does not know fails `test_round_trip_strategies_cover_every_kind_and_...`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from enum import Enum
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rbee_mesh.protocol import (
    HEADER,
    MAGIC,
    MAX_BODY_BYTES,
    MESSAGE_TYPES,
    OPERATIONS,
    PROTOCOL_VERSION,
    Batch,
    Data,
    Done,
    ErrorCode,
    Heartbeat,
    Infer,
    Kind,
    Message,
    ModelGet,
    Narration,
    Operation,
    Ping,
    ProtocolError,
    RemoteProtocolError,
    Submit,
    WorkerSpawn,
    decode,
    decode_heartbeat,
    decode_state,
    encode,
    encode_batch,
    peek_route,
)
from rbee_mesh.protocol import fields as F
from rbee_mesh.protocol.constants import MAX_BATCH
from rbee_mesh.protocol.messages import _OperationSpec

ROUND_TRIP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

#: Longest free text generated for an unpatterned Text field (the real limits go up to 200,000).
TEXT_CAP = 40
INT64 = st.integers(-(2**63), 2**63 - 1)
UTF8_CHARS = st.characters(codec="utf-8")  # no lone surrogates: those cannot be put on the wire

# Independent of messages._JOB_ID on purpose: the docs say ASCII, 1 to 64 bytes, this alphabet.
JOB_ID = st.from_regex(re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}"), fullmatch=True)

JSON_SCALAR = (
    st.none()
    | st.booleans()
    | INT64
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(UTF8_CHARS, max_size=20)
)
JSON_VALUE = st.recursive(
    JSON_SCALAR,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(UTF8_CHARS, max_size=10), inner, max_size=4)
    ),
    max_leaves=8,
)
JSON_MAP = st.dictionaries(st.text(UTF8_CHARS, max_size=10), JSON_VALUE, max_size=4)


# --- valid-message strategies, derived from the specs ------------------------------------------


def strategy_for_spec(spec: F.Spec) -> st.SearchStrategy[Any]:
    """Values that `spec.load` accepts, spread over its whole range."""
    if isinstance(spec, F.Optional):
        return st.none() | strategy_for_spec(spec.inner)
    if isinstance(spec, F.Text):
        if spec.pattern is None:
            return st.text(UTF8_CHARS, min_size=spec.min_len, max_size=min(spec.max_len, TEXT_CAP))
        lo, hi = spec.min_len, spec.max_len
        return st.from_regex(spec.pattern, fullmatch=True).filter(lambda v: lo <= len(v) <= hi)
    if isinstance(spec, F.TextList):
        return st.lists(strategy_for_spec(spec.item), max_size=spec.max_items)
    if isinstance(spec, F.Turns):
        turn = st.fixed_dictionaries(
            {"role": st.sampled_from(spec.roles), "content": strategy_for_spec(spec.content)}
        )
        return st.lists(turn, max_size=4)
    if isinstance(spec, F.Int):
        return st.integers(spec.lo, spec.hi)
    if isinstance(spec, F.Float):
        return st.floats(spec.lo, spec.hi, exclude_min=spec.open_lo, allow_nan=False)
    if isinstance(spec, F.Bool):
        return st.booleans()
    if isinstance(spec, F.Blob):
        return st.binary(max_size=min(spec.max_len, TEXT_CAP))
    if isinstance(spec, F.OneOf):
        return st.sampled_from(list(spec.enum))
    if isinstance(spec, F.Choice):
        return st.sampled_from(spec.values)
    if isinstance(spec, F.Value):
        return JSON_MAP if spec.mapping else JSON_VALUE
    if isinstance(spec, _OperationSpec):
        return st.one_of([operation_strategy(cls) for cls in OPERATIONS.values()])
    raise AssertionError(f"no strategy for spec {spec!r}: teach strategy_for_spec about it")


def _field_strategies(cls: type) -> dict[str, st.SearchStrategy[Any]]:
    strategies: dict[str, st.SearchStrategy[Any]] = {}
    for field in dataclasses.fields(cls):
        if field.name == "job_id" and issubclass(cls, Message):
            strategies["job_id"] = JOB_ID if cls.NEEDS_JOB else st.just("") | JOB_ID
        elif "spec" in field.metadata:
            strategies[field.name] = strategy_for_spec(field.metadata["spec"])
        else:
            raise AssertionError(f"{cls.__name__}.{field.name} has no spec to generate from")
    return strategies


@functools.cache
def operation_strategy(cls: type[Operation]) -> st.SearchStrategy[Operation]:
    return st.builds(cls, **_field_strategies(cls))


@functools.cache
def message_strategy(cls: type[Message]) -> st.SearchStrategy[Message]:
    if cls is Batch:  # its frames are of its own job
        return JOB_ID.flatmap(_batch_of_job)
    return st.builds(cls, **_field_strategies(cls))


def _batch_of_job(job_id: str) -> st.SearchStrategy[Message]:
    frame = (message_strategy(Narration) | message_strategy(Data)).map(
        lambda message: dataclasses.replace(message, job_id=job_id)
    )
    frames = st.lists(frame, min_size=1, max_size=MAX_BATCH).map(tuple)
    return st.builds(Batch, job_id=st.just(job_id), messages=frames)


def any_message() -> st.SearchStrategy[Message]:
    return st.one_of([message_strategy(MESSAGE_TYPES[kind]) for kind in Kind])


def assert_round_trips(message: Message) -> None:
    frames = encode(message)
    assert len(frames) == 4
    assert all(isinstance(frame, bytes) for frame in frames)
    assert peek_route(frames) == (message.KIND, message.job_id)
    assert decode(frames) == message


def decode_or_refuse(frames: list[bytes]) -> Message | None:
    """Decode: a refusal must be a RemoteProtocolError (the peer's fault, never ours), a success
    a valid, re-encodable message. The queen's lazy heartbeat decoding must agree with `decode`
    on the same frames."""
    try:
        message: Message | None = decode(frames)
    except RemoteProtocolError as exc:
        assert exc.code in (ErrorCode.INVALID_REQUEST, ErrorCode.UNSUPPORTED_VERSION)
        assert exc.message
        message = None
    try:
        beat, packed = decode_heartbeat(frames)
        lazily: Heartbeat | None = dataclasses.replace(beat, state=decode_state(packed))
    except RemoteProtocolError:
        lazily = None
    assert lazily == (message if isinstance(message, Heartbeat) else None)
    if message is not None:
        assert isinstance(message, MESSAGE_TYPES[message.KIND])
        assert decode(encode(message)) == message
    return message


def frames_for(kind: Kind, body: Any, job_id: bytes = b"job-1") -> list[bytes]:
    packed = body if isinstance(body, bytes) else msgpack.packb(body, use_bin_type=True)
    return [HEADER, bytes([kind]), job_id, packed]


def refusal(frames: list[bytes]) -> ProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode(frames)
    return info.value


# --- round trips ------------------------------------------------------------------------------


def test_round_trip_strategies_cover_every_kind_and_operation() -> None:
    # Building a strategy walks every field spec, so a field or spec type it cannot generate fails.
    kinds = {kind: message_strategy(cls) for kind, cls in MESSAGE_TYPES.items()}
    ops = {name: operation_strategy(cls) for name, cls in OPERATIONS.items()}
    for strategy in [*kinds.values(), *ops.values()]:
        strategy.validate()
    assert set(kinds) == set(Kind), "every Kind needs a message class and a strategy"
    assert set(ops) == set(OPERATIONS)


@pytest.mark.parametrize("kind", list(Kind), ids=lambda kind: kind.name)
@ROUND_TRIP
@given(data=st.data())
def test_every_message_kind_round_trips(kind: Kind, data: st.DataObject) -> None:
    assert kind in MESSAGE_TYPES, f"no message class for {kind.name}"
    assert_round_trips(data.draw(message_strategy(MESSAGE_TYPES[kind])))


@pytest.mark.parametrize("name", sorted(OPERATIONS))
@ROUND_TRIP
@given(data=st.data())
def test_every_operation_round_trips_inside_submit(name: str, data: st.DataObject) -> None:
    strategies = _field_strategies(Submit)
    strategies["op"] = operation_strategy(OPERATIONS[name])
    message = data.draw(st.builds(Submit, **strategies))
    assert type(message.op) is OPERATIONS[name]
    assert_round_trips(message)


# --- fuzzing ----------------------------------------------------------------------------------

FUZZ_FRAME = (
    st.binary(max_size=80)
    | st.just(HEADER)
    | st.sampled_from([bytes([kind]) for kind in Kind])
    | JOB_ID.map(str.encode)
    | JSON_MAP.map(lambda body: msgpack.packb(body, use_bin_type=True))
)


@FUZZ
@given(st.lists(FUZZ_FRAME, max_size=6))
def test_decode_of_arbitrary_frames_raises_only_protocol_error(frames: list[bytes]) -> None:
    decode_or_refuse(frames)


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_decode_of_random_bytes_raises_only_protocol_error(frames: list[bytes]) -> None:
    decode_or_refuse(frames)


@st.composite
def mutated_encodings(draw: st.DrawFn) -> list[bytes]:
    frames = [bytearray(frame) for frame in encode(draw(any_message()))]
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate_body", "swap"]))
        i = draw(st.integers(0, len(frames) - 1))
        frame = frames[i]
        if action == "flip" and frame:
            frame[draw(st.integers(0, len(frame) - 1))] ^= draw(st.integers(1, 255))
        elif action == "insert":
            at = draw(st.integers(0, len(frame)))
            frame[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif action == "delete" and frame:
            at = draw(st.integers(0, len(frame) - 1))
            del frame[at : at + draw(st.integers(1, 4))]
        elif action == "truncate_body":
            body = frames[3]
            del body[draw(st.integers(0, max(0, len(body) - 1))) :]
        elif action == "swap":
            j = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
    return [bytes(frame) for frame in frames]


@FUZZ
@given(mutated_encodings())
def test_decode_of_mutated_valid_frames_raises_only_protocol_error(frames: list[bytes]) -> None:
    decode_or_refuse(frames)


def _vocabulary() -> tuple[list[str], list[str]]:
    """Every wire field name, and every string an enum field or operation name may take."""
    names, words = {"name", "args"}, set(OPERATIONS)
    for cls in [*MESSAGE_TYPES.values(), *OPERATIONS.values()]:
        for field in dataclasses.fields(cls):
            names.add(field.name)
            spec = field.metadata.get("spec")
            while isinstance(spec, F.Optional):
                spec = spec.inner
            if isinstance(spec, F.OneOf):
                words |= {str(member.value) for member in spec.enum}
    return sorted(names), sorted(words)


FIELD_NAMES, ENUM_WORDS = _vocabulary()
FUZZ_KEY = st.sampled_from(FIELD_NAMES) | st.text(UTF8_CHARS, max_size=8)
FUZZ_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.sampled_from(FIELD_NAMES + ENUM_WORDS)
    | st.text(UTF8_CHARS, max_size=12)
    | st.binary(max_size=6)
)
FUZZ_VALUE = st.recursive(
    FUZZ_SCALAR,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(FUZZ_KEY, inner, max_size=6),
    max_leaves=20,
)


@FUZZ
@given(
    kind=st.sampled_from(list(Kind)),
    job_id=st.just(b"") | JOB_ID.map(str.encode),
    body=st.dictionaries(FUZZ_KEY, FUZZ_VALUE, max_size=8) | FUZZ_VALUE,
)
def test_decode_of_random_msgpack_body_raises_only_protocol_error(
    kind: Kind, job_id: bytes, body: Any
) -> None:
    decode_or_refuse(frames_for(kind, body, job_id))


@st.composite
def perturbed(draw: st.DrawFn, value: Any) -> Any:
    """`value` with one field somewhere inside it replaced, removed, added or left alone."""
    if isinstance(value, dict) and value and draw(st.integers(0, 3)):
        out = dict(value)
        key = draw(st.sampled_from(sorted(out)))
        action = draw(st.sampled_from(["replace", "delete", "add", "recurse"]))
        if action == "replace":
            out[key] = draw(FUZZ_VALUE)
        elif action == "delete":
            del out[key]
        elif action == "add":
            out[draw(FUZZ_KEY)] = draw(FUZZ_VALUE)
        else:
            out[key] = draw(perturbed(out[key]))
        return out
    return draw(FUZZ_VALUE)


@st.composite
def perturbed_bodies(draw: st.DrawFn) -> list[bytes]:
    message = draw(any_message())
    body: Any = message.to_wire()
    for _ in range(draw(st.integers(1, 3))):
        body = draw(perturbed(body))
    return frames_for(message.KIND, body, message.job_id.encode())


@FUZZ
@given(perturbed_bodies())
def test_decode_of_perturbed_valid_body_raises_only_protocol_error(frames: list[bytes]) -> None:
    decode_or_refuse(frames)


# --- the checks in C agree with the specs ---------------------------------------------------------


def loaded_by_specs(cls: type, body: Any) -> dict[str, Any] | None:
    """What the specs' `load` alone make of a decoded body: its fields, or None if refused."""
    declared = {f.name: f for f in dataclasses.fields(cls) if "spec" in f.metadata}
    if not isinstance(body, dict) or not set(body) <= set(declared) - {"job_id"}:
        return None
    out = {}
    for name, field in declared.items():
        if name in body:
            value = body[name]
        elif field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            return None
        try:
            out[name] = field.metadata["spec"].load(name, value)
        except ProtocolError:
            return None
    return out


def loaded_in_c(cls: type, body: bytes) -> dict[str, Any] | None:
    """What a class's C path makes of a body: its fields, or None if refused."""
    path = F._c_path(cls)
    assert path is not None
    try:
        values = path.as_dict(path.decode(body))
        for name, load in path.load_after:
            values[name] = load(name, values[name])
    except path.refused_or_invalid:
        return None
    return values


def _c_checked(kind: Kind) -> bool:
    return F._c_path(MESSAGE_TYPES[kind]) is not None


@FUZZ
@given(perturbed_bodies())
def test_what_the_c_path_takes_the_specs_take_as_the_same_values(frames: list[bytes]) -> None:
    cls = MESSAGE_TYPES[Kind(frames[1][0])]
    if not _c_checked(cls.KIND):
        return
    in_c = loaded_in_c(cls, frames[3])
    if in_c is not None:  # (what it refuses the specs decide alone: only this way must agree)
        assert loaded_by_specs(cls, msgpack.unpackb(frames[3])) == in_c


@ROUND_TRIP
@given(data=st.data())
def test_the_c_path_takes_every_valid_message_and_encodes_it_as_msgpack_does(
    data: st.DataObject,
) -> None:
    kind = data.draw(st.sampled_from([kind for kind in Kind if _c_checked(kind)]))
    message = data.draw(message_strategy(MESSAGE_TYPES[kind]))
    packed = msgpack.packb(message.to_wire(), use_bin_type=True)
    assert message.body in (None, packed)  # (none kept where a field is a dict or a list)
    assert encode(message)[3] == packed
    assert loaded_in_c(type(message), packed) is not None


def _specs_checked_in_c() -> list[tuple[str, F.Spec]]:
    classes = [*MESSAGE_TYPES.values(), *OPERATIONS.values()]
    return sorted(
        {
            (f"{cls.__name__}.{f.name}", f.metadata["spec"])
            for cls in classes
            if F._c_path(cls) is not None
            for f in dataclasses.fields(cls)
            if "spec" in f.metadata
        },
        key=lambda pair: pair[0],
    )


def _near(spec: F.Spec) -> st.SearchStrategy[Any]:
    """Values at and around a spec's limits, and of the wrong kinds."""
    edges: st.SearchStrategy[Any] = st.nothing()
    if isinstance(spec, F.Optional):
        spec = spec.inner
    if isinstance(spec, F.Text):
        size = st.sampled_from(sorted({0, 1, spec.min_len, spec.max_len, spec.max_len + 1}))
        alphabet = st.sampled_from([*"aZ09._:/@+-", ".", "\n", " ", "é", "\x00"])
        pieces = st.text(alphabet, min_size=1, max_size=4)
        edges = st.tuples(size, pieces).map(lambda drawn: (drawn[1] * drawn[0])[: drawn[0]])
    elif isinstance(spec, F.Int):
        edges = st.sampled_from([spec.lo - 1, spec.lo, spec.hi, spec.hi + 1, 0])
    elif isinstance(spec, F.Float):
        edges = st.sampled_from([spec.lo, spec.hi, spec.hi + 1, spec.lo - 1, math.nan, math.inf])
        edges = edges | st.sampled_from([int(spec.lo), int(spec.hi)])
    elif isinstance(spec, F.OneOf | F.Choice):
        words = [m.value for m in spec.enum] if isinstance(spec, F.OneOf) else spec.values
        edges = st.sampled_from([*words, *(w.upper() for w in words), ""])
    return edges | FUZZ_SCALAR | st.lists(FUZZ_SCALAR, max_size=3)


@pytest.mark.parametrize(("field", "spec"), _specs_checked_in_c(), ids=lambda v: str(v)[:40])
@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_a_specs_msgspec_type_takes_nothing_its_load_refuses(
    field: str, spec: F.Spec, data: st.DataObject
) -> None:
    import msgspec

    value = data.draw(_near(spec))
    try:
        packed = msgpack.packb(value, use_bin_type=True)
        taken = msgspec.msgpack.decode(packed, type=spec.wire_type())
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError, OverflowError):
        return
    if spec.load_after_wire_type:
        return  # load runs after it anyway
    assert spec.load(field, value) == taken


def test_most_kinds_and_operations_are_checked_in_c() -> None:
    unchecked = {kind.name for kind in Kind if not _c_checked(kind)}
    assert unchecked == {"SUBMIT", "BATCH"}  # an operation, and frames: checked one by one
    in_python = sorted(name for name, cls in OPERATIONS.items() if F._c_path(cls) is None)
    assert in_python == ["infer"]  # (its chat turns)


# --- explicit refusals ------------------------------------------------------------------------


def _valid_frames() -> list[bytes]:
    return encode(Done("job-1", result={"ok": True}))


def test_decode_refuses_wrong_magic_saying_so() -> None:
    frames = _valid_frames()
    frames[0] = b"XBEE" + bytes([PROTOCOL_VERSION])
    exc = refusal(frames)
    assert exc.code is ErrorCode.INVALID_REQUEST
    assert "magic" in exc.message


@pytest.mark.parametrize("version", [PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1])
def test_decode_refuses_another_version_as_unsupported_naming_both_versions(version: int) -> None:
    frames = _valid_frames()
    frames[0] = MAGIC + bytes([version])
    exc = refusal(frames)
    assert exc.code is ErrorCode.UNSUPPORTED_VERSION
    assert re.search(rf"\b{version}\b", exc.message), exc.message
    assert re.search(rf"\b{PROTOCOL_VERSION}\b", exc.message), exc.message


@pytest.mark.parametrize("kind_byte", [0, max(Kind) + 1, 255])
def test_decode_refuses_unknown_kind_byte(kind_byte: int) -> None:
    frames = _valid_frames()
    frames[1] = bytes([kind_byte])
    exc = refusal(frames)
    assert "kind" in exc.message
    assert str(kind_byte) in exc.message


def test_decode_refuses_job_id_of_65_bytes() -> None:
    exc = refusal(frames_for(Kind.DONE, {"result": None}, b"a" * 65))
    assert "job id" in exc.message


def test_decode_accepts_job_id_of_64_bytes() -> None:
    assert decode(frames_for(Kind.DONE, {"result": None}, b"a" * 64)).job_id == "a" * 64


def test_decode_refuses_non_ascii_job_id() -> None:
    exc = refusal(frames_for(Kind.DONE, {"result": None}, "jöb-1".encode()))
    assert "ASCII" in exc.message


def test_decode_refuses_body_over_max_body_bytes() -> None:
    body = msgpack.packb({"result": "x" * MAX_BODY_BYTES})
    assert len(body) > MAX_BODY_BYTES
    exc = refusal(frames_for(Kind.DONE, body))
    assert str(MAX_BODY_BYTES) in exc.message


def test_encode_refuses_body_over_max_body_bytes() -> None:
    with pytest.raises(ProtocolError, match=str(MAX_BODY_BYTES)):
        encode(Data("job-1", record={"blob": "x" * MAX_BODY_BYTES}))


@pytest.mark.parametrize(
    "body",
    [
        {"result": msgpack.ExtType(1, b"x")},
        {"result": [msgpack.ExtType(127, b"\x00\x00\x00\x01")]},
        {"result": msgpack.Timestamp(1, 0)},
        {"result": b"x"},
        {"result": b""},
        {"result": {"nested": b"bytes"}},
        {b"result": None},
    ],
    ids=["ext", "ext-in-list", "timestamp-ext", "bin", "empty-bin", "nested-bin", "bin-key"],
)
def test_decode_refuses_ext_and_bin_types_in_body(body: dict[Any, Any]) -> None:
    refusal(frames_for(Kind.DONE, msgpack.packb(body, use_bin_type=True)))


def test_decode_refuses_trailing_bytes_after_the_body_map() -> None:
    body = msgpack.packb({"result": None}) + b"\xc0"
    refusal(frames_for(Kind.DONE, body))


def _packed(*items: Any) -> bytes:
    return b"".join(msgpack.packb(item) for item in items)


def _nested_list(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]], built as bytes: packb would refuse it


# (kind, body map built around the nested value) - the deep value sits where each validator reads.
_NESTING_SITES: dict[str, tuple[Kind, Callable[[bytes], bytes]]] = {
    "done-result": (Kind.DONE, lambda deep: b"\x81" + _packed("result") + deep),
    "ready-role-enum": (
        Kind.READY,
        lambda deep: b"\x82" + _packed("sender", "w1", "role") + deep,
    ),
    "narration-level-enum": (
        Kind.NARRATION,
        lambda deep: b"\x84" + _packed("actor", "a", "action", "b", "human", "h", "level") + deep,
    ),
    "submit-op-name": (
        Kind.SUBMIT,
        lambda deep: (
            b"\x82"
            + _packed("ref", "r1", "op")
            + b"\x82"
            + _packed("name")
            + deep
            + _packed("args", {})
        ),
    ),
    "submit-op-arg": (
        Kind.SUBMIT,
        lambda deep: (
            b"\x82"
            + _packed("ref", "r1", "op", {"name": "ping", "args": {}})[:-1]
            + b"\x81"
            + _packed("count")
            + deep
        ),
    ),
}


@pytest.mark.parametrize("depth", [100, 1_000, 10_000])
@pytest.mark.parametrize("site", sorted(_NESTING_SITES))
def test_decode_refuses_deep_nesting_without_recursion_error(site: str, depth: int) -> None:
    kind, build = _NESTING_SITES[site]
    body = build(_nested_list(depth))
    refusal(frames_for(kind, body, b"" if kind in (Kind.SUBMIT, Kind.READY) else b"job-1"))


def test_nesting_site_bodies_are_valid_with_a_flat_value() -> None:
    """Guards the hand-built bodies above: with a valid scalar in place, each decodes."""
    flat = {
        "done-result": _packed(None),
        "ready-role-enum": _packed("worker"),
        "narration-level-enum": _packed("info"),
        "submit-op-name": _packed("ping"),
        "submit-op-arg": _packed(3),
    }
    assert set(flat) == set(_NESTING_SITES)
    for site, (kind, build) in _NESTING_SITES.items():
        job = b"" if kind in (Kind.SUBMIT, Kind.READY) else b"job-1"
        assert decode(frames_for(kind, build(flat[site]), job)).KIND is kind, site


def test_decode_names_an_unknown_field() -> None:
    exc = refusal(frames_for(Kind.DONE, {"result": None, "colour": "blue"}))
    assert "colour" in exc.message


def test_decode_names_a_missing_field() -> None:
    exc = refusal(frames_for(Kind.TOKEN, {"text": "hello"}))
    assert "seq" in exc.message


_PONG = {"actor": "hive", "action": "pong", "human": "pong"}


@pytest.mark.parametrize(
    ("items", "words"),
    [
        ([], "1 to 256 frames"),
        ([[int(Kind.NARRATION), _PONG]] * (MAX_BATCH + 1), "1 to 256 frames"),
        ([[int(Kind.TOKEN), {"seq": 0, "text": "x"}]], "NARRATION or DATA"),
        ([[int(Kind.DONE), {"result": None}]], "NARRATION or DATA"),
        ([[[3], _PONG]], "NARRATION or DATA"),
        ([[int(Kind.NARRATION)]], "NARRATION or DATA"),
        ([[int(Kind.NARRATION), _PONG], [int(Kind.NARRATION), {**_PONG, "level": "loud"}]],
         "messages[1] (NARRATION): level"),
        ([[int(Kind.DATA), {"record": {}, "extra": 1}]], "unknown field(s): extra"),
    ],
)  # fmt: skip
def test_decode_refuses_a_batch_naming_what_is_wrong(items: list[Any], words: str) -> None:
    assert words in refusal(frames_for(Kind.BATCH, {"messages": items})).message


def test_a_batch_joined_from_encoded_frames_decodes_to_them_in_order() -> None:
    said = [
        Narration(job_id="job-1", actor="hive", action="pong", human=f"pong {i}") for i in range(3)
    ]
    said.insert(1, Data(job_id="job-1", record={"done": 1}))
    frames = encode_batch("job-1", [(m.KIND, encode(m)[3]) for m in said])
    batch = decode(frames)
    assert isinstance(batch, Batch) and list(batch.messages) == said
    assert encode(batch) == frames


def test_a_batch_refuses_a_frame_of_another_job() -> None:
    other = Narration(job_id="job-2", actor="hive", action="pong", human="pong")
    with pytest.raises(ProtocolError, match="of another job"):
        Batch(job_id="job-1", messages=(other,))


def test_decode_names_an_unknown_operation() -> None:
    body = {"ref": "r1", "op": {"name": "launch_missiles", "args": {}}}
    exc = refusal(frames_for(Kind.SUBMIT, body, b""))
    assert "launch_missiles" in exc.message


def test_submit_refused_for_a_bad_argument_carries_the_submitters_ref() -> None:
    body = {"ref": "keeper-ref-7", "op": {"name": "infer", "args": {"prompt": "hi", "top_k": -1}}}
    exc = refusal(frames_for(Kind.SUBMIT, body, b""))
    assert exc.ref == "keeper-ref-7"
    assert "top_k" in exc.message


# --- operation validation ---------------------------------------------------------------------

BAD_INFER_ARGS = [
    ("temperature", 2.5),
    ("top_p", 0),
    ("top_p", 0.0),
    ("top_k", -1),
    ("max_tokens", 0),
    ("repeat_penalty", 3),
    ("seed", -1),
    ("stop", ["halt"] * 9),
    ("prompt", ""),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("top_p", -math.inf),
    ("repeat_penalty", math.nan),
    ("max_tokens", True),
    ("top_k", False),
    ("seed", True),
]


@pytest.mark.parametrize(("field", "value"), BAD_INFER_ARGS, ids=repr)
def test_infer_construction_refuses_out_of_range_argument_naming_it(field: str, value: Any) -> None:
    args = {"prompt": "hi", field: value}
    with pytest.raises(ProtocolError) as info:
        Infer(**args)
    assert field in info.value.message


@pytest.mark.parametrize(("field", "value"), BAD_INFER_ARGS, ids=repr)
def test_infer_decoding_refuses_out_of_range_argument_naming_it(field: str, value: Any) -> None:
    body = {"ref": "r1", "op": {"name": "infer", "args": {"prompt": "hi", field: value}}}
    exc = refusal(frames_for(Kind.SUBMIT, body, b""))
    assert field in exc.message
    assert exc.ref == "r1"


@pytest.mark.parametrize(
    "device",
    ["", "gpu", "CPU", "cuda", "cuda:", "cuda:123", "cuda:-1", " cpu", "cuda:0 ", "cuda:\u0663"],
    ids=repr,
)
def test_worker_spawn_refuses_a_bad_device_string(device: str) -> None:
    with pytest.raises(ProtocolError) as info:
        WorkerSpawn(model="owner/repo", device=device)
    assert "device" in info.value.message


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda:0", "cuda:15"])
def test_worker_spawn_accepts_a_good_device_string(device: str) -> None:
    assert WorkerSpawn(model="owner/repo", device=device).device == device


@pytest.mark.parametrize(
    "build",
    [
        lambda model: WorkerSpawn(model=model),
        lambda model: Infer(prompt="hi", model=model),
        lambda model: ModelGet(model=model),
    ],
    ids=["worker_spawn", "infer", "model_get"],
)
@pytest.mark.parametrize("model", ["my model", "owner/repo :file", " owner/repo", "owner/ repo"])
def test_model_ref_with_spaces_is_refused(build: Callable[[str], Operation], model: str) -> None:
    with pytest.raises(ProtocolError) as info:
        build(model)
    assert "model" in info.value.message


# --- regressions: a message that exists must be encodable ----------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: Done("job-1", result=2**64),
        lambda: Done("job-1", result=[-(2**63) - 1]),
        lambda: Done("job-1", result="\ud800"),
        lambda: Done("job-1", result={"\udcff": 1}),
        lambda: Narration("job-1", actor="hive", action="say", human="bad \udcff"),
        lambda: Ping(interval_s=10**400),
    ],
    ids=["uint64+1", "int64-1", "surrogate-value", "surrogate-key", "surrogate-text", "huge-float"],
)
def test_construction_refuses_values_msgpack_cannot_carry(build: Callable[[], Message]) -> None:
    with pytest.raises(ProtocolError):
        build()


@pytest.mark.parametrize("number", [2**64 - 1, -(2**63)])
def test_value_integers_at_the_msgpack_limits_round_trip(number: int) -> None:
    assert_round_trips(Done("job-1", result=[number]))


def test_enum_values_in_strategies_are_strings() -> None:
    """OneOf only looks up string values; every enum it is used with must have string values."""
    for cls in [*MESSAGE_TYPES.values(), *OPERATIONS.values()]:
        for field in dataclasses.fields(cls):
            spec = field.metadata.get("spec")
            if isinstance(spec, F.OneOf):
                assert issubclass(spec.enum, Enum)
                assert all(isinstance(m.value, str) for m in spec.enum), (cls, field.name)
