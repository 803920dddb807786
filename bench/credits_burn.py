"""Burn-engine cost (issue 25): one customer's month of minute windows, in memory.

    .venv/bin/python -m bench.credits_burn

Two grants (one expiring mid-month); 43,200 minute windows, each changing cost three
times in order (the worker's common case: the newest window grows); then 200 late
spends up to a day back; then one 29 days back; then a full recompute of the same
inputs, which must equal what the incremental book holds (self-check, exit 1 if not).
"""

from __future__ import annotations

import random
import sys
import time
from decimal import Decimal

from meterstream.credits.burn import CreditBook, compute_ledger
from meterstream.credits.grants import Grant
from meterstream.credits.spend import SpendChange

MINUTE = 60_000
WINDOWS = 43_200  # minute windows in 30 days


def main() -> int:
    book = CreditBook("acme", "usd")
    book.add_grant(
        Grant("promo", "acme", Decimal(100), "usd", 0, expires_ms=15 * 86_400_000, priority=10),
        0,
    )
    book.add_grant(Grant("paid", "acme", Decimal(1000), "usd", 0, priority=50), 0)
    revision = changes = 0
    start = time.perf_counter()
    for w in range(WINDOWS):
        level = Decimal(0)
        for _ in range(3):
            revision += 1
            level += Decimal("0.0123")
            change = SpendChange(
                "acme", f"tokens|{w * MINUTE}|", w * MINUTE, level, "usd", revision
            )
            book.apply(change, w * MINUTE + 59_000)
            changes += 1
    elapsed = time.perf_counter() - start
    print(f"in order: {changes} changes, {elapsed / changes * 1e6:.1f} us per change")

    rnd = random.Random(1)
    now = WINDOWS * MINUTE
    late = []
    for i in range(200):
        w = rnd.randrange(WINDOWS - 1440, WINDOWS)
        revision += 1
        late.append(
            SpendChange("acme", f"late|{i}", w * MINUTE + 1, Decimal("0.5"), "usd", revision)
        )
    start = time.perf_counter()
    for change in late:
        book.apply(change, now)
    elapsed = time.perf_counter() - start
    print(f"late (up to 1 day back): {elapsed / len(late) * 1e3:.2f} ms per change")

    revision += 1
    start = time.perf_counter()
    step = book.apply(
        SpendChange("acme", "late|month", 100 * MINUTE, Decimal("0.5"), "usd", revision), now
    )
    elapsed = time.perf_counter() - start
    print(f"late (29 days back): {elapsed * 1e3:.0f} ms, {len(step.entries)} correcting entries")

    start = time.perf_counter()
    full = compute_ledger(
        "acme", "usd", grants=book.grants.values(), spends=book.spends.values(), now_ms=now
    )
    elapsed = time.perf_counter() - start
    same = full == book.canonical()
    print(f"full recompute of {len(book.spends)} sources: {elapsed * 1e3:.0f} ms; equal: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
