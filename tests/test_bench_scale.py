"""The scale benchmark (benchmarks/scale.py): its simulated hives are hives to a real queen, and a
short run of the whole benchmark, processes and all, yields its records and leaves nothing behind.

Speed is what the benchmark measures; nothing here asserts it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from benchmarks.scale import WORKERS_PER_HIVE, run_scale, simulated_hives
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.mesh import running_queen
from rbee_mesh.protocol import (
    Actor,
    Done,
    Heartbeat,
    Kind,
    Narration,
    WorkerList,
    decode,
    encode,
)
from tests.conftest import FAST_KEEPER, FAST_QUEEN, queen_address


async def test_simulated_hives_are_hives_to_a_real_queen() -> None:
    beat_s = FAST_QUEEN.heartbeat_s
    with trio.fail_after(20):
        async with (
            simulated_hives(3, heartbeat_s=beat_s) as sim,
            running_queen(
                "tcp://127.0.0.1:0", FAST_QUEEN, hives=[h.control for h in sim.hives]
            ) as queen,
            open_keeper(queen_address(queen), FAST_KEEPER) as keeper,
        ):
            # READY alone makes a hive live; only heartbeats taken off the SUB socket set its
            # clock skew and count.
            await polled(
                lambda: (
                    queen.hives.heartbeats_received >= 3 * len(sim.hives)
                    and all(link.clock_skew_s is not None for link in queen.hives.links)
                ),
                every=beat_s / 4,
            )
            links = {link.hive_id: link for link in queen.hives.links}
            assert sorted(links) == [h.id for h in sim.hives]
            for hive in sim.hives:
                link = links[hive.id]
                assert link.liveness_state == "live"
                assert link.heartbeat_endpoint == hive.publisher.endpoint
                assert link.client.info["control"] == hive.control
                assert len(link.state["workers"]) == WORKERS_PER_HIVE
                assert {d["id"] for d in link.state["devices"]} == {"cpu", "cuda:0", "cuda:1"}
                assert hive.received[Kind.READY] >= 1
            # The queen heartbeats every hive that answered it.
            await polled(
                lambda: all(hive.received[Kind.HEARTBEAT] for hive in sim.hives), every=beat_s / 4
            )

            target = sim.hives[1]
            job = await keeper.submit(WorkerList(hive=target.id))
            events = [m async for m in job]
    assert isinstance(job.terminal, Done)
    assert job.terminal.result == [w.to_record() for w in target.workers]
    narration = [e for e in events if isinstance(e, Narration)]
    assert [(n.actor, n.hive_id) for n in narration] == [(Actor.HIVE, target.id)]


async def test_a_simulated_heartbeat_is_what_the_protocol_encodes() -> None:
    with trio.fail_after(10):
        async with simulated_hives(1, heartbeat_s=0.5) as sim:
            hive = sim.hives[0]
            frames = hive.heartbeat()
    beat = decode(frames)
    assert isinstance(beat, Heartbeat)
    assert (beat.sender, beat.interval_s, beat.state) == (hive.id, 0.5, hive.state)
    assert encode(beat) == frames  # byte for byte: the splice is the encoder's output


@pytest.mark.slow
def test_a_short_scale_run_reports_every_operation_and_cleans_up(tmp_path: Path) -> None:
    lines: list[str] = []
    records = run_scale([5], window_s=1.0, workdir=tmp_path, progress=lines.append, rate=20)

    assert [(r["op"], r["mode"]) for r in records] == [
        ("worker_list", "back-to-back"),
        ("worker_list", "open-loop"),
        ("status", "back-to-back"),
        ("hive_list", "back-to-back"),
    ]
    for record in records:
        assert record["hives"] == 5 and record["workers"] == 5 * WORKERS_PER_HIVE
        assert record["samples"] > 0 and record["p99_us"] >= record["p50_us"] > 0
        assert record["ops_per_s"] > 0
        assert record["queen_cpu_share"] > 0 and record["simulator_cpu_share"] >= 0
        assert record["heartbeats_per_s"] > 0 and record["idle_heartbeats_per_s"] > 0
        assert record["expected_heartbeats_per_s"] == 5.0
        assert record["setup_s"] > 0
    assert any("all live" in line for line in lines)
    # The queen's state directory is gone, and so are the processes.
    assert list(tmp_path.iterdir()) == []
    assert _children(os.getpid()) == []


async def polled(condition: Callable[[], bool], *, every: float) -> None:
    """Return once `condition()` holds. For state that no event announces (a heartbeat taken,
    a counter moved): looked at every `every` seconds; callers bound it with fail_after."""
    while not condition():  # noqa: ASYNC110 -- no event exists; callers bound it in time
        await trio.sleep(every)


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (zombies included: they would be unreaped children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found
