"""Ctrl-C for ``make run``: the terminal's foreground for meterstream alone.

A terminal sends Ctrl-C (SIGINT) to its whole foreground process group. Under
``make run`` that group is make's, and make answers SIGINT by waiting for its
child and then reporting ``make: *** [Makefile:NN: run] Interrupt`` and dying by
the same signal (exit status 130), however cleanly meterstream stopped.

:func:`own_foreground` moves this process into a process group of its own and
makes that group the terminal's foreground, so a Ctrl-C reaches meterstream
only: it stops cleanly, gives the terminal back to the group it came from, and
exits 0, and so does make. It does this only when it is needed and safe: stdin
and stdout are the terminal, this process is not already a process-group
leader (a shell with job control makes every command one, so run from a shell
nothing changes) and its group is the terminal's foreground (make started it
in the foreground). Ctrl-Z is ignored meanwhile (a stopped group of ours would
hold the terminal while make and the shell wait); SIGTTOU is ignored while the
terminal changes hands. If this process dies without giving the terminal back,
the shell takes it back when make exits, as it does after every job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator


def _foreground_candidate() -> tuple[int, int] | None:
    """(terminal fd, our process group) when taking the foreground is needed and safe."""
    try:
        fd = sys.stdin.fileno()
        if not (os.isatty(fd) and sys.stdout.isatty()):
            return None
        group = os.getpgrp()
        if os.getpid() == group or os.tcgetpgrp(fd) != group:
            return None
    except (OSError, ValueError, AttributeError):
        return None
    return fd, group


@contextlib.contextmanager
def own_foreground() -> Iterator[bool]:
    """Hold the terminal's foreground (see the module docstring); yields whether it did."""
    candidate = _foreground_candidate()
    if candidate is None:
        yield False
        return
    fd, parent_group = candidate
    old_ttou = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    old_tstp = signal.signal(signal.SIGTSTP, signal.SIG_IGN)
    taken = False
    try:
        os.setpgid(0, 0)
        os.tcsetpgrp(fd, os.getpgrp())
        taken = True
    except OSError:
        with contextlib.suppress(OSError):
            os.setpgid(0, parent_group)
    try:
        yield taken
    finally:
        if taken:
            with contextlib.suppress(OSError):
                os.tcsetpgrp(fd, parent_group)
        signal.signal(signal.SIGTTOU, old_ttou)
        signal.signal(signal.SIGTSTP, old_tstp)
