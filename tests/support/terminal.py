"""Reading a pseudo-terminal's master side in tests."""

from __future__ import annotations

import select


def readable(fd: int, timeout_s: float) -> bool:
    """Whether ``fd`` has data (or its other side closed) within ``timeout_s``.

    ``poll``, not ``select``: a test process that has opened many files (a long session of
    the suite) gets descriptors past FD_SETSIZE (1024), which ``select`` refuses with
    "filedescriptor out of range in select()"."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(int(timeout_s * 1000)))
