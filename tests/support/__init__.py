"""Helpers shared by several test files: meters files written as one line a meter
(``meters``), reading a topic back (``kafka``), and the ``meterstream`` commands and
sockets the tests poke (``cli``). The stack itself (broker, worker processes, a test's
slice) is tests/harness.py."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository's root: its example files (meters, plans), Makefile and deploy/."""
