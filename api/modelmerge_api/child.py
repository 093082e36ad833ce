"""Exec a command that dies with its parent: `python -m modelmerge_api.child PARENT_PID CMD...`.

The local backend starts each merge through this shim, which sets PR_SET_PDEATHSIG (Linux) before exec'ing
`modelmerge merge`, so a merge never outlives an API server that was killed outright. Elsewhere it just execs."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, command = int(sys.argv[1]), sys.argv[2:]
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the server died before the signal was armed
        sys.exit(70)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
