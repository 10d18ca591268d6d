"""`doctor`'s checks, each on the facts it reads (real files, a real port)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import trio

from rbee_mesh.actors.keeper.doctor import hive_check, multicast_check
from rbee_mesh.protocol import PROTOCOL_VERSION


def interfaces(root: Path, flags: dict[str, int]) -> Path:
    for name, value in flags.items():
        (root / name).mkdir()
        (root / name / "flags").write_text(f"{value:#x}\n")
    return root


def test_an_up_multicast_interface_is_ok(tmp_path: Path) -> None:
    check = multicast_check(interfaces(tmp_path, {"lo": 0x9, "eth0": 0x1003}))
    assert check.ok and "eth0" in check.message


def test_no_multicast_interface_is_a_problem_with_what_to_do(tmp_path: Path) -> None:
    check = multicast_check(interfaces(tmp_path, {"lo": 0x9, "wg0": 0x91, "eth1": 0x1002}))
    assert not check.ok and "wg0 cannot" in check.message
    assert "--peer" in check.advice


def hive(port: int, **overrides: Any) -> dict[str, Any]:
    return {
        "liveness": "live",
        "heartbeat_age_s": 0.4,
        "endpoint": f"tcp://127.0.0.1:{port}",
        "protocol": PROTOCOL_VERSION,
        "clock_skew_s": 0.01,
        **overrides,
    }


async def test_a_healthy_hive_is_ok() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check = await hive_check("h1", hive(listening.getsockname()[1]))
    assert check.ok and "reachable" in check.message


async def test_every_problem_of_a_hive_is_named_with_its_remedy() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nobody listens there once closed
    with trio.fail_after(10):
        check = await hive_check(
            "h2", hive(closed, liveness="lost", protocol=PROTOCOL_VERSION + 1, clock_skew_s=-42.0)
        )
    assert not check.ok
    assert "lost" in check.message and "not reachable" in check.message
    assert f"speaks protocol {PROTOCOL_VERSION + 1}" in check.message
    assert "42.0 s ahead" in check.message
    assert "time synchronisation" in check.advice and "same rbee-mesh version" in check.advice
