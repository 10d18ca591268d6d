"""Hive discovery over real mDNS, each test in a network namespace of its own.

mDNS is multicast to UDP 5353. Each test creates a fresh network namespace (`ip netns add`, so it
needs root), where zeroconf is bound to the namespace's loopback: no packet reaches the host's
interfaces, and no other mDNS responder on the host (avahi) sees or answers ours. The scenarios run
in a child process inside the namespace (`ip netns exec NS python -c ...`), report what they saw
as one JSON line, and the test asserts on it. Waits are for events, under trio.fail_after.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import trio
from zeroconf import ServiceInfo, Zeroconf

from rbee_mesh.protocol import PROTOCOL_VERSION
from rbee_mesh.transport.discovery import (
    SERVICE_TYPE,
    DiscoveryEvent,
    Found,
    HiveAnnouncement,
    MalformedAnnouncement,
    announcing,
    browsing,
    parse_announcement,
    protocol_compatible,
)
from tests.skips import skip_or_fail

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = ["127.0.0.1"]
HIVE = HiveAnnouncement(
    hive_id="gpu-box",
    protocol=PROTOCOL_VERSION,
    host="127.0.0.1",
    control_port=7835,
    heartbeat_port=7836,
    key="9?@gr!a]vwRHx(ETfD.?@Ya(RBnS@Eh*OPzrBpRZ",
    version="0.1.0",
)
_namespaces = itertools.count()

# ---- running a scenario inside a network namespace -----------------------------------------------

_CHILD = (
    "import json, sys, trio\n"
    "from tests.test_discovery import SCENARIOS\n"
    "print(json.dumps(trio.run(SCENARIOS[sys.argv[1]], *sys.argv[2:])), flush=True)\n"
)


def _child_command(scenario: str, *args: str) -> list[str]:
    return [sys.executable, "-c", _CHILD, scenario, *args]


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace with its loopback up; removed after the test, pass or fail."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        skip_or_fail("needs root and iproute2 to create a network namespace")
    name = f"rbee-discovery-{os.getpid()}-{next(_namespaces)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def run_in(netns: str, scenario: str, *args: str) -> dict[str, Any]:
    """Run `SCENARIOS[scenario]` in `netns`; what it returned."""
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, *_child_command(scenario, *args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=20,
    )
    if proc.returncode != 0:
        pytest.fail(f"scenario {scenario} failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    if "timings_s" in result:
        print(f"{scenario}: {result['timings_s']}")
    return result


# ---- scenarios: run inside the namespace ---------------------------------------------------------


def _record(event: DiscoveryEvent) -> dict[str, Any]:
    if isinstance(event, Found):
        return {"event": "found", **asdict(event.announcement)}
    return {"event": "gone", "hive_id": event.hive_id, "name": event.name}


def _announcement(record: dict[str, Any]) -> HiveAnnouncement:
    return HiveAnnouncement(**{k: v for k, v in record.items() if k != "event"})


async def _announce_until(
    ann: HiveAnnouncement, stop: trio.Event, announced: trio.Event | None = None
) -> None:
    async with announcing(ann, interfaces=LOOPBACK):
        if announced is not None:
            announced.set()
        await stop.wait()


async def found_then_gone() -> dict[str, Any]:
    """Announce HIVE to a browser, then withdraw it."""
    stop, announced = trio.Event(), trio.Event()
    async with browsing(interfaces=LOOPBACK) as events, trio.open_nursery() as nursery:
        start = time.monotonic()
        nursery.start_soon(_announce_until, HIVE, stop, announced)
        with trio.fail_after(5):
            found = await events.receive()
            found_s = time.monotonic() - start
            await announced.wait()  # entering `announcing` returns after its last announcement
        announced_s = time.monotonic() - start
        start = time.monotonic()
        stop.set()
        with trio.fail_after(3):
            gone = await events.receive()
        gone_s = time.monotonic() - start
    return {
        "events": [_record(found), _record(gone)],
        "timings_s": {
            "announce_to_found": round(found_s, 3),
            "announce_to_entered": round(announced_s, 3),
            "exit_to_gone": round(gone_s, 3),
        },
    }


async def announce_cancelled_while_probing() -> dict[str, Any]:
    """Cancel `announcing` in the middle of its probing: how long leaving takes."""
    start = time.monotonic()
    with trio.move_on_after(0.5) as scope:
        async with announcing(HIVE, interfaces=LOOPBACK):
            await trio.sleep_forever()
    return {
        "cancelled": scope.cancelled_caught,
        "timings_s": {"cancel_to_exit": round(time.monotonic() - start - 0.5, 3)},
    }


async def _register_raw(name: str, properties: dict[bytes, bytes], stop: trio.Event) -> None:
    """Announce a service of our type with any TXT record, as something else on the LAN might."""
    zc = await trio.to_thread.run_sync(Zeroconf, LOOPBACK)
    try:
        info = ServiceInfo(
            SERVICE_TYPE,
            f"{name}.{SERVICE_TYPE}",
            port=9,
            properties=properties,
            parsed_addresses=LOOPBACK,
        )
        await trio.to_thread.run_sync(zc.register_service, info)
        await stop.wait()
    finally:
        await trio.to_thread.run_sync(zc.close)


class _LogWatch(logging.Handler):
    """Sets a trio Event when a log line containing its text is logged, from any thread."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__()
        self.token = trio.lowlevel.current_trio_token()
        self.seen = {text: trio.Event() for text in texts}

    def emit(self, record: logging.LogRecord) -> None:
        for text, seen in self.seen.items():
            if text in record.getMessage():
                self.token.run_sync_soon(seen.set)


async def foreign_and_mismatched_announcements() -> dict[str, Any]:
    """Garbage and foreign announcements next to a good hive and a hive of another protocol."""
    watch = _LogWatch(["ignoring service junk.", "ignoring service foreign.", "speaks protocol 99"])
    logging.getLogger("rbee_mesh.transport.discovery").addHandler(watch)
    future = replace(HIVE, hive_id="future-box", protocol=99, control_port=7935)
    stop = trio.Event()
    found: list[dict[str, Any]] = []
    async with browsing(interfaces=LOOPBACK) as events, trio.open_nursery() as nursery:
        nursery.start_soon(_register_raw, "junk", {b"hive_id": b"\xff\xfe", b"proto": b"x"}, stop)
        nursery.start_soon(_register_raw, "foreign", {b"path": b"/printer"}, stop)
        nursery.start_soon(_announce_until, HIVE, stop)
        nursery.start_soon(_announce_until, future, stop)
        with trio.fail_after(6):
            while len(found) < 2:
                found.append(_record(await events.receive()))
            for seen in watch.seen.values():
                await seen.wait()
        stop.set()
    return {"found": sorted(found, key=lambda r: r["hive_id"])}


async def hive_restarted_on_new_port() -> dict[str, Any]:
    """A hive process killed (no goodbye), then started again on other ports."""
    records: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    async with browsing(interfaces=LOOPBACK) as events:
        for port, label in ((7835, "first"), (17835, "restarted")):
            start = time.monotonic()
            proc = await trio.lowlevel.open_process(_child_command("announce_forever", str(port)))
            try:
                with trio.fail_after(6):
                    event = await events.receive()
                timings[f"{label}_spawn_to_found"] = round(time.monotonic() - start, 3)
                records.append(_record(event))
            finally:
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
    return {"events": records, "timings_s": timings}


async def announce_forever(port: str) -> None:
    """A hive's announcement until killed (for `hive_restarted_on_new_port`)."""
    ann = replace(HIVE, control_port=int(port), heartbeat_port=int(port) + 1)
    async with announcing(ann, interfaces=LOOPBACK):
        await trio.sleep_forever()


SCENARIOS = {
    f.__name__: f
    for f in (
        found_then_gone,
        announce_cancelled_while_probing,
        foreign_and_mismatched_announcements,
        hive_restarted_on_new_port,
        announce_forever,
    )
}

# ---- the tests -----------------------------------------------------------------------------------


def test_announced_hive_is_found_with_its_fields_then_gone_on_goodbye(netns: str) -> None:
    result = run_in(netns, "found_then_gone")
    found, gone = result["events"]
    assert found == {"event": "found", **asdict(HIVE)}
    assert gone == {"event": "gone", "hive_id": "gpu-box", "name": f"gpu-box.{SERVICE_TYPE}"}
    assert result["timings_s"]["announce_to_found"] < 4
    assert result["timings_s"]["exit_to_gone"] < 1


def test_announcing_cancelled_while_probing_exits_promptly(netns: str) -> None:
    result = run_in(netns, "announce_cancelled_while_probing")
    assert result["cancelled"]
    assert result["timings_s"]["cancel_to_exit"] < 0.5


def test_foreign_or_garbage_announcements_are_ignored_and_other_protocols_still_found(
    netns: str,
) -> None:
    result = run_in(netns, "foreign_and_mismatched_announcements")
    future, gpu = (_announcement(record) for record in result["found"])
    assert gpu == HIVE
    assert (future.hive_id, future.protocol) == ("future-box", 99)
    assert not protocol_compatible(future)
    assert protocol_compatible(gpu)


def test_hive_restarted_on_new_port_is_found_again_with_that_port(netns: str) -> None:
    result = run_in(netns, "hive_restarted_on_new_port")
    first, restarted = result["events"]
    assert (first["event"], first["control_port"]) == ("found", 7835)
    assert (restarted["event"], restarted["control_port"]) == ("found", 17835)
    assert restarted["heartbeat_port"] == 17836


def test_control_endpoint_brackets_ipv6_hosts() -> None:
    assert HIVE.control_endpoint == "tcp://127.0.0.1:7835"
    assert replace(HIVE, host="fd00::5").control_endpoint == "tcp://[fd00::5]:7835"


@pytest.mark.parametrize(
    ("properties", "addresses", "why"),
    [
        ({**HIVE.txt(), b"hive_id": b""}, ["127.0.0.1"], "'hive_id' is empty"),
        ({**HIVE.txt(), b"hive_id": b"\xff"}, ["127.0.0.1"], "not UTF-8"),
        ({**HIVE.txt(), b"proto": None}, ["127.0.0.1"], "no 'proto'"),
        ({**HIVE.txt(), b"control": b"-1"}, ["127.0.0.1"], "'control' is not a number"),
        ({**HIVE.txt(), b"heartbeat": b"70000"}, ["127.0.0.1"], "'heartbeat' is not a number"),
        ({b"path": b"/printer"}, ["127.0.0.1"], "no 'hive_id'"),
        (HIVE.txt(), [], "no address"),
        ({**HIVE.txt(), b"key": b"not-a-key"}, ["127.0.0.1"], "'key' is not a public key"),
        ({**HIVE.txt(), b"key": None}, ["127.0.0.1"], "no 'key'"),
    ],
)
def test_malformed_txt_records_are_rejected_with_a_reason(
    properties: dict[bytes, bytes | None], addresses: list[str], why: str
) -> None:
    with pytest.raises(MalformedAnnouncement, match=why):
        parse_announcement(properties, addresses)


def test_txt_record_round_trips_and_prefers_non_loopback_addresses() -> None:
    parsed = parse_announcement(HIVE.txt(), ["127.0.0.1", "192.168.1.7"])
    assert parsed == replace(HIVE, host="192.168.1.7")
