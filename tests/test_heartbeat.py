"""The heartbeat schedule (actors/heartbeat.py) on trio's mock clock: time moves only when the
test moves it, so a frozen process is `clock.jump` with no task running meanwhile.

Intervals are powers of two so that the boundaries are exact in binary floating point.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from rbee_mesh.actors.heartbeat import HeartbeatSchedule
from rbee_mesh.protocol import Liveness, PeerLiveness

INTERVAL = 0.25
STEP = INTERVAL / 8


class Link:
    """A link as a server, client or hive holds one: records what the schedule does to it."""

    def __init__(self) -> None:
        self.liveness = PeerLiveness(INTERVAL, trio.current_time())
        self.beat_interval_s: float | None = None
        self.beats: list[float] = []
        self.changes: list[tuple[float, Liveness, Liveness]] = []

    def beat(self) -> None:
        self.beats.append(trio.current_time())

    def liveness_changed(self, was: Liveness, now: Liveness) -> None:
        self.changes.append((trio.current_time(), was, now))


@asynccontextmanager
async def on_a_schedule() -> AsyncIterator[Link]:
    """A link on a running schedule (it has beaten once) for the duration of the block."""
    link = Link()
    schedule = HeartbeatSchedule(INTERVAL)
    schedule.add(link)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(schedule.run)
        await trio.testing.wait_all_tasks_blocked()
        yield link
        nursery.cancel_scope.cancel()


async def advance(clock: trio.testing.MockClock, seconds: float) -> None:
    """Let time pass in small steps, every task running at each."""
    for _ in range(round(seconds / STEP)):
        clock.jump(STEP)
        await trio.testing.wait_all_tasks_blocked()


async def test_a_silent_peer_is_suspect_then_lost_and_beaten_every_interval(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with on_a_schedule() as link:
        await advance(mock_clock, 4 * INTERVAL)
    # Suspect once silent for more than 1.5 intervals, lost after more than 2.5 (CLIENT_LOST_AFTER
    # is 3 by default: the default here), each seen within the half interval the checks allow.
    (t_suspect, *suspect), (t_lost, *lost) = link.changes
    assert suspect == [Liveness.LIVE, Liveness.SUSPECT]
    assert 1.5 * INTERVAL < t_suspect <= 2 * INTERVAL
    assert lost == [Liveness.SUSPECT, Liveness.LOST]
    assert 3.5 * INTERVAL < t_lost <= 4 * INTERVAL
    gaps = [b - a for a, b in zip(link.beats, link.beats[1:], strict=False)]
    assert link.beats[0] == 0 and gaps and all(gap == INTERVAL for gap in gaps)


async def test_a_schedule_that_was_frozen_judges_no_one_on_waking(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with on_a_schedule() as link:
        await advance(mock_clock, INTERVAL)
        # The process freezes for ten intervals: no task runs, the peer's frames queue unread.
        mock_clock.jump(10 * INTERVAL)
        await trio.testing.wait_all_tasks_blocked()
        assert link.changes == []  # woken, it judged no one...
        assert link.beats[-1] == trio.current_time()  # ...but beat at once
        link.liveness.seen(trio.current_time())  # the queued frames are read
        await advance(mock_clock, INTERVAL)
        assert link.changes == []
        # Checks resumed: a peer that stays silent is still found out.
        await advance(mock_clock, 4 * INTERVAL)
    assert [now for _, _, now in link.changes] == [Liveness.SUSPECT, Liveness.LOST]


async def test_a_link_whose_interval_shrinks_beats_at_the_new_pace_without_waiting_out_the_old(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A client learns its server's shorter interval after its first beat: its next beat must
    not wait out the longer one (the server judges it by the shorter from then on)."""
    async with on_a_schedule() as link:
        assert link.beats == [0.0]
        link.beat_interval_s = INTERVAL / 4
        await advance(mock_clock, 2 * INTERVAL)
    assert link.beats[1] < INTERVAL
    gaps = [b - a for a, b in zip(link.beats[1:], link.beats[2:], strict=False)]
    assert gaps and all(gap == INTERVAL / 4 for gap in gaps)
