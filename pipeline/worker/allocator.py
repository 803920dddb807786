"""glibc's malloc thresholds held at their starting values for a long-running worker.

glibc maps blocks of 128 KiB and more on their own and returns the top of its heap
to the system past 128 KiB free; but each time a mapped block is freed it raises
both thresholds to that block's size (up to 32 and 64 MB). A worker frees large
buffers all the time (fetched record batches, insert payloads, changelog record
batches), so after a few minutes those buffers come from the heap, between
long-lived objects, and their space stays resident once they are freed. Measured
in a 10-minute half-load soak on RocksDB (``mallinfo2``): the heap grew from ~90 to
~125 MB, ~50 MB of it free; with the thresholds fixed, ~85 MB with 5-10 MB free.

Fixed thresholds (``mallopt``, the same as glibc's ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` environment variables) stop that. An operator's own
variable wins; other C libraries (musl, macOS) are left alone. Memory that other
allocators hold (the embedded ClickHouse engine's jemalloc) is not affected.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value of both
PARAMETERS = {
    "MALLOC_MMAP_THRESHOLD_": M_MMAP_THRESHOLD,
    "MALLOC_TRIM_THRESHOLD_": M_TRIM_THRESHOLD,
}


def tune_allocator() -> list[str]:
    """Fix glibc's mmap and trim thresholds at 128 KiB, each unless the environment
    sets it; returns the variables set this way (empty on other C libraries)."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return []
    return [
        name
        for name, parameter in PARAMETERS.items()
        if name not in os.environ and mallopt(parameter, THRESHOLD_BYTES) == 1
    ]
