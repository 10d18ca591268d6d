"""Declarative field validation for messages and operations.

Every field of every message and operation names a `Spec`. A spec turns a value that came from a
user or off the wire into the value the dataclass keeps (`load`, which rejects anything out of
range with a ProtocolError that names the field), and back into a msgpack-ready value (`dump`).
One mechanism validates both construction in our own code and decoding of untrusted bytes, so a
message that exists is a message that is valid.

The same checks run in C where they can: each spec also names the msgspec type that checks what
its `load` checks (`wire_type`), and a class whose fields all have one gets a msgspec Struct of
its wire fields, which checks an instance as it is built and a body as it is decoded, and encodes
it (`_CPath`): 0.2 us each for a narration, where `load` and msgpack took 2.3, 1.6 and 3.7 us.
A class gets it after its first C_PATH_AFTER instances, so that a short command never pays for
importing msgspec.
What the Struct refuses is checked again by `load`, which says what is wrong; so `load` alone
decides what is valid, and a test holds the two to the same answers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

from rbee_mesh.protocol.constants import MAX_BODY_VALUES, MAX_VALUE_DEPTH
from rbee_mesh.protocol.errors import ProtocolError, TooLarge

#: Never "..": no identifier can name a parent directory, wherever one ends up.
_IDENT = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._:/@+-]*")


class Spec:
    """How one field is validated (`load`) and put on the wire (`dump`)."""

    def load(self, name: str, value: Any) -> Any:
        raise ProtocolError(f"{name}: no validator")  # pragma: no cover - every Spec overrides

    def dump(self, value: Any) -> Any:
        return value

    def wire_type(self) -> Any:
        """The msgspec type that accepts exactly what `load` accepts, as `load` returns it, or
        None where there is none (the class then checks in Python alone)."""
        return None

    #: Whether `load` must still run after the msgspec type has checked a value (checks it
    #: cannot express: a free-form value's depth, keys and numbers).
    load_after_wire_type: ClassVar[bool] = False


@dataclass(frozen=True)
class Text(Spec):
    """A str with a length range and an optional full-match pattern."""

    max_len: int = 256
    min_len: int = 0
    pattern: re.Pattern[str] | None = None
    hint: str = ""

    def load(self, name: str, value: Any) -> str:
        # The common case in one expression (a hot path: every text field of every frame); the
        # checks below say what is wrong with anything else.
        if (
            type(value) is str
            and self.min_len <= len(value) <= self.max_len
            and value.isascii()
            and (self.pattern is None or not value or self.pattern.fullmatch(value))
        ):
            return value
        if not isinstance(value, str):
            raise ProtocolError(f"{name} must be a string, got {_type_name(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            if self.min_len and not value:
                raise ProtocolError(f"{name} must not be empty")
            raise ProtocolError(
                f"{name} must be {self.min_len} to {self.max_len} characters, got {len(value)}"
            )
        if not _utf8_ok(value):
            raise ProtocolError(f"{name} is not valid Unicode text (it holds a lone surrogate)")
        if self.pattern is not None and value and not self.pattern.fullmatch(value):
            raise ProtocolError(f"{name} {value[:80]!r} is not valid{self.hint}")
        return value

    def wire_type(self) -> Any:
        pattern = None
        if self.pattern is not None:  # load matches it whole, and only against a non-empty text
            optional = "?" if self.min_len == 0 else ""
            pattern = f"^(?:{self.pattern.pattern}){optional}\\Z"
        return _annotated(str, min_length=self.min_len, max_length=self.max_len, pattern=pattern)


def ident(max_len: int = 64) -> Text:
    """An identifier: job, hive, worker or sender id."""
    return Text(
        max_len=max_len,
        min_len=1,
        pattern=_IDENT,
        hint=" (letters, digits and . _ : / @ + -, starting with a letter or digit, no '..')",
    )


@dataclass(frozen=True)
class Int(Spec):
    lo: int
    hi: int

    def load(self, name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{name} must be an integer, got {_type_name(value)}")
        if not self.lo <= value <= self.hi:
            raise ProtocolError(f"{name} must be between {self.lo} and {self.hi}, got {value}")
        return value

    def wire_type(self) -> Any:
        return _annotated(int, ge=self.lo, le=self.hi)


@dataclass(frozen=True)
class Float(Spec):
    """A finite number in [lo, hi]; `open_lo` excludes lo itself. Integers are accepted."""

    lo: float
    hi: float
    open_lo: bool = False

    def load(self, name: str, value: Any) -> float:
        if (  # the common case (NaN and the infinities fail it)
            type(value) is float
            and (self.lo < value if self.open_lo else self.lo <= value)
            and value <= self.hi
        ):
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProtocolError(f"{name} must be a number, got {_type_name(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise ProtocolError(f"{name} must be a finite number, got a huge integer") from None
        if not math.isfinite(number):
            raise ProtocolError(f"{name} must be a finite number, got {number}")
        below = number <= self.lo if self.open_lo else number < self.lo
        if below or number > self.hi:
            low = "above" if self.open_lo else "at least"
            raise ProtocolError(
                f"{name} must be {low} {self.lo} and at most {self.hi}, got {value}"
            )
        return number

    def wire_type(self) -> Any:  # (msgspec takes integers for a float, as load does)
        low = {"gt": self.lo} if self.open_lo else {"ge": self.lo}
        return _annotated(float, **low, le=self.hi)


@dataclass(frozen=True)
class Bool(Spec):
    def load(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{name} must be true or false, got {_type_name(value)}")
        return value

    def wire_type(self) -> Any:
        return bool


E = TypeVar("E", bound=Enum)


@dataclass(frozen=True)
class OneOf(Spec):
    """A member of an Enum whose values are strings; travels as the value."""

    enum: type[Enum]

    def load(self, name: str, value: Any) -> Enum:
        if isinstance(value, self.enum):
            return value
        # Only strings are looked up: a list off the wire is not hashable.
        if isinstance(value, str):
            member = self._members.get(value)
            if member is not None:
                return member
        choices = ", ".join(str(m.value) for m in self.enum)
        raise ProtocolError(f"{name} must be one of {choices}; got {_brief(value)}")

    def dump(self, value: Any) -> Any:
        return value.value

    def wire_type(self) -> Any:
        return self.enum

    @functools.cached_property
    def _members(self) -> dict[str, Enum]:
        """The members by their values (a dict lookup, where `enum(value)` costs a microsecond)."""
        return {member.value: member for member in self.enum}


@dataclass(frozen=True)
class Optional(Spec):
    """None, or a value of the inner spec."""

    inner: Spec

    def load(self, name: str, value: Any) -> Any:
        return None if value is None else self.inner.load(name, value)

    def dump(self, value: Any) -> Any:
        return None if value is None else self.inner.dump(value)

    def wire_type(self) -> Any:
        inner = self.inner.wire_type()
        return None if inner is None or self.inner.load_after_wire_type else inner | None


@dataclass(frozen=True)
class TextList(Spec):
    """A bounded sequence of strings, kept as a tuple so messages stay hashable and frozen."""

    item: Text
    max_items: int

    def load(self, name: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list | tuple):
            raise ProtocolError(f"{name} must be a list of strings, got {_type_name(value)}")
        if len(value) > self.max_items:
            raise ProtocolError(f"{name} may hold at most {self.max_items} items, got {len(value)}")
        return tuple(self.item.load(f"{name}[{i}]", v) for i, v in enumerate(value))

    def dump(self, value: Any) -> Any:
        return list(value)

    def wire_type(self) -> Any:
        item = self.item.wire_type()
        items = tuple[item, ...]  # type: ignore[valid-type]  # (a type made at run time)
        return None if item is None else _annotated(items, max_length=self.max_items)


@dataclass(frozen=True)
class Blob(Spec):
    """Bytes (msgpack's bin), at most `max_len` of them: a piece of a file, never text."""

    max_len: int

    def load(self, name: str, value: Any) -> bytes:
        if type(value) is not bytes:
            raise ProtocolError(f"{name} must be bytes, got {_type_name(value)}")
        if len(value) > self.max_len:
            raise ProtocolError(f"{name} may hold at most {self.max_len} bytes, got {len(value)}")
        return value

    def wire_type(self) -> Any:
        return _annotated(bytes, max_length=self.max_len)


@dataclass(frozen=True)
class Turns(Spec):
    """The earlier turns of a chat: a bounded list of {"role", "content"} maps, kept as a tuple
    of (role, content) pairs."""

    roles: tuple[str, ...]
    content: Text
    max_items: int

    def load(self, name: str, value: Any) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, list | tuple):
            raise ProtocolError(f"{name} must be a list of turns, got {_type_name(value)}")
        if len(value) > self.max_items:
            raise ProtocolError(f"{name} may hold at most {self.max_items} turns, got {len(value)}")
        turns = []
        for i, turn in enumerate(value):
            if isinstance(turn, Mapping) and set(turn) == {"role", "content"}:
                role, content = turn["role"], turn["content"]
            elif isinstance(turn, tuple) and len(turn) == 2:  # as Python code gives it
                role, content = turn
            else:
                raise ProtocolError(f"{name}[{i}] must be a map of role and content")
            if role not in self.roles:
                raise ProtocolError(f"{name}[{i}].role must be one of {', '.join(self.roles)}")
            turns.append((role, self.content.load(f"{name}[{i}].content", content)))
        return tuple(turns)

    def dump(self, value: Any) -> Any:
        return [{"role": role, "content": content} for role, content in value]


@dataclass(frozen=True)
class Value(Spec):
    """A free-form msgpack value (results, records, heartbeat state), checked for shape only.

    Maps must have str keys; bytes, ext types, non-finite numbers and nesting deeper than
    MAX_VALUE_DEPTH are refused, and more than MAX_BODY_VALUES items in all is `TooLarge`.
    `mapping=True` requires the top level to be a map.
    """

    mapping: bool = False
    load_after_wire_type = True

    def load(self, name: str, value: Any) -> Any:
        if self.mapping and not isinstance(value, Mapping):
            raise ProtocolError(f"{name} must be a map, got {_type_name(value)}")
        _check_value(name, value)
        return value

    def wire_type(self) -> Any:
        return dict[str, Any] if self.mapping else Any


def _check_value(name: str, root: Any) -> None:
    """Walk `root` without recursion, looking at each item once (a hot path: every result,
    record and state passes here, so the common scalars are checked inline)."""
    budget = MAX_BODY_VALUES
    stack: list[tuple[Any, int]] = [([root], -1)]
    while stack:
        value, depth = stack.pop()
        budget -= len(value)
        if budget < 0:
            raise TooLarge(f"{name} holds more than {MAX_BODY_VALUES} values")
        if depth >= MAX_VALUE_DEPTH:
            raise ProtocolError(f"{name} nests deeper than {MAX_VALUE_DEPTH} levels")
        if isinstance(value, Mapping):
            for key in value:
                if type(key) is not str:
                    raise ProtocolError(f"{name} has a map key that is not a string")
                if not key.isascii() and not _utf8_ok(key):
                    raise ProtocolError(f"{name} has a map key with a lone surrogate")
            items: Iterable[Any] = value.values()
        else:
            items = value
        for item in items:
            kind = type(item)
            if kind is str:
                if not item.isascii() and not _utf8_ok(item):
                    raise ProtocolError(f"{name} holds text with a lone surrogate")
            elif kind is int:
                if not _MSGPACK_INT_MIN <= item <= _MSGPACK_INT_MAX:
                    raise ProtocolError(f"{name} holds an integer outside the 64-bit range")
            elif kind is list or kind is dict or kind is tuple or isinstance(item, Mapping):
                if item:
                    stack.append((item, depth + 1))
            else:
                _check_scalar(name, item)


def _check_scalar(name: str, value: Any) -> None:
    """The rarer scalars: None, booleans, numbers, and subclasses of str and int (enums)."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        if not value.isascii() and not _utf8_ok(value):
            raise ProtocolError(f"{name} holds text with a lone surrogate")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ProtocolError(f"{name} holds a non-finite number")
    elif isinstance(value, int):
        if not _MSGPACK_INT_MIN <= value <= _MSGPACK_INT_MAX:
            raise ProtocolError(f"{name} holds an integer outside the 64-bit range")
    else:
        raise ProtocolError(f"{name} holds a value of unsupported type {_type_name(value)}")


_MSGPACK_INT_MIN = -(2**63)
_MSGPACK_INT_MAX = 2**64 - 1


def _utf8_ok(text: str) -> bool:
    """Whether msgpack can put `text` on the wire (lone surrogates cannot be UTF-8 encoded)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _brief(value: Any) -> str:
    """An untrusted value for an error message: scalars shown (cut to 80), containers by type.

    Never repr() a container from the wire: a deeply nested one raises RecursionError.
    """
    if value is None or isinstance(value, bool | int | float | str):
        return f"{value!r:.80}"
    return _type_name(value)


@dataclass(frozen=True)
class Choice(Spec):
    """A string that is one of `values` (which a command line offers as its choices)."""

    values: tuple[str, ...]

    def load(self, name: str, value: Any) -> str:
        if isinstance(value, str) and value in self.values:
            return value
        raise ProtocolError(f"{name} must be one of {', '.join(self.values)}; got {_brief(value)}")

    def wire_type(self) -> Any:
        return Literal[self.values]


@dataclass(frozen=True)
class Arg:
    """How a person gives a field on the command line: the keeper builds its commands from the
    operations' fields (sans I/O: plain data, no command-line library here)."""

    help: str = ""
    #: The option's long name without dashes; default: the field's, `_` written `-`.
    name: str = ""
    #: A short option, such as "-m".
    short: str = ""
    metavar: str = ""
    #: A positional argument rather than an option.
    argument: bool = False
    #: For a boolean that is true by default: the flag that makes it false (e.g. "running").
    negated_by: str = ""
    #: Not on the operation's command line (another command sets it).
    hidden: bool = False


@dataclass(frozen=True)
class Parameter:
    """One field of an operation as a command line sees it."""

    name: str
    spec: Spec
    #: The field's default, or dataclasses.MISSING for a required field.
    default: Any
    arg: Arg


def spec(
    s: Spec,
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = dataclasses.MISSING,
    arg: Arg | None = None,
) -> Any:
    """Declare a dataclass field validated by `s`, with an optional default or default factory,
    and how a command line asks for it (`arg`)."""
    metadata = {"spec": s, "arg": arg or Arg()}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def parameters(cls: type) -> tuple[Parameter, ...]:
    """The fields of a Validated dataclass (an operation), in order, for a command line."""
    return tuple(
        Parameter(
            name=f.name,
            spec=f.metadata["spec"],
            default=f.default,
            arg=f.metadata["arg"],
        )
        for f in dataclasses.fields(cls)
        if "spec" in f.metadata and not f.metadata["arg"].hidden
    )


@dataclass(frozen=True)
class _FieldSpec:
    name: str
    spec: Spec
    required: bool
    on_wire: bool
    #: `spec.load`, bound once.
    load: Callable[[str, Any], Any]
    #: `spec.dump`, or None where it gives the value unchanged.
    dump: Callable[[Any], Any] | None


_FIELD_SPECS: dict[type, tuple[_FieldSpec, ...]] = {}
_WIRE_SHAPES: dict[type, tuple[frozenset[str], tuple[str, ...]]] = {}
_WIRE_FIELDS: dict[type, tuple[tuple[str, Callable[[Any], Any] | None], ...]] = {}


def _field_specs(cls: type) -> tuple[_FieldSpec, ...]:
    """The spec'd fields of a Validated dataclass, computed once per class (a hot path)."""
    cached = _FIELD_SPECS.get(cls)
    if cached is not None:
        return cached
    exclude: frozenset[str] = getattr(cls, "WIRE_EXCLUDE", frozenset())
    specs = _FIELD_SPECS[cls] = tuple(
        _FieldSpec(
            name=f.name,
            spec=f.metadata["spec"],
            required=f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            on_wire=f.name not in exclude,
            load=f.metadata["spec"].load,
            dump=None if type(f.metadata["spec"]).dump is Spec.dump else f.metadata["spec"].dump,
        )
        for f in dataclasses.fields(cls)
        if "spec" in f.metadata
    )
    return specs


_DEFAULTS: dict[type, tuple[tuple[tuple[str, Any, Callable[[], Any] | None], ...], int]] = {}


def _defaults(cls: type) -> tuple[tuple[tuple[str, Any, Callable[[], Any] | None], ...], int]:
    """A class's fields that have defaults, as (name, default, factory or None), and how many
    fields it has in all."""
    cached = _DEFAULTS.get(cls)
    if cached is None:
        fields = dataclasses.fields(cls)
        defaults = tuple(
            (
                f.name,
                f.default,
                None if f.default_factory is dataclasses.MISSING else f.default_factory,
            )
            for f in fields
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        )
        cached = _DEFAULTS[cls] = (defaults, len(fields))
    return cached


def _wire_fields(cls: type) -> tuple[tuple[str, Callable[[Any], Any] | None], ...]:
    """The fields a class puts on the wire, each with its dump (None: the value as it is)."""
    fields = _WIRE_FIELDS.get(cls)
    if fields is None:
        fields = _WIRE_FIELDS[cls] = tuple((f.name, f.dump) for f in _field_specs(cls) if f.on_wire)
    return fields


def _annotated(kind: Any, **constraints: Any) -> Any:
    """`kind` with msgspec's constraints (those given as None left out)."""
    import msgspec

    given = {key: value for key, value in constraints.items() if value is not None}
    return Annotated[kind, msgspec.Meta(**given)]


@dataclass(frozen=True)
class _CPath:
    """A class's wire fields as a msgspec Struct: built, checked, encoded and decoded in C."""

    struct: Any
    #: The names of its wire fields, and those whose spec's `load` runs after the Struct's check.
    names: tuple[str, ...]
    load_after: tuple[tuple[str, Callable[[str, Any], Any]], ...]
    convert: Callable[..., Any]
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]
    as_dict: Callable[[Any], dict[str, Any]]
    #: What msgspec raises for a value it refuses (the Python checks then say why), and that
    #: with what a `load` after it raises.
    refused: tuple[type[BaseException], ...]
    refused_or_invalid: tuple[type[BaseException], ...]


#: Each class's C path, or None where a field's spec has no msgspec type.
_C_PATHS: dict[type, _CPath | None] = {}

#: Instances of a class built or decoded before it gets its C path: a command that sends a few
#: messages never imports msgspec (14 ms, 7 of a keeper's start-up to its first frame), an actor
#: that sends thousands does after its first few.
C_PATH_AFTER = 64
_USES: dict[type, int] = {}


def _warm_c_path(cls: type) -> _CPath | None:
    """`cls`'s C path once it has had C_PATH_AFTER instances (None before, or if it has none)."""
    try:
        return _C_PATHS[cls]
    except KeyError:
        pass
    uses = _USES[cls] = _USES.get(cls, 0) + 1
    return _c_path(cls) if uses >= C_PATH_AFTER else None


def c_path_built(cls: type) -> bool:
    """Whether `cls` checks in C now."""
    return _C_PATHS.get(cls) is not None


def _c_path(cls: type) -> _CPath | None:
    try:
        return _C_PATHS[cls]
    except KeyError:
        pass
    fields = [f for f in _field_specs(cls) if f.on_wire]
    types = [f.spec.wire_type() for f in fields]
    exclude: frozenset[str] = getattr(cls, "WIRE_EXCLUDE", frozenset())
    unchecked = [f for f in dataclasses.fields(cls) if "spec" not in f.metadata]
    if any(kind is None for kind in types) or any(f.name not in exclude for f in unchecked):
        _C_PATHS[cls] = None  # (a field a decoded body could not fill: from_wire fills it)
        return None
    import msgspec

    defaults = {f.name: f for f in dataclasses.fields(cls)}
    declared: list[Any] = []
    for f, kind in zip(fields, types, strict=True):
        field = defaults[f.name]
        if field.default is not dataclasses.MISSING:
            declared.append((f.name, kind, field.default))
        elif field.default_factory is not dataclasses.MISSING:
            declared.append((f.name, kind, msgspec.field(default_factory=field.default_factory)))
        else:
            declared.append((f.name, kind))
    struct = msgspec.defstruct(
        f"{cls.__name__}Wire", declared, kw_only=True, forbid_unknown_fields=True
    )
    refused = (msgspec.ValidationError, msgspec.DecodeError, UnicodeEncodeError, TypeError,
               OverflowError, RecursionError)  # fmt: skip
    path = _C_PATHS[cls] = _CPath(
        struct=struct,
        names=tuple(f.name for f in fields),
        load_after=tuple((f.name, f.load) for f in fields if f.spec.load_after_wire_type),
        convert=functools.partial(msgspec.convert, type=struct, from_attributes=True),
        encode=msgspec.msgpack.Encoder().encode,
        decode=msgspec.msgpack.Decoder(struct).decode,
        as_dict=msgspec.structs.asdict,
        refused=refused,
        refused_or_invalid=(*refused, ProtocolError),
    )
    return path


def check_field(cls: type, field: str, value: Any, *, name: str = "") -> Any:
    """`value` as `cls`'s field `field` takes it, or ProtocolError naming it `name` (by default
    the field's own name): one field checked alone, as another interface (the HTTP API) calls
    it."""
    found = next(f for f in _field_specs(cls) if f.name == field)
    return found.spec.load(name or field, value)


def _wire_shape(cls: type) -> tuple[frozenset[str], tuple[str, ...]]:
    """The names of a class's fields on the wire, and those of them that are required."""
    shape = _WIRE_SHAPES.get(cls)
    if shape is None:
        fields = [f for f in _field_specs(cls) if f.on_wire]
        names = frozenset(f.name for f in fields)
        shape = _WIRE_SHAPES[cls] = (names, tuple(f.name for f in fields if f.required))
    return shape


class Validated:
    """Mixin for frozen dataclasses whose fields are declared with `spec()`.

    Validation runs in __post_init__, so every constructed instance is valid. `from_wire` builds an
    instance from an untrusted map, refusing unknown and missing fields; `to_wire` is its inverse.
    """

    WIRE_EXCLUDE: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        # Straight into the instance's dict: a frozen dataclass's fields live there, and
        # object.__setattr__ per field costs a third of a message's construction.
        values = self.__dict__
        path = _warm_c_path(type(self))
        if path is not None:
            try:
                checked = path.convert(self)
                body = path.encode(checked)
            except path.refused:
                pass  # the checks below say what is wrong
            else:
                values.update(path.as_dict(checked))
                for name, load in path.load_after:
                    values[name] = load(name, values[name])
                if not path.load_after:  # (a free-form value is a dict or list: mutable)
                    values[_BODY] = body
                return
        for f in _field_specs(type(self)):
            values[f.name] = f.load(f.name, values[f.name])

    @classmethod
    def from_body(
        cls, body: bytes, what: str, unpack: Callable[[bytes], Any], **extra: Any
    ) -> Self:
        """Build from a msgpack body; `extra` supplies fields that travel outside it. A body of
        at most MAX_BODY_VALUES bytes (which can hold no more values than that) is checked by
        the class's C path; a larger one, and what the C path refuses, is unpacked with
        `unpack` (which counts values) and checked by `from_wire`, which says what is wrong."""
        path = _warm_c_path(cls)
        if path is not None and len(body) <= MAX_BODY_VALUES:
            try:
                instance = object.__new__(cls)
                values = instance.__dict__
                values.update(path.as_dict(path.decode(body)))
                values.update(extra)
                for name, load in path.load_after:
                    values[name] = load(name, values[name])
                instance._checked()
            except path.refused_or_invalid:
                pass  # decoded again below, to say why
            else:
                if not path.load_after:
                    values[_BODY] = body
                return instance
        return cls.from_wire(unpack(body), what, **extra)

    def _checked(self) -> None:
        """What a class checks beyond its fields, on an instance decoded in C (whose
        __post_init__ did not run)."""

    @property
    def body(self) -> bytes | None:
        """Its msgpack body, where its C path made it (or it was decoded from one) and none of
        its fields is a free-form value (a dict or a list, which may change after)."""
        body: bytes | None = self.__dict__.get(_BODY)
        return body

    @classmethod
    def from_wire(cls, body: Any, what: str, **extra: Any) -> Self:
        """Build from a decoded msgpack map; `extra` supplies fields that travel outside it."""
        if not isinstance(body, Mapping):
            raise ProtocolError(f"{what} body must be a map, got {_type_name(body)}")
        names, required = _wire_shape(cls)
        if not names.issuperset(body):
            unknown = [str(k) for k in body if k not in names]
            raise ProtocolError(f"{what} has unknown field(s): {', '.join(sorted(unknown))[:200]}")
        missing = [name for name in required if name not in body]
        if missing:
            raise ProtocolError(f"{what} is missing field(s): {', '.join(missing)}")
        # Built as __init__ would (defaults, then the values given), without its per-field
        # object.__setattr__: a frozen dataclass's fields live in the instance's dict. Then
        # validated as every instance is.
        defaults, count = _defaults(cls)
        instance = object.__new__(cls)
        values = instance.__dict__
        for name, default, factory in defaults:
            values[name] = default if factory is None else factory()
        values.update(body)
        values.update(extra)
        if len(values) != count:
            try:  # a field neither given nor defaulted: __init__ says which
                return cls(**body, **extra)
            except TypeError as exc:
                raise ProtocolError(f"{what}: {exc}") from None
        instance.__post_init__()
        return instance

    def to_wire(self) -> dict[str, Any]:
        values = self.__dict__
        return {
            name: values[name] if dump is None else dump(values[name])
            for name, dump in _wire_fields(type(self))
        }


#: Where an instance keeps its encoded body (not a field: no part of equality or repr).
_BODY = "_wire_body"


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        bytes: "bytes",
        list: "a list",
        tuple: "a list",
        dict: "a map",
    }.get(type(value), type(value).__name__)
