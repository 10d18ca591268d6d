"""Liveness of a peer from the frames it sends, and its clock, as pure state machines.

Any frame from a peer counts as a heartbeat. A peer that has missed one heartbeat interval is
SUSPECT; after `lost_after` missed intervals it is LOST. A frame makes it LIVE again, from any
state. Half an interval of grace absorbs scheduling jitter, so "missed one" means "silent for more
than 1.5 intervals". Time is passed in, so the machine is tested with a fake clock.

`PeerClock` estimates how far a peer's wall clock is from ours, from the timestamps its frames
carry, so that a SUBMIT's `accept_by` (the sender's clock) can be judged here.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from rbee_mesh.protocol.constants import CLIENT_LOST_AFTER, SUSPECT_AFTER


class Liveness(StrEnum):
    LIVE = "live"
    SUSPECT = "suspect"
    LOST = "lost"


@dataclass
class PeerLiveness:
    """Tracks one peer. Call `seen` on every frame from it and `check` periodically."""

    interval_s: float
    last_seen: float
    suspect_after: int = SUSPECT_AFTER
    lost_after: int = CLIENT_LOST_AFTER
    state: Liveness = Liveness.LIVE

    def missed(self, now: float) -> int:
        """How many heartbeat intervals have passed without a frame: k once silent > k + 0.5."""
        silent = now - self.last_seen
        return max(0, math.ceil(silent / self.interval_s - 0.5) - 1)

    def seen(self, now: float) -> Liveness | None:
        """A frame arrived. Returns the previous state if this changed it (it is now LIVE)."""
        self.last_seen = max(self.last_seen, now)
        return self._move(Liveness.LIVE)

    def check(self, now: float) -> Liveness | None:
        """Re-evaluate at time `now`. Returns the previous state if the state changed."""
        missed = self.missed(now)
        if missed >= self.lost_after:
            return self._move(Liveness.LOST)
        if missed >= self.suspect_after and self.state is Liveness.LIVE:
            return self._move(Liveness.SUSPECT)
        return None

    def _move(self, new: Liveness) -> Liveness | None:
        old, self.state = self.state, new
        return old if old is not new else None


@dataclass
class PeerClock:
    """Our clock minus a peer's, estimated from the send times its frames carry.

    Each sample is (when it arrived, here) minus (when it was sent, there): the offset plus the
    time on the way, never less than the offset. The smallest of the recent samples is the
    estimate, so a frame that waited (a cut link, a frozen process) does not spoil it, and a
    clock that drifts is followed.
    """

    samples: deque[float] = field(default_factory=lambda: deque(maxlen=16))

    def sample(self, sent: float, arrived: float) -> None:
        """A frame sent at `sent` (the peer's clock, epoch seconds; 0: unknown) arrived at
        `arrived` (ours)."""
        if sent > 0:
            self.samples.append(arrived - sent)

    @property
    def offset(self) -> float | None:
        return min(self.samples) if self.samples else None

    def late_by(self, deadline: float, now: float) -> float:
        """How long ago `deadline` (the peer's clock) passed, by our clock `now`; 0 if it has
        not, or if nothing is known of the peer's clock yet."""
        offset = self.offset
        if offset is None:
            return 0.0
        return max(0.0, (now - offset) - deadline)
