"""Other machines over SSH, through the system's OpenSSH client.

Why ssh(1) and not a library: a host is then whatever ssh takes (an alias from ~/.ssh/config with
its HostName, Port, User, IdentityFile and ProxyJump; `user@host`), keys come from the agent or
the files the user set up, and host keys are checked against known_hosts by the code that wrote
them; as ansible does by default. A library (asyncssh) re-implements each of these, runs on
asyncio (a bridge to trio), and would still have to read known_hosts and talk to the agent.

Every call runs ssh with `BatchMode=yes` (nothing asks a question: no password prompt, no "are
you sure you want to continue connecting") and `StrictHostKeyChecking=yes` (a host whose key is
not in known_hosts, or whose key changed, is refused, never added). A failure of ssh itself
(its exit status 255) is an `SshError` whose `failure` says which, read from ssh's message, and
which names the host key's fingerprint where the key is the problem. `host:port` is taken too,
which ssh alone does not.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import trio

#: How long ssh waits for the TCP connection (its ConnectTimeout), in seconds.
CONNECT_TIMEOUT_S = 10.0

#: ssh's own exit status for its own failures (a remote command's is passed through).
_SSH_FAILED = 255


class SshFailure(StrEnum):
    """Why ssh could not run a command on a host."""

    UNRESOLVABLE = "unresolvable"
    UNREACHABLE = "unreachable"
    AUTH_REFUSED = "auth-refused"
    HOST_KEY_UNKNOWN = "host-key-unknown"
    HOST_KEY_CHANGED = "host-key-changed"
    OTHER = "ssh-failed"


class SshError(Exception):
    """ssh failed to run a command on `host`: `failure` says why, `message` for a person."""

    def __init__(self, host: str, failure: SshFailure, message: str) -> None:
        super().__init__(message)
        self.host = host
        self.failure = failure
        self.message = message


@dataclass(frozen=True)
class Host:
    """A machine as ssh reaches it: `destination` (an alias, `host` or `user@host`), a port
    given as `host:port`, and the ssh config file to read (None: ssh's own default)."""

    destination: str
    port: int | None = None
    config: Path | None = None

    @classmethod
    def parse(cls, text: str, *, config: Path | None = None) -> Host:
        """`alias`, `host`, `user@host`, `host:port`, `user@[v6addr]:port`. ValueError for what
        ssh would take as an option, or a port out of range."""
        if not text or text.startswith("-") or any(c.isspace() for c in text):
            raise ValueError(f"{text!r} is not a host (an ssh destination, host or host:port)")
        user, at, rest = text.rpartition("@")
        port: int | None = None
        bracketed = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", rest)
        if bracketed:  # [v6 address] with an optional port
            rest, given = bracketed.group(1), bracketed.group(2)
            port = int(given) if given else None
        elif rest.count(":") == 1:  # host:port (an IPv6 address alone has several colons)
            rest, _, given = rest.partition(":")
            if not given.isdigit():
                raise ValueError(f"{text!r}: the port must be a number")
            port = int(given)
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"{text!r}: the port must be 1 to 65535")
        if not rest:
            raise ValueError(f"{text!r} names no host")
        return cls(f"{user}{at}{rest}", port, config)

    def __str__(self) -> str:
        return self.destination if self.port is None else f"{self.destination}:{self.port}"

    def ssh_argv(self, command: Sequence[str], *, verbose: bool = False) -> list[str]:
        """The ssh command line that runs `command` (an argv, quoted for the remote shell)."""
        argv = [
            "ssh",
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S:g}",
        ]  # fmt: skip
        if self.config is not None:
            argv += ["-F", str(self.config)]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        if verbose:
            argv.append("-v")
        # After "--" the destination is never read as an option, whatever it is.
        return [*argv, "--", self.destination, shlex.join(command)]


@dataclass(frozen=True)
class Ran:
    """What a remote command did: its exit status and its output."""

    status: int
    stdout: str
    stderr: str


async def run(
    host: Host, command: Sequence[str], *, stdin: bytes = b"", timeout_s: float = 60.0
) -> Ran:
    """Run `command` on `host` and wait for it (at most `timeout_s`: TimeoutError). Raises
    SshError if ssh could not run it; the command's own failure is in the result."""
    with trio.fail_after(timeout_s):
        done = await trio.run_process(
            host.ssh_argv(command), stdin=stdin, capture_stdout=True, capture_stderr=True,
            check=False,
        )  # fmt: skip
    stderr = done.stderr.decode(errors="replace")
    if done.returncode == _SSH_FAILED:
        failure, message = _failure(str(host), stderr)
        if failure is SshFailure.HOST_KEY_UNKNOWN:
            message = _unknown_key(str(host), await _presented_key(host))
        raise SshError(str(host), failure, message)
    return Ran(done.returncode, done.stdout.decode(errors="replace"), stderr)


#: ssh's messages, and what each means (OpenSSH 8 and 9).
_FAILURES = [
    (re.compile(r"Could not resolve hostname [^:]*: (.*)"), SshFailure.UNRESOLVABLE),
    (re.compile(r"REMOTE HOST IDENTIFICATION HAS CHANGED"), SshFailure.HOST_KEY_CHANGED),
    (re.compile(r"No \S+ host key is known for|Host key verification failed"),
     SshFailure.HOST_KEY_UNKNOWN),
    (re.compile(r"Permission denied \(([^)]*)\)"), SshFailure.AUTH_REFUSED),
    (re.compile(r"connect to host \S+ port \d+: (.*)|Connection (?:closed|reset) by .*|"
                r"kex_exchange_identification: (.*)|Connection timed out.*"),
     SshFailure.UNREACHABLE),
]  # fmt: skip


def _failure(host: str, stderr: str) -> tuple[SshFailure, str]:
    """What ssh's message says went wrong, and a sentence for a person."""
    found, failure = next(
        ((match, failure) for pattern, failure in _FAILURES if (match := pattern.search(stderr))),
        (None, SshFailure.OTHER),
    )
    if found is None:
        return failure, f"ssh to {host} failed: {_last_line(stderr) or 'no message'}"
    detail = next((group for group in found.groups() if group), found.group(0)).strip()
    match failure:
        case SshFailure.UNRESOLVABLE:
            return failure, f"cannot resolve {host}: {detail}"
        case SshFailure.UNREACHABLE:
            return failure, f"cannot reach {host}: {detail}"
        case SshFailure.AUTH_REFUSED:
            return failure, (
                f"{host} refused every key offered ({detail}): is the key in its "
                "authorized_keys, and in your agent or named by IdentityFile?"
            )
        case SshFailure.HOST_KEY_CHANGED:
            fingerprint = re.search(r"SHA256:[A-Za-z0-9+/=]+", stderr)
            said = f" (it now presents {fingerprint.group(0)})" if fingerprint else ""
            return failure, (
                f"the host key of {host} has CHANGED since it was recorded in known_hosts{said}:"
                " someone may be in the middle, or the machine was reinstalled. Not connecting; "
                "if you know why it changed, remove the old key (`ssh-keygen -R`) and add the new"
            )
    return failure, _unknown_key(host, "")


def _unknown_key(host: str, presented: str) -> str:
    shown = f" ({presented})" if presented else ""
    return (
        f"the host key of {host}{shown} is not in known_hosts, and is not taken unseen: compare "
        "it with the machine's own (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` there), "
        "then add it to known_hosts (`ssh-keyscan`, or one `ssh` by hand)"
    )


async def _presented_key(host: Host) -> str:
    """The key the host presents (its type and fingerprint), from ssh's own account of the
    handshake (so also through a ProxyJump); empty if it did not get that far."""
    with trio.move_on_after(CONNECT_TIMEOUT_S + 5):
        done = await trio.run_process(
            host.ssh_argv(["true"], verbose=True), capture_stdout=True, capture_stderr=True,
            check=False,
        )  # fmt: skip
        said = done.stderr.decode(errors="replace")
        found = re.search(r"Server host key: (\S+) (SHA256:[A-Za-z0-9+/=]+)", said)
        if found:
            return f"{found.group(1)} {found.group(2)}"
    return ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
