"""The job lifecycle: the one place that knows a job's states and which frame may follow which.

A job is SUBMITTED, then ACCEPTED, then streams NARRATION / DATA / TOKEN frames (NARRATION and
DATA also coalesced into BATCH frames), then ends with
exactly one terminal frame: DONE, ERROR or CANCELLED. A submission can also be refused before it
becomes a job (an ERROR with the SUBMIT's `ref`).

Both ends of a job drive the same table, as h11 drives one for both ends of a connection: the
server calls `JobLifecycle.send` before it sends a frame of the job, the client calls
`JobLifecycle.receive` for each frame it gets. A frame the table does not allow is the sender's
bug on the sending side (`LocalProtocolError`: not sent) and the peer's fault on the receiving
side (`RemoteProtocolError`: not believed). So "exactly one terminal frame" is enforced where
frames leave, and a peer that ends a job twice is caught where they arrive.

`outcome` turns a terminal frame into the job's result or its `MeshError`, for every side that
waits on a job it submitted (a keeper, or an actor that forwarded the job one hop down).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from rbee_mesh.protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    MeshError,
    RemoteProtocolError,
)
from rbee_mesh.protocol.messages import Cancelled, Done, Error, Kind, Message


class JobState(StrEnum):
    SUBMITTED = "submitted"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


#: The frames of a running job that stream to its submitter, between ACCEPTED and the end (a
#: relay passes them on unopened).
STREAMED = frozenset({Kind.NARRATION, Kind.DATA, Kind.TOKEN, Kind.BATCH, Kind.CHUNK})

#: The frames a server sends about one job, by the job's state: (state, frame) -> next state.
TRANSITIONS: dict[tuple[JobState, Kind], JobState] = {
    (JobState.SUBMITTED, Kind.ACCEPTED): JobState.RUNNING,
    # A submission refused before it became a job (busy, malformed, expired, ...).
    (JobState.SUBMITTED, Kind.ERROR): JobState.FAILED,
    (JobState.RUNNING, Kind.NARRATION): JobState.RUNNING,
    (JobState.RUNNING, Kind.DATA): JobState.RUNNING,
    (JobState.RUNNING, Kind.TOKEN): JobState.RUNNING,
    (JobState.RUNNING, Kind.BATCH): JobState.RUNNING,
    (JobState.RUNNING, Kind.CHUNK): JobState.RUNNING,
    (JobState.RUNNING, Kind.DONE): JobState.DONE,
    (JobState.RUNNING, Kind.ERROR): JobState.FAILED,
    (JobState.RUNNING, Kind.CANCELLED): JobState.CANCELLED,
}

#: The job states a terminal frame leads to.
_ENDED_BY = {
    Kind.DONE: JobState.DONE,
    Kind.ERROR: JobState.FAILED,
    Kind.CANCELLED: JobState.CANCELLED,
}


#: The states in which a job streams (NARRATION, DATA, TOKEN may follow), read off the table.
_STREAMING = frozenset(state for state, kind in TRANSITIONS if kind in STREAMED)


class JobLifecycle:
    """The state of one job, advanced by the frames that carry it (either end of the wire)."""

    def __init__(self, state: JobState = JobState.SUBMITTED) -> None:
        self.state = state

    def allows(self, kind: Kind) -> bool:
        """Whether a frame of `kind` may follow now."""
        return (self.state, kind) in TRANSITIONS

    @property
    def streaming(self) -> bool:
        """Whether a streamed frame (NARRATION, DATA, TOKEN, BATCH) may follow now; one never
        changes the state. (Every relayed frame asks this: a set lookup, not the table's.)"""
        return self.state in _STREAMING

    def send(self, kind: Kind) -> JobState:
        """Advance on a frame this process is about to send; LocalProtocolError if it may not
        (a bug here: the frame must not leave)."""
        return self._advance(kind, LocalProtocolError)

    def receive(self, kind: Kind) -> JobState:
        """Advance on a frame that arrived; RemoteProtocolError if the table does not allow it
        (the peer's fault: the frame is ignored)."""
        return self._advance(kind, RemoteProtocolError)

    def _advance(
        self, kind: Kind, error: type[LocalProtocolError | RemoteProtocolError]
    ) -> JobState:
        nxt = TRANSITIONS.get((self.state, kind))
        if nxt is None:
            raise error(f"a {kind.name} frame is not allowed for a job that is {self.state}")
        self.state = nxt
        return nxt


def ended_state(terminal: Message) -> JobState:
    """The state a job is in once `terminal` (DONE, ERROR or CANCELLED) has ended it."""
    return _ENDED_BY[terminal.KIND]


def outcome(terminal: Message, who: str) -> Any:
    """The result of a job that `terminal` ended, or its MeshError. `who` names the actor that
    ran it, for the message of a cancellation."""
    match terminal:
        case Done():
            return terminal.result
        case Error():
            raise MeshError(terminal.code, terminal.message, started=terminal.started)
        case Cancelled():
            raise MeshError(ErrorCode.CANCELLED, f"{who}: {terminal.reason}")
    raise RemoteProtocolError(f"{who} ended a job with {terminal.KIND.name}")
