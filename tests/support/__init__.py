"""Helpers shared by several test files: meters files written as one line a meter
(``meters``), reading a topic back (``kafka``), and the ``meterstream`` commands and
sockets the tests poke (``cli``). The stack itself (broker, worker processes, a test's
slice) is tests/harness.py."""
