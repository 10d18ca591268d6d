"""One heartbeat schedule for every link of an actor: send, watch, and say when liveness changes.

Every link in the mesh (a server's view of each client, a client's view of its server, a hive's
view of each worker, the queen's view of each hive) does the same three things: send a
heartbeat every interval, check the peer's liveness (the pure `PeerLiveness` core) at least
twice per interval, and act when it changes. `HeartbeatSchedule` does the first two for any
number of links from one task, and calls each link back for the third.

With many links the work is spread: the links are taken a slice at a time, the slices spread
over the interval, so that a queen of 1,000 hives neither holds its loop for the whole check
(2-3 ms) nor sends 1,000 heartbeats in one burst.

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
_LINKS_PER_SLICE = 100
_MAX_SLICES = 10


class Beating(Protocol):
    """A link on a heartbeat schedule."""

    @property
    def liveness(self) -> PeerLiveness | None:
        """The peer's liveness, or None while it is not watched (never heard yet)."""
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
        self._links: dict[Beating, None] = {}

    def add(self, link: Beating) -> None:
        self._links[link] = None

    def discard(self, link: Beating) -> None:
        self._links.pop(link, None)

    def __len__(self) -> int:
        return len(self._links)

    async def run(self) -> None:
        """Beat each link once per interval and check it twice per its peer's interval, until
        cancelled. A link added meanwhile is beaten within an interval."""
        next_beat: list[float] = []
        woke = trio.current_time()
        while True:
            # Cut the slices anew each round, as links come and go.
            slices = min(_MAX_SLICES, 1 + len(self._links) // _LINKS_PER_SLICE)
            if len(next_beat) != slices:
                start = trio.current_time()
                next_beat = [start + i * self.interval_s / slices for i in range(slices)]
            fastest = min(
                [self.interval_s]
                + [link.liveness.interval_s for link in self._links if link.liveness is not None]
            )
            links = list(self._links)
            for n in range(slices):
                now = trio.current_time()
                asleep, woke = now - woke > fastest, now  # it meant to sleep fastest / 2 at most
                if not asleep:
                    self._tend(links[n * len(links) // slices : (n + 1) * len(links) // slices])
                if now >= next_beat[n]:
                    next_beat[n] = max(next_beat[n] + self.interval_s, now)
                    for link in links[n * len(links) // slices : (n + 1) * len(links) // slices]:
                        if link in self._links:  # not dropped by a change just now
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
