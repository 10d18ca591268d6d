"""Error codes shared by every actor, and the exceptions that carry them.

`MeshError` is an operation failing for a reason the user should see (a model that does not exist,
a worker that died). `ProtocolError` is a value or frame this protocol does not allow, and says
whose fault it was, as h11 does: `RemoteProtocolError` for a peer's bad frame (garbage bytes, an
unknown version, a field of the wrong type), `LocalProtocolError` for something this process
tried to build or send (our own bug, or a result too large to send). All carry an `ErrorCode` and
a message written for a person; all become an ERROR frame on the wire.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Why a job or a frame failed. The value is what travels on the wire."""

    INVALID_REQUEST = "INVALID_REQUEST"
    UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
    NOT_FOUND = "NOT_FOUND"
    FORBIDDEN = "FORBIDDEN"
    CONFLICT = "CONFLICT"
    UNAVAILABLE = "UNAVAILABLE"
    BUSY = "BUSY"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    WORKER_LOST = "WORKER_LOST"
    HIVE_LOST = "HIVE_LOST"
    RESULT_TOO_LARGE = "RESULT_TOO_LARGE"
    INTERNAL = "INTERNAL"

    @property
    def description(self) -> str:
        """One line saying what this code means, for help texts and docs."""
        return _DESCRIPTIONS[self]


_DESCRIPTIONS: dict[ErrorCode, str] = {
    ErrorCode.INVALID_REQUEST: "the request is malformed or a parameter is out of range",
    ErrorCode.UNSUPPORTED_VERSION: "the peer speaks a protocol version this build does not",
    ErrorCode.NOT_FOUND: "the named job, hive, worker or model does not exist",
    ErrorCode.FORBIDDEN: "the sender's role may not ask this actor for this operation",
    ErrorCode.CONFLICT: "the request contradicts the current state (for example: already done)",
    ErrorCode.UNAVAILABLE: "no actor that can serve the request is reachable",
    ErrorCode.BUSY: "the actor is at capacity; try again later",
    ErrorCode.TIMEOUT: "the job did not finish within its deadline",
    ErrorCode.CANCELLED: "the job was cancelled",
    ErrorCode.WORKER_LOST: "the worker running the job died or stopped answering",
    ErrorCode.HIVE_LOST: "the hive running the job died or stopped answering",
    ErrorCode.RESULT_TOO_LARGE: "the result is larger than one frame carries; ask for less",
    ErrorCode.INTERNAL: "a bug in rbee-mesh; the message says where",
}


class MeshError(Exception):
    """An operation failed; `code` says why, `message` says it to a person.

    `started` is False only where it is known that the job did nothing yet (refused before it
    began: a busy or dead worker, a SUBMIT that could not be delivered in time): such a job may
    be placed again elsewhere. True means it may have begun, and must not silently run twice.
    """

    def __init__(self, code: ErrorCode, message: str, *, started: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.started = started

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ProtocolError(MeshError):
    """A value or frame that the protocol does not allow. Raised only by the protocol package.

    Raised as it is when a value is built from input (a command line, a field): the input was
    invalid. `decode` raises `RemoteProtocolError`, and `encode` and the job lifecycle's sending
    side raise `LocalProtocolError`.
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INVALID_REQUEST) -> None:
        super().__init__(code, message, started=False)
        #: The `ref` of the SUBMIT that was refused, when it could be read; else empty.
        self.ref = ""


class RemoteProtocolError(ProtocolError):
    """A peer sent a frame the protocol does not allow: the peer's fault, answered, not fatal."""


class LocalProtocolError(ProtocolError):
    """This process built or tried to send something the protocol does not allow.

    `INTERNAL` (a bug here), or `RESULT_TOO_LARGE` for a value over a size limit (a result that
    grew with the mesh): either way the job it belongs to ends, and the actor goes on serving.
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INTERNAL) -> None:
        super().__init__(message, code)


class TooLarge(LocalProtocolError):
    """A value or body over one of the protocol's size limits (constants.py)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.RESULT_TOO_LARGE)
