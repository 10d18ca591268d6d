"""Liveness of a peer from the frames it sends, as a pure state machine.

Any frame from a peer counts as a heartbeat. A peer that has missed one heartbeat interval is
SUSPECT; after `lost_after` missed intervals it is LOST. A frame makes it LIVE again, from any
state. Half an interval of grace absorbs scheduling jitter, so "missed one" means "silent for more
than 1.5 intervals". Time is passed in, so the machine is tested with a fake clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum


class Liveness(StrEnum):
    LIVE = "live"
    SUSPECT = "suspect"
    LOST = "lost"


@dataclass
class PeerLiveness:
    """Tracks one peer. Call `seen` on every frame from it and `check` periodically."""

    interval_s: float
    last_seen: float
    suspect_after: int = 1
    lost_after: int = 3
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
