"""`rbee-mesh doctor`: why a hive is not visible, in plain words.

Each check says ok, or what is wrong and what to do about it:

- the queen answers at the endpoint this command would use;
- some interface of this machine can send multicast (mDNS discovery needs it);
- the hives announced on the LAN (a few seconds of listening) against the hives the queen has
  linked: one announced but not linked (for example: another protocol version);
- for each hive the queen knows: it is live, its control port is reachable from here, it speaks
  this protocol, its clock agrees with this machine's.
"""

from __future__ import annotations

import socket
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from rbee_mesh import __version__
from rbee_mesh.actors.jobclient import ClientConfig, ServerUnreachable
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.trust import Trust
from rbee_mesh.protocol import PROTOCOL_VERSION, Done, HiveGet, HiveList, Operation, Status
from rbee_mesh.transport import parse_endpoint
from rbee_mesh.transport.discovery import Found, HiveAnnouncement, browsing, protocol_compatible

#: More clock difference than this breaks the age of heartbeats and timestamps in narration.
MAX_CLOCK_SKEW_S = 5.0
#: How long to listen for hives announcing themselves.
LISTEN_S = 3.0
_IFF_UP, _IFF_LOOPBACK, _IFF_MULTICAST = 0x1, 0x8, 0x1000


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    message: str
    #: What to do about it, when not ok.
    advice: str = ""

    def to_record(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "message": self.message, "advice": self.advice}


async def run_doctor(endpoint: str, *, discovery: bool, trust: Trust) -> list[Check]:
    """Every check, in order, as the node of `trust`; mDNS is listened to only when
    `discovery` is on."""
    checks = [multicast_check()]
    quick = ClientConfig(accept_timeout_s=3.0)
    pending: list[dict[str, Any]] = []
    try:
        async with open_keeper(endpoint, quick, trust) as keeper:
            status = await _result(keeper, Status())
            q = status["queen"]
            checks.insert(
                0,
                Check(
                    "queen",
                    True,
                    f"answers at {endpoint} (v{q['version']}, protocol {q['protocol']})",
                ),
            )
            rows = await _result(keeper, HiveList())
            pending = [row for row in rows if row["liveness"] == "pending"]
            hives = {
                row["hive"]: await _result(keeper, HiveGet(hive=row["hive"]))
                for row in rows
                if row["liveness"] != "pending"
            }
    except ServerUnreachable as exc:
        advice = (
            "start one: rbee-mesh queen start (or name it with --queen); a queen of another "
            "machine answers only keepers it trusts: rbee-mesh keeper join TOKEN"
        )
        checks.insert(0, Check("queen", False, exc.message, advice))
        hives = {}
    if discovery:
        checks.append(await mdns_check(hives, {row["hive"] for row in pending}))
    else:
        checks.append(Check("mdns", True, "skipped: discovery is off (RBEE_MESH_DISCOVERY)"))
    if not hives and checks[0].ok:
        checks.append(
            Check(
                "hives",
                False,
                "the queen knows no hive",
                "start one on each machine (rbee-mesh hive start --join TOKEN, with a token "
                "of rbee-mesh queen invite), or name them: queen start --peer HOST#KEY",
            )
        )
    checks += [await hive_check(name, detail) for name, detail in hives.items()]
    checks += [
        Check(
            f"hive {row['hive']}",
            False,
            f"found on the LAN at {row['endpoint']} with a key the queen does not trust "
            f"(fingerprint {row['fingerprint']})",
            f"compare the fingerprint with `rbee-mesh id` on that machine, then: rbee-mesh "
            f"hive trust {row['hive']}; the hive must trust this queen too (hive start --join)",
        )
        for row in pending
    ]
    return checks


async def _result(keeper: Any, op: Operation) -> Any:
    job = await keeper.submit(op)
    async for _ in job:
        pass
    if not isinstance(job.terminal, Done):
        raise ServerUnreachable(f"the queen could not answer {op.NAME}: {job.terminal}")
    return job.terminal.result


def multicast_check(net: Path = Path("/sys/class/net")) -> Check:
    """Whether some interface that is up (not loopback) can send multicast."""
    capable: list[str] = []
    without: list[str] = []
    for iface in sorted(p.name for p in net.iterdir()):
        try:
            flags = int((net / iface / "flags").read_text(), 16)
        except (OSError, ValueError):
            continue
        if not flags & _IFF_UP or flags & _IFF_LOOPBACK:
            continue
        (capable if flags & _IFF_MULTICAST else without).append(iface)
    if capable:
        return Check("multicast", True, f"can send multicast on {', '.join(capable)}")
    detail = f" ({', '.join(without)} cannot)" if without else ""
    return Check(
        "multicast",
        False,
        f"no interface that is up can send multicast{detail}",
        "discovery cannot work here: name hives with queen start --peer HOST or in "
        "<state>/config.toml, or enable multicast (ip link set DEV multicast on)",
    )


async def mdns_check(linked: dict[str, dict[str, Any]], pending: Collection[str] = ()) -> Check:
    """Listen for announcements and compare them with the hives the queen has linked (or lists
    as pending: a key it does not trust, said by their own checks)."""
    seen: dict[str, HiveAnnouncement] = {}
    try:
        async with browsing() as events:
            with trio.move_on_after(LISTEN_S):
                async for event in events:
                    if isinstance(event, Found):
                        seen[event.announcement.hive_id] = event.announcement
    except OSError as exc:
        return Check(
            "mdns",
            False,
            f"cannot listen for mDNS: {exc}",
            "check that UDP port 5353 is free and multicast is allowed",
        )
    if not seen:
        return Check(
            "mdns",
            not linked or all(h["source"] != "mdns" for h in linked.values()),
            f"no hive announced itself in {LISTEN_S:g} s",
            "hives started with --local-only are not announced; a firewall may drop mDNS "
            "(UDP 5353)",
        )
    wrong = [a for a in seen.values() if not protocol_compatible(a)]
    if wrong:
        names = ", ".join(f"{a.hive_id} (protocol {a.protocol})" for a in wrong)
        return Check(
            "mdns",
            False,
            f"hives that speak another protocol: {names}; this build speaks {PROTOCOL_VERSION}",
            f"run the same rbee-mesh version (this is {__version__}) on every machine",
        )
    missing = [h for h in seen if h not in linked and h not in pending]
    if missing:
        return Check(
            "mdns",
            False,
            f"announced but not linked by the queen: {', '.join(missing)}",
            "is the queen started with discovery (queen start --discovery)?",
        )
    return Check("mdns", True, f"announced and linked: {', '.join(sorted(seen))}")


async def hive_check(name: str, detail: dict[str, Any]) -> Check:
    problems: list[str] = []
    advice: list[str] = []
    if detail["liveness"] != "live":
        problems.append(f"{detail['liveness']} (last heard {detail['heartbeat_age_s']} s ago)")
        advice.append("is the hive running (rbee-mesh hive status on its machine)?")
    reachable = await _port_reachable(detail["endpoint"])
    if reachable is not None:
        problems.append(f"control port not reachable from here: {reachable}")
        advice.append("a firewall, or the hive serves only its own machine (--local-only)")
    protocol = detail.get("protocol")
    if protocol is not None and protocol != PROTOCOL_VERSION:
        problems.append(f"speaks protocol {protocol}, this build {PROTOCOL_VERSION}")
        advice.append("run the same rbee-mesh version everywhere")
    skew = detail.get("clock_skew_s")
    if skew is not None and abs(skew) > MAX_CLOCK_SKEW_S:
        problems.append(f"its clock is {abs(skew):.1f} s {'behind' if skew > 0 else 'ahead'}")
        advice.append("run time synchronisation (chrony or systemd-timesyncd) on both machines")
    if problems:
        return Check(f"hive {name}", False, "; ".join(problems), "; ".join(advice))
    return Check(
        f"hive {name}",
        True,
        f"live, heard {detail['heartbeat_age_s']} s ago, {detail['endpoint']} reachable, "
        f"clock skew {skew} s",
    )


async def _port_reachable(endpoint: str) -> str | None:
    """None if a TCP connection to the endpoint succeeds in 2 s; else why not."""
    ep = parse_endpoint(endpoint)
    if ep.scheme != "tcp" or ep.host is None or ep.port is None:
        return None  # in-memory or ipc: nothing to reach over the network
    try:
        with trio.fail_after(2):
            stream = await trio.open_tcp_stream(ep.host.strip("[]"), ep.port)
        await stream.aclose()
    except trio.TooSlowError:
        return "no answer in 2 s"
    except (OSError, socket.gaierror) as exc:
        return exc.strerror or str(exc)
    return None
