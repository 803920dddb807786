"""What the poison-pill checks (issue #20, items 3 and 6) cost on the bench's events.

``python -m bench.poison_checks [--events N]``

In one process, on the events of bench/load.py (the load of ``make bench``), CPU time,
the minimum of 15 alternating rounds:

- ``parse_event`` with the repeated-key pre-check, and with it switched off;
- the events API's ``check_body`` on bodies of 100 of them, likewise;
- ``contributions`` then ``enforce_limits`` (the range decisions) on batches of 5,000
  with no base state (the steady state: no total near a limit), and ``contributions``
  alone.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from bench.load import closed_end_ms, generate
from meterstream import events as ev_module
from meterstream.api import ingest
from meterstream.meters import fold
from meterstream.meters.config import load_meters

HORIZON_MS = 7 * 86_400_000


def best(fn: Callable[[], object], rounds: list[float]) -> None:
    started = time.process_time()
    fn()
    rounds.append(time.process_time() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    args = parser.parse_args()
    now = time.time_ns() // 1_000_000
    records = generate(args.events, 1_000, end_ms=closed_end_ms(now)).records
    bodies = [
        b'{"events":[' + b",".join(v for _, v in records[i : i + 100]) + b"]}"
        for i in range(0, len(records), 100)
    ]
    meters = load_meters("bench/meters.yaml")
    parsed = [
        ev_module.parse_event(v, record_timestamp_ms=now, now_ms=now, horizon_ms=HORIZON_MS)
        for _, v in records
    ]
    events = [e for e in parsed if isinstance(e, ev_module.UsageEvent)]
    batches = [events[i : i + 5000] for i in range(0, len(events), 5000)]

    def parse_all() -> None:
        for key, value in records:
            ev_module.parse_event(
                value, record_timestamp_ms=now, now_ms=now, horizon_ms=HORIZON_MS, key=key
            )

    def check_all() -> None:
        for body in bodies:
            ingest.check_body(body, now_ms=now, horizon_ms=HORIZON_MS)

    def windows() -> None:
        for batch in batches:
            fold.enforce_limits(meters, fold.contributions(meters, batch), {}, batch)

    def contributions_only() -> None:
        for batch in batches:
            fold.contributions(meters, batch)

    real = (ev_module.repeated_key_problems, ingest.may_repeat_keys)
    rounds: dict[str, list[float]] = {}
    for _ in range(15):
        for label, check in (("with", True), ("without", False)):
            if check:
                ev_module.repeated_key_problems, ingest.may_repeat_keys = real
            else:
                ev_module.repeated_key_problems = lambda raw, doc, event: []
                ingest.may_repeat_keys = lambda raw, colons: False
            best(parse_all, rounds.setdefault(f"parse_event {label}", []))
            best(check_all, rounds.setdefault(f"check_body {label}", []))
        ev_module.repeated_key_problems, ingest.may_repeat_keys = real
        best(windows, rounds.setdefault("contributions + enforce_limits", []))
        best(contributions_only, rounds.setdefault("contributions", []))
    for name, times in rounds.items():
        n = len(records) if not name.startswith("contributions") else len(events)
        print(f"{name:34} {min(times) / n * 1e6:6.2f} us/event (CPU, min of {len(times)})")


if __name__ == "__main__":
    main()
