"""The demo's own account of what earlier runs sent (files only: no broker)."""

from __future__ import annotations

import json
from pathlib import Path

from meterstream.embedded.demo.ledger import DemoLedger
from meterstream.embedded.demo.load import DemoLoad, Expected
from meterstream.meters.windows import month_bounds

NOW = 1_796_000_000_000  # 2026-11-29 (UTC)
DEC = month_bounds("2026-12")


def new_events(run_id: str, n: int, now_ms: int = NOW) -> list[dict]:
    records = DemoLoad(run_id, seed=1).next_batch(n, now_ms, live=False)
    return [r.event for r in records if r.event is not None]


def expected_of(events: list[dict]) -> Expected:
    out = Expected()
    for e in events:
        out.add_event(e)
    return out


def test_a_run_is_resent_until_folded_then_counted_from_the_ledger(tmp_path: Path) -> None:
    events = new_events("run-1", 500)
    log = DemoLedger.load(tmp_path, oldest_resendable_ms=0).open_log("run-1")
    log.write(events[:200])
    log.write(events[200:])
    log.close()

    # Not folded (the run stopped before the record held it): the next run resends it.
    ledger = DemoLedger.load(tmp_path, oldest_resendable_ms=0)
    assert [(p.run_id, p.events) for p in ledger.pending] == [("run-1", events)]
    assert ledger.expected.events == 0

    ledger.fold({"run-1": {"events": len(events)}}, expected_of(events), keep_from_ms=0)
    assert not (tmp_path / "runs" / "run-1.jsonl").exists()
    assert oct((tmp_path / "ledger.json").stat().st_mode & 0o777) == "0o600"

    again = DemoLedger.load(tmp_path, oldest_resendable_ms=0)
    assert again.pending == []
    assert again.expected.totals(0, 2**62) == expected_of(events).totals(0, 2**62)
    assert again.runs == {"run-1": {"events": len(events)}}


def test_a_crash_between_the_ledger_and_the_log_delete_does_not_count_twice(
    tmp_path: Path,
) -> None:
    events = new_events("run-1", 50)
    ledger = DemoLedger.load(tmp_path, oldest_resendable_ms=0)
    ledger.fold({"run-1": {"events": 50}}, expected_of(events), keep_from_ms=0)
    log = ledger.open_log("run-1")  # as if the delete never happened
    log.write(events)
    log.close()
    again = DemoLedger.load(tmp_path, oldest_resendable_ms=0)
    assert again.pending == []
    assert not (tmp_path / "runs" / "run-1.jsonl").exists()
    assert again.expected.events == len(events)


def test_a_torn_last_line_was_never_sent_and_is_skipped(tmp_path: Path) -> None:
    events = new_events("run-1", 20)
    log = DemoLedger.load(tmp_path, oldest_resendable_ms=0).open_log("run-1")
    log.write(events)
    log.close()
    with (tmp_path / "runs" / "run-1.jsonl").open("a") as out:
        out.write('{"customer_id": "demo-ac')
    ledger = DemoLedger.load(tmp_path, oldest_resendable_ms=0)
    assert ledger.pending[0].events == events


def test_logs_older_than_the_dedup_horizon_are_set_aside(tmp_path: Path) -> None:
    old = new_events("run-old", 10, now_ms=NOW - 8 * 86_400_000)
    log = DemoLedger.load(tmp_path, oldest_resendable_ms=0).open_log("run-old")
    log.write(old)
    log.close()
    ledger = DemoLedger.load(tmp_path, oldest_resendable_ms=NOW - 7 * 86_400_000)
    assert ledger.pending == [] and [r.run_id for r in ledger.expired] == ["run-old"]


def test_fold_keeps_the_current_and_previous_month_only(tmp_path: Path) -> None:
    october = new_events("r-oct", 30, now_ms=month_bounds("2026-10")[0] + 5 * 86_400_000)
    december = new_events("r-dec", 30, now_ms=DEC[0] + 5 * 86_400_000)
    ledger = DemoLedger.load(tmp_path, oldest_resendable_ms=0)
    ledger.fold(
        {"r-oct": {"events": 30, "last_ms": month_bounds("2026-10")[0]}},
        expected_of(october),
        keep_from_ms=0,
    )
    ledger.fold(
        {"r-dec": {"events": 30, "last_ms": DEC[0]}},
        expected_of(december),
        keep_from_ms=month_bounds("2026-11")[0],
    )
    data = json.loads((tmp_path / "ledger.json").read_text())
    assert list(data["runs"]) == ["r-dec"]
    again = DemoLedger.load(tmp_path, oldest_resendable_ms=0)
    assert again.expected.totals(*month_bounds("2026-10")) == {}
    assert again.expected.totals(*DEC) == expected_of(december).totals(*DEC)
