"""The job lifecycle as a transition table.

A job is SUBMITTED, then ACCEPTED, then streams NARRATION / DATA / TOKEN frames, then ends with
exactly one terminal frame: DONE, ERROR or CANCELLED. `JobTracker` checks a job's frames against the
table, so a peer that sends anything after the end, or ends a job twice, is caught here and not
believed. Everything that decides a job's state lives in this module.
"""

from __future__ import annotations

from enum import StrEnum

from rbee_mesh.protocol.errors import ProtocolError
from rbee_mesh.protocol.messages import Kind


class JobState(StrEnum):
    SUBMITTED = "submitted"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


TRANSITIONS: dict[tuple[JobState, Kind], JobState] = {
    (JobState.SUBMITTED, Kind.ACCEPTED): JobState.RUNNING,
    # A submission can be refused before it becomes a job (for example: malformed).
    (JobState.SUBMITTED, Kind.ERROR): JobState.FAILED,
    (JobState.RUNNING, Kind.NARRATION): JobState.RUNNING,
    (JobState.RUNNING, Kind.DATA): JobState.RUNNING,
    (JobState.RUNNING, Kind.TOKEN): JobState.RUNNING,
    (JobState.RUNNING, Kind.DONE): JobState.DONE,
    (JobState.RUNNING, Kind.ERROR): JobState.FAILED,
    (JobState.RUNNING, Kind.CANCELLED): JobState.CANCELLED,
}


class JobTracker:
    """The state of one job as seen from the frames that arrive for it."""

    def __init__(self, state: JobState = JobState.SUBMITTED) -> None:
        self.state = state

    def on_frame(self, kind: Kind) -> JobState:
        """Advance on a frame of `kind`; ProtocolError if the table does not allow it."""
        nxt = TRANSITIONS.get((self.state, kind))
        if nxt is None:
            raise ProtocolError(
                f"a {kind.name} frame is not allowed for a job that is {self.state}"
            )
        self.state = nxt
        return nxt
