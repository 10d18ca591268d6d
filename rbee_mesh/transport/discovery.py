"""Zero-config discovery of hives on the LAN: mDNS/DNS-SD through python-zeroconf, bridged to trio.

A hive announces `_rbee-hive._tcp.local.` while it runs (`announcing`); a queen browses for it
(`browsing`) and links to each hive it finds by its control endpoint (`HiveRegistry.add`). An
announcement is a hint, not a credential: anyone on the LAN can send one. It carries the hive's
public key, which a queen links to only once a person has trusted it (`hive trust`), and which
the CURVE handshake then proves: an impostor announcing a trusted key cannot complete it.

Liveness does not come from mDNS either. A hive that exits cleanly sends a goodbye and browsers
report it `Gone` at once; a hive that crashes sends nothing, and its record lingers in every
browser's cache until its TTL runs out (zeroconf's defaults: 75 minutes for PTR and TXT, after
which it is `Gone`; 2 minutes for SRV and addresses). The queen learns that a hive is lost from its
heartbeats, never from mDNS.

Bridge: `Zeroconf` (the synchronous class) runs its own asyncio loop in a thread of its own.
zeroconf's asyncio API (`AsyncZeroconf`) wants to run on the caller's asyncio loop, which trio has
not, so it is not used; the coroutine methods of `Zeroconf` are, on that private loop. Blocking
calls (opening the sockets, closing) run in `trio.to_thread`; registration (~1.6 s of probing and
announcing) runs on zeroconf's loop as a future that trio waits on in a thread, and cancels when
it is cancelled. Browse callbacks run in zeroconf's browser thread and enter trio with
`trio.from_thread.run(..., trio_token=...)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import ifaddr
import trio
from zeroconf import (
    InterfaceChoice,
    NonUniqueNameException,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from rbee_mesh.protocol import PROTOCOL_VERSION, ErrorCode, MeshError
from rbee_mesh.protocol.constants import MAX_ANNOUNCED_HIVES
from rbee_mesh.transport.curve import check_key, fingerprint

log = logging.getLogger("rbee_mesh.transport.discovery")


def remember(table: dict[str, HiveAnnouncement], key: str, ann: HiveAnnouncement) -> None:
    """Keep `ann` in `table` as its newest entry. Announcements are not authenticated (anyone on
    the LAN can make up thousands): past MAX_ANNOUNCED_HIVES the oldest is forgotten."""
    table.pop(key, None)
    table[key] = ann
    while len(table) > MAX_ANNOUNCED_HIVES:
        del table[next(iter(table))]


SERVICE_TYPE = "_rbee-hive._tcp.local."

#: How long a browser waits for a service's records that did not arrive with its announcement.
_RESOLVE_TIMEOUT_MS = 1_000
#: How long leaving `announcing` or `browsing` may take (the goodbye takes ~0.25 s).
_CLOSE_TIMEOUT_S = 2.0
#: Discovery events waiting for the consumer; beyond this, zeroconf's browser thread waits.
_EVENT_BUFFER = 64


@dataclass(frozen=True)
class HiveAnnouncement:
    """What a hive tells the LAN about itself."""

    hive_id: str
    protocol: int
    #: An address to reach the hive at. Announcing a wildcard (`0.0.0.0`, `::`) announces this
    #: machine's addresses instead (those of `interfaces`, when given).
    host: str
    control_port: int
    heartbeat_port: int
    #: The hive's CURVE public key (z85): the server key a queen pins when it links to it.
    key: str
    #: The rbee-mesh version of the hive.
    version: str

    @property
    def control_endpoint(self) -> str:
        """The endpoint a queen links to (`HiveRegistry.add`)."""
        return f"tcp://{_url_host(self.host)}:{self.control_port}"

    @property
    def heartbeat_endpoint(self) -> str:
        return f"tcp://{_url_host(self.host)}:{self.heartbeat_port}"

    def txt(self) -> dict[bytes, bytes]:
        """The TXT record: one key per field except the host (the A/AAAA records carry it)."""
        return {
            b"hive_id": self.hive_id.encode(),
            b"proto": str(self.protocol).encode(),
            b"control": str(self.control_port).encode(),
            b"heartbeat": str(self.heartbeat_port).encode(),
            b"key": self.key.encode(),
            b"fp": fingerprint(self.key).encode(),
            b"version": self.version.encode(),
        }


@dataclass(frozen=True)
class Found:
    """A hive announced itself, or changed its announcement (new ports after a restart)."""

    announcement: HiveAnnouncement


@dataclass(frozen=True)
class Gone:
    """A hive withdrew its announcement (its goodbye), or its record expired."""

    hive_id: str
    #: The mDNS service name the hive announced under.
    name: str


DiscoveryEvent = Found | Gone


def protocol_compatible(ann: HiveAnnouncement) -> bool:
    """Whether this build can talk to the announced hive."""
    return ann.protocol == PROTOCOL_VERSION


class MalformedAnnouncement(ValueError):
    """A service of our type whose records are not a hive's announcement."""


def parse_announcement(
    properties: Mapping[bytes, bytes | None], addresses: list[str]
) -> HiveAnnouncement:
    """The announcement in a service's TXT record and addresses; MalformedAnnouncement if none."""

    def text(key: str, *, required: bool = True) -> str:
        value = properties.get(key.encode())
        if value is None:
            if required:
                raise MalformedAnnouncement(f"no {key!r} in its TXT record")
            return ""
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise MalformedAnnouncement(f"{key!r} is not UTF-8: {value!r}") from None

    def number(key: str, low: int, high: int) -> int:
        raw = text(key)
        if not raw.isdecimal() or not low <= int(raw) <= high:
            raise MalformedAnnouncement(f"{key!r} is not a number in {low}..{high}: {raw!r}")
        return int(raw)

    hive_id = text("hive_id")
    if not hive_id:
        raise MalformedAnnouncement("'hive_id' is empty")
    if not addresses:
        raise MalformedAnnouncement("no address")
    return HiveAnnouncement(
        hive_id=hive_id,
        protocol=number("proto", 0, 2**31),
        host=_reachable(addresses)[0],
        control_port=number("control", 1, 65535),
        heartbeat_port=number("heartbeat", 1, 65535),
        key=_key(text("key")),
        version=text("version", required=False),
    )


@asynccontextmanager
async def announcing(
    ann: HiveAnnouncement, *, interfaces: list[str] | None = None
) -> AsyncIterator[None]:
    """Announce `ann` on the LAN for the duration of the block; withdraw it (goodbye) on exit.

    Entering returns once the name has been probed and the announcement sent (~1.6 s), or raises
    MeshError (CONFLICT) when the probe is answered: another hive announces the same id. (Two
    processes on one machine may miss each other's answers: they share port 5353, and the kernel
    hands a unicast answer to one of them.) Leaving, also by cancellation, sends the goodbye
    (~0.25 s). `interfaces` are the addresses to announce on (default: all of this machine's).
    """
    addresses = [ann.host]
    if ipaddress.ip_address(ann.host).is_unspecified:
        addresses = _reachable(interfaces or machine_ipv4_addresses())
    info = ServiceInfo(
        SERVICE_TYPE,
        f"{ann.hive_id}.{SERVICE_TYPE}",
        port=ann.control_port,
        properties=ann.txt(),
        parsed_addresses=addresses,
    )
    zc = await trio.to_thread.run_sync(Zeroconf, _interface_choice(interfaces))
    try:
        await _register(zc, info)
        log.info("announcing hive %s at %s", ann.hive_id, ", ".join(addresses))
        yield
    finally:
        await _close(zc)


@asynccontextmanager
async def browsing(
    *, interfaces: list[str] | None = None
) -> AsyncIterator[trio.MemoryReceiveChannel[DiscoveryEvent]]:
    """Watch the LAN for hives: `Found` when one announces itself or changes, `Gone` when it leaves.

    A foreign or malformed announcement of our service type is logged and skipped. A hive whose
    protocol differs from ours is still `Found` (see `protocol_compatible`), with a log line.
    """
    send, receive = trio.open_memory_channel[DiscoveryEvent](_EVENT_BUFFER)
    listener = _Listener(send, trio.lowlevel.current_trio_token())
    zc = await trio.to_thread.run_sync(Zeroconf, _interface_choice(interfaces))
    browser: ServiceBrowser | None = None
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[listener.on_change])
        yield receive
    finally:
        # First wake a callback that waits for room in the channel: stopping the browser joins
        # its thread.
        send.close()
        await _close(zc, browser)


class _Listener:
    """Turns zeroconf's callbacks (in its browser thread) into discovery events in trio."""

    def __init__(
        self, send: trio.MemorySendChannel[DiscoveryEvent], token: trio.lowlevel.TrioToken
    ) -> None:
        self._send = send
        self._token = token
        # Touched by zeroconf's browser thread only.
        self._known: dict[str, HiveAnnouncement] = {}

    def on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            gone = self._known.pop(name, None)
            if gone is not None:
                log.info("hive %s withdrew its announcement", gone.hive_id)
                self._emit(Gone(gone.hive_id, name))
            return
        info = ServiceInfo(service_type, name)
        if not info.load_from_cache(zeroconf) and not info.request(zeroconf, _RESOLVE_TIMEOUT_MS):
            log.warning("ignoring service %s: its records did not arrive", name)
            return
        try:
            ann = parse_announcement(info.properties, info.parsed_addresses())
        except MalformedAnnouncement as e:
            log.warning("ignoring service %s: not a hive's announcement: %s", name, e)
            return
        if self._known.get(name) == ann:
            return
        remember(self._known, name, ann)  # the oldest forgotten: its goodbye is not heard
        if not protocol_compatible(ann):
            log.warning(
                "hive %s speaks protocol %d; this build speaks %d",
                ann.hive_id,
                ann.protocol,
                PROTOCOL_VERSION,
            )
        self._emit(Found(ann))

    def _emit(self, event: DiscoveryEvent) -> None:
        # Waits while the channel is full: a slow consumer holds up this thread, not zeroconf's.
        with contextlib.suppress(
            trio.ClosedResourceError, trio.BrokenResourceError, trio.RunFinishedError
        ):  # browsing has ended
            trio.from_thread.run(self._send.send, event, trio_token=self._token)


async def _register(zc: Zeroconf, info: ServiceInfo) -> None:
    """Probe for `info`'s name and announce it, on zeroconf's own loop; cancellable."""

    async def register_and_announce() -> None:
        await (await zc.async_register_service(info))

    assert zc.loop is not None
    registered = asyncio.run_coroutine_threadsafe(register_and_announce(), zc.loop)
    try:
        await trio.to_thread.run_sync(registered.result, abandon_on_cancel=True)
    except NonUniqueNameException:
        raise MeshError(
            ErrorCode.CONFLICT,
            f"another hive announces itself as {info.name.removesuffix('.' + SERVICE_TYPE)!r} "
            "on this network; give this one another id (--id)",
        ) from None
    finally:
        # When cancelled: stop probing now, else closing zeroconf waits a second for it.
        registered.cancel()


async def _close(zc: Zeroconf, browser: ServiceBrowser | None = None) -> None:
    """Close `zc` (sending goodbyes for what it announced), bounded, even when cancelled."""

    def close() -> None:
        if browser is not None:
            browser.cancel()
        zc.close()

    with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT_S) as scope:
        await trio.to_thread.run_sync(close, abandon_on_cancel=True)
    if scope.cancelled_caught:
        log.warning("zeroconf did not close within %.0f s; left it closing", _CLOSE_TIMEOUT_S)


def _interface_choice(interfaces: list[str] | None) -> InterfaceChoice | list[str]:
    return InterfaceChoice.All if interfaces is None else list(interfaces)


def _key(text: str) -> str:
    try:
        return check_key(text)
    except ValueError as exc:
        raise MalformedAnnouncement(f"'key' is not a public key: {exc}") from None


def machine_ipv4_addresses() -> list[str]:
    return [
        ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if isinstance(ip.ip, str)
    ]


def _reachable(addresses: list[str]) -> list[str]:
    """`addresses`, loopback ones last: another machine cannot reach those."""
    return sorted(addresses, key=lambda a: ipaddress.ip_address(a).is_loopback)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
