"""The worker's glibc tuning: large transient buffers keep getting their own mapping
after one was freed, instead of joining the heap (meterstream.worker.allocator).

Each case runs in a fresh interpreter: the allocator's state is per process.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")
pytestmark = pytest.mark.skipif(not GLIBC, reason="needs glibc 2.33+ (mallinfo2)")

# Frees a 300 kB block (which, untuned, raises glibc's threshold above 200 kB), then
# holds a 200 kB block and prints how many mapped blocks that added.
PROBE = """
import ctypes, sys
from meterstream.worker.allocator import tune_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
tuned = ",".join(tune_allocator()) if sys.argv[1] == "tune" else "-"
first = bytearray(300_000)
del first
before = libc.mallinfo2().hblks
held = bytearray(200_000)
print(tuned, libc.mallinfo2().hblks - before)
"""


def glibc_defaults() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}


def probe(mode: str, env: dict[str, str]) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.split()
    return out[0], int(out[1])


def test_untuned_glibc_puts_a_large_block_in_the_heap_after_a_free() -> None:
    # the behaviour tune_allocator exists for (so the tuned case below can fail)
    assert probe("plain", glibc_defaults()) == ("-", 0)


def test_tuned_worker_maps_each_large_block() -> None:
    assert probe("tune", glibc_defaults()) == ("MALLOC_MMAP_THRESHOLD_,MALLOC_TRIM_THRESHOLD_", 1)


def test_an_operators_own_threshold_is_left_alone() -> None:
    env = {**glibc_defaults(), "MALLOC_MMAP_THRESHOLD_": "1048576"}
    # only the trim threshold is set; 200 kB stays under the operator's 1 MB
    assert probe("tune", env) == ("MALLOC_TRIM_THRESHOLD_", 0)
