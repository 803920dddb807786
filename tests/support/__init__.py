"""Helpers shared by several test files: meters files written as one line a meter
(``meters``), reading a topic back (``kafka``), the ``meterstream`` commands and sockets
the tests poke (``cli``), and here the repository's root and the shipped migrations. The
stack itself (broker, worker processes, a test's slice) is tests/harness.py; its fixtures
are tests/conftest.py."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository's root: its example files (meters, plans), Makefile and deploy/."""

MIGRATIONS = [
    "0001_usage_events",
    "0002_meter_windows",
    "0003_rejected_events",
    "0004_stripe_meter_events",
    "0005_meter_usage_views",
    "0006_usage_events_meters",
    "0007_stripe_customers",
    "0008_usage_events_refused_meters",
    "0009_prices",
    "0010_credits",
    "0011_corrections",
    "0012_credit_purchases",
    "0013_stripe_corrections",
]
"""The ClickHouse migrations this version ships, in the order they apply."""
