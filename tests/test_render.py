"""How events look: the download progress bar, an inference's summary."""

from __future__ import annotations

import pytest

from rbee_mesh.actors.keeper.render import HumanRenderer, ProgressBar
from rbee_mesh.protocol import Accepted, Done
from rbee_mesh.units import human_bytes


def test_progress_bar_draws_in_place_with_percent_bytes_rate_and_eta(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bar = ProgressBar()
    bar.draw({"bytes": 512 * 1024, "total": 1024 * 1024, "rate_bps": 2048, "eta_s": 256})
    bar.clear()
    err = capsys.readouterr().err
    drawn, cleared = err.split("\x1b[K")[:2]
    assert drawn.startswith("\r[" + "#" * 15 + "." * 15 + "]")
    assert " 50.0% 512.0 KiB/1.0 MiB 2.0 KiB/s ETA 256s" in drawn
    assert cleared == "\r"


@pytest.mark.parametrize(
    ("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 2**30, "5.0 GiB")]
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


def test_an_inference_that_made_no_token_is_summed_up_not_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A model whose first token is its end of sequence: DONE with 0 tokens and no ttft."""
    renderer = HumanRenderer()
    renderer.event(Accepted(job_id="j1", ref="r1", op="infer", deadline_s=60.0))
    usage = {"prompt_tokens": 5, "generated_tokens": 0, "ttft_s": None, "tokens_per_s": 0.0,
             "duration_s": 0.01}  # fmt: skip
    result = {"text": "", "usage": usage, "worker": "w-1", "backend": "llama-cpp",
              "finish_reason": "stop"}  # fmt: skip
    renderer.event(Done(job_id="j1", result=result))
    err = capsys.readouterr().err
    assert "0 tokens" in err and "no token before the model's end of sequence" in err
