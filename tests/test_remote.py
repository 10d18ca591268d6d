"""Commands on another machine over SSH (`rbee_mesh.actors.keeper.remote`), against a real
OpenSSH server on loopback (tests/sshd.py): what runs, and every way ssh can refuse, each told
apart and said so that a person knows what to do."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from rbee_mesh.actors.keeper.remote import Host, SshError, SshFailure, run
from tests import netns
from tests.clitools import free_port
from tests.skips import skip_or_fail
from tests.sshd import ALIAS, Sshd, make_key, running_sshd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def box() -> Iterator[Sshd]:
    with running_sshd() as sshd:
        yield sshd


async def refusal(host: Host) -> SshError:
    with trio.fail_after(30), pytest.raises(SshError) as info:
        await run(host, ["true"])
    return info.value


async def test_a_command_runs_as_the_user_with_its_arguments_unchanged(box: Sshd) -> None:
    with trio.fail_after(30):
        ran = await run(box.host(), ["printf", "%s|", "a b", "it's", "$HOME", ""])
        home = await run(box.host(), ["sh", "-c", 'echo "$(id -un) $HOME"'])
    assert (ran.status, ran.stdout) == (0, "a b|it's|$HOME||")
    assert home.stdout.split() == [box.user, str(box.home)]


async def test_stdin_reaches_the_command_and_its_own_failure_is_its_status(box: Sshd) -> None:
    with trio.fail_after(30):
        echoed = await run(box.host(), ["cat"], stdin=b"a wheel's bytes\x00\xff")
        failed = await run(box.host(), ["sh", "-c", "echo why >&2; exit 3"])
    assert echoed.stdout == "a wheel's bytes\x00\ufffd"
    assert (failed.status, failed.stderr.strip()) == (3, "why")


async def test_user_at_host_colon_port_reaches_the_same_box(box: Sshd) -> None:
    with trio.fail_after(30):
        ran = await run(box.host(f"{box.user}@127.0.0.1:{box.port}"), ["id", "-un"])
    assert ran.stdout.strip() == box.user


async def test_a_proxyjump_in_the_ssh_config_is_followed(box: Sshd, tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(
        # "jumped" is reached through "testbox" (the same box: ssh there, then a channel on).
        f"Host jumped\n    HostName 127.0.0.1\n    Port {box.port}\n    User {box.user}\n"
        f"    ProxyJump testbox\n"
        f"Match all\n    Include {box.config}\n"
    )
    config.chmod(0o600)
    with trio.fail_after(30):
        ran = await run(box.host("jumped", config=config), ["sh", "-c", "echo $SSH_CONNECTION"])
    assert ran.stdout.split()[0] == "127.0.0.1"  # it came from the box itself: the jump


@pytest.fixture
def agent(box: Sshd, tmp_path: Path) -> Iterator[Path]:
    """An ssh-agent holding the box's key: its socket."""
    sock = tmp_path / "agent.sock"
    started = subprocess.run(["ssh-agent", "-a", str(sock)], capture_output=True, text=True)
    found = re.search(r"SSH_AGENT_PID=(\d+)", started.stdout)
    assert found is not None, started.stderr
    try:
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(box.key)], env=env, check=True, capture_output=True)
        yield sock
    finally:
        os.kill(int(found.group(1)), signal.SIGTERM)


async def test_a_key_from_the_agent_is_offered(box: Sshd, agent: Path, tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(  # no key file named: the agent's key, or none
        f"Host {ALIAS}\n    HostName 127.0.0.1\n    Port {box.port}\n    User {box.user}\n"
        f"    IdentityAgent {agent}\n    IdentityFile none\n"
        f"    UserKnownHostsFile {box.known_hosts}\n    GlobalKnownHostsFile /dev/null\n"
    )
    config.chmod(0o600)
    with trio.fail_after(30):
        ran = await run(box.host(config=config), ["id", "-un"])
    assert ran.stdout.strip() == box.user


async def test_a_closed_port_is_unreachable(box: Sshd) -> None:
    error = await refusal(box.host(f"{box.user}@127.0.0.1:{free_port()}"))
    assert error.failure is SshFailure.UNREACHABLE
    assert "cannot reach" in error.message and "Connection refused" in error.message


async def test_a_key_the_box_does_not_know_is_refused(box: Sshd, tmp_path: Path) -> None:
    stranger = make_key(tmp_path / "stranger")
    config = box.client_config(tmp_path, key=stranger, known_hosts=box.known_hosts)
    error = await refusal(box.host(config=config))
    assert error.failure is SshFailure.AUTH_REFUSED
    assert "refused every key" in error.message and "publickey" in error.message


async def test_an_unknown_host_key_is_refused_naming_its_fingerprint(
    box: Sshd, tmp_path: Path
) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    error = await refusal(
        box.host(config=box.client_config(tmp_path, key=box.key, known_hosts=empty))
    )
    assert error.failure is SshFailure.HOST_KEY_UNKNOWN
    assert box.fingerprint() in error.message
    assert empty.read_text() == ""  # never added


async def test_a_changed_host_key_is_refused_naming_the_new_one(box: Sshd, tmp_path: Path) -> None:
    other = make_key(tmp_path / "other_host").with_suffix(".pub").read_text().split()
    recorded = tmp_path / "known_hosts"
    recorded.write_text(f"[127.0.0.1]:{box.port} {other[0]} {other[1]}\n")
    config = box.client_config(tmp_path, key=box.key, known_hosts=recorded)
    error = await refusal(box.host(config=config))
    assert error.failure is SshFailure.HOST_KEY_CHANGED
    assert "CHANGED" in error.message and box.fingerprint() in error.message


#: Runs remote.run on the host named by argv[1] and prints the failure (in a namespace below).
_RUN_AND_SAY = """
import sys, trio
from rbee_mesh.actors.keeper.remote import Host, SshError, run
try:
    trio.run(run, Host.parse(sys.argv[1]), ["true"])
except SshError as exc:
    print(exc.failure, exc.message, sep="|")
"""


def test_a_name_that_does_not_resolve_is_told_apart() -> None:
    """In a network namespace of its own, with no interface up: the name lookup fails there and
    no query leaves this machine."""
    if (reason := netns.unavailable_reason()) is not None:
        skip_or_fail(reason)
    name = f"rbee-dns-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        said = subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, "-c", _RUN_AND_SAY, "gpu-box.invalid"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout.strip()  # fmt: skip
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
    failure, message = said.split("|")
    assert failure == SshFailure.UNRESOLVABLE
    assert message.startswith("cannot resolve gpu-box.invalid: ")


@pytest.mark.parametrize(
    ("text", "destination", "port"),
    [
        ("gpu1", "gpu1", None),
        ("ana@gpu1", "ana@gpu1", None),
        ("gpu1:2222", "gpu1", 2222),
        ("ana@10.0.0.7:22", "ana@10.0.0.7", 22),
        ("[fe80::1]:2200", "fe80::1", 2200),
        ("ana@[::1]", "ana@::1", None),
        ("fe80::1", "fe80::1", None),
    ],
)
def test_a_host_is_what_ssh_takes_and_host_colon_port(
    text: str, destination: str, port: int | None
) -> None:
    host = Host.parse(text)
    assert (host.destination, host.port) == (destination, port)
    argv = host.ssh_argv(["true"])
    assert argv[argv.index("--") + 1] == destination


@pytest.mark.parametrize("text", ["", "-oProxyCommand=touch /tmp/x", "a b", "gpu1:", "gpu1:x",
                                  "gpu1:70000", "ana@"])  # fmt: skip
def test_what_is_not_a_host_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Host.parse(text)
