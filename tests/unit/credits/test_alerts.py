"""Thresholds fire once per crossing, re-arm only after the value has gone back."""

from __future__ import annotations

import itertools
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterstream.credits.alerts import (
    AlertKind,
    Threshold,
    ThresholdState,
    evaluate,
    payment_failed,
)
from meterstream.credits.grants import Grant
from meterstream.credits.status import CustomerStatus
from meterstream.credits.webhooks import SIGNATURE_HEADER, verify_header
from meterstream.errors import CreditsError

D = Decimal


def status(balance: str, at: int = 0, cause: str | None = None, **kw) -> CustomerStatus:
    return CustomerStatus(
        "acme",
        "usd",
        at,
        cause or f"c{at}-{balance}",
        D(balance),
        kw.pop("period", "2025-01"),
        **kw,
    )


def run(thresholds, statuses, grants=()):
    states: dict = {}
    alerts = []
    for s in statuses:
        step = evaluate(thresholds, states, s, live_grants=grants)
        states = dict(step.states)
        alerts.extend(step.alerts)
    return states, alerts


LOW = Threshold("low", AlertKind.BALANCE_BELOW, amount=D(5))
EMPTY = Threshold("empty", AlertKind.BALANCE_EXHAUSTED)


def test_balance_below_fires_once_per_crossing_and_again_after_going_back() -> None:
    balances = ["20", "6", "5", "4", "1", "7", "3", "2", "5.01", "5"]
    _, alerts = run([LOW], [status(b, i) for i, b in enumerate(balances)])
    # fires at 5 (reached), not again at 4 and 1; re-arms at 7, fires at 3; again at 5
    assert [(a.at_ms, a.value) for a in alerts] == [(2, D(5)), (6, D(3)), (9, D(5))]
    first = alerts[0].to_json()
    assert first == {
        "id": alerts[0].alert_id,
        "object": "billing_alert",
        "type": "balance_below",
        "customer_id": "acme",
        "threshold_id": "low",
        "at_ms": 2,
        "cause": "c2-5",
        "value": "5",
        "threshold": "5",
        "currency": "usd",
        "meter": None,
        "period": None,
        "limit": None,
        "grant_id": None,
        "expires_ms": None,
        "purchase_id": None,
        "failure_code": None,
    }


def test_a_margin_requires_the_value_to_come_back_further() -> None:
    low = Threshold("low", AlertKind.BALANCE_BELOW, amount=D(5), margin=D(2))
    _, alerts = run([low], [status(b, i) for i, b in enumerate(["4", "6", "4", "7.5", "4"])])
    assert [a.at_ms for a in alerts] == [0, 4]


def test_exhausted_usage_and_percent_thresholds() -> None:
    above = Threshold("big", AlertKind.USAGE_ABOVE, amount=D(1000), meter="tokens")
    pct = Threshold("80pct", AlertKind.USAGE_PERCENT, percent=D(80), meter="tokens")
    limits = {"tokens": D(10_000)}
    statuses = [
        status("1", 1, usage={"tokens": D(999)}, limits=limits),
        status("0", 2, usage={"tokens": D(1000)}, limits=limits),
        status("-1", 3, usage={"tokens": D(7999)}, limits=limits),
        status("-2", 4, usage={"tokens": D(8000)}, limits=limits),
        status("-3", 5, usage={"tokens": D(9000)}, limits=limits),
        # a new period: usage restarts, thresholds re-arm, and can fire at once
        status("-3", 6, usage={"tokens": D(9000)}, limits=limits, period="2025-02"),
    ]
    _, alerts = run([EMPTY, above, pct], statuses)
    assert [(a.threshold_id, a.at_ms, a.period) for a in alerts] == [
        ("empty", 2, None),
        ("big", 2, "2025-01"),
        ("80pct", 4, "2025-01"),
        ("big", 6, "2025-02"),
        ("80pct", 6, "2025-02"),
    ]
    assert alerts[2].limit == D(10_000) and alerts[2].value == D(8000)
    # no limit on the meter: the percent threshold is not evaluated
    states, alerts = run([pct], [status("1", 1, usage={"tokens": D(10**6)})])
    assert alerts == [] and states["80pct"] == ThresholdState(period="2025-01")


def test_a_grant_about_to_expire_alerts_once() -> None:
    soon = Threshold("soon", AlertKind.GRANT_EXPIRING, within_ms=100)
    g = Grant("g1", "acme", D(10), "usd", 0, expires_ms=1_000)
    never = Grant("g2", "acme", D(10), "usd", 0)
    grants = [(g, D(4)), (never, D(10))]
    states, alerts = run([soon], [status("14", t) for t in (800, 900, 950, 999)], grants)
    assert [(a.at_ms, a.grant_id, a.value, a.expires_ms) for a in alerts] == [
        (900, "g1", D(4), 1_000)
    ]
    # after its expiry the grant is forgotten; a used-up grant never alerts
    assert states["soon"].grants == frozenset({("g1", 1_000)})
    later = evaluate([soon], states, status("10", 1_000), live_grants=[])
    assert later.states["soon"].grants == frozenset()
    _, alerts = run([soon], [status("0", 950)], [(g, D(0))])
    assert alerts == []


def test_alert_ids_are_deterministic_and_distinct_per_crossing() -> None:
    statuses = [status(b, i) for i, b in enumerate(["4", "9", "4", "9", "4"])]
    _, first = run([LOW], statuses)
    _, replay = run([LOW], statuses)
    assert [a.alert_id for a in first] == [a.alert_id for a in replay]
    assert len({a.alert_id for a in first}) == 3
    # a restart that lost the state re-derives the same id for the same crossing
    _, again = run([LOW], statuses[2:3])
    assert again[0].alert_id == first[1].alert_id


def test_payment_failed_alerts_and_signed_webhook() -> None:
    failed = Threshold("pay", AlertKind.PAYMENT_FAILED)
    alerts = payment_failed(
        [failed, LOW],
        customer_id="acme",
        purchase_id="rch_1",
        amount=D("15"),
        currency="usd",
        at_ms=5,
        failure_code="card_declined",
    )
    assert len(alerts) == 1 and alerts[0].purchase_id == "rch_1"
    assert alerts[0].to_json()["failure_code"] == "card_declined"
    request = alerts[0].webhook("whsec_x", now_ms=1_735_689_600_000)
    assert verify_header(
        request.body, request.headers[SIGNATURE_HEADER], "whsec_x", now_ms=1_735_689_600_000
    )
    # payment_failed thresholds do not fire from a status
    assert run([failed], [status("0", 1)])[1] == []


def test_thresholds_are_checked() -> None:
    with pytest.raises(CreditsError, match="amount is required"):
        Threshold("t", AlertKind.BALANCE_BELOW)
    with pytest.raises(CreditsError, match="meter is required"):
        Threshold("t", AlertKind.USAGE_ABOVE, amount=D(1))
    with pytest.raises(CreditsError, match="takes no"):
        Threshold("t", AlertKind.BALANCE_EXHAUSTED, amount=D(1))
    with pytest.raises(CreditsError, match="within_ms"):
        Threshold("t", AlertKind.GRANT_EXPIRING)
    with pytest.raises(CreditsError, match="float"):
        Threshold("t", AlertKind.BALANCE_BELOW, amount=1.5)  # type: ignore[arg-type]


@given(
    st.lists(st.integers(-50, 50), min_size=1, max_size=40),
    st.integers(-10, 10),
    st.integers(0, 5),
)
def test_at_most_once_per_crossing(values: list[int], level: int, margin: int) -> None:
    low = Threshold("low", AlertKind.BALANCE_BELOW, amount=D(level), margin=D(margin))
    _, alerts = run([low], [status(str(v), i) for i, v in enumerate(values)])
    # an independent count: a crossing starts where the value reaches the level while
    # armed; the threshold re-arms once the value is above level + margin
    armed, expected = True, []
    for i, v in enumerate(values):
        if not armed and v > level + margin:
            armed = True
        if armed and v <= level:
            expected.append(i)
            armed = False
    assert [a.at_ms for a in alerts] == expected
    # between two alerts the value went back above the level + margin
    for a, b in itertools.pairwise(alerts):
        assert any(v > level + margin for v in values[a.at_ms : b.at_ms])
    assert len({a.alert_id for a in alerts}) == len(alerts)
