"""Where an inference job runs, decided from what the hives last said (pure: plain data in)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from rbee_mesh.actors.queen.scheduler import Action, HiveView, matches, place
from rbee_mesh.inference.sizing import estimated_memory
from rbee_mesh.protocol import ErrorCode, Infer, MeshError

MODEL = "owner/tiny-GGUF:tiny.Q4_K_M.gguf"
GIB = 2**30


def hive(
    name: str,
    *,
    workers: list[dict[str, Any]] = (),  # type: ignore[assignment]
    models: list[dict[str, Any]] = (),  # type: ignore[assignment]
    free: int = 8 * GIB,
) -> HiveView:
    return HiveView(
        name,
        workers=list(workers),
        models=list(models),
        devices=[{"id": "cpu", "memory_free": free}],
    )


def worker(wid: str, *, model: str = MODEL, state: str = "ready", slots: int = 1) -> dict[str, Any]:
    return {"id": wid, "model": model, "state": state, "slots": slots}


def model(mid: str = MODEL, size: int = GIB, status: str = "available") -> dict[str, Any]:
    return {"id": mid, "size": size, "status": status}


def infer(**kwargs: Any) -> Infer:
    return Infer(prompt="hi", **kwargs)


def test_an_idle_worker_with_the_model_is_used() -> None:
    d = place(infer(model=MODEL), [hive("a", workers=[worker("w1")], models=[model()])], {})
    assert (d.action, d.hive, d.worker, d.model) == (Action.USE, "a", "w1", MODEL)
    assert "w1" in d.reason and "idle" in d.reason


def test_the_model_may_be_named_by_repo_or_file() -> None:
    hives = [hive("a", workers=[worker("w1")])]
    assert place(infer(model="owner/tiny-GGUF"), hives, {}).worker == "w1"
    assert place(infer(model="tiny.Q4_K_M.gguf"), hives, {}).worker == "w1"
    assert matches(MODEL, MODEL) and not matches(MODEL, "owner/other")


def test_the_least_loaded_worker_with_a_free_slot_is_used() -> None:
    hives = [hive("a", workers=[worker("w1", slots=2), worker("w2", slots=2)])]
    assert place(infer(model=MODEL), hives, {"w1": 1}).worker == "w2"


def test_a_worker_whose_slots_are_taken_by_this_queen_is_not_idle() -> None:
    hives = [hive("a", workers=[worker("w1")], models=[model()], free=0)]
    d = place(infer(model=MODEL), hives, {"w1": 1})
    assert d.action is Action.WAIT and "busy" in d.reason


def test_with_every_worker_busy_a_hive_with_room_spawns_another() -> None:
    hives = [hive("a", workers=[worker("w1")], models=[model()])]
    d = place(infer(model=MODEL), hives, {"w1": 1})
    assert (d.action, d.hive, d.model) == (Action.SPAWN, "a", MODEL)
    assert "busy" in d.reason


def test_a_hive_with_the_model_and_no_worker_spawns_on_the_roomiest_hive() -> None:
    hives = [hive("a", models=[model()], free=2 * GIB), hive("b", models=[model()], free=6 * GIB)]
    d = place(infer(model=MODEL), hives, {})
    assert (d.action, d.hive) == (Action.SPAWN, "b")


def test_not_enough_memory_anywhere_is_a_clear_error() -> None:
    hives = [hive("a", models=[model(size=10 * GIB)], free=4 * GIB)]
    with pytest.raises(MeshError) as err:
        place(infer(model=MODEL), hives, {})
    assert err.value.code is ErrorCode.UNAVAILABLE
    assert "out of memory" in err.value.message and "4.0 GiB" in err.value.message
    assert estimated_memory(10 * GIB) > 10 * GIB


def test_a_model_no_hive_holds_is_downloaded_when_named_as_a_hub_reference() -> None:
    hives = [hive("a", free=2 * GIB), hive("b", free=6 * GIB)]
    d = place(infer(model="owner/new-GGUF"), hives, {})
    assert (d.action, d.hive, d.model) == (Action.DOWNLOAD, "b", "owner/new-GGUF")


def test_a_bare_name_no_hive_holds_is_not_found() -> None:
    with pytest.raises(MeshError) as err:
        place(infer(model="nothing.gguf"), [hive("a")], {})
    assert err.value.code is ErrorCode.NOT_FOUND


def test_a_hive_whose_catalog_was_never_read_may_hold_the_model_so_it_is_unavailable() -> None:
    """Neither "no hive holds it" nor a download: the hive that did not list its models may
    hold it. A hive that did list the model still gets the job."""
    unread = replace(hive("a"), models_unread="no answer from hive a within 2s")
    for op in (infer(model="nothing.gguf"), infer(model="owner/new-GGUF"), infer()):
        with pytest.raises(MeshError) as err:
            place(op, [unread, hive("b")], {})
        assert err.value.code is ErrorCode.UNAVAILABLE, op
        assert "hive a has not listed its models (no answer from hive a" in err.value.message
    d = place(infer(model=MODEL), [unread, hive("b", models=[model()])], {})
    assert (d.action, d.hive) == (Action.SPAWN, "b")


def test_a_pinned_busy_worker_means_waiting_and_an_unknown_one_not_found() -> None:
    hives = [hive("a", workers=[worker("w1"), worker("w2")], models=[model()])]
    d = place(infer(model=MODEL, worker="w1"), hives, {"w1": 1})
    assert d.action is Action.WAIT and "w1" in d.reason
    with pytest.raises(MeshError) as err:
        place(infer(worker="w9"), hives, {})
    assert err.value.code is ErrorCode.NOT_FOUND


def test_dead_and_stopping_workers_are_never_used() -> None:
    hives = [
        hive("a", workers=[worker("w1", state="dead"), worker("w2", state="stopping")],
             models=[model()])
    ]  # fmt: skip
    d = place(infer(model=MODEL), hives, {})
    assert d.action is Action.SPAWN and d.worker is None


def test_without_a_model_any_idle_worker_serves() -> None:
    d = place(infer(), [hive("a", workers=[worker("w1", model="x/y:z.gguf")])], {})
    assert d.worker == "w1"


def test_no_live_hive_is_unavailable() -> None:
    with pytest.raises(MeshError) as err:
        place(infer(), [], {})
    assert err.value.code is ErrorCode.UNAVAILABLE


def cpu_hive(cores: int, workers: list[dict[str, Any]], size: int, gpu_free: int = 0) -> HiveView:
    devices: list[dict[str, Any]] = [
        {"id": "cpu", "kind": "cpu", "memory_free": 8 * GIB, "cores": cores}
    ]
    if gpu_free:
        devices.append({"id": "cuda:0", "kind": "cuda", "memory_free": gpu_free})
    return HiveView("a", workers=workers, models=[model(size=size)], devices=devices)


def test_a_cpu_hive_whose_cores_a_busy_worker_takes_queues_rather_than_spawning() -> None:
    busy = [{**worker("w1", state="busy"), "device": "cpu"}]
    # 100 MB: threads on every core of two. Another worker would share them: both crawl.
    d = place(infer(model=MODEL), [cpu_hive(2, busy, 100 * 2**20)], {"w1": 1})
    assert d.action is Action.WAIT and "CPU cores of hive a are taken" in d.reason, d.reason
    # A small model runs on one thread: a second one has a core of its own.
    d = place(infer(model=MODEL), [cpu_hive(2, busy, 10 * 2**20)], {"w1": 1})
    assert d.action is Action.SPAWN
    # A GPU with room for it computes apart from the cores.
    d = place(infer(model=MODEL), [cpu_hive(2, busy, 100 * 2**20, gpu_free=4 * GIB)], {"w1": 1})
    assert d.action is Action.SPAWN
    # An idle worker of another model takes no core: a worker for this one may start.
    idle_other = [{**worker("w2", model="o/other:x.gguf"), "device": "cpu"}]
    d = place(infer(model=MODEL), [cpu_hive(2, idle_other, 100 * 2**20)], {})
    assert d.action is Action.SPAWN


def test_a_batch_with_a_free_sequence_is_filled_before_a_worker_is_spawned() -> None:
    batching = [{**worker("w1", state="busy", slots=4), "device": "cpu"}]
    # A small model: a core is free for a second worker, but the first has sequences free.
    for inflight in (1, 3):
        d = place(infer(model=MODEL), [cpu_hive(2, batching, 10 * 2**20)], {"w1": inflight})
        assert (d.action, d.worker) == (Action.USE, "w1"), d.reason
    # Its batch full: a second worker only on cores of its own, else the job waits.
    d = place(infer(model=MODEL), [cpu_hive(2, batching, 10 * 2**20)], {"w1": 4})
    assert d.action is Action.SPAWN
    d = place(infer(model=MODEL), [cpu_hive(2, batching, 100 * 2**20)], {"w1": 4})
    assert d.action is Action.WAIT and "CPU cores of hive a are taken" in d.reason, d.reason


def test_a_worker_being_spawned_takes_its_cores_already() -> None:
    # Another 100 MB model is being spawned on the 2-core hive: this one waits for it.
    other = "o/other:x.gguf"
    view = cpu_hive(2, [], 100 * 2**20)
    view = HiveView(
        view.name, workers=[], models=[*view.models, model(other, size=100 * 2**20)],
        devices=view.devices, starting=[other],
    )  # fmt: skip
    d = place(infer(model=MODEL), [view], {})
    assert d.action is Action.WAIT and "busy (or starting)" in d.reason, d.reason
