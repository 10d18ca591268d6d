"""The job lifecycle table (protocol/jobs.py), peer liveness and clocks (protocol/liveness.py).

The lifecycle is driven from both ends: what arrives (`receive`, the peer's fault when refused)
and what is about to leave (`send`, our own bug when refused). Liveness is driven by a fake
clock: plain floats. Intervals are powers of two so that the boundaries (1.5 and 3.5 intervals
of silence) are exact in binary floating point.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rbee_mesh.protocol import (
    TERMINAL_KINDS,
    Cancelled,
    Done,
    Error,
    ErrorCode,
    JobLifecycle,
    JobState,
    Kind,
    Liveness,
    LocalProtocolError,
    MeshError,
    PeerClock,
    PeerLiveness,
    ProtocolError,
    RemoteProtocolError,
    outcome,
)
from rbee_mesh.protocol.jobs import TRANSITIONS

STREAM_KINDS = [Kind.NARRATION, Kind.DATA, Kind.TOKEN]
TERMINALS = sorted(TERMINAL_KINDS)
NON_TERMINALS = [kind for kind in Kind if kind not in TERMINAL_KINDS]
EXPECTED_END = {Kind.DONE: JobState.DONE, Kind.ERROR: JobState.FAILED,
                Kind.CANCELLED: JobState.CANCELLED}  # fmt: skip
INTERVALS = [0.25, 1.0, 2.0, 8.0]
T0 = 1_000.0


# --- job lifecycle ----------------------------------------------------------------------------


def _ended(terminal: Kind) -> JobLifecycle:
    job = JobLifecycle()
    job.receive(Kind.ACCEPTED)
    job.receive(terminal)
    return job


@settings(max_examples=50, deadline=None)
@given(
    narration=st.integers(0, 5),
    tokens=st.integers(0, 5),
)
def test_accepted_narration_tokens_done_ends_done(narration: int, tokens: int) -> None:
    job = JobLifecycle()
    assert job.state is JobState.SUBMITTED
    kinds = [Kind.ACCEPTED, *[Kind.NARRATION] * narration, *[Kind.TOKEN] * tokens]
    for kind in kinds:
        assert job.receive(kind) is JobState.RUNNING
    assert job.receive(Kind.DONE) is JobState.DONE
    assert job.state is JobState.DONE
    assert job.state.is_terminal


@settings(max_examples=50, deadline=None)
@given(stream=st.lists(st.sampled_from(STREAM_KINDS), max_size=12), end=st.sampled_from(TERMINALS))
def test_streamed_frames_in_any_order_then_one_terminal_ends_the_job(
    stream: list[Kind], end: Kind
) -> None:
    job = JobLifecycle()
    for kind in [Kind.ACCEPTED, *stream]:
        assert job.receive(kind) is JobState.RUNNING
    assert job.receive(end) is EXPECTED_END[end]


def test_submission_can_be_refused_with_error_before_acceptance() -> None:
    job = JobLifecycle()
    assert job.receive(Kind.ERROR) is JobState.FAILED


@pytest.mark.parametrize("kind", [*STREAM_KINDS, Kind.DONE, Kind.CANCELLED], ids=str)
def test_frames_before_acceptance_are_refused(kind: Kind) -> None:
    job = JobLifecycle()
    with pytest.raises(ProtocolError, match=kind.name):
        job.receive(kind)
    assert job.state is JobState.SUBMITTED


@pytest.mark.parametrize("kind", NON_TERMINALS, ids=lambda kind: kind.name)
@pytest.mark.parametrize("terminal", TERMINALS, ids=lambda kind: kind.name)
def test_no_frame_is_accepted_after_a_terminal_frame(terminal: Kind, kind: Kind) -> None:
    job = _ended(terminal)
    with pytest.raises(ProtocolError):
        job.receive(kind)
    assert job.state is EXPECTED_END[terminal]


@pytest.mark.parametrize("second", TERMINALS, ids=lambda kind: kind.name)
@pytest.mark.parametrize("first", TERMINALS, ids=lambda kind: kind.name)
def test_ending_a_job_twice_is_refused(first: Kind, second: Kind) -> None:
    job = _ended(first)
    with pytest.raises(ProtocolError, match=second.name):
        job.receive(second)
    assert job.state is EXPECTED_END[first]


@pytest.mark.parametrize("terminal", TERMINALS, ids=lambda kind: kind.name)
def test_a_frame_refused_on_arrival_is_the_peers_fault(terminal: Kind) -> None:
    job = _ended(terminal)
    with pytest.raises(RemoteProtocolError):
        job.receive(Kind.TOKEN)


@pytest.mark.parametrize("terminal", TERMINALS, ids=lambda kind: kind.name)
def test_a_second_terminal_frame_is_refused_before_it_leaves_as_our_own_bug(
    terminal: Kind,
) -> None:
    job = JobLifecycle(JobState.RUNNING)
    assert job.allows(terminal)
    job.send(terminal)
    assert not job.allows(Kind.DONE)
    with pytest.raises(LocalProtocolError) as caught:
        job.send(Kind.DONE)
    assert caught.value.code is ErrorCode.INTERNAL
    assert job.state is EXPECTED_END[terminal]


def test_outcome_is_the_result_or_the_error_with_its_started_flag() -> None:
    assert outcome(Done("job-1", result={"x": 1}), "hive h") == {"x": 1}
    with pytest.raises(MeshError) as refused:
        outcome(Error("job-1", code=ErrorCode.BUSY, message="full", started=False), "w")
    assert (refused.value.code, refused.value.started) == (ErrorCode.BUSY, False)
    with pytest.raises(MeshError) as failed:
        outcome(Error("job-1", code=ErrorCode.INTERNAL, message="boom"), "w")
    assert failed.value.started
    with pytest.raises(MeshError) as cancelled:
        outcome(Cancelled("job-1", reason="enough"), "worker w-1")
    assert cancelled.value.code is ErrorCode.CANCELLED
    assert cancelled.value.message == "worker w-1: enough"


def test_transition_table_has_no_way_out_of_a_terminal_state() -> None:
    assert [key for key in TRANSITIONS if key[0].is_terminal] == []


@settings(max_examples=300, deadline=None)
@given(
    start=st.sampled_from([JobState.SUBMITTED, JobState.RUNNING]),
    kinds=st.lists(st.sampled_from(list(Kind)), max_size=30),
)
def test_random_frame_sequences_reach_at_most_one_terminal_state(
    start: JobState, kinds: list[Kind]
) -> None:
    job = JobLifecycle(start)
    terminals_reported: list[JobState] = []
    for kind in kinds:
        before = job.state
        try:
            after = job.receive(kind)
        except ProtocolError:
            assert job.state is before, "a refused frame must not change the state"
            continue
        assert not before.is_terminal, f"{kind.name} accepted after {before}"
        assert after is job.state
        if after.is_terminal:
            terminals_reported.append(after)
    assert len(terminals_reported) <= 1
    if terminals_reported:
        assert job.state is terminals_reported[0]


# --- liveness ---------------------------------------------------------------------------------


def _peer(interval: float) -> PeerLiveness:
    return PeerLiveness(interval_s=interval, last_seen=T0)


@pytest.mark.parametrize("interval", INTERVALS)
def test_peer_is_live_within_one_and_a_half_intervals(interval: float) -> None:
    peer = _peer(interval)
    for fraction in (0.0, 0.5, 1.0, 1.25, 1.5):
        assert peer.check(T0 + fraction * interval) is None, fraction
        assert peer.state is Liveness.LIVE


@pytest.mark.parametrize("interval", INTERVALS)
def test_peer_is_suspect_after_one_missed_interval(interval: float) -> None:
    peer = _peer(interval)
    assert peer.check(T0 + 1.625 * interval) is Liveness.LIVE
    assert peer.state is Liveness.SUSPECT
    assert peer.check(T0 + 3.5 * interval) is None  # not yet three missed
    assert peer.state is Liveness.SUSPECT


@pytest.mark.parametrize("interval", INTERVALS)
def test_peer_is_lost_after_three_missed_intervals(interval: float) -> None:
    peer = _peer(interval)
    peer.check(T0 + 2 * interval)
    assert peer.state is Liveness.SUSPECT
    assert peer.check(T0 + 3.625 * interval) is Liveness.SUSPECT
    assert peer.state is Liveness.LOST


@pytest.mark.parametrize("silent_intervals", [2.0, 5.0], ids=["suspect", "lost"])
def test_a_frame_makes_a_suspect_or_lost_peer_live_again(silent_intervals: float) -> None:
    peer = _peer(1.0)
    now = T0 + silent_intervals
    before = peer.state
    peer.check(now)
    assert peer.state is not before
    stale_state = peer.state
    assert peer.seen(now) is stale_state
    assert peer.state is Liveness.LIVE
    assert peer.check(now + 1.5) is None  # the silence is counted from the new frame
    assert peer.state is Liveness.LIVE


def test_check_returns_the_previous_state_only_on_change() -> None:
    peer = _peer(1.0)
    timeline = [0.5, 1.0, 1.75, 2.5, 3.0, 4.0, 5.0, 9.0]
    results = [peer.check(T0 + t) for t in timeline]
    assert results == [None, None, Liveness.LIVE, None, None, Liveness.SUSPECT, None, None]
    assert peer.seen(T0 + 9.0) is Liveness.LOST
    assert peer.seen(T0 + 9.5) is None  # already LIVE: no change to report


@pytest.mark.parametrize("interval", INTERVALS)
def test_peer_checked_late_goes_from_live_straight_to_lost(interval: float) -> None:
    peer = _peer(interval)
    assert peer.check(T0 + 10 * interval) is Liveness.LIVE
    assert peer.state is Liveness.LOST


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(st.tuples(st.sampled_from(["seen", "check"]), st.floats(0.0, 3.0)), max_size=25)
)
def test_seen_and_check_report_the_previous_state_exactly_when_it_changes(
    events: list[tuple[str, float]],
) -> None:
    peer = _peer(1.0)
    now = T0
    for event, step in events:
        now += step
        before = peer.state
        reported = peer.seen(now) if event == "seen" else peer.check(now)
        assert reported == (before if peer.state is not before else None)
        if event == "seen":
            assert peer.state is Liveness.LIVE


# --- clocks -------------------------------------------------------------------------------------


def test_a_peer_clock_knows_nothing_until_a_frame_carries_a_time() -> None:
    clock = PeerClock()
    clock.sample(0.0, T0)  # a frame that says nothing of when it was sent
    assert clock.offset is None
    assert clock.late_by(T0 - 100, T0) == 0.0


def test_a_peer_clock_takes_the_smallest_sample_so_a_held_frame_cannot_spoil_it() -> None:
    clock = PeerClock()
    # The peer's clock is 5 s behind ours; frames take 1 to 30 ms, and one waited 20 s.
    for delay in (0.010, 0.001, 0.030):
        clock.sample(T0 - 5.0, T0 + delay)
    clock.sample(T0 - 5.0, T0 + 20.0)
    assert clock.offset == pytest.approx(5.001)


def test_a_deadline_in_the_peers_clock_is_judged_by_ours() -> None:
    clock = PeerClock()
    clock.sample(T0 - 5.0, T0)  # the peer is 5 s behind
    # The peer's deadline T0 - 4 is ours T0 + 1: not passed at T0, passed by 2 s at T0 + 3.
    assert clock.late_by(T0 - 4.0, T0) == 0.0
    assert clock.late_by(T0 - 4.0, T0 + 3.0) == pytest.approx(2.0)


def test_a_peer_clock_follows_a_drift_past_its_window() -> None:
    clock = PeerClock()
    clock.sample(T0, T0)
    for n in range(clock.samples.maxlen or 0):
        clock.sample(T0 + n, T0 + n + 0.5)
    assert clock.offset == pytest.approx(0.5)
