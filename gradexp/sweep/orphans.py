"""A sweep's helper processes end with the process that made them, however it ends: a SIGKILLed sweep
left its fork server and workers running for minutes (issue 25), their SIGINT and SIGTERM blocked
(execute._mp_context), and a resume meanwhile ran their points a second time.

Linux's parent-death signal does it: the fork server asks for SIGKILL when the sweep process dies
(gradexp.sweep._forkserver, imported there first), and each worker when the fork server dies
(execute._init_worker), so that the chain unwinds from the sweep down. A fork does not inherit the
setting, hence each process asks for itself. Elsewhere (macOS, Windows: spawn) nothing is set."""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux); if the parent is already gone, end now."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request was made: no signal will come
        os._exit(1)
