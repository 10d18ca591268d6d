"""The serving benchmark (benchmarks/serving.py, `rbee-mesh bench --serve`): its arithmetic, its
refusals, and a short real run of every system."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import serving
from tests.real_model import smollm2

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCES = {0: " with the invention", 1: " with steam"}


def _request(prompt: int, sent: float, first: float | None, ended: float, tokens: int = 4,
             text: str | None = None) -> serving.Request:  # fmt: skip
    text = REFERENCES[prompt] if text is None else text
    return serving.Request(prompt, sent, ended, first, tokens, text)


def test_rows_give_aggregate_rates_latencies_and_ratios_to_the_server_and_direct() -> None:
    batches = {
        # Two rounds of one request: 4 tokens in 0.1 s and in 0.2 s.
        ("direct", 1): [[_request(0, 0.0, 0.02, 0.1)], [_request(0, 5.0, 5.03, 5.2)]],
        ("server", 1): [[_request(0, 0.0, 0.05, 0.4)]],
        ("api", 1): [[_request(0, 0.0, 0.03, 0.25)]],
        # Two at once, sent together: 8 tokens from the first send to the last end (0.4 s).
        ("server", 2): [[_request(0, 0.0, 0.05, 0.2), _request(1, 0.0, 0.25, 0.4)]],
        ("api", 2): [[_request(0, 0.0, 0.05, 0.1), _request(1, 0.01, 0.06, 0.11)]],
        # Interrupted: one request got a single token, the start of its text.
        ("server-default", 2): [
            [_request(0, 0.0, 0.05, 0.05, tokens=1, text=" with"), _request(1, 0.0, 0.1, 0.2)]
        ],
    }
    rows = {(r["system"], r["concurrency"]): r for r in serving.summarise(batches, 4, REFERENCES)}
    direct = rows[("direct", 1)]
    assert direct["agg_tps"] == 30.0  # the median of 40 and 20 tokens/s
    assert (direct["ttft_ms_p50"], direct["latency_ms_p50"], direct["latency_ms_max"]) == (
        25.0, 150.0, 200.0,
    )  # fmt: skip
    assert rows[("api", 1)]["agg_tps"] == 16.0
    assert rows[("api", 1)]["vs_direct"] == round(16 / 30, 3)
    assert rows[("api", 1)]["vs_server"] == 1.6
    assert rows[("server", 2)]["agg_tps"] == 20.0 and rows[("server", 2)]["vs_direct"] is None
    api = rows[("api", 2)]
    assert api["agg_tps"] == round(8 / 0.11, 1) and api["vs_server"] == round(8 / 0.11 / 20, 3)
    assert (api["latency_ms_p50"], api["latency_ms_p99"]) == (100.0, 100.0)
    assert api["same_text"] and api["short"] == 0 and api["errors"] == 0
    cut = rows[("server-default", 2)]
    assert (cut["tokens_min"], cut["tokens_max"], cut["short"], cut["same_text"]) == (1, 4, 1, True)
    table = serving.table(list(rows.values()))
    assert "1 cut short" in table and "different text" not in table
    # Ordered by concurrency, then system.
    assert [(r["system"], r["concurrency"]) for r in serving.summarise(batches, 4)][:3] == [
        ("direct", 1), ("server", 1), ("api", 1),
    ]  # fmt: skip


def test_a_different_text_is_flagged_and_targets_judge_the_mesh() -> None:
    batches = {
        ("direct", 1): [[_request(0, 0.0, 0.02, 0.1)]],
        ("api", 1): [[_request(0, 0.0, 0.02, 0.101, text=" with a different text")]],
        ("server", 4): [[_request(i % 2, 0.0, 0.1, 1.0) for i in range(4)]],
        ("api", 4): [[_request(i % 2, 0.0, 0.1, 0.5) for i in range(4)]],
        ("cli", 4): [[_request(i % 2, 0.0, 0.3, 0.8) for i in range(4)]],
    }
    rows = serving.summarise(batches, 4, REFERENCES)
    lone = next(r for r in rows if r["system"] == "api" and r["concurrency"] == 1)
    assert lone["same_text"] is False
    assert "different text" in serving.table([lone])
    verdicts = {t["target"]: (t["value"], t["met"]) for t in serving.targets(rows)}
    assert verdicts == {
        "4 at once: rbee-mesh API aggregate tok/s vs llama-cpp-python server": (2.0, True),
        "4 at once: rbee-mesh CLI aggregate tok/s vs llama-cpp-python server": (1.25, False),
        "a lone request: rbee-mesh API tok/s vs llama-cpp-python direct": (0.99, True),
    }


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--concurrency", "1,0"], "needs counts of 1 or more"),
        (["--system", "carrier-pigeon"], "invalid choice: 'carrier-pigeon'"),
        (["--model", "/nonexistent/model.gguf"], "no model at /nonexistent/model.gguf"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(args: list[str], said: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rbee_mesh", "bench", "--serve", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert said in done.stderr
    assert "rbee-mesh bench --serve" in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_short_run_serves_every_system_the_same_text(tmp_path: Path) -> None:
    model = smollm2()
    plan = serving.Plan(rounds=1, concurrency=(1, 2), max_tokens=8)
    report = serving.run(model, plan, out_dir=tmp_path)
    rows = {(r["system"], r["concurrency"]): r for r in report["results"]}
    # llama-cpp-python's server needs the bench extra; without it, a note says so.
    servers = ("server", "server-default")
    reason = serving.server_unavailable()
    systems = [s for s in serving.SYSTEMS if reason is None or s not in servers]
    assert set(rows) == {(s, n) for s in systems for n in (1, 2)}
    left_out = [n for n in report["notes"] if " left out: " in n]
    assert len(left_out) == (0 if reason is None else 2), report["notes"]
    for (system, n), row in rows.items():
        assert row["requests"] == n and row["errors"] == 0, row
        assert row["agg_tps"] > 0 and row["latency_ms_p50"] > 0, row
        # Greedy, the same prompts: the same text everywhere, all 8 tokens but where the
        # server as it starts by default interrupted a request for the next one.
        assert row["same_text"], row
        if system != "server-default":
            assert (row["tokens_min"], row["tokens_max"]) == (8, 8), row
    assert rows[("direct", 1)]["vs_direct"] == 1.0
    assert rows[("api", 2)]["vs_server"] == (None if reason else pytest.approx(
        rows[("api", 2)]["agg_tps"] / rows[("server", 2)]["agg_tps"], rel=0.01))  # fmt: skip
    assert report["mesh_workers"] and report["threads"] >= 1
    assert json.loads((tmp_path / "serving.json").read_text())["results"] == report["results"]
    assert (tmp_path / "serving.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
