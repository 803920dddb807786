"""The demo's generator, expected totals, comparison and screen (pure: no broker)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meterstream.embedded.demo.load import (
    CUSTOMERS,
    DemoLoad,
    Expected,
    check_meters,
    is_demo_customer,
)
from meterstream.embedded.demo.report import (
    LiveView,
    RunFacts,
    StripeMeter,
    compare,
    fit,
    fmt_number,
    live_frame,
    round_covering,
    summary_lines,
)
from meterstream.events import loads_exact
from meterstream.meters.config import MetersConfig, load_meters
from meterstream.meters.windows import month_bounds
from meterstream.sinks.stripe.payloads import Rounding

REPO = Path(__file__).resolve().parents[4]
HOUR = 3_600_000
GRACE = StripeMeter(grace_ms=5_000, interval_s=15, rounding=Rounding.CARRY)
STRIPE = {m: GRACE for m in ("ai_tokens", "api_requests", "active_servers", "compute_units")}


def ms(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp() * 1000)


def event(name: str, customer: str, at: str, key: str = "k", **props: Any) -> dict[str, Any]:
    return {
        "event_name": name,
        "customer_id": customer,
        "idempotency_key": key,
        "timestamp": ms(at),
        "properties": props,
    }


def expected_of(*events: dict[str, Any]) -> Expected:
    out = Expected()
    for e in events:
        out.add_event(e)
    return out


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("180.000000000"), "180"),
        (Decimal("1234567"), "1,234,567"),
        (Decimal("12.340"), "12.34"),
        (Decimal("3288.550000000"), "3,288.55"),
        (Decimal("0E-9"), "0"),
        (Decimal("-1234.5"), "-1,234.5"),
        (Decimal("1E+3"), "1,000"),
        (Decimal("0.000001"), "0.000001"),
        (42, "42"),
        (None, ""),
    ],
)
def test_numbers_are_written_as_people_write_them(value: Any, text: str) -> None:
    assert fmt_number(value) == text


def test_each_run_has_fresh_idempotency_keys() -> None:
    """The old demo drew keys from a fixed seed: every event of a second run on the
    same state dir was an idempotency_conflict. Same seed, other run: other keys."""
    first, second = DemoLoad("run-a", seed=7), DemoLoad("run-b", seed=7)
    a = first.next_batch(3000, ms("2026-12-05T12:00:00"))
    b = second.next_batch(3000, ms("2026-12-05T12:00:00"))
    keys_a = {loads_exact(r.value).get("idempotency_key") for r in a} - {None}
    keys_b = {loads_exact(r.value).get("idempotency_key") for r in b} - {None}
    assert keys_a and keys_b and not keys_a & keys_b
    new = [r.event for r in a if r.event is not None]
    assert len({e["idempotency_key"] for e in new}) == len(new) == first.new
    assert first.duplicates and first.conflicts and first.invalid
    assert {e["customer_id"] for e in new} == set(CUSTOMERS)
    assert all(is_demo_customer(c) for c in CUSTOMERS)
    assert not is_demo_customer("acme")  # the README's examples


def test_expected_totals_per_period_and_window() -> None:
    exp = expected_of(
        event("ai_chat", "demo-acme", "2026-11-30T23:30:00", tokens=100, model="m"),
        event("ai_chat", "demo-acme", "2026-12-01T00:10:00", tokens=7, model="m"),
        event("ai_chat", "demo-acme", "2026-12-01T01:10:00", tokens=5, model="m"),
        event("api_request", "demo-acme", "2026-12-01T00:10:00", user_id="user_1"),
        event("api_request", "demo-acme", "2026-12-02T00:10:00", user_id="user_1"),
        event("api_request", "demo-acme", "2026-12-02T00:11:00", user_id="user_2"),
        event("server_heartbeat", "demo-acme", "2026-12-01T00:10:00", servers=4),
        event("server_heartbeat", "demo-acme", "2026-12-01T03:10:00", servers=9),
        event("compute", "demo-acme", "2026-12-01T00:10:00", units=Decimal("0.25")),
        event("call", "demo-acme", "2026-12-01T00:10:00", country="US"),
        event("call", "demo-acme", "2026-12-01T00:10:00", country="DE"),
        event("call", "demo-acme", "2026-12-01T00:10:00"),  # no country: neither meter
    )
    november = exp.totals(*month_bounds("2026-11"))
    assert november == {("ai_tokens", "demo-acme"): Decimal(100)}
    december = exp.totals(*month_bounds("2026-12"))
    assert december == {
        ("ai_tokens", "demo-acme"): Decimal(12),
        ("api_requests", "demo-acme"): Decimal(3),
        ("active_users", "demo-acme"): Decimal(2),  # distinct over the period, not per day
        ("active_servers", "demo-acme"): Decimal(9),
        ("compute_units", "demo-acme"): Decimal("0.25"),
        ("local_calls", "demo-acme"): Decimal(1),
        ("international_calls", "demo-acme"): Decimal(1),
    }
    # Only windows closed by 01:00: the 00:00-01:00 hour, not 01:00-02:00 or 03:00-04:00.
    closed = exp.totals(*month_bounds("2026-12"), closed_by=lambda m: ms("2026-12-01T01:00:00"))
    assert closed[("ai_tokens", "demo-acme")] == 7
    assert closed[("active_servers", "demo-acme")] == 4
    assert ("active_users", "demo-acme") not in closed  # daily windows: none closed yet


def test_runs_merge_into_what_one_run_of_all_events_gives() -> None:
    load = DemoLoad("r", seed=3)
    events = [r.event for r in load.next_batch(2000, ms("2026-12-05T12:00:00"), live=False)]
    events = [e for e in events if e is not None]
    whole = expected_of(*events)
    halves = expected_of(*events[:700])
    halves.merge(Expected.from_json(expected_of(*events[700:]).to_json()))  # via the file form
    bounds = month_bounds("2026-12")
    assert halves.totals(*bounds) == whole.totals(*bounds)
    assert halves.events == whole.events == len(events)


def test_check_meters_accepts_the_example_file_and_names_every_difference() -> None:
    meters = load_meters(REPO / "meters.example.yaml")
    assert check_meters(meters) == []
    data = meters.model_dump(mode="json", exclude_none=True)
    for meter in data["meters"]:
        if meter["name"] == "ai_tokens":
            meter["aggregation"] = "max"
        if meter["name"] == "local_calls":
            meter["filters"][0]["value"] = "DE"
    data["meters"] = [m for m in data["meters"] if m["name"] != "active_users"]
    problems = check_meters(MetersConfig.model_validate(data))
    assert len(problems) == 3
    assert any("ai_tokens: aggregation is 'max'" in p for p in problems)
    assert any("local_calls: filters" in p for p in problems)
    assert "meter active_users: missing" in problems


# ------------------------------------------------------------------ compare


def two_hours() -> Expected:
    """demo-acme: tokens in 21:00-22:00 (closed at 22:30) and 22:00-23:00 (open)."""
    return expected_of(
        event("ai_chat", "demo-acme", "2026-12-05T21:10:00", tokens=1000, model="m"),
        event("ai_chat", "demo-acme", "2026-12-05T22:10:00", tokens=500, model="m"),
        event("compute", "demo-acme", "2026-12-05T21:20:00", units=Decimal("10.25")),
        event("compute", "demo-acme", "2026-12-05T21:30:00", units=Decimal("0.25")),
    )


def ch_totals(**extra: Decimal) -> dict[tuple[str, str], Decimal]:
    out = {
        ("ai_tokens", "demo-acme"): Decimal("1500.000000000"),
        ("compute_units", "demo-acme"): Decimal("10.500000000"),
    }
    for name, value in extra.items():
        meter, _, customer = name.partition("__")
        out[(meter, customer.replace("_", "-"))] = value
    return out


def run_compare(
    clickhouse: dict[tuple[str, str], Decimal],
    stripe: dict[tuple[str, str], Decimal] | None,
    forwarded_at: str | None = "2026-12-05T22:30:00",
    stripe_meters: dict[str, StripeMeter] | None = None,
) -> Any:
    forwarded = {} if forwarded_at is None else {m: ms(forwarded_at) / 1000 for m in STRIPE}
    return compare(
        "2026-12",
        month_bounds("2026-12"),
        two_hours(),
        clickhouse,
        stripe,
        stripe_meters or STRIPE,
        forwarded,
    )


def test_only_windows_closed_grace_before_the_last_forward_are_due() -> None:
    due = {("ai_tokens", "demo-acme"): Decimal(1000), ("compute_units", "demo-acme"): Decimal(11)}
    check = run_compare(ch_totals(), due)
    assert check.ok and check.stripe_ok
    assert check.stripe == {
        ("ai_tokens", "demo-acme"): (1000, 1000),
        ("compute_units", "demo-acme"): (11, 11),  # 10.5 rounded half up (carry)
    }
    text = "\n".join(check.not_due)
    assert "22:00-23:00 UTC" in text and "closes at 23:00" in text and "after 23:00:05" in text

    # A forward 4 s after 23:00 is inside the grace: the 22:00 hour is still not due.
    assert run_compare(ch_totals(), due, "2026-12-05T23:00:04").ok
    # From 23:00:05 on it is due, so the same Stripe totals are now short by 500.
    late = run_compare(ch_totals(), due, "2026-12-05T23:00:05")
    assert not late.ok and late.not_due == []
    assert late.stripe_differences == [
        "Stripe ai_tokens demo-acme: 1,000; the generator's due total (rounded) is 1,500 (-500)"
    ]


def test_the_summary_waits_for_a_round_after_the_record_and_the_last_close() -> None:
    complete = ms("2026-12-05T22:30:00")
    # Mid-hour: any round after the record was complete will do.
    assert round_covering(GRACE, HOUR, complete, ms("2026-12-05T22:40:00")) == complete
    # 3 s after 23:00 the 22:00 hour is not due yet (5 s grace) ...
    assert round_covering(GRACE, HOUR, complete, ms("2026-12-05T23:00:03")) == complete
    # ... from 23:00:05 on it is, and only a round from then on has sent it.
    assert round_covering(GRACE, HOUR, complete, ms("2026-12-05T23:00:06")) == ms(
        "2026-12-05T23:00:05"
    )


def test_rounding_follows_the_meter_rule() -> None:
    down = {**STRIPE, "compute_units": StripeMeter(5_000, 15, Rounding.DOWN)}
    due = {("ai_tokens", "demo-acme"): Decimal(1000), ("compute_units", "demo-acme"): Decimal(10)}
    assert run_compare(ch_totals(), due, stripe_meters=down).ok
    assert not run_compare(ch_totals(), due).ok  # carry makes 11


def test_every_difference_fails_and_is_named() -> None:
    due = {("ai_tokens", "demo-acme"): Decimal(1000), ("compute_units", "demo-acme"): Decimal(11)}
    # An extra event in ClickHouse for a demo customer.
    more = ch_totals()
    more[("ai_tokens", "demo-acme")] += 1
    assert run_compare(more, due).clickhouse_differences == [
        "ClickHouse ai_tokens demo-acme: 1,501; the generator's total is 1,500 (+1)"
    ]
    # A row the generator never produced (the old summary counted it as a match).
    extra = ch_totals(local_calls__demo_zed=Decimal(3))
    assert run_compare(extra, due).clickhouse_differences == [
        "ClickHouse local_calls demo-zed: 3; the generator sent none"
    ]
    # A total missing from ClickHouse.
    missing = ch_totals()
    del missing[("compute_units", "demo-acme")]
    assert run_compare(missing, due).clickhouse_differences == [
        "ClickHouse compute_units demo-acme: nothing; the generator's total is 10.5"
    ]
    # Stripe holding something for a demo customer that nothing due explains.
    stray = {**due, ("api_requests", "demo-hooli"): Decimal(2)}
    assert run_compare(ch_totals(), stray).stripe_differences == [
        "Stripe api_requests demo-hooli: 2; the generator's due total (rounded) is 0 (+2)"
    ]
    # Customers outside the demo's namespace (the README's examples) are not its own.
    others = ch_totals(ai_tokens__acme=Decimal(5))
    check = run_compare(others, due)
    assert check.ok and check.other_customers == 1


def test_stripe_is_not_checked_without_a_completed_forward_round() -> None:
    check = run_compare(ch_totals(), {}, forwarded_at=None)
    assert check.ok  # ClickHouse matched ...
    assert not check.stripe_ok  # ... but Stripe is not claimed to
    assert "has not completed a round" in (check.stripe_unchecked or "")


# ------------------------------------------------------------------ the screen


def totals_of(scale: int) -> dict[tuple[str, str], Decimal]:
    """Every example meter with a total, as ClickHouse returns them (9 decimals)."""
    out = {}
    for i, customer in enumerate(CUSTOMERS):
        out[("ai_tokens", customer)] = Decimal(2_675_059 + i) * scale
        out[("api_requests", customer)] = Decimal(1_104 + i) * scale
        out[("active_servers", customer)] = Decimal("29.000000000")
        out[("compute_units", customer)] = Decimal("13457.370000000") * scale
        out[("local_calls", customer)] = Decimal(237) * scale
        out[("international_calls", customer)] = Decimal(223) * scale
        out[("active_users", customer)] = Decimal(40)
    return out


@pytest.mark.parametrize(
    ("scale", "shown"),
    [(1, ["2,675,059", "13,457.37", "1,104"]), (100, ["267.5M", "1.346M", "110.4k"])],
)
def test_the_live_screen_fits_24_by_80_and_explains_the_stripe_rows(
    scale: int, shown: list[str]
) -> None:
    """One row per meter, a column per customer; numbers in full while they fit,
    shortened (k, M) past 80 columns; never ClickHouse's trailing zeros."""
    totals = totals_of(scale)
    stripe = {k: v.to_integral_value() for k, v in totals.items() if k[0] in STRIPE}
    view = LiveView(
        run_id="20261205T224419-3f9a",
        elapsed_s=3725,
        rate=200,
        sent=1_234_567,
        new=1_172_839,
        recorded=1_172_001,
        period="2026-12",
        clickhouse={**totals, ("ai_tokens", "acme"): Decimal(1)},  # not a demo customer
        stripe=stripe,
        stripe_meters=STRIPE,
        forwarded_s={m: ms("2026-12-05T22:44:31") / 1000 for m in STRIPE},
        now_ms=ms("2026-12-05T22:44:40"),
    )
    lines = live_frame(view)
    assert len(lines) <= 23, "\n".join(lines)
    assert max(len(line) for line in lines) <= 79, "\n".join(lines)
    text = "\n".join(lines)
    assert ".000" not in text and all(number in text for number in shown)
    assert "Stripe (22:44:31)" in text
    assert "is sent 5 s after it closes" in text and "22:00-23:00 UTC is not" in text
    assert "  acme" in text.splitlines()[4] and "demo-acme" not in text.splitlines()[4]


def test_a_matching_summary_fits_the_terminal_too() -> None:
    exp = two_hours()
    due = {("ai_tokens", "demo-acme"): Decimal(1000), ("compute_units", "demo-acme"): Decimal(11)}
    check = run_compare(ch_totals(), due)
    facts = RunFacts(
        sent=5_920,
        new=5_633,
        resent=0,
        duplicates=167,
        conflicts=45,
        invalid=75,
        runs=2,
        events=exp.events,
        recorded=True,
    )
    lines = summary_lines(check, facts, STRIPE)
    text = "\n".join(lines)
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 80, text
    assert "ClickHouse equals the generator's totals: yes (2 of 2)" in text
    assert "Stripe equals the generator's closed windows (rounded): yes (2 of 2 due)" in text
    assert text.count("!") == 1  # the caption that explains the mark; no cell has one


def test_a_smaller_terminal_gets_cut_lines_not_wrapped_ones() -> None:
    lines = [f"line {i} " + "x" * 100 for i in range(30)]
    cut = fit(lines, 40, 12)
    assert len(cut) == 11 and all(len(line) < 40 for line in cut)
    assert cut[-1].startswith("... 20 more lines")
    assert cut[0].endswith("...")
