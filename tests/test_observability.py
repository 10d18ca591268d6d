"""What the queen shows of the mesh (docs/observability.md): `/metrics` as Prometheus reads it,
`top`'s snapshots, and the dashboard in a real headless Chromium (Debian's chromium and
chromium-driver, driven with Selenium), live while a job generates.

A queen and the hive of a state directory in this process, a real worker process, a
random-weight model (which writes hundreds of tokens in a tenth of a second: for the dashboard,
whose tokens must be seen arriving, SmolLM2, tests/real_model.py); the HTTP server on a free
loopback port.
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from rbee_mesh.actors.hive.catalog import Catalog
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.keeper.render import top_text
from rbee_mesh.protocol import (
    Actor,
    Data,
    Done,
    Error,
    ErrorCode,
    Infer,
    Ping,
    Ready,
    Submit,
    WorkerSpawn,
    decode,
    encode,
)
from rbee_mesh.protocol.operations import Top
from tests import real_model
from tests.conftest import TINY_MODEL, Served, serving_a_mesh
from tests.keyed import open_connection
from tests.skips import skip_or_fail

MODEL = TINY_MODEL
REAL_REPO = "rbee-test/smollm2"
REAL = f"{REAL_REPO}:{real_model.FILE}"
REPO_ROOT = Path(__file__).resolve().parents[1]
#: Where the dashboard's screenshot is kept (a test artefact): RBEE_TEST_ARTIFACTS, else here.
ARTIFACTS = Path(os.environ.get("RBEE_TEST_ARTIFACTS", REPO_ROOT / "tests" / "artifacts"))


@pytest.fixture
async def served_real(tmp_path: Path) -> AsyncIterator[Served]:
    state = tmp_path / "state"
    Catalog(state / "hive" / "models").add_file(REAL_REPO, real_model.FILE, real_model.smollm2())
    async with serving_a_mesh(state) as served:
        yield served


def base(served: Served) -> str:
    return served.url.removesuffix("/v1")


async def get(url: str) -> str:
    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=20) as answer:
            return str(answer.read().decode())

    return await trio.to_thread.run_sync(fetch)


async def scrape(served: Served) -> dict[str, float]:
    """/metrics, parsed by prometheus-client's own parser: {'name{label=value,...}': value}."""
    text = await get(f"{base(served)}/metrics")
    return {
        sample.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())) + "}":
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }  # fmt: skip


async def run(served: Served, op: Any) -> Any:
    async with open_keeper(served.queen.listener.endpoint) as keeper:
        job = await keeper.submit(op)
        end = await job.end()
    assert isinstance(end, Done), end
    return end.result


async def test_the_metrics_parse_and_move_as_jobs_run(served: Served) -> None:
    with trio.fail_after(120):
        before = await scrape(served)
        await run(served, Ping())
        await run(served, WorkerSpawn(model=MODEL))
        await run(served, Infer(prompt="Once upon a time", model=MODEL, max_tokens=16, seed=1))
        after = await scrape(served)
    ping = "rbee_mesh_jobs_total{operation=ping,outcome=done}"
    assert before.get(ping, 0) == 0 and after[ping] == 1
    assert after["rbee_mesh_jobs_total{operation=infer,outcome=done}"] == 1
    assert after["rbee_mesh_job_duration_seconds_count{operation=infer}"] == 1
    assert after["rbee_mesh_time_to_first_token_seconds_count{}"] == 1
    assert after["rbee_mesh_generation_tokens_per_second_count{}"] == 1
    assert after["rbee_mesh_queue_wait_seconds_count{}"] == 1
    assert after["rbee_mesh_hives{liveness=live}"] == 1
    hive = served.hive.id
    assert after[f"rbee_mesh_workers{{hive={hive},state=ready}}"] == 1
    assert after[f"rbee_mesh_models_loaded{{hive={hive}}}"] == 1
    assert after[f"rbee_mesh_hive_models{{hive={hive}}}"] == 1
    assert 0 <= after[f"rbee_mesh_hive_heartbeat_age_seconds{{hive={hive}}}"] < 5
    assert 0 <= after[f"rbee_mesh_device_utilization_ratio{{device=cpu,hive={hive}}}"] <= 1
    assert after[f"rbee_mesh_device_memory_free_bytes{{device=cpu,hive={hive}}}"] > 0
    assert after["rbee_mesh_jobs_running{}"] == 0 and after["rbee_mesh_queue_depth{}"] == 0
    assert "rbee_mesh_refused_handshakes_total{}" in after


async def test_a_refused_submission_is_counted_by_operation_and_code(served: Served) -> None:
    hello = Ready(job_id="", sender="t", role=Actor.KEEPER, session="t", ts=time.time())
    late = Submit(job_id="", ref="t1", op=Ping(), accept_by=1.0)  # its sender gave up long ago
    with trio.fail_after(30):
        async with await open_connection(served.queen.listener.endpoint) as peer:
            await peer.send(encode(hello))
            await peer.send(encode(late))
            while not isinstance(answer := decode(await peer.receive()), Error):
                pass  # (its READY, heartbeats)
        after = await scrape(served)
    assert answer.code is ErrorCode.TIMEOUT and not answer.started
    assert after["rbee_mesh_submits_refused_total{code=timeout,operation=ping}"] == 1
    assert "rbee_mesh_jobs_total{operation=ping,outcome=done}" not in after  # no job ran


async def test_top_sends_snapshots_of_the_mesh_as_it_is(served: Served) -> None:
    with trio.fail_after(60):
        async with open_keeper(served.queen.listener.endpoint) as keeper:
            job = await keeper.submit(Top(count=2, interval_s=0.1))
            records = [m.record async for m in job if isinstance(m, Data)]
    assert isinstance(job.terminal, Done) and job.terminal.result == {"snapshots": 2}
    assert [r["kind"] for r in records] == ["snapshot", "snapshot"]
    [hive] = records[-1]["hives"]
    assert hive["hive"] == served.hive.id and hive["liveness"] == "live"
    assert records[-1]["queen"]["jobs_running"] == 0  # top itself is not counted
    text = top_text(records[-1])
    assert served.hive.id in text and "RUNNING JOBS (0)" in text


def test_top_shows_a_terminal_nothing_it_would_take_for_a_command() -> None:
    evil = "h\x1b[2J\x1b]0;pwned\x07"
    text = top_text({
        "queen": {"name": evil},
        "hives": [{"hive": evil, "devices": [{"memory_total": "x"}], "workers": [{"id": evil}]}],
        "jobs": [{"id": evil, "narration": [evil], "text": evil}],
        "failures": [{"id": evil, "error": evil}],
    })  # fmt: skip
    assert "\x1b" not in text and "\x07" not in text
    assert text.count("h [2J ]0;pwned ") >= 5  # each shown, as text


# ---- the dashboard in a real browser ---------------------------------------------------------


def chromium() -> Any:
    """Headless Chromium under Selenium, kept off every network but this machine's loopback."""
    for binary in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        if not Path(binary).exists():
            skip_or_fail(f"no {binary} (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-default-apps", "--disable-domain-reliability",
        "--no-pings", "--window-size=1280,900",
        # No name resolves but loopback's: nothing can leave this machine.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def shown(browser: Any, selector: str) -> str:
    """The text of the first element `selector` finds, read in one go in the page (which
    replaces its elements at each snapshot: one found, then read, may be gone in between)."""
    script = "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';"
    return str(browser.execute_script(script, selector))


async def until(check: Callable[[], Any], what: str, timeout_s: float = 30) -> Any:
    """The first truthy value of `check()` (the browser is another process: a bounded poll)."""
    with trio.move_on_after(timeout_s):
        while not (value := await trio.to_thread.run_sync(check)):  # noqa: ASYNC110 -- no event
            await trio.sleep(0.1)
        return value
    raise AssertionError(f"the dashboard did not show {what} within {timeout_s:g}s")


@pytest.mark.slow
async def test_the_dashboard_shows_the_hive_its_worker_and_a_jobs_tokens_live(
    served_real: Served,
) -> None:
    served = served_real
    browser = await trio.to_thread.run_sync(chromium)
    try:
        with trio.fail_after(180):
            await trio.to_thread.run_sync(browser.get, f"{base(served)}/")
            hives = await until(lambda: shown(browser, "#hives .hive"), "the hive")
            assert served.hive.id in hives and "live" in hives
            # (busy: from the hive's second heartbeat, which says since the first)
            cpu = await until(lambda: "busy" in (t := shown(browser, ".device")) and t, "its cpu")
            assert "used" in cpu  # memory and utilisation, each with its bar
            await run(served, WorkerSpawn(model=REAL))
            worker = await until(
                lambda: "ready" in (t := shown(browser, "tr.worker")) and t, "the worker, ready"
            )
            assert REAL in worker

            async with open_keeper(served.queen.listener.endpoint) as keeper:
                op = Infer(prompt="Once upon a time", model=REAL, max_tokens=400, temperature=0)
                job = await keeper.submit(op)
                first = await until(lambda: shown(browser, ".job-text"), "the job's first tokens")
                later = await until(
                    lambda: (t := shown(browser, ".job-text")) != first and t, "more tokens"
                )
                await trio.to_thread.run_sync(_keep_screenshot, browser)
                await job.cancel()
                await job.end()
            assert first and later and later != first  # the text grew while the job ran
            # What hives say is shown as text, never as markup (a hive's heartbeat is its own).
            made = await trio.to_thread.run_sync(browser.execute_script, EVIL_SNAPSHOT)
            assert made == {"images": 0, "shown": True}, made
    finally:
        await trio.to_thread.run_sync(browser.quit)


#: Shows a snapshot whose hive says markup in every field it sends; what the page made of it.
EVIL_SNAPSHOT = """
const evil = '<img src=x onerror="window.pwned = 1">';
show({queen: {name: "q", uptime_s: 1, jobs_running: 0, queued: 0},
      hives: [{hive: "h", liveness: "live", heartbeat_age_s: 0.1, models: evil, workers_total: 1,
               devices: [{id: evil, name: evil, memory_total: 1, memory_free: 0, utilization: 0}],
               workers: [{id: evil, model: evil, state: evil, busy: evil, slots: evil}]}],
      jobs: [{id: evil, op: evil, model: evil, age_s: evil, narration: [evil], text: evil}],
      failures: [{id: evil, op: evil, error: evil}]});
return {images: document.querySelectorAll("img").length,
        shown: document.body.innerText.includes('<img src=x onerror="window.pwned = 1">')};
"""


def _keep_screenshot(browser: Any) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / "dashboard.png"
    assert browser.save_screenshot(str(path)), "no screenshot"
    assert path.stat().st_size > 10_000
