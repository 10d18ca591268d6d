"""`rbee-mesh`'s exit codes (README.md), in a module of their own: the command tree (cli.py)
and what its commands run (session.py) both end with them, and the tree imports nothing heavy.

0 done; 1 the job failed; 2 invalid usage or request; 3 the queen (or the actor a job needs) is
unreachable; 4 not found; 5 timed out; 6 not permitted; 130 cancelled (Ctrl-C). Over SSH
(`hive install HOST`, `--ssh HOST`): 10 the host is unreachable or its name does not resolve;
11 it refused every key; 12 its host key is unknown or changed; 13 it has no Python 3.11; 14 a
step failed there; 15 a port the hive needs is in use there; 4 rbee-mesh is not installed there.
"""

from __future__ import annotations

from rbee_mesh.protocol.errors import ErrorCode

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 4
EXIT_TIMEOUT = 5
EXIT_FORBIDDEN = 6
EXIT_CANCELLED = 130
EXIT_HOST_UNREACHABLE = 10
EXIT_SSH_REFUSED = 11
EXIT_HOST_KEY = 12
EXIT_NO_PYTHON = 13
EXIT_INSTALL_FAILED = 14
EXIT_PORT_IN_USE = 15

#: The exit code of a failure over SSH, by its name (remote.SshFailure, install.InstallFailure).
EXIT_FOR_REMOTE = {
    "unresolvable": EXIT_HOST_UNREACHABLE,
    "unreachable": EXIT_HOST_UNREACHABLE,
    "auth-refused": EXIT_SSH_REFUSED,
    "host-key-unknown": EXIT_HOST_KEY,
    "host-key-changed": EXIT_HOST_KEY,
    "no-python": EXIT_NO_PYTHON,
    "not-installed": EXIT_NOT_FOUND,
    "step-failed": EXIT_INSTALL_FAILED,
    "port-in-use": EXIT_PORT_IN_USE,
}

#: The exit code of a job or command that ended with an error of this code (else EXIT_FAILED).
EXIT_FOR_CODE = {
    ErrorCode.INVALID_REQUEST: EXIT_USAGE,
    ErrorCode.UNSUPPORTED_VERSION: EXIT_USAGE,
    ErrorCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    ErrorCode.NOT_FOUND: EXIT_NOT_FOUND,
    ErrorCode.TIMEOUT: EXIT_TIMEOUT,
    ErrorCode.FORBIDDEN: EXIT_FORBIDDEN,
    ErrorCode.CANCELLED: EXIT_CANCELLED,
}
