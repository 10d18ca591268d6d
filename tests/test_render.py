"""How events look: the download progress bar."""

from __future__ import annotations

import pytest

from rbee_mesh.actors.keeper.render import ProgressBar
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
