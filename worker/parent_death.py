"""Processes that must not outlive the one that started them, even when it is SIGKILLed.

Linux's parent-death signal (`prctl(PR_SET_PDEATHSIG)`): the kernel sends the child a
signal when the *thread* that forked it exits, however it exits, so start such children
from a thread that lives as long as the parent (the main thread). It survives `exec`, so
it also covers a separate binary such as redis-server. Elsewhere it is a no-op, and the
children are stopped only by the orderly shutdown of `trainjob serve` and the worker.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def dies_with(parent: int, signum: signal.Signals) -> Callable[[], None]:
    """A function to call first thing in a child forked by `parent`: from then on the
    child gets `signum` when `parent` exits. Usable as subprocess.Popen's `preexec_fn`:
    libc is looked up here, before the fork, so only the prctl call runs between fork
    and exec."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def in_the_child() -> None:
        if prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        # The parent may have died between the fork and the prctl: no signal would come.
        if os.getppid() != parent:
            os.kill(os.getpid(), signum)

    return in_the_child
