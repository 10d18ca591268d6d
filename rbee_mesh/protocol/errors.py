"""Error codes shared by every actor, and the two exceptions that carry them.

`MeshError` is an operation failing for a reason the user should see (a model that does not exist,
a worker that died). `ProtocolError` is a peer sending something this protocol does not allow
(garbage bytes, an unknown version, a field of the wrong type). Both carry an `ErrorCode` and a
message written for a person; both become an ERROR frame on the wire.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Why a job or a frame failed. The value is what travels on the wire."""

    INVALID_REQUEST = "INVALID_REQUEST"
    UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
    NOT_FOUND = "NOT_FOUND"
    CONFLICT = "CONFLICT"
    UNAVAILABLE = "UNAVAILABLE"
    BUSY = "BUSY"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    WORKER_LOST = "WORKER_LOST"
    HIVE_LOST = "HIVE_LOST"
    INTERNAL = "INTERNAL"

    @property
    def description(self) -> str:
        """One line saying what this code means, for help texts and docs."""
        return _DESCRIPTIONS[self]


_DESCRIPTIONS: dict[ErrorCode, str] = {
    ErrorCode.INVALID_REQUEST: "the request is malformed or a parameter is out of range",
    ErrorCode.UNSUPPORTED_VERSION: "the peer speaks a protocol version this build does not",
    ErrorCode.NOT_FOUND: "the named job, hive, worker or model does not exist",
    ErrorCode.CONFLICT: "the request contradicts the current state (for example: already done)",
    ErrorCode.UNAVAILABLE: "no actor that can serve the request is reachable",
    ErrorCode.BUSY: "the actor is at capacity; try again later",
    ErrorCode.TIMEOUT: "the job did not finish within its deadline",
    ErrorCode.CANCELLED: "the job was cancelled",
    ErrorCode.WORKER_LOST: "the worker running the job died or stopped answering",
    ErrorCode.HIVE_LOST: "the hive running the job died or stopped answering",
    ErrorCode.INTERNAL: "a bug in rbee-mesh; the message says where",
}


class MeshError(Exception):
    """An operation failed; `code` says why, `message` says it to a person."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ProtocolError(MeshError):
    """A frame or field that the protocol does not allow. Raised only by the protocol package."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INVALID_REQUEST) -> None:
        super().__init__(code, message)
        #: The `ref` of the SUBMIT that was refused, when it could be read; else empty.
        self.ref = ""
