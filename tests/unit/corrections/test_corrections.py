"""The pure part of fixing history: what a correction request selects (every problem
listed), the effective record (latest correction wins; voids out, amendments in) and the
dry-run's before/after, against references computed here by hand."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from meterstream.corrections import effective
from meterstream.corrections.request import parse_correction
from meterstream.errors import CorrectionError
from meterstream.events import UsageEvent, canonical_json, loads_exact
from meterstream.meters.config import parse_meters, yaml_load_exact
from meterstream.meters.fold import WindowKey
from meterstream.meters.windows import period_label
from tests.support.meters import BY_MODEL, meter_entry, meters_yaml

MINUTE = 60_000
METERS = parse_meters(
    yaml_load_exact(
        meters_yaml(
            meter_entry("tokens", "chat", "sum", "properties.tokens", window="minute"),
            meter_entry(
                "by_model", "chat", "sum", "properties.tokens", window="minute", group_by=BY_MODEL
            ),
            meter_entry(
                "big",
                "chat",
                "count",
                window="minute",
                filters="[{property: properties.tokens, operator: gte, value: 100}]",
            ),
        )
    )
)


def ev(key: str, ts: int, tokens: Any, model: str = "a", customer: str = "c1") -> UsageEvent:
    props = loads_exact(canonical_json({"tokens": tokens, "model": model}))
    return UsageEvent("chat", customer, key, ts, props, properties_json=canonical_json(props))


def test_a_range_void_needs_a_range_a_scope_and_a_reason_every_problem_listed() -> None:
    with pytest.raises(CorrectionError) as bad:
        parse_correction(
            {"kind": "void", "from": "yesterday", "where": [{"operator": "zz"}]}, METERS
        )
    problems = bad.value.problems
    assert any(p.startswith("reason: required") for p in problems)
    assert any(p.startswith("from: ") for p in problems)
    assert any(p.startswith("from, to: a range void needs both") for p in problems)
    assert any("at least one of customer_id, event_name, meter" in p for p in problems)
    assert any(p.startswith("where[0]") for p in problems)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"kind": "erase"}, "kind: must be 'void' or 'amend'"),
        ({"kind": "void", "reason": "r", "keys": []}, "keys: must be a list of 1-10000 objects"),
        (
            {"kind": "void", "reason": "r", "from": -1, "to": 5, "customer_id": "c"},
            "from: timestamp -1 is outside 1970-01-01 .. 9999-12-31 UTC",
        ),
        (
            {"kind": "void", "reason": "r", "keys": [{"customer_id": "c"}]},
            "keys[0].customer_id and idempotency_key are required",
        ),
        (
            {
                "kind": "amend",
                "reason": "r",
                "keys": [{"customer_id": "c", "idempotency_key": "k"}],
            },
            "keys[0].properties: required for an amend",
        ),
        (
            {
                "kind": "amend",
                "reason": "r",
                "keys": [{"customer_id": "c", "idempotency_key": "k", "properties": [1]}],
            },
            "keys[0].properties.properties: must be a JSON object",
        ),
        (
            {"kind": "void", "reason": "r", "from": 5, "to": 5, "customer_id": "c"},
            "from: must be before to",
        ),
        (
            {"kind": "void", "reason": "r", "from": 0, "to": 5, "meter": "nope"},
            "meter: no meter named 'nope'",
        ),
        (
            {
                "kind": "void",
                "reason": "r",
                "keys": [{"customer_id": "c", "idempotency_key": "k"}],
                "customer_id": "c",
            },
            "keys: select by keys or by range, not both (customer_id)",
        ),
        (
            {
                "kind": "void",
                "reason": "r",
                "from": 0,
                "to": 5,
                "customer_id": "c",
                "correction_id": "a b",
            },
            "correction_id: 1-100 characters of A-Z a-z 0-9 _ . : -",
        ),
        (
            {"kind": "void", "reason": "r", "from": 0, "to": 5, "customer_id": "c", "x": 1},
            "unknown field(s): x",
        ),
    ],
)
def test_bad_requests_say_what_is_wrong(body: dict[str, Any], problem: str) -> None:
    with pytest.raises(CorrectionError) as bad:
        parse_correction(body, METERS)
    assert problem in bad.value.problems


def test_a_range_selector_selects_by_customer_time_meter_filter_and_property() -> None:
    c = parse_correction(
        {
            "kind": "void",
            "reason": "bug",
            "customer_id": "c1",
            "meter": "big",
            "from": "1970-01-01T00:01:00Z",
            "to": 3 * MINUTE,
            "where": [{"property": "properties.model", "operator": "eq", "value": "b"}],
        },
        METERS,
    )
    events = [
        ev("in", MINUTE, 150, "b"),
        ev("too-small", MINUTE, 50, "b"),  # the meter's filter (tokens >= 100) does not hold
        ev("other-model", MINUTE, 150, "a"),
        ev("before", MINUTE - 1, 150, "b"),
        ev("at-end", 3 * MINUTE, 150, "b"),  # to is exclusive
        ev("other-customer", MINUTE, 150, "b", customer="c2"),
        ev("last-ms", 3 * MINUTE - 1, 150, "b"),
    ]
    assert [e.idempotency_key for e in effective.selected(c, METERS, events)] == ["in", "last-ms"]
    assert c.event_names(METERS) == ["chat"]


def test_the_latest_correction_of_an_event_wins() -> None:
    rows = [
        effective.EventCorrection("c1", "k", "a", "void", "", 10),
        effective.EventCorrection("c1", "k", "b", "amend", '{"tokens":5}', 20),
        effective.EventCorrection("c1", "j", "b", "amend", '{"tokens":5}', 20),
        effective.EventCorrection("c1", "j", "c", "void", "", 20),  # same time: greater id
    ]
    latest = effective.latest(rows)
    assert latest[("c1", "k")].correction_id == "b"
    assert latest[("c1", "j")].action == "void"
    events = [ev("k", 0, 1), ev("j", 0, 2), ev("x", 0, 3)]
    out = effective.effective(events, latest)
    assert [(e.idempotency_key, e.properties) for e in out] == [
        ("k", {"tokens": Decimal(5)}),
        ("x", {"tokens": Decimal(3), "model": "a"}),
    ]
    # the amended event keeps its key, time and fingerprint: a copy sent later is a duplicate
    assert out[0].fingerprint == events[0].fingerprint
    assert out[0].canonical_properties() == '{"tokens":5}'


def test_dry_run_diff_is_the_fold_with_and_without_the_correction() -> None:
    record = [
        ev("k1", 0, 10, "a"),
        ev("k2", 1000, 200, "b"),
        ev("k3", MINUTE, 7, "a"),
        ev("k4", MINUTE + 5, Decimal("0.5"), "b"),
    ]
    c = parse_correction(
        {
            "kind": "amend",
            "reason": "typo",
            "keys": [
                {
                    "customer_id": "c1",
                    "idempotency_key": "k2",
                    "properties": {"tokens": 20, "model": "a"},
                }
            ],
        },
        METERS,
    )
    chosen = effective.selected(c, METERS, record)
    fixes = effective.latest(effective.planned(c, "cor_1", chosen, 99))
    after = effective.effective(record, fixes)
    windows = effective.windows_affected(METERS, chosen, effective.effective(chosen, fixes))
    # the amendment moves k2 from group b to group a and out of the "big" filter
    assert {(k.meter, k.group_key) for k in windows if not k.is_total} == {
        ("tokens", "{}"),
        ("by_model", '{"properties.model":"b"}'),
        ("by_model", '{"properties.model":"a"}'),
        ("big", "{}"),
    }
    diff = effective.diff(METERS, windows, record, after)
    changes = {
        (w["meter"], w["group_key"]): (w["before"]["value"], w["after"]["value"])
        for w in diff["windows"]
    }
    assert changes == {
        ("tokens", "{}"): ("210", "30"),
        ("by_model", '{"properties.model":"a"}'): ("10", "30"),
        ("by_model", '{"properties.model":"b"}'): ("200", "0"),
        ("big", "{}"): ("1", "0"),
    }
    periods = {
        p["meter"]: (p["before"]["value"], p["after"]["value"], p["change"])
        for p in diff["periods"]
    }
    # the months' totals are folded over every window of the month, the untouched ones too
    assert periods == {
        "tokens": ("217.5", "37.5", "-180.0"),
        "by_model": ("217.5", "37.5", "-180.0"),
        "big": ("1", "0", "-1"),
    }
    assert all(p["period"] == period_label(0) for p in diff["periods"])
    # the windows of minute 1 are untouched by the correction: not listed
    assert all(w["window_start_ms"] == 0 for w in diff["windows"])


def test_a_void_plans_one_row_per_selected_event() -> None:
    c = parse_correction(
        {"kind": "void", "reason": "r", "keys": [{"customer_id": "c1", "idempotency_key": "k1"}]},
        METERS,
    )
    rows = effective.planned(c, "cor_9", [ev("k1", 0, 1)], 1234)
    assert rows == [effective.EventCorrection("c1", "k1", "cor_9", "void", "", 1234)]
    assert WindowKey("tokens", "c1", "{}", 0) in effective.windows_affected(
        METERS, [ev("k1", 0, 1)], []
    )
