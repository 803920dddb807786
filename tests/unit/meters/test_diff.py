"""``meters diff`` as a pure computation: the record's events under two meters files,
folded by the one fold, against totals worked out by hand here."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from meterstream.events import UsageEvent, parse_timestamp
from meterstream.meters.config import parse_meters, yaml_load_exact
from meterstream.meters.diff import diff_meters, recompute_preview

NOV = parse_timestamp("2026-11-10T10:00:00Z")
DEC = parse_timestamp("2026-12-02T10:00:00Z")

OLD = """
meters:
  - {name: tokens, event_name: llm, aggregation: sum, value: properties.tokens,
     filters: [{property: properties.kind, operator: eq, value: chat}]}
  - {name: calls, event_name: llm, aggregation: count}
  - {name: gone, event_name: llm, aggregation: max, value: properties.tokens}
"""
NEW = """
meters:
  - {name: tokens, event_name: llm, aggregation: sum, value: properties.tokens}
  - {name: calls, event_name: llm, aggregation: count}
  - {name: big, event_name: llm, aggregation: sum, value: properties.tokens, window: minute}
"""


def ev(key: str, ts: int, customer: str = "c1", refused: tuple[str, ...] = (), **props: Any):
    return UsageEvent(
        event_name="llm",
        customer_id=customer,
        idempotency_key=key,
        timestamp_ms=ts,
        properties=props,
        refused_meters=refused,
    )


def cfg(text: str) -> Any:
    return parse_meters(yaml_load_exact(text))


def rows_by(diff: Any) -> dict[tuple[str, str, str], Any]:
    return {(r.customer_id, r.meter, r.period): r for r in diff.rows}


def test_totals_under_both_definitions_and_the_difference() -> None:
    record = [
        ev("a", NOV, kind="chat", tokens=10),
        ev("b", NOV + 1, kind="embed", tokens=5),
        ev("c", DEC, kind="embed", tokens="2.5"),
        ev("d", DEC, customer="c2", kind="chat", tokens=1),
    ]
    diff = diff_meters(cfg(OLD), cfg(NEW), record)
    assert diff.meters == {
        "big": "added",
        "calls": "unchanged",
        "gone": "removed",
        "tokens": "changed",
    }
    rows = rows_by(diff)
    nov = rows[("c1", "tokens", "2026-11")]
    assert (nov.old.value, nov.old.event_count) == (Decimal(10), 1)
    assert (nov.new.value, nov.new.event_count) == (Decimal(15), 2)
    assert nov.difference == Decimal(5) and nov.status == "changed"
    dec = rows[("c1", "tokens", "2026-12")]
    assert dec.old is None and dec.new.value == Decimal("2.5") and dec.difference == Decimal("2.5")
    assert rows[("c2", "tokens", "2026-12")].difference == 0
    assert rows[("c1", "calls", "2026-11")].old.value == rows[("c1", "calls", "2026-11")].new.value
    gone = rows[("c1", "gone", "2026-11")]
    assert gone.new is None and gone.old.value == Decimal(10) and gone.difference == -10
    big = rows[("c1", "big", "2026-12")]
    assert big.old is None and big.new.value == Decimal("2.5") and big.status == "added"
    assert diff.refused == {"big": 0}


def test_recorded_refusals_hold_under_both_and_an_added_meter_decides_again() -> None:
    huge = Decimal("6e20")  # a minute window of a sum meter stays within ±10^21
    record = [
        ev("a", NOV, refused=("tokens",), kind="chat", tokens=7),
        ev("b", NOV + 1, kind="chat", tokens=3),
        ev("x", DEC, kind="embed", tokens=huge),
        ev("y", DEC + 1, kind="embed", tokens=huge),  # the second would leave big's range
        ev("z", DEC + 2, refused=("*",), kind="chat", tokens=1),  # unprocessable: none
    ]
    diff = diff_meters(cfg(OLD), cfg(NEW), record)
    rows = rows_by(diff)
    nov = rows[("c1", "tokens", "2026-11")]
    assert nov.old.value == nov.new.value == Decimal(3)  # "a" stays refused by tokens
    assert rows[("c1", "calls", "2026-11")].new.event_count == 2  # calls did count "a"
    big = rows[("c1", "big", "2026-12")]
    assert big.new.value == huge and big.new.event_count == 1
    assert diff.refused == {"big": 1}
    dec = rows[("c1", "tokens", "2026-12")]
    assert dec.new.value == 2 * huge and not dec.new.out_of_range  # hour window: 10^23


def test_by_window_and_only_one_meter() -> None:
    record = [ev("a", NOV, kind="chat", tokens=1), ev("b", NOV + 3_600_000, kind="x", tokens=2)]
    diff = diff_meters(cfg(OLD), cfg(NEW), record, meter="tokens", by_window=True)
    assert diff.meters == {"tokens": "changed"}
    got = [(r.window_start_ms, r.old and r.old.value, r.new.value) for r in diff.rows]
    assert got == [(NOV, Decimal(1), Decimal(1)), (NOV + 3_600_000, None, Decimal(2))]


def test_an_effective_date_in_the_new_file_keeps_history() -> None:
    new = """
meters:
  - name: tokens
    event_name: llm
    aggregation: sum
    value: properties.tokens
    versions:
      - effective_until: 2026-12-01T00:00:00Z
        value: properties.tokens
        filters: [{property: properties.kind, operator: eq, value: chat}]
"""
    record = [ev("a", NOV, kind="embed", tokens=4), ev("b", DEC, kind="embed", tokens=6)]
    diff = diff_meters(cfg(OLD), cfg(new), record, meter="tokens")
    rows = rows_by(diff)
    assert ("c1", "tokens", "2026-11") not in rows  # nothing counts before the date, both
    dec = rows[("c1", "tokens", "2026-12")]
    assert dec.old is None and dec.new.value == 6


def test_recompute_preview_compares_the_stored_windows_with_the_record() -> None:
    meters = cfg(NEW)
    hour = NOV - NOV % 3_600_000

    def stored(meter: str, value: str, count: int, start: int = hour) -> dict[str, Any]:
        return {
            "meter": meter,
            "customer_id": "c1",
            "group_key": "{}",
            "window_start_ms": start,
            "value": Decimal(value),
            "event_count": count,
            "distinct_values": [],
            "latest_ts_ms": 0,
            "latest_key": "",
        }

    # as the old definition wrote them: chat only (10), and a window nothing counts for now
    rows = [stored("tokens", "10", 1), stored("tokens", "4", 1, hour - 3_600_000)]
    record = [ev("a", NOV, kind="chat", tokens=10), ev("b", NOV + 1, kind="embed", tokens=5)]
    preview = recompute_preview(meters, "tokens", rows, record, by_window=True)
    got = {
        r.window_start_ms: (r.old and r.old.value, r.new and r.new.value, r.difference)
        for r in preview.rows
    }
    assert got == {
        hour - 3_600_000: (Decimal(4), None, Decimal(-4)),
        hour: (Decimal(10), Decimal(15), Decimal(5)),
    }
    assert preview.meters == {"tokens": "recompute"}
    per_period = recompute_preview(meters, "tokens", rows, record)
    assert [(r.old.value, r.new.value) for r in per_period.rows] == [(Decimal(14), Decimal(15))]
