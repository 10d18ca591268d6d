"""A LAN of network namespaces for multi-host tests: real kernels' TCP, no machines needed.

Each host is a network namespace with `lo` up and one interface, ``eth0``, whose veth peer is a
port of a Linux bridge (the "switch"). The bridge lives in a namespace of its own and the veth
pairs are created inside it, so nothing is added to the root namespace; the hosts have no route
but their subnet (10.213.X.0/24, X random per LAN, which exists only in these namespaces) and
multicast (224.0.0.0/4 on ``eth0``, for mDNS), so no packet can leave.

    with open_lan(["q", "h1", "h2"]) as lan:
        lan["h1"].popen([sys.executable, "-m", "rbee_mesh", "hive", "start", ...], env=env)
        lan["q"].run(["ip", "addr"])
        lan.cut(lan["h1"])       # its switch port drops every frame, both ways
        lan.restore(lan["h1"])

or, in a test, `lan_or_skip(names)`. The benchmarks (benchmarks/bench.py, the remote mode) use it
too, so it needs nothing but the standard library.

Cleanup always runs, also when the test fails or is interrupted: every process in each namespace
(`ip netns pids`) is killed, then the namespaces are deleted. Processes in a namespace are found
by the kernel, not by what we remember, so daemons that detached into new sessions go too.

Needs root and iproute2 (`ip`, `bridge`). Where namespaces cannot be made, the fixture skips with
the reason, or fails when CI=true (a CI runner that silently skips these tests tests nothing).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Interface names are at most 15 bytes; the bridge's port for host NAME is "p-NAME".
MAX_HOST_NAME = 12


class LanUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no iproute2, no permission)."""


def _ip(*args: str, timeout: float = 10) -> None:
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, args, done.stdout, done.stderr)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None if they probably can."""
    if os.name != "posix" or not os.path.isdir("/proc/self/ns"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root, or in a privileged container)"
    for tool in ("ip", "bridge"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    return None


@dataclass
class Host:
    """One machine of the LAN: a network namespace with one address."""

    name: str
    netns: str
    address: str
    #: The bridge's end of this host's cable (in the bridge's namespace).
    port: str
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` as a command that runs inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 30,
        cwd: str | os.PathLike[str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run to completion inside the namespace; output captured as text. Always bounded."""
        return subprocess.run(
            self.argv(argv),
            env=None if env is None else dict(env),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )

    def popen(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        stdin: Any = subprocess.DEVNULL,
        stdout: Any = subprocess.PIPE,
        stderr: Any = subprocess.PIPE,
        text: bool = True,
    ) -> subprocess.Popen[str]:
        """Start inside the namespace (`ip netns exec` execs, so the pid is the command's)."""
        proc: subprocess.Popen[str] = subprocess.Popen(
            self.argv(argv),
            env=None if env is None else dict(env),
            cwd=cwd,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            text=text,
        )
        self._procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process now in this host's namespace, whoever started it."""
        return _netns_pids(self.netns)


def _netns_pids(netns: str) -> list[int]:
    done = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=10
    )
    return [int(p) for p in done.stdout.split()]


class Lan:
    """Hosts on one bridge. Build it with `open_lan`; index it by host name."""

    def __init__(self, names: Sequence[str]) -> None:
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"host names must be distinct and at least one: {names!r}")
        for name in names:
            if not name.isidentifier() or len(name) > MAX_HOST_NAME:
                raise ValueError(f"host name {name!r}: a short identifier, at most 12 chars")
        if len(names) > 250:
            raise ValueError("at most 250 hosts per LAN")
        self.tag = f"rbee-{secrets.token_hex(3)}"
        self.bridge_netns = f"{self.tag}-br"
        self.subnet = f"10.213.{secrets.randbelow(256)}.0/24"
        prefix = self.subnet.rsplit(".", 1)[0]
        self.hosts: dict[str, Host] = {
            name: Host(name, f"{self.tag}-{name}", f"{prefix}.{i}", f"p-{name}")
            for i, name in enumerate(names, start=1)
        }
        self._made: list[str] = []  # namespaces that exist, to delete
        self._cut: set[str] = set()
        self._closed = False

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts.values())

    # ---- building -------------------------------------------------------------------------------

    def _add_netns(self, netns: str) -> None:
        _ip("ip", "netns", "add", netns)
        self._made.append(netns)
        _ip("ip", "-n", netns, "link", "set", "lo", "up")

    def build(self) -> None:
        br = self.bridge_netns
        self._add_netns(br)
        # No STP and no forward delay: ports forward at once. No multicast snooping: multicast
        # (mDNS) floods to every port, as on a small unmanaged switch.
        _ip("ip", "-n", br, "link", "add", "br0", "type", "bridge",
            "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0")  # fmt: skip
        _ip("ip", "-n", br, "link", "set", "br0", "up")
        for host in self.hosts.values():
            self._add_netns(host.netns)
            # Made inside the bridge's namespace, its peer born inside the host's: the pair never
            # exists in the root namespace.
            _ip("ip", "-n", br, "link", "add", host.port, "type", "veth",
                "peer", "name", "eth0", "netns", host.netns)  # fmt: skip
            _ip("ip", "-n", br, "link", "set", host.port, "master", "br0", "up")
            _ip("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("ip", "-n", host.netns, "link", "set", "eth0", "multicast", "on", "up")
            # Multicast needs a route when there is no default route (and there is none).
            _ip("ip", "-n", host.netns, "route", "add", "224.0.0.0/4", "dev", "eth0")

    # ---- faults ---------------------------------------------------------------------------------

    def cut(self, host: Host) -> None:
        """Make the host's switch port drop every frame, both ways, silently.

        The port is set to the bridge's `disabled` state: the host's interface stays up with its
        carrier, nothing in the host's namespace changes, and no RST, ICMP or ARP reply comes
        back. Both ends' TCP just hear nothing, as when a switch or cable fails somewhere
        between two machines. (Taking a veth down instead would drop the host's carrier, a
        local event a host can see; tc netem and tc filters are not in every kernel: this one
        has neither.)
        """
        _ip("bridge", "-n", self.bridge_netns, "link", "set", "dev", host.port, "state", "0")
        self._cut.add(host.name)

    def restore(self, host: Host) -> None:
        """Forward the host's frames again (the port's `forwarding` state)."""
        _ip("bridge", "-n", self.bridge_netns, "link", "set", "dev", host.port, "state", "3")
        self._cut.discard(host.name)

    def shape(self, host: Host, rate: str) -> None:
        """Let the host send at most `rate` (tc's units, such as "40mbit"), as over a slow
        cable: a token bucket (tbf) on its eth0, queueing at most 50 ms of it; what it receives
        is not slowed."""
        _ip("ip", "netns", "exec", host.netns, "tc", "qdisc", "replace", "dev", "eth0", "root",
            "tbf", "rate", rate, "burst", "256kb", "latency", "50ms")  # fmt: skip

    def unshape(self, host: Host) -> None:
        _ip("ip", "netns", "exec", host.netns, "tc", "qdisc", "del", "dev", "eth0", "root")

    # ---- cleanup --------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process in the namespaces, then delete them. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for netns in reversed(self._made):
            try:
                _kill_all(netns)
            except Exception as exc:  # keep going: deleting the others matters more
                errors.append(f"{netns}: {exc}")
        for host in self.hosts.values():
            for proc in host._procs:
                # Killed above (they were in the namespace); reap them and close their pipes.
                with contextlib.suppress(Exception):
                    if proc.poll() is None:
                        proc.kill()
                    proc.communicate(timeout=5)
        for netns in reversed(self._made):
            try:
                _ip("ip", "netns", "del", netns)
            except Exception as exc:
                errors.append(f"{netns}: {exc}")
        self._made.clear()
        _open_lans.discard(self)
        if errors:
            raise RuntimeError("LAN cleanup failed: " + "; ".join(errors))


def _kill_all(netns: str, timeout: float = 10) -> None:
    """SIGKILL every process in the namespace until none is left (new ones may be forking)."""
    deadline = time.monotonic() + timeout
    while pids := [p for p in _netns_pids(netns) if p != os.getpid()]:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} survived SIGKILL for {timeout} s")
        time.sleep(0.02)


_open_lans: set[Lan] = set()


@atexit.register
def _close_leftovers() -> None:
    # A LAN whose `with` never finished (the interpreter is exiting): still clean up.
    for lan in list(_open_lans):
        with contextlib.suppress(Exception):
            lan.close()


@contextlib.contextmanager
def open_lan(names: Sequence[str] = ("q", "h1", "h2")) -> Iterator[Lan]:
    """A LAN of these hosts, torn down on exit whatever happens. Raises `LanUnavailable`."""
    if (reason := unavailable_reason()) is not None:
        raise LanUnavailable(reason)
    lan = Lan(names)
    _open_lans.add(lan)
    try:
        try:
            lan.build()
        except (subprocess.CalledProcessError, OSError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            raise LanUnavailable(f"could not build the test LAN: {detail.strip()}") from exc
        yield lan
    finally:
        lan.close()


def require_lan() -> None:
    """Skip the test if namespaces cannot be made; fail under CI=true instead."""
    if (reason := unavailable_reason()) is not None:
        unavailable(reason)


def unavailable(reason: str) -> None:
    from tests.skips import skip_or_fail  # pytest's: only tests get here

    skip_or_fail(f"multi-host tests need network namespaces: {reason}")


@contextlib.contextmanager
def lan_or_skip(names: Sequence[str] = ("q", "h1", "h2")) -> Iterator[Lan]:
    """`open_lan` for fixtures: skips (or fails under CI=true) where namespaces cannot be made."""
    require_lan()
    with contextlib.ExitStack() as stack:
        try:
            made = stack.enter_context(open_lan(names))
        except LanUnavailable as exc:
            unavailable(str(exc))
        yield made
