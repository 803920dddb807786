"""Meter versions (effective dates): which definition decides for an event, and what a
meters file with versions may not say (every problem with its path)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from meterstream.errors import ConfigError, InvalidValue
from meterstream.events import UsageEvent, parse_timestamp
from meterstream.meters.config import parse_meters, yaml_load_exact
from meterstream.meters.fold import fold

CUT = parse_timestamp("2026-12-01T00:00:00Z")
EARLIER = parse_timestamp("2026-11-01T00:00:00Z")
HOUR = 3_600_000

VERSIONED = """
meters:
  - name: tokens
    event_name: llm
    aggregation: sum
    value: properties.total
    filters: [{property: properties.kind, operator: eq, value: chat}]
    window: hour
    versions:
      - effective_until: 2026-11-01T00:00:00Z
        value: properties.legacy
      - effective_until: 2026-12-01T00:00:00Z
        value: properties.tokens
        filters: [{property: properties.kind, operator: in, value: [chat, embed]}]
"""

SUM_METER = """
meters:
  - name: m
    event_name: llm
    aggregation: sum
    value: properties.v
"""


def ev(ts: int, key: str, **properties: Any) -> UsageEvent:
    return UsageEvent(
        event_name="llm",
        customer_id="c1",
        idempotency_key=key,
        timestamp_ms=ts,
        properties=properties,
    )


def config(text: str = VERSIONED) -> Any:
    return parse_meters(yaml_load_exact(text))


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config(text)
    return caught.value.problems


def test_the_definition_valid_at_the_event_time_decides() -> None:
    meter = config().by_name("tokens")
    props = {"kind": "embed", "legacy": 1, "tokens": 10, "total": 100}
    assert meter.matches(ev(EARLIER - 1, "a", **props))  # the first version: no filter
    assert meter.extract(ev(EARLIER - 1, "a", **props)) == Decimal(1)
    assert meter.matches(ev(EARLIER, "b", **props))  # the second: chat or embed
    assert meter.extract(ev(EARLIER, "b", **props)) == Decimal(10)
    assert meter.extract(ev(CUT - 1, "c", **props)) == Decimal(10)
    assert not meter.matches(ev(CUT, "d", **props))  # the current: chat only
    assert meter.matches(ev(CUT, "e", **{**props, "kind": "chat"}))
    assert meter.extract(ev(CUT, "e", **{**props, "kind": "chat"})) == Decimal(100)
    assert meter.effective_from_ms == CUT
    assert meter.definition_at(CUT - 1)[1] == "properties.tokens"
    assert meter.definition_at(CUT)[1] == "properties.total"


def test_fold_uses_each_events_definition() -> None:
    meters = config()
    events = [
        ev(CUT - HOUR, "old1", kind="embed", tokens=7, total=1000),
        ev(CUT - HOUR + 5, "old2", kind="chat", tokens=3, total=1000),
        ev(CUT, "new1", kind="embed", tokens=7, total=1000),  # filtered out now
        ev(CUT + 5, "new2", kind="chat", tokens=3, total=20),
    ]
    states = fold(meters, events)
    by_start = {k.window_start_ms: s for k, s in states.items()}
    assert by_start[CUT - HOUR].value == Decimal(10)
    assert by_start[CUT - HOUR].event_count == 2
    assert by_start[CUT].value == Decimal(20)
    assert by_start[CUT].event_count == 1


def test_an_unreadable_value_names_the_path_of_its_version() -> None:
    meter = config().by_name("tokens")
    with pytest.raises(InvalidValue, match=r"properties\.tokens is missing"):
        meter.extract(ev(CUT - 1, "x", kind="chat", total=1))


def test_a_meter_without_versions_is_as_before() -> None:
    meters = config("meters:\n  - {name: n, event_name: llm, aggregation: count, window: day}\n")
    meter = meters.by_name("n")
    assert meter.versions == () and meter.effective_from_ms is None
    assert meter.matches(ev(0, "a")) and meter.matches(ev(CUT, "b"))


def test_versions_out_of_order_overlap_and_off_window_are_each_reported() -> None:
    found = problems(
        SUM_METER
        + """    window: day
    versions:
      - {effective_until: 2026-12-01T00:00:00Z, value: properties.a}
      - {effective_until: 2026-11-01T00:00:00Z, value: properties.b}
      - {effective_until: 2026-12-05T12:00:00Z, value: properties.c}
"""
    )
    assert any(
        p.startswith("meters[0].versions[1].effective_until: 2026-11-01T00:00:00Z must be after")
        for p in found
    ), found
    assert any(
        p.startswith("meters[0].versions[2].effective_until: 2026-12-05T12:00:00Z is not a window")
        for p in found
    ), found
    assert len(found) == 2, found


def test_version_fields_are_checked_with_their_paths() -> None:
    found = problems(
        SUM_METER
        + """    versions:
      - {effective_until: 2026-12-01T00:00:00, value: properties.a}
      - {effective_until: 2026-12-02T00:00:00Z}
      - {effective_until: soon, value: properties.a}
      - {effective_until: 2026-12-03T00:00:00Z, value: properties.a, window: day}
      - effective_until: 2026-12-04T00:00:00Z
        value: properties.a
        filters: [{property: properties.k, operator: gt}]
  - name: c
    event_name: llm
    aggregation: count
    versions: [{effective_until: 2026-12-01T00:00:00Z, value: properties.a}]
"""
    )
    joined = "\n".join(found)
    assert "meters[0].versions[0].effective_until: " in joined and "offset" in joined
    assert "meters[0].versions[1].value: required for aggregation 'sum'" in found
    assert any(p.startswith("meters[0].versions[2].effective_until: ") for p in found), found
    unknown = "meters[0].versions[3].window: unknown field: a version changes"
    assert any(p.startswith(unknown) for p in found), found
    assert "meters[0].versions[4].filters[0].value: required for operator 'gt'" in found
    assert "meters[1].versions[0].value: must be absent for aggregation 'count'" in found
