"""The chaos soak (benchmarks/chaos.py): 300 jobs of every kind on a queen and two hives in
network namespaces, while a nemesis kills workers, freezes hives and cuts their links.

One soak, run once for the module; each test checks one of its promises. `pytest -s` prints the
soak's table (jobs, outcomes, faults, times to detect them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks import chaos
from tests import netns

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

#: Freezes and cuts held at least 1.5 s: twice the 0.7 s in which a hive is declared lost.
PLAN = chaos.ChaosPlan(jobs=300, seed=14, hold_s=(1.5, 3.0), max_seconds=420)


@pytest.fixture(scope="module")
def soaked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    netns.require_lan()
    run = chaos.soak(PLAN, tmp_path_factory.mktemp("chaos"), print)
    summary = chaos.summarise(run)
    print("\n" + chaos.table(summary))
    yield summary


def test_the_load_ran_to_the_end_with_300_jobs_of_every_kind(soaked: dict[str, Any]) -> None:
    assert soaked["finished"], f"the load was stopped after {PLAN.max_seconds} s"
    assert soaked["jobs"].keys() == {"infer", "control", "download"}
    assert min(soaked["jobs"].values()) >= PLAN.jobs, soaked["jobs"]


def test_the_nemesis_struck_with_every_kind_of_fault(soaked: dict[str, Any]) -> None:
    assert all(soaked["faults"].get(kind, 0) >= 2 for kind in chaos.FAULT_KINDS), soaked["faults"]


def test_every_job_ended_once_with_the_truth(soaked: dict[str, Any]) -> None:
    """DONE that delivered what it claims, BUSY, or an error named for a fault around it."""
    assert soaked["surprising"] == []
    assert soaked["log_problems"] == []


def test_faults_ended_jobs_and_every_job_not_hit_by_one_succeeded(
    soaked: dict[str, Any],
) -> None:
    """The faults did end jobs (the soak tested something), and each kind had jobs done."""
    failed = sum(n for kind in soaked["outcomes"].values() for code, n in kind.items()
                 if code != "DONE")  # fmt: skip
    assert failed > 0, soaked["outcomes"]
    assert all(kind.get("DONE", 0) > 0 for kind in soaked["outcomes"].values())


def test_no_worker_process_is_left_without_its_hive_knowing(soaked: dict[str, Any]) -> None:
    assert soaked["orphans"] == []


def test_no_partial_download_is_published(soaked: dict[str, Any]) -> None:
    assert soaked["partial"] == []
    for hive, counts in soaked["catalogs"].items():
        assert counts.get("available", 0) > 0, (hive, counts)


def test_the_mesh_serves_normally_right_after(soaked: dict[str, Any]) -> None:
    assert all(isinstance(seconds, float) for seconds in soaked["after"].values()), soaked["after"]


def test_each_hive_fault_was_seen_by_the_registry(soaked: dict[str, Any]) -> None:
    """Every freeze and cut held its full time outlasts the 0.7 s in which a hive is declared
    lost: `hive list` showed each one lost, and live again after (those over 2 s before the
    load ended: the last one may be cut short, or end with the load)."""
    held = [
        row for row in soaked["faults_log"]
        if row["kind"] != "kill" and row["held_s"] >= PLAN.hold_s[0]
        and row["end"] + 2 < soaked["load_ended"]
    ]  # fmt: skip
    assert held, soaked["faults_log"]
    for row in held:
        assert row["registry_after_s"] is not None, row
        assert row["live_again_after_s"] is not None, row
