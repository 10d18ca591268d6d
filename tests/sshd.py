"""A real OpenSSH server on loopback for a user of its own: the remote machine of the SSH tests.

    with running_sshd() as box:
        box.host()          # remote.Host of the alias "testbox", in box.config
        box.home            # the user's home, to look at what a command did there

What it makes, and removes again whatever happens: a system user (`rbee-t` and random hex) with a
home of its own under /tmp, holding an authorized key the tests made; an sshd (Debian's
openssh-server; `.ci/run` installs it) on a free port of 127.0.0.1 only, with a host key the
tests made, taking that user alone and by key alone; and, for the client side, the key, a
known_hosts holding the server's key, and an ssh config naming it all (passed with -F, so the
machine's own ~/.ssh is never read or written). Needs root (sshd switches to the user).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rbee_mesh.actors.keeper.remote import Host
from tests.clitools import free_port, stop_process
from tests.skips import skip_or_fail

SSHD = Path("/usr/sbin/sshd")
ALIAS = "testbox"


@dataclass
class Sshd:
    port: int
    user: str
    home: Path
    #: The client's files: its key, its known_hosts, its ssh config.
    key: Path
    known_hosts: Path
    config: Path
    #: The server's host key (the public half's file).
    host_key: Path

    def host(self, text: str = ALIAS, *, config: Path | None = None) -> Host:
        return Host.parse(text, config=config or self.config)

    def client_config(self, directory: Path, *, key: Path, known_hosts: Path) -> Path:
        """Another ssh config for this server: the client offers `key` and trusts `known_hosts`."""
        return write_client_config(directory, self.port, self.user, key, known_hosts)

    @contextlib.contextmanager
    def environment(self, **variables: str) -> Iterator[None]:
        """The user's sessions get `variables` (~/.ssh/environment, which this sshd reads)."""
        path = self.home / ".ssh" / "environment"
        path.write_text("".join(f"{name}={value}\n" for name, value in variables.items()))
        try:
            yield
        finally:
            path.unlink()

    def fingerprint(self) -> str:
        """The server's host key fingerprint, as ssh-keygen prints it (SHA256:...)."""
        out = subprocess.run(
            ["ssh-keygen", "-lf", str(self.host_key)], capture_output=True, text=True, check=True
        ).stdout
        return out.split()[1]


def write_client_config(
    directory: Path, port: int, user: str, key: Path, known_hosts: Path
) -> Path:
    """An ssh config naming the server `testbox`; for any host, the client offers `key` alone
    (no agent) and trusts `known_hosts` alone."""
    path = directory / f"config-{secrets.token_hex(3)}"
    path.write_text(
        f"Host {ALIAS}\n"
        f"    HostName 127.0.0.1\n    Port {port}\n    User {user}\n"
        f"Host *\n"
        f"    IdentityFile {key}\n    IdentitiesOnly yes\n    IdentityAgent none\n"
        f"    UserKnownHostsFile {known_hosts}\n    GlobalKnownHostsFile /dev/null\n"
    )
    path.chmod(0o600)
    return path


def make_key(path: Path) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rbee-test", "-f", str(path)],
        check=True,
    )
    return path


@contextlib.contextmanager
def running_sshd() -> Iterator[Sshd]:
    if os.geteuid() != 0:
        skip_or_fail("an sshd for another user needs root")
    if not SSHD.exists() or shutil.which("ssh") is None:
        skip_or_fail("no OpenSSH server (apt-get install openssh-server; .ci/run does)")
    user = f"rbee-t{secrets.token_hex(3)}"
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rbee-sshd-")))
        homes = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rbee-homes-")))
        homes.chmod(0o755)
        home = homes / user
        # "*": no password, and not locked (sshd refuses a locked account even a key).
        adding = ["useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/sh"]
        subprocess.run([*adding, "--password", "*", user], check=True)
        stack.callback(_remove_user, user)
        key = make_key(work / "client_ed25519")
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        (ssh_dir / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
        (ssh_dir / "authorized_keys").chmod(0o600)
        subprocess.run(["chown", "-R", f"{user}:{user}", str(ssh_dir)], check=True)
        host_key = make_key(work / "host_ed25519")
        port = free_port()
        server_config = work / "sshd_config"
        server_config.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"PidFile {work / 'sshd.pid'}\nAuthorizedKeysFile .ssh/authorized_keys\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin no\n"
            f"AllowUsers {user}\nStrictModes yes\nPermitUserEnvironment yes\n"
        )
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation
        server = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(server_config)],
            stdout=subprocess.DEVNULL,
            stderr=(work / "sshd.log").open("w"),
        )
        stack.callback(stop_process, server)
        _wait_for(lambda: _listens(port), server, f"sshd on port {port}")
        known_hosts = work / "known_hosts"
        public = host_key.with_suffix(".pub").read_text().split()
        known_hosts.write_text(f"[127.0.0.1]:{port} {public[0]} {public[1]}\n")
        config = write_client_config(work, port, user, key, known_hosts)
        yield Sshd(port, user, home, key, known_hosts, config, host_key.with_suffix(".pub"))


def _wait_for(
    ready: Callable[[], bool], process: subprocess.Popen[bytes], what: str, timeout_s: float = 20
) -> None:
    """Until `ready()` (another process: no event to wait on, so a bounded poll)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        if ready():
            return
        time.sleep(0.02)
    raise RuntimeError(f"no {what} within {timeout_s:g}s")


def _listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
    except OSError:
        return False
    return True


def _remove_user(user: str) -> None:
    """The user, every process of theirs, and their home."""
    subprocess.run(["pkill", "-KILL", "-u", user], check=False)
    subprocess.run(["userdel", "--remove", user], check=False, capture_output=True)


@contextlib.contextmanager
def user_manager(box: Sshd) -> Iterator[dict[str, str]]:
    """A systemd user manager (`systemd --user`) for the box's user, as logind starts one; with
    no logind to stop it at their last logout, it runs until this block ends, as lingering
    does. Yields what their sessions need to reach it (XDG_RUNTIME_DIR).

    This machine need not run systemd as PID 1: the manager runs in a mount namespace of its own
    where /run/systemd/system exists (what systemd looks at to know it was booted with), in a
    cgroup of each hierarchy that it may manage (delegated to the user, as logind does)."""
    systemd = Path("/lib/systemd/systemd")
    if not systemd.exists() or shutil.which("systemctl") is None:
        skip_or_fail("no systemd (apt-get install systemd; .ci/run does)")
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    hierarchies = [  # cgroup v2's, and v1's own of systemd (where the two are mixed)
        Path(mount[1])
        for mount in mounts
        if mount[2] == "cgroup2" or (mount[2] == "cgroup" and "name=systemd" in mount[3])
    ]
    if not hierarchies:
        skip_or_fail("no cgroup hierarchy to delegate to a systemd user manager")
    uid = pwd.getpwnam(box.user).pw_uid
    groups = [path / f"rbee-{box.user}" for path in hierarchies]
    with contextlib.ExitStack() as stack:
        runtime = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rbee-run-")))
        os.chown(runtime, uid, uid)
        stack.callback(_remove_cgroups, groups)
        for group in groups:
            group.mkdir()
            subprocess.run(["chown", "-R", f"{box.user}:{box.user}", str(group)], check=True)
        enter = "; ".join(f"echo $$ > {group}/cgroup.procs" for group in groups)
        setup = f"mount -t tmpfs rbee-run /run && mkdir -p /run/systemd/system && {enter}"
        manager = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f'{setup} && exec setpriv --reuid={uid} --regid={uid} --init-groups "$@"', "-",
             "env", "-i", f"HOME={box.home}", f"USER={box.user}", f"LOGNAME={box.user}",
             f"XDG_RUNTIME_DIR={runtime}", "PATH=/usr/local/bin:/usr/bin:/bin",
             str(systemd), "--user"],
            stdout=subprocess.DEVNULL,
            stderr=stack.enter_context((runtime / "manager.log").open("w")),
        )  # fmt: skip
        stack.callback(stop_process, manager)
        _wait_for(lambda: (runtime / "systemd" / "private").exists(), manager, "its socket")
        yield {"XDG_RUNTIME_DIR": str(runtime)}


def _remove_cgroups(groups: list[Path]) -> None:
    """Every process left in `groups` killed (again, while any forks), then the groups,
    innermost first."""
    deadline = time.monotonic() + 10
    for group in groups:
        for directory in [*sorted(group.rglob("*/"), key=lambda p: -len(p.parts)), group]:
            while directory.exists():
                _kill_all_in(directory)
                try:
                    directory.rmdir()
                except OSError:  # (its killed processes not yet gone)
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)


def _kill_all_in(group: Path) -> None:
    for procs in group.rglob("cgroup.procs"):
        for pid in procs.read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
