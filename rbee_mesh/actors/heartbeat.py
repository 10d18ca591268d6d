"""One heartbeat schedule for every link of an actor: send, watch, and say when liveness changes.

Every link in the mesh (a server's view of each client, a client's view of its server, a hive's
view of each worker, the queen's view of each hive) does the same three things: send a
heartbeat every interval, check the peer's liveness (the pure `PeerLiveness` core) at least
twice per interval, and act when it changes. `HeartbeatSchedule` does the first two for any
number of links from one task, and calls each link back for the third.

With many links the work is spread: the links are taken a slice at a time, the slices spread
over the interval, so that a queen of 1,000 hives neither holds its loop for the whole check
(2-3 ms) nor sends 1,000 heartbeats in one burst. A slice is small (25 links): a job that
arrives while one is tended (its links checked, and beaten where due) waits for it, and slices
of 100 put the p99 of a forwarded `worker list` at 1,000 simulated hives at 8.4-10.5 ms,
against 5.6-7.8 ms with 25 (docs/benchmarks.md, "Scale").

A schedule that was itself asleep (its process frozen or starved for longer than a heartbeat
interval) judges no one on waking: the frames its peers sent meanwhile are still unread in the
sockets, and counting that silence against them would declare a whole mesh lost because one
machine was busy. It checks again half an interval later, when the frames have been read.
"""

from __future__ import annotations

from typing import Protocol

import trio

from rbee_mesh.protocol import Liveness, PeerLiveness

#: A slice holds about this many links, and a round at most this many slices.
_LINKS_PER_SLICE = 25
_MAX_SLICES = 40


class Beating(Protocol):
    """A link on a heartbeat schedule."""

    @property
    def liveness(self) -> PeerLiveness | None:
        """The peer's liveness, or None while it is not watched (never heard yet)."""
        ...

    @property
    def beat_interval_s(self) -> float | None:
        """How often this link beats, if more often than the schedule's interval (None: at the
        schedule's)."""
        ...

    def beat(self) -> None:
        """Send the peer a heartbeat now, never waiting (skip it if the pipe is full)."""
        ...

    def liveness_changed(self, was: Liveness, now: Liveness) -> None:
        """The peer's liveness moved from `was` to `now`."""
        ...


class HeartbeatSchedule:
    """Beats and watches a changing set of links, from one task: `await schedule.run()`."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        #: Each link, and when it is next due to beat.
        self._links: dict[Beating, float] = {}

    def add(self, link: Beating) -> None:
        self._links[link] = trio.current_time()

    def discard(self, link: Beating) -> None:
        self._links.pop(link, None)

    def __len__(self) -> int:
        return len(self._links)

    async def run(self) -> None:
        """Beat each link once per its interval and check it twice per its peer's interval,
        until cancelled. A link added meanwhile is beaten within one pass."""
        woke = trio.current_time()
        skipped = False
        while True:
            # Cut the slices anew each round, as links come and go.
            slices = min(_MAX_SLICES, 1 + len(self._links) // _LINKS_PER_SLICE)
            fastest = self.interval_s
            for link in self._links:
                if link.liveness is not None:
                    fastest = min(fastest, link.liveness.interval_s)
                if link.beat_interval_s is not None:
                    fastest = min(fastest, link.beat_interval_s)
            links = list(self._links)
            for n in range(slices):
                part = links[n * len(links) // slices : (n + 1) * len(links) // slices]
                now = trio.current_time()
                # It meant to sleep fastest / 2 at most. Once only: a loop late at every wake
                # must still judge.
                skipped = now - woke > fastest and not skipped
                woke = now
                if not skipped:
                    self._tend(part)
                for link in part:
                    due = self._links.get(link)  # None: dropped by a change just now
                    if due is None:
                        continue
                    interval = link.beat_interval_s or self.interval_s
                    if due - now > interval:  # its interval shrank since: due sooner
                        due = now
                    if now >= due:
                        self._links[link] = max(due + interval, now)
                        link.beat()
                await trio.sleep(fastest / 2 / slices)

    def _tend(self, part: list[Beating]) -> None:
        now = trio.current_time()
        for link in part:
            watched = link.liveness
            if watched is not None:
                was = watched.check(now)
                if was is not None:
                    link.liveness_changed(was, watched.state)
