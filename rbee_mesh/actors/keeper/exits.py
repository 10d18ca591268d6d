"""`rbee-mesh`'s exit codes (README.md), in a module of their own: the command tree (cli.py)
and what its commands run (session.py) both end with them, and the tree imports nothing heavy.

0 done; 1 the job failed; 2 invalid usage or request; 3 the queen (or the actor a job needs) is
unreachable; 4 not found; 5 timed out; 6 not permitted; 130 cancelled (Ctrl-C).
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
