"""The Stripe meter emulator, driven through the real ``stripe`` SDK and StripeMeterClient."""

from __future__ import annotations

import socket
import time
import urllib.error
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import stripe

from meterstream.errors import StripeError
from meterstream.sinks.stripe.client import MeterSpec, SendResult, StripeMeterClient
from meterstream.sinks.stripe.emulator.server import BackgroundEmulator
from meterstream.sinks.stripe.payloads import build_meter_event, meter_event_identifier

DAY = 86400


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def emulator() -> Iterator[BackgroundEmulator]:
    with BackgroundEmulator() as emu:
        yield emu


@pytest.fixture(autouse=True)
def _fresh_state(emulator: BackgroundEmulator) -> None:
    emulator.reset()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(emulator: BackgroundEmulator, sleeps: list[float]) -> StripeMeterClient:
    def record_and_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    return StripeMeterClient(
        None,
        emulator.url,
        rate_limit_per_second=None,
        max_retries=12,
        backoff_base=0.001,
        backoff_cap=0.005,
        sleep=record_and_sleep,
    )


def raw_sdk(emulator: BackgroundEmulator) -> stripe.StripeClient:
    return stripe.StripeClient(
        "sk_test_emulator", base_addresses={"api": emulator.url}, max_network_retries=0
    )


def raw_create(sdk: stripe.StripeClient, params: Any, options: Any = None) -> Any:
    """``POST /v1/billing/meter_events`` straight through the SDK, params unchecked."""
    return sdk.v1.billing.meter_events.create(params, options)


def new_meter(client: StripeMeterClient, formula: Any = "sum") -> dict[str, Any]:
    event_name = f"ev_{uuid.uuid4().hex[:10]}"
    return client.create_meter(MeterSpec(f"Meter {event_name}", event_name, formula))


def minute_start(ts: int) -> int:
    return ts - ts % 60


def test_create_and_list_meters(client: StripeMeterClient) -> None:
    meter = new_meter(client)
    assert meter["id"].startswith("mtr_")
    assert meter["object"] == "billing.meter"
    assert meter["status"] == "active"
    assert meter["default_aggregation"] == {"formula": "sum"}
    assert meter["customer_mapping"] == {"event_payload_key": "stripe_customer_id", "type": "by_id"}
    assert meter["value_settings"] == {"event_payload_key": "value"}
    assert meter["livemode"] is False
    assert [m["id"] for m in client.list_meters()] == [meter["id"]]

    with pytest.raises(StripeError) as err:
        client.create_meter(MeterSpec("again", meter["event_name"], "sum"))
    assert err.value.status == 400
    assert err.value.code == "resource_already_exists"
    assert not err.value.retryable
    assert client.ensure_meter(MeterSpec("x", meter["event_name"], "sum"))["id"] == meter["id"]
    with pytest.raises(StripeError, match="expected"):
        client.ensure_meter(MeterSpec("x", meter["event_name"], "last"))


def test_events_sum_into_event_summaries(
    client: StripeMeterClient, emulator: BackgroundEmulator
) -> None:
    meter = new_meter(client)
    now = int(time.time())
    start = minute_start(now) - 3600
    values = [5, 7, -2, 30]
    for i, value in enumerate(values):
        params = build_meter_event(
            meter["event_name"],
            meter_event_identifier("api", "cus_a", "p1", i),
            "cus_a",
            value,
            start + 60 * i,
        )
        assert client.send_meter_event(params) == SendResult("sent", 1)
    client.send_meter_event(
        build_meter_event(meter["event_name"], "other-customer", "cus_b", 1000, start)
    )
    [summary] = client.event_summaries(meter["id"], "cus_a", start, minute_start(now) + 60)
    assert summary.aggregated_value == Decimal(sum(values))
    assert summary.meter == meter["id"]

    accepted = emulator.events(customer="cus_a")
    assert [e["value"] for e in accepted] == ["5", "7", "-2", "30"]
    assert all(e["payload"]["value"] == e["value"] for e in accepted)
    assert emulator.stats()["accepted"] == 5


def test_hourly_grouping(client: StripeMeterClient) -> None:
    meter = new_meter(client)
    hour = int(time.time()) // 3600 * 3600 - 3 * 3600
    for i, (offset, value) in enumerate([(10, 1), (20, 2), (3600 + 5, 4)]):
        client.send_meter_event(
            build_meter_event(meter["event_name"], f"h{i}", "cus_h", value, hour + offset)
        )
    summaries = client.event_summaries(
        meter["id"], "cus_h", hour, hour + 3 * 3600, value_grouping_window="hour"
    )
    assert [(s.start_time - hour, s.aggregated_value) for s in summaries] == [
        (0, Decimal(3)),
        (3600, Decimal(4)),
    ]


def test_duplicate_identifier_counts_as_success_and_is_accepted_once(
    client: StripeMeterClient, emulator: BackgroundEmulator
) -> None:
    meter = new_meter(client)
    identifier = meter_event_identifier(meter["event_name"], "cus_d", "2025-01", 0)
    params = build_meter_event(meter["event_name"], identifier, "cus_d", 9, int(time.time()))
    first = client.send_meter_event(params)
    second = client.send_meter_event(params)
    assert first == SendResult("sent", 1)
    assert second.status == "duplicate" and second.duplicate
    assert len(emulator.events(identifier=identifier)) == 1
    stats = emulator.stats()
    assert stats["accepted"] == 1
    assert stats["rejected_duplicates"] == 1

    # What Stripe answers to a repeated identifier: 400, its message, no code.
    with pytest.raises(stripe.InvalidRequestError) as err:
        raw_create(raw_sdk(emulator), params)
    assert err.value.http_status == 400
    assert err.value.code is None
    assert f"An event already exists with identifier {identifier}." == err.value.user_message


def test_identifier_is_unique_for_24_hours_only() -> None:
    clock = FakeClock(1_800_000_000)
    with BackgroundEmulator(clock=clock) as emu:
        client = StripeMeterClient(None, emu.url, rate_limit_per_second=None)
        meter = new_meter(client)

        def send(ts: float) -> SendResult:
            return client.send_meter_event(
                build_meter_event(meter["event_name"], "same-id", "cus_t", 1, int(ts))
            )

        assert send(clock.now).status == "sent"
        clock.advance(DAY - 1)
        assert send(clock.now).status == "duplicate"
        clock.advance(2)
        assert send(clock.now).status == "sent"
        assert emu.stats()["accepted"] == 2


def test_whole_number_and_string_rules(
    client: StripeMeterClient, emulator: BackgroundEmulator
) -> None:
    meter = new_meter(client)
    sdk = raw_sdk(emulator)
    now = int(time.time())
    base: Any = {"event_name": meter["event_name"], "timestamp": now}
    for bad in ["1.5", "1e3", "+1", " 1", "", "abc", "1.0"]:
        with pytest.raises(stripe.InvalidRequestError) as err:
            raw_create(sdk, {**base, "payload": {"stripe_customer_id": "cus_w", "value": bad}})
        assert err.value.http_status == 400, bad
        assert err.value.code == "meter_event_invalid_value", bad
        assert err.value.param == "payload[value]"

    with pytest.raises(stripe.InvalidRequestError) as err:
        raw_create(sdk, {**base, "payload": {"value": "1"}})
    assert err.value.code == "meter_event_no_customer_defined"

    with pytest.raises(stripe.InvalidRequestError) as err:
        raw_create(sdk, {**base, "payload": {"stripe_customer_id": "cus_w", "value": "1" * 20}})
    assert err.value.code == "meter_event_value_too_many_digits"

    with pytest.raises(stripe.InvalidRequestError) as err:
        raw_create(
            sdk,
            {**base, "identifier": "x" * 101, "payload": {"stripe_customer_id": "c", "value": "1"}},
        )
    assert err.value.param == "identifier"

    # Negative whole numbers are whole numbers.
    event = raw_create(sdk, {**base, "payload": {"stripe_customer_id": "cus_w", "value": "-4"}})
    assert event.payload["value"] == "-4"
    assert event.identifier  # generated when absent

    # v2 JSON bodies: a payload value that is not a string is refused.
    with pytest.raises(stripe.StripeError) as v2err:
        sdk.v2.billing.meter_events.create(
            {"event_name": meter["event_name"], "payload": {"stripe_customer_id": "c", "value": 3}}  # type: ignore[dict-item]
        )
    assert v2err.value.http_status == 400

    # Through our client a rule violation is a permanent StripeError, not retried.
    with pytest.raises(StripeError) as perm:
        client.send_meter_event({**base, "payload": {"stripe_customer_id": "c", "value": "2.5"}})
    assert perm.value.code == "meter_event_invalid_value"
    assert perm.value.status == 400
    assert not perm.value.retryable
    stats = emulator.stats()
    assert stats["accepted"] == 1
    assert stats["rejected_other"] == 12


def test_timestamp_window(client: StripeMeterClient) -> None:
    meter = new_meter(client)
    now = int(time.time())

    def send(ts: int, ident: str) -> SendResult:
        return client.send_meter_event(
            build_meter_event(meter["event_name"], ident, "cus_ts", 1, ts)
        )

    with pytest.raises(StripeError) as old:
        send(now - 35 * DAY - 60, "too-old")
    assert (old.value.code, old.value.status, old.value.retryable) == (
        "timestamp_too_far_in_past",
        400,
        False,
    )
    with pytest.raises(StripeError) as ahead:
        send(now + 6 * 60, "too-far-ahead")
    assert ahead.value.code == "timestamp_in_future"
    assert send(now - 35 * DAY + 60, "old-but-ok").status == "sent"
    assert send(now + 4 * 60, "ahead-but-ok").status == "sent"


def test_last_formula_takes_latest_event_time(
    client: StripeMeterClient, emulator: BackgroundEmulator
) -> None:
    meter = new_meter(client, "last")
    assert meter["default_aggregation"] == {"formula": "last"}
    now = int(time.time())
    start = minute_start(now) - 600
    # Sent out of order: the greatest timestamp wins, not the last received.
    for ident, value, offset in [("l1", 10, 300), ("l2", 99, 120), ("l3", 42, 60)]:
        client.send_meter_event(
            build_meter_event(meter["event_name"], ident, "cus_l", value, start + offset)
        )
    [summary] = client.event_summaries(meter["id"], "cus_l", start, start + 600)
    assert summary.aggregated_value == Decimal(10)
    # A tie on timestamp: Stripe leaves the winner undefined; the emulator flags it and
    # answers the earliest received of the tied events (never the correction).
    assert emulator.stats()["last_ties"] == 0
    client.send_meter_event(build_meter_event(meter["event_name"], "l4", "cus_l", 7, start + 300))
    [summary] = client.event_summaries(meter["id"], "cus_l", start, start + 600)
    assert summary.aggregated_value == Decimal(10)
    assert emulator.stats()["last_ties"] == 1
    ties = emulator.request("GET", "/_emulator/ties")["data"]
    assert [(t["customer"], t["timestamp"], t["identifiers"]) for t in ties] == [
        ("cus_l", start + 300, ["l1", "l4"])
    ]


def test_count_formula_counts_events(client: StripeMeterClient) -> None:
    meter = new_meter(client, "count")
    now = int(time.time())
    for i in range(4):
        client.send_meter_event(
            build_meter_event(meter["event_name"], f"c{i}", "cus_c", 100, now - 120)
        )
    [summary] = client.event_summaries(
        meter["id"], "cus_c", minute_start(now) - 600, minute_start(now) + 60
    )
    assert summary.aggregated_value == Decimal(4)


def test_faults_every_event_arrives_exactly_once(
    client: StripeMeterClient, emulator: BackgroundEmulator, sleeps: list[float]
) -> None:
    meter = new_meter(client)
    emulator.set_faults(rate_429=0.3, rate_500=0.1, seed=1)
    now = int(time.time())
    identifiers = [meter_event_identifier(meter["event_name"], "cus_f", "p", i) for i in range(50)]
    results = [
        client.send_meter_event(build_meter_event(meter["event_name"], ident, "cus_f", i, now))
        for i, ident in enumerate(identifiers)
    ]
    emulator.set_faults(rate_429=0.0, rate_500=0.0)

    assert all(r.status == "sent" for r in results)
    stats = emulator.stats()
    assert stats["faults_injected"] > 10
    assert stats["accepted"] == 50
    assert stats["rejected_duplicates"] == 0
    assert sum(r.attempts - 1 for r in results) == stats["faults_injected"]
    assert len(sleeps) == stats["faults_injected"]
    assert all(0 <= s <= 0.005 for s in sleeps)
    accepted = emulator.events(event_name=meter["event_name"])
    assert sorted(e["identifier"] for e in accepted) == sorted(identifiers)
    [summary] = client.event_summaries(
        meter["id"], "cus_f", minute_start(now) - 60, minute_start(now) + 60
    )
    assert summary.aggregated_value == Decimal(sum(range(50)))


def test_unknown_customer_is_permanent(
    client: StripeMeterClient, emulator: BackgroundEmulator
) -> None:
    meter = new_meter(client)
    now = int(time.time())
    # By default (empty registry) any customer is accepted, as Stripe v1 does.
    assert (
        client.send_meter_event(
            build_meter_event(meter["event_name"], "u0", "cus_anyone", 1, now)
        ).status
        == "sent"
    )

    emulator.register_customers("cus_known")
    assert (
        client.send_meter_event(
            build_meter_event(meter["event_name"], "u1", "cus_known", 1, now)
        ).status
        == "sent"
    )
    requests_before = emulator.stats()["requests"]
    with pytest.raises(StripeError) as err:
        client.send_meter_event(build_meter_event(meter["event_name"], "u2", "cus_nobody", 1, now))
    assert err.value.code == "resource_missing"
    assert err.value.status == 400
    assert err.value.retryable is False
    assert emulator.stats()["requests"] == requests_before + 1  # not retried
    assert [e["identifier"] for e in emulator.events()] == ["u0", "u1"]


def test_unknown_event_name(client: StripeMeterClient) -> None:
    with pytest.raises(StripeError) as err:
        client.send_meter_event(build_meter_event("no_such_meter", "n1", "c", 1, int(time.time())))
    assert err.value.code == "no_meter"
    assert not err.value.retryable


def test_idempotency_key_replays_the_first_answer(emulator: BackgroundEmulator) -> None:
    client = StripeMeterClient(None, emulator.url, rate_limit_per_second=None)
    meter = new_meter(client)
    sdk = raw_sdk(emulator)
    params: Any = build_meter_event(meter["event_name"], "idem-1", "cus_i", 1, int(time.time()))
    first = raw_create(sdk, params, {"idempotency_key": "k1"})
    again = raw_create(sdk, params, {"idempotency_key": "k1"})
    assert first.identifier == again.identifier == "idem-1"
    assert emulator.stats()["accepted"] == 1
    with pytest.raises(stripe.IdempotencyError):
        raw_create(sdk, {**params, "identifier": "idem-2"}, {"idempotency_key": "k1"})


def test_emulator_rate_limit_is_retried() -> None:
    clock = FakeClock(1_800_000_000)
    with BackgroundEmulator(clock=clock) as emu:
        client = StripeMeterClient(
            None, emu.url, rate_limit_per_second=None, sleep=lambda _s: clock.advance(1)
        )
        meter = new_meter(client)
        emu.set_faults(rate_limit_per_second=3)
        results = [
            client.send_meter_event(
                build_meter_event(meter["event_name"], f"r{i}", "cus_r", 1, int(clock.now))
            )
            for i in range(10)
        ]
        stats = emu.stats()
        assert stats["accepted"] == 10
        assert stats["rate_limited"] >= 3
        assert sum(r.attempts - 1 for r in results) == stats["rate_limited"]


def test_network_errors_are_retryable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sleeps: list[float] = []
    client = StripeMeterClient(
        None,
        f"http://127.0.0.1:{port}",
        rate_limit_per_second=None,
        max_retries=2,
        sleep=sleeps.append,
    )
    with pytest.raises(StripeError) as err:
        client.send_meter_event(build_meter_event("m", "net", "c", 1, int(time.time())))
    assert err.value.status is None
    assert err.value.retryable
    assert len(sleeps) == 2
    assert "sk_test_emulator" not in repr(client)


def test_v2_stream_batches_share_the_identifier_store(
    client: StripeMeterClient, emulator: BackgroundEmulator
) -> None:
    meter = new_meter(client)
    now = int(time.time())
    batch = [
        build_meter_event(meter["event_name"], f"v2-{i}", "cus_v", i, now - 30) for i in range(100)
    ]
    assert client.send_batch_v2(batch).status == "sent"
    assert client.send_batch_v2(batch).status == "sent"  # a resend is dropped by identifier
    assert client.send_meter_event(batch[0]).status == "duplicate"  # v1 sees v2's identifiers
    stats = emulator.stats()
    assert stats["accepted"] == 100
    with pytest.raises(ValueError):
        client.send_batch_v2([*batch, batch[0]])
    [summary] = client.event_summaries(
        meter["id"], "cus_v", minute_start(now) - 120, minute_start(now) + 60
    )
    assert summary.aggregated_value == Decimal(sum(range(100)))


def test_v2_expired_session_is_renewed() -> None:
    clock = FakeClock(time.time())
    with BackgroundEmulator(clock=clock) as emu:
        client = StripeMeterClient(None, emu.url, rate_limit_per_second=None, sleep=lambda _s: None)
        meter = new_meter(client)
        first = build_meter_event(meter["event_name"], "s1", "cus_s", 1, int(clock.now))
        assert client.send_batch_v2([first]) == SendResult("sent", 1)
        clock.advance(16 * 60)  # the emulator's session (15 min) has expired
        second = build_meter_event(meter["event_name"], "s2", "cus_s", 1, int(clock.now))
        assert client.send_batch_v2([second]) == SendResult("sent", 2)
        assert [e["identifier"] for e in emu.events()] == ["s1", "s2"]

        sdk = stripe.StripeClient(
            "sk_test_emulator", base_addresses={"api": emu.url, "meter_events": emu.url}
        )
        session = sdk.v2.billing.meter_event_session.create()
        clock.advance(15 * 60)
        with pytest.raises(stripe.TemporarySessionExpiredError):
            sdk.v2.billing.meter_event_stream.create(
                {"events": [{"event_name": meter["event_name"], "payload": {}}]},
                {"api_key": session.authentication_token},
            )


# ---------------------------------------------------------------- meter event adjustments


def send_events(
    client: StripeMeterClient, event_name: str, customer: str, values: list[int], ts: int
) -> list[str]:
    identifiers = [f"{event_name}-{customer}-{i}" for i in range(len(values))]
    for ident, value in zip(identifiers, values, strict=True):
        params = build_meter_event(event_name, ident, customer, value, ts)
        assert client.send_meter_event(params).status == "sent"
    return identifiers


def cancellations(emulator: BackgroundEmulator) -> tuple[int, int]:
    """The emulator's counts: (events cancelled, cancellations refused)."""
    stats = emulator.stats()
    return stats["cancelled"], stats["rejected_cancellations"]


def cancel_params(event_name: str, identifier: str) -> Any:
    """The meter event adjustment (v1 or v2) that cancels ``identifier``."""
    return {"event_name": event_name, "type": "cancel", "cancel": {"identifier": identifier}}


def test_cancel_within_24_hours_removes_the_value_from_summaries(
    client: StripeMeterClient, emulator: BackgroundEmulator
) -> None:
    meter = new_meter(client)
    now = int(time.time())
    start, end = minute_start(now) - 600, minute_start(now) + 60
    ids = send_events(client, meter["event_name"], "cus_x", [5, 7, 30], now - 120)
    [before] = client.event_summaries(meter["id"], "cus_x", start, end)
    assert before.aggregated_value == Decimal(42)

    adjustment = client.cancel_meter_event(meter["event_name"], ids[2])
    # Stripe's v1 billing.meter_event_adjustment, which has no id.
    assert adjustment == {
        "object": "billing.meter_event_adjustment",
        "cancel": {"identifier": ids[2]},
        "event_name": meter["event_name"],
        "livemode": False,
        "status": "pending",
        "type": "cancel",
    }
    [after] = client.event_summaries(meter["id"], "cus_x", start, end)
    assert after.aggregated_value == Decimal(12)

    events = {e["identifier"]: e for e in emulator.events(customer="cus_x")}
    assert [events[i]["cancelled"] for i in ids] == [False, False, True]
    assert events[ids[2]]["cancelled_at"] is not None
    assert events[ids[0]]["cancelled_at"] is None
    stats = emulator.stats()
    assert (stats["accepted"], stats["cancelled"], stats["rejected_cancellations"]) == (3, 1, 0)
    # The cancelled identifier stays taken: resending it is still a duplicate.
    resend = build_meter_event(meter["event_name"], ids[2], "cus_x", 30, now - 120)
    assert client.send_meter_event(resend).status == "duplicate"


def test_cancel_the_latest_event_of_a_last_meter(client: StripeMeterClient) -> None:
    meter = new_meter(client, "last")
    start = minute_start(int(time.time())) - 600
    for ident, customer, value, offset in [
        ("l-early", "cus_l", 10, 60),
        ("l-late", "cus_l", 99, 120),
        ("m-late", "cus_m", 77, 120),
    ]:
        client.send_meter_event(
            build_meter_event(meter["event_name"], ident, customer, value, start + offset)
        )
    [summary] = client.event_summaries(meter["id"], "cus_l", start, start + 600)
    assert summary.aggregated_value == Decimal(99)
    client.cancel_meter_event(meter["event_name"], "l-late")
    # The cancelled event no longer is the latest: the earlier one is.
    [summary] = client.event_summaries(meter["id"], "cus_l", start, start + 600)
    assert summary.aggregated_value == Decimal(10)
    [other] = client.event_summaries(meter["id"], "cus_m", start, start + 600)
    assert other.aggregated_value == Decimal(77)


def test_cancel_after_24_hours_is_refused() -> None:
    clock = FakeClock(1_800_000_000)
    with BackgroundEmulator(clock=clock) as emu:
        client = StripeMeterClient(None, emu.url, rate_limit_per_second=None)
        meter = new_meter(client)
        [old, edge] = send_events(client, meter["event_name"], "cus_t", [3, 4], int(clock.now))
        clock.advance(DAY)  # exactly 24 h: still cancellable
        assert client.cancel_meter_event(meter["event_name"], edge)["status"] == "pending"
        clock.advance(1)
        requests_before = emu.stats()["requests"]
        with pytest.raises(StripeError) as err:
            client.cancel_meter_event(meter["event_name"], old)
        assert (err.value.status, err.value.code, err.value.retryable) == (400, None, False)
        assert "within 24 hours" in str(err.value)
        assert emu.stats()["requests"] == requests_before + 1  # permanent: not retried
        assert [e["cancelled"] for e in emu.events()] == [False, True]
        assert cancellations(emu) == (1, 1)


def test_the_clock_control_moves_time_for_every_limit(
    client: StripeMeterClient, emulator: BackgroundEmulator
) -> None:
    meter = new_meter(client)
    now = int(emulator.request("GET", "/_emulator/clock")["now"])
    [ident] = send_events(client, meter["event_name"], "cus_k", [3], now)
    moved = emulator.advance_clock(DAY + 1)  # the shared emulator's time, 24 h 1 s on
    assert moved >= now + DAY + 1
    with pytest.raises(StripeError) as err:
        client.cancel_meter_event(meter["event_name"], ident)
    assert "within 24 hours" in str(err.value)
    # the identifier is free again after 24 hours, and timestamps are judged by the moved clock
    stamp = int(moved) - 60
    sent = client.send_meter_event(build_meter_event(meter["event_name"], ident, "cus_k", 1, stamp))
    assert sent.status == "sent"
    # 34 days before the wall clock, 35 days and a second before the emulator's
    old = build_meter_event(meter["event_name"], "k2", "cus_k", 1, now - 34 * DAY)
    with pytest.raises(StripeError) as late:
        client.send_meter_event(old)
    assert late.value.code == "timestamp_too_far_in_past"
    for bad in ({"advance_seconds": -1}, {"advance_seconds": "1"}, {}):
        with pytest.raises(urllib.error.HTTPError):
            emulator.request("POST", "/_emulator/clock", bad)
    emulator.reset()  # back to the wall clock
    assert abs(emulator.request("GET", "/_emulator/clock")["now"] - time.time()) < 60


def test_cancel_unknown_identifier_or_other_event_name_is_refused(
    client: StripeMeterClient, emulator: BackgroundEmulator
) -> None:
    meter, other = new_meter(client), new_meter(client)
    [ident] = send_events(client, meter["event_name"], "cus_u", [1], int(time.time()))

    with pytest.raises(StripeError) as unknown:
        client.cancel_meter_event(meter["event_name"], "never-sent")
    assert (unknown.value.status, unknown.value.code) == (400, "resource_missing")
    assert not unknown.value.retryable

    with pytest.raises(StripeError) as wrong_name:
        client.cancel_meter_event(other["event_name"], ident)
    assert wrong_name.value.code == "resource_missing"

    with pytest.raises(StripeError) as no_meter:
        client.cancel_meter_event("no_such_meter", ident)
    assert no_meter.value.code == "no_meter"

    sdk = raw_sdk(emulator)
    with pytest.raises(stripe.InvalidRequestError) as missing:
        sdk.v1.billing.meter_event_adjustments.create(
            {"event_name": meter["event_name"], "type": "cancel"}
        )
    assert (missing.value.code, missing.value.param) == ("parameter_missing", "cancel[identifier]")
    with pytest.raises(stripe.InvalidRequestError) as bad_type:
        sdk.v1.billing.meter_event_adjustments.create(
            {"event_name": meter["event_name"], "type": "void", "cancel": {"identifier": ident}}  # type: ignore[typeddict-item]
        )
    assert bad_type.value.param == "type"

    assert [e["cancelled"] for e in emulator.events()] == [False]
    assert cancellations(emulator) == (0, 5)


def test_double_cancel_is_refused(client: StripeMeterClient, emulator: BackgroundEmulator) -> None:
    meter = new_meter(client)
    now = int(time.time())
    [ident] = send_events(client, meter["event_name"], "cus_d", [8], now)
    client.cancel_meter_event(meter["event_name"], ident)
    # (the client's own second call replays its first answer: another idempotency key here)
    params = cancel_params(meter["event_name"], ident)
    with pytest.raises(stripe.InvalidRequestError) as err:
        raw_sdk(emulator).v1.billing.meter_event_adjustments.create(
            params, {"idempotency_key": "another"}
        )
    assert (err.value.http_status, err.value.code) == (400, None)
    assert "already been canceled" in str(err.value)
    [summary] = client.event_summaries(
        meter["id"], "cus_d", minute_start(now) - 60, minute_start(now) + 60
    )
    assert summary.aggregated_value == Decimal(0)
    assert cancellations(emulator) == (1, 1)


def test_cancel_retries_replay_through_the_idempotency_key(
    client: StripeMeterClient, emulator: BackgroundEmulator
) -> None:
    meter = new_meter(client)
    [ident] = send_events(client, meter["event_name"], "cus_r", [2], int(time.time()))
    params = cancel_params(meter["event_name"], ident)
    sdk = raw_sdk(emulator)
    first = sdk.v1.billing.meter_event_adjustments.create(params, {"idempotency_key": "c1"})
    again = sdk.v1.billing.meter_event_adjustments.create(params, {"idempotency_key": "c1"})
    assert first.to_dict() == again.to_dict()
    assert emulator.stats()["cancelled"] == 1

    # Injected faults are retried by the client; the event is cancelled once.
    [ident2] = send_events(client, meter["event_name"], "cus_r2", [2], int(time.time()))
    emulator.set_faults(rate_500=0.6, seed=3)
    try:
        adjustment = client.cancel_meter_event(meter["event_name"], ident2)
    finally:
        emulator.set_faults(rate_500=0.0)
    assert adjustment["cancel"] == {"identifier": ident2}
    stats = emulator.stats()
    assert stats["faults_injected"] > 0
    assert (stats["cancelled"], stats["rejected_cancellations"]) == (2, 0)
    # A second call (a crash before the first one's outcome was recorded) replays it.
    assert client.cancel_meter_event(meter["event_name"], ident2) == adjustment
    assert cancellations(emulator) == (2, 0)


def test_v2_meter_event_adjustment(emulator: BackgroundEmulator) -> None:
    client = StripeMeterClient(None, emulator.url, rate_limit_per_second=None)
    meter = new_meter(client)
    now = int(time.time())
    [ident] = send_events(client, meter["event_name"], "cus_v2", [6], now)
    sdk = raw_sdk(emulator)
    adjustment = sdk.v2.billing.meter_event_adjustments.create(
        cancel_params(meter["event_name"], ident)
    )
    assert adjustment.object == "v2.billing.meter_event_adjustment"
    assert adjustment.id.startswith("mtr_event_adj_")
    assert (adjustment.status, adjustment.type, adjustment.livemode) == ("pending", "cancel", False)
    assert adjustment.cancel.identifier == ident
    assert adjustment.event_name == meter["event_name"]
    assert adjustment.created.endswith("Z")
    [summary] = client.event_summaries(
        meter["id"], "cus_v2", minute_start(now) - 60, minute_start(now) + 60
    )
    assert summary.aggregated_value == Decimal(0)

    # v1 and v2 share one store: v1 sees the v2 cancellation.
    with pytest.raises(StripeError, match="already been canceled"):
        client.cancel_meter_event(meter["event_name"], ident)
    # The one error Stripe documents for this endpoint.
    with pytest.raises(stripe.InvalidRequestError) as err:
        sdk.v2.billing.meter_event_adjustments.create(
            {"event_name": meter["event_name"], "type": "cancel", "cancel": {}}  # type: ignore[typeddict-item]
        )
    assert (err.value.http_status, err.value.code) == (400, "invalid_cancel_configuration")


# ---------------------------------------------------------------- the state file


def test_state_file_keeps_the_account_across_restarts(tmp_path: Any) -> None:
    """What `meterstream run` relies on: a restarted emulator still has the meters,
    the events (summaries, cancellations) and the identifiers it was sent."""
    state = tmp_path / "stripe-emulator.jsonl"
    now = int(time.time())
    with BackgroundEmulator(state_file=state) as emu:
        client = StripeMeterClient(None, emu.url, rate_limit_per_second=None)
        meter = new_meter(client)
        for i, value in enumerate((5, 7, 11)):
            params = build_meter_event(meter["event_name"], f"id-{i}", "cus_a", value, now)
            assert client.send_meter_event(params).status == "sent"
        sdk = raw_sdk(emu)
        sdk.v1.billing.meter_event_adjustments.create(cancel_params(meter["event_name"], "id-2"))
    assert oct(state.stat().st_mode & 0o777) == "0o600"

    with BackgroundEmulator(state_file=state) as emu:
        client = StripeMeterClient(None, emu.url, rate_limit_per_second=None)
        assert [m["id"] for m in client.list_meters()] == [meter["id"]]
        assert [(e["identifier"], e["cancelled"]) for e in emu.events()] == [
            ("id-0", False),
            ("id-1", False),
            ("id-2", True),
        ]
        summaries = client.event_summaries(
            meter["id"], "cus_a", minute_start(now), minute_start(now) + 60
        )
        assert [s.aggregated_value for s in summaries] == [12]
        again = build_meter_event(meter["event_name"], "id-1", "cus_a", 7, now)
        assert client.send_meter_event(again).status == "duplicate"
        fresh = build_meter_event(meter["event_name"], "id-3", "cus_a", 1, now)
        assert client.send_meter_event(fresh).status == "sent"
        assert [e["identifier"] for e in emu.events()][-1] == "id-3"


def test_state_file_ignores_a_torn_last_line_and_is_locked(tmp_path: Any) -> None:
    state = tmp_path / "stripe-emulator.jsonl"
    now = int(time.time())
    with BackgroundEmulator(state_file=state) as emu:
        client = StripeMeterClient(None, emu.url, rate_limit_per_second=None)
        meter = new_meter(client)
        client.send_meter_event(build_meter_event(meter["event_name"], "a", "cus_a", 1, now))
        # A second emulator on the same file would fork the account: refused.
        with pytest.raises(RuntimeError, match="in use by another Stripe emulator"):
            BackgroundEmulator(state_file=state).start()
    # A write the process did not finish (its request was never answered).
    with state.open("a") as out:
        out.write('{"op":"event","event":{"meter":"')
    with BackgroundEmulator(state_file=state) as emu:
        assert [e["identifier"] for e in emu.events()] == ["a"]
    assert state.read_text().endswith("\n")  # compacted: the torn line is gone
