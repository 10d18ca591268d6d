"""A daemon as a systemd user unit (`hive start --service systemd`): systemd starts it again if
it fails, and at boot, and `hive stop` disables and removes the unit again.

It is driven with `systemctl --user` (systemd's own client; its D-Bus API would need a D-Bus
library for four calls). The unit runs the same `rbee-mesh <name> start --foreground` that a
detached daemon runs, with the same state directory pinned (RBEE_MESH_HOME), its output appended
to the same log, and the rbee-mesh, Hugging Face and CUDA settings of the shell that started it
(the user manager's environment is not that shell's). The unit file is the user's only (mode
0600: such settings may hold a token).

A user manager is of use only if it outlives the person's sessions: where logind runs it for
them, that is "lingering" (`loginctl enable-linger`, which usually needs an administrator);
`unusable()` says why not where it is not.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

from rbee_mesh.actors.keeper import daemon

#: The variables of the starting shell that a unit keeps, by prefix.
KEPT_VARIABLES = ("RBEE_MESH_", "HF_", "HUGGINGFACE_", "CUDA_")
#: How long one systemctl call may take (enable --now waits for the unit to start).
CALL_TIMEOUT_S = 30.0


class SystemdError(Exception):
    """A systemctl call failed; the message says which and what it printed."""


def unit_name(name: str) -> str:
    return f"rbee-mesh-{name}.service"


def unit_path(name: str) -> Path:
    """Where a user manager looks for a user's units (its own environment decides, not this
    shell's XDG_CONFIG_HOME: the default is the one both agree on)."""
    return Path.home() / ".config" / "systemd" / "user" / unit_name(name)


def unusable() -> str | None:
    """Why a user unit would not do here (None: it would): no systemctl, no user manager that
    answers, or one that stops at this user's last logout."""
    if shutil.which("systemctl") is None:
        return "systemd is not installed here"
    if _systemctl("show-environment", check=False).returncode != 0:
        return "no systemd user manager answers here"
    user = pwd.getpwuid(os.getuid()).pw_name
    linger = _run(["loginctl", "show-user", user, "--property=Linger", "--value"], check=False)
    if linger.returncode == 0 and linger.stdout.strip() == "no":  # (no logind: no sessions)
        return (
            f"lingering is off for {user}, so the user manager stops at their last logout "
            f"(`sudo loginctl enable-linger {user}` turns it on)"
        )
    return None


def install(name: str, argv: list[str]) -> int:
    """Write the unit of `rbee-mesh <argv>`, enable it and start it; the pid it runs as."""
    path = unit_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = daemon.state_dir().resolve()
    log = str(daemon.log_path(name).resolve())
    if not log.isprintable():
        raise SystemdError(f"the log's path {log!r} cannot be written in a unit file")
    kept = {k: v for k, v in os.environ.items() if k.startswith(KEPT_VARIABLES) and _fits(v)}
    kept["RBEE_MESH_HOME"] = str(state)
    command = " ".join(_quoted(w, command=True) for w in [sys.executable, "-m", "rbee_mesh", *argv])
    text = (
        f"[Unit]\nDescription=rbee-mesh {name}\n\n"
        # exec: started once `rbee-mesh` runs, so the pid shown is the daemon's from the start.
        f"[Service]\nType=exec\nExecStart={command}\n"
        + "".join(f"Environment={_quoted(f'{k}={v}')}\n" for k, v in sorted(kept.items()))
        + f"StandardOutput=append:{log.replace('%', '%%')}\n"
        f"StandardError=append:{log.replace('%', '%%')}\n"
        "Restart=on-failure\nRestartSec=2\nTimeoutStopSec=15\n\n"
        "[Install]\nWantedBy=default.target\n"
    )
    _write_private(path, text)  # (the shell's settings may hold a token)
    _systemctl("daemon-reload")
    _systemctl("reset-failed", unit_name(name), check=False)  # (a crash loop's start limit)
    _systemctl("enable", "--now", unit_name(name))
    shown = _systemctl("show", "--property=MainPID", "--value", unit_name(name))
    return int(shown.stdout.strip() or 0)


def remove(name: str) -> bool:
    """Stop and disable the unit and remove its file; whether there was one. Where no user
    manager answers, the unit's files are removed all the same (it starts nothing then)."""
    path = unit_path(name)
    if not path.exists():
        return False
    if _systemctl("show-environment", check=False).returncode == 0:
        _systemctl("disable", "--now", unit_name(name))  # SystemdError if it will not
    else:
        (path.parent / "default.target.wants" / unit_name(name)).unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    _systemctl("daemon-reload", check=False)
    return True


def _write_private(path: Path, text: str) -> None:
    """`text` to `path`, atomically, readable by this user alone from its first byte."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fits(value: str) -> bool:
    """Whether a setting's value can go into a unit file as it is (printable UTF-8)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return value.isprintable()


def _quoted(word: str, *, command: bool = False) -> str:
    """`word` as one word of a unit file's assignment or, with `command`, its command line,
    where systemd also expands $VARIABLES (systemd.syntax(7), systemd.service(5)); a control
    character as its C escape, which systemd turns back (never a line break in the file)."""
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    escaped = "".join(c if c.isprintable() else _escape(c) for c in escaped)
    return '"' + (escaped.replace("$", "$$") if command else escaped) + '"'


def _escape(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def _systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["systemctl", "--user", *args], check=check)


def _run(argv: list[str], *, check: bool) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=CALL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        if check:
            raise SystemdError(f"`{' '.join(argv)}` failed: {exc}") from exc
        return subprocess.CompletedProcess(argv, 1, "", str(exc))
    if check and done.returncode != 0:
        said = (done.stderr or done.stdout).strip()
        raise SystemdError(f"`{' '.join(argv)}` failed: {said}")
    return done
