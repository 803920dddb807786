"""The event contract: what is accepted, what is dead-lettered and why."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterstream.events import (
    MAX_EVENT_BYTES,
    Reason,
    Rejection,
    UsageEvent,
    canonical_json,
    derive_idempotency_key,
    parse_event,
    parse_timestamp,
)

NOW = 1_790_000_000_000
HORIZON = 7 * 24 * 3600 * 1000


def parse(raw: bytes | str, record_ts: int = NOW) -> UsageEvent | Rejection:
    data = raw.encode() if isinstance(raw, str) else raw
    return parse_event(data, record_timestamp_ms=record_ts, now_ms=NOW, horizon_ms=HORIZON)


def test_valid_event_keeps_exact_decimals() -> None:
    event = parse(
        '{"event_name":"ai_chat","customer_id":"c1","idempotency_key":"k","timestamp":'
        f'{NOW - 1000},"properties":{{"tokens":0.1,"nested":{{"x":1e-3}}}}}}'
    )
    assert isinstance(event, UsageEvent)
    assert event.properties["tokens"] == Decimal("0.1")
    assert event.properties["nested"]["x"] == Decimal("0.001")
    assert event.timestamp_ms == NOW - 1000
    assert not event.key_derived


@pytest.mark.parametrize(
    ("text", "expected_ms"),
    [
        ("2026-09-21T10:00:00Z", 1_789_984_800_000),
        ("2026-09-21T12:00:00.123+02:00", 1_789_984_800_123),
        (1_790_071_200_456, 1_790_071_200_456),
    ],
)
def test_timestamps_rfc3339_or_epoch_ms(text: object, expected_ms: int) -> None:
    assert parse_timestamp(text) == expected_ms


def test_timestamp_without_offset_is_rejected() -> None:
    with pytest.raises(ValueError, match="UTC offset"):
        parse_timestamp("2026-09-21T10:00:00")


def test_missing_timestamp_uses_the_record_timestamp() -> None:
    event = parse('{"event_name":"e","customer_id":"c","idempotency_key":"k"}', NOW - 5)
    assert isinstance(event, UsageEvent)
    assert event.timestamp_ms == NOW - 5
    assert event.properties == {}


def test_missing_key_is_derived_deterministically() -> None:
    raw = f'{{"event_name":"e","customer_id":"c","timestamp":{NOW},"properties":{{"a":1}}}}'
    first, second = parse(raw), parse(raw)
    assert isinstance(first, UsageEvent) and isinstance(second, UsageEvent)
    assert first.key_derived
    assert first.idempotency_key == second.idempotency_key
    assert first.idempotency_key == derive_idempotency_key("e", "c", NOW, {"a": 1})
    other = parse(raw.replace('"a":1', '"a":2'))
    assert isinstance(other, UsageEvent)
    assert other.idempotency_key != first.idempotency_key


@pytest.mark.parametrize(
    ("raw", "reason", "detail"),
    [
        ("{not json", Reason.INVALID_JSON, ""),
        ("[1,2]", Reason.INVALID_EVENT, "JSON object"),
        ('{"customer_id":"c"}', Reason.INVALID_EVENT, "event_name: required"),
        ('{"event_name":"e"}', Reason.INVALID_EVENT, "customer_id: required"),
        ('{"event_name":"","customer_id":"c"}', Reason.INVALID_EVENT, "event_name"),
        ('{"event_name":"e","customer_id":"c","properties":[]}', Reason.INVALID_EVENT, "object"),
        ('{"event_name":"e","customer_id":"c","timestmp":1}', Reason.INVALID_EVENT, "unknown"),
        ('{"event_name":"e","customer_id":"c","timestamp":"x"}', Reason.INVALID_EVENT, "RFC"),
        ('{"event_name":"e","customer_id":"c","idempotency_key":5}', Reason.INVALID_EVENT, "key"),
        (f'{{"event_name":"e","customer_id":"c","timestamp":{NOW + 301_000}}}',
         Reason.FUTURE_TIMESTAMP, "future"),
        (f'{{"event_name":"e","customer_id":"c","timestamp":{NOW - HORIZON - 1}}}',
         Reason.TOO_LATE, "horizon"),
    ],
)  # fmt: skip
def test_bad_events_are_rejected_with_a_reason(raw: str, reason: Reason, detail: str) -> None:
    result = parse(raw)
    assert isinstance(result, Rejection)
    assert result.reason is reason
    assert detail in result.detail
    assert result.raw == raw.encode()


def test_every_problem_is_listed_at_once() -> None:
    result = parse('{"event_name":5,"customer_id":"","properties":3,"extra":1}')
    assert isinstance(result, Rejection)
    for part in ("extra: unknown", "event_name", "customer_id", "properties"):
        assert part in result.detail


def test_five_minutes_ahead_is_still_accepted() -> None:
    assert isinstance(
        parse(f'{{"event_name":"e","customer_id":"c","timestamp":{NOW + 300_000}}}'), UsageEvent
    )


def test_too_large() -> None:
    raw = (
        b'{"event_name":"e","customer_id":"c","properties":{"x":"' + b"a" * MAX_EVENT_BYTES + b'"}}'
    )
    result = parse(raw)
    assert isinstance(result, Rejection)
    assert result.reason is Reason.TOO_LARGE


def test_rejection_identifies_the_event_when_it_can() -> None:
    result = parse(
        f'{{"event_name":"e","customer_id":"c","idempotency_key":"k","timestamp":{NOW * 2}}}'
    )
    assert isinstance(result, Rejection)
    assert (result.customer_id, result.idempotency_key) == ("c", "k")
    assert result.to_dlq(NOW)["reason"] == "future_timestamp"


def test_canonical_json_is_stable_and_exact() -> None:
    assert canonical_json({"b": Decimal("1.10"), "a": [1, "é"]}) == '{"a":[1,"é"],"b":1.10}'


def test_fingerprint_ignores_key_order_but_not_content() -> None:
    a = parse(
        f'{{"event_name":"e","customer_id":"c","idempotency_key":"k","timestamp":{NOW},'
        '"properties":{"x":1,"y":2}}'
    )
    b = parse(
        f'{{"properties":{{"y":2,"x":1}},"timestamp":{NOW},"idempotency_key":"k",'
        '"customer_id":"c","event_name":"e"}'
    )
    c = parse(
        f'{{"event_name":"e","customer_id":"c","idempotency_key":"k","timestamp":{NOW},'
        '"properties":{"x":1,"y":3}}'
    )
    assert isinstance(a, UsageEvent) and isinstance(b, UsageEvent) and isinstance(c, UsageEvent)
    assert a.fingerprint == b.fingerprint != c.fingerprint


@pytest.mark.parametrize(
    "timestamp",
    [10**20, -1, 253_402_300_800_000, "0001-01-01T00:00:00+14:00", "1E+400"],
)
def test_timestamps_outside_the_representable_range_are_rejected_not_raised(
    timestamp: object,
) -> None:
    """Such a value once raised inside the worker (datetime overflow): a poison pill."""
    value = timestamp if isinstance(timestamp, int) or timestamp == "1E+400" else f'"{timestamp}"'
    raw = f'{{"event_name":"a","customer_id":"c","timestamp":{value}}}'.encode()
    result = parse_event(raw, record_timestamp_ms=0, now_ms=1_800_000_000_000, horizon_ms=10**9)
    assert isinstance(result, Rejection) and result.reason == Reason.INVALID_EVENT
    assert "outside 1970-01-01" in result.detail


@pytest.mark.parametrize("depth", [40, 990, 5_000])
def test_deeply_nested_properties_are_rejected_not_raised(depth: int) -> None:
    raw = b'{"event_name":"a","customer_id":"c","properties":{"x":' + b"[" * depth
    raw += b"]" * depth + b"}}"
    result = parse_event(raw, record_timestamp_ms=NOW, now_ms=NOW, horizon_ms=10**9)
    assert isinstance(result, Rejection)
    assert result.reason is Reason.INVALID_EVENT  # the contract's 32 levels, at any depth


# -- issue #20, item 6: contract mismatches ---------------------------------------------


def test_repeated_keys_are_an_invalid_event_not_half_kept() -> None:
    for raw, problem in [
        ('{"event_name":"e","customer_id":"a","customer_id":"b"}', "duplicate key 'customer_id'"),
        (
            '{"event_name":"e","customer_id":"c","properties":{"tokens":1,"tokens":2}}',
            "properties: duplicate key 'tokens'",
        ),
        (
            '{"event_name":"e","customer_id":"c","properties":{"m":[{"x":1,"x":1}]}}',
            "properties.m[0]: duplicate key 'x'",
        ),
        # a key spelled with an escape, and an escaped ':' that hides a colon
        ('{"event_name":"e","customer_id":"c","properties":{"t":1,"\\u0074":2}}', "'t'"),
        ('{"event_name":"e","customer_id":"c","properties":{"a:b":1,"a\\u003ab":2}}', "'a:b'"),
    ]:
        result = parse(raw)
        assert isinstance(result, Rejection), raw
        assert result.reason is Reason.INVALID_EVENT
        assert problem in result.detail, (raw, result.detail)


def test_colons_inside_strings_are_not_mistaken_for_repeated_keys() -> None:
    raw = (
        '{"event_name":"e:1","customer_id":"c:2","idempotency_key":"k:3",'
        '"timestamp":"2026-09-21T10:00:00Z","properties":{"u:rl":"http://x:80/a:b",'
        '"escaped":"\\u003a\\u003A","nested":{"a":[":",{"b:":":"}]}}}'
    )
    event = parse(raw)
    assert isinstance(event, UsageEvent), event
    assert event.properties["escaped"] == "::"


def test_fast_check_is_exact_when_it_clears_a_document() -> None:
    from meterstream.events import duplicate_keys, may_repeat_keys

    clean = b'{"a":{"b":":","c":[1,{"d":2}]}}'
    assert not may_repeat_keys(clean, canonical_json(loads(clean)).count(":"))
    assert duplicate_keys(clean) == []
    repeated = b'{"a":{"b":1,"b":2}}'
    assert may_repeat_keys(repeated, canonical_json(loads(repeated)).count(":"))
    assert duplicate_keys(repeated) == [(("a",), "b")]


def loads(raw: bytes) -> object:
    from meterstream.events import loads_exact

    return loads_exact(raw)


@pytest.mark.parametrize("depth", [33, 500, 5_000, 10_000])
def test_nesting_past_32_levels_is_an_invalid_event_at_any_depth(depth: int) -> None:
    raw = b'{"event_name":"a","customer_id":"c","properties":' + b'{"x":' * depth
    raw += b"1" + b"}" * depth + b"}"
    result = parse_event(raw, record_timestamp_ms=NOW, now_ms=NOW, horizon_ms=10**9, key=b"cus")
    assert isinstance(result, Rejection)
    assert result.reason is Reason.INVALID_EVENT
    assert "nested deeper than 32 levels" in result.detail
    assert result.customer_id in ("c", "cus")


def test_dead_letters_carry_the_kafka_key_or_the_customer_of_well_formed_json() -> None:
    def rejected(raw: bytes, key: bytes | None) -> Rejection:
        result = parse_event(raw, record_timestamp_ms=NOW, now_ms=NOW, horizon_ms=HORIZON, key=key)
        assert isinstance(result, Rejection)
        return result

    large = b'{"event_name":"e","customer_id":"json","idempotency_key":"k","properties":{"x":"'
    large += b"a" * MAX_EVENT_BYTES + b'"}}'
    assert (rejected(large, b"cus").reason, rejected(large, b"cus").customer_id) == (
        Reason.TOO_LARGE,
        "cus",
    )
    from_json = rejected(large, None)
    assert (from_json.customer_id, from_json.idempotency_key) == ("json", "k")
    assert rejected(b"x" * (MAX_EVENT_BYTES + 1), None).customer_id == ""
    bad_json = rejected(b'{"customer_id":"c",', b"cus")
    assert (bad_json.reason, bad_json.customer_id) == (Reason.INVALID_JSON, "cus")
    assert rejected(b'{"customer_id":"c",', None).customer_id == ""


def test_rejection_text_is_always_utf8() -> None:
    result = parse('{"event_name":5,"customer_id":"\\ud800","idempotency_key":"\\udfffk"}')
    assert isinstance(result, Rejection)
    assert (result.customer_id, result.idempotency_key) == ("?", "?k")
    import orjson

    orjson.dumps(result.to_dlq(NOW))  # raised before: surrogates not allowed
    assert Rejection(Reason.INVALID_VALUE, "x\ud800", b"", "\udfff").detail == "x?"


def test_produce_reports_repeated_keys_and_deep_lines_instead_of_sending_them() -> None:
    from meterstream.cli.produce import check_lines

    good = b'{"event_name":"e","customer_id":"c","idempotency_key":"k"}'
    twice = b'{"event_name":"e","customer_id":"c","customer_id":"d"}'
    deep = b'{"event_name":"e","customer_id":"c","properties":' + b"[" * 5_000 + b"]" * 5_000
    sent, bad = check_lines([good, twice, deep + b"}"])
    assert sent == [(b"c", good)]
    assert bad == [
        "line 2: duplicate key 'customer_id' (keys must be unique)",
        "line 3: nested deeper than 32 levels",
    ]


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=20)
    | st.decimals(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=200) | _JSON.map(lambda v: canonical_json(v).encode()), st.binary(max_size=8)
)
def test_any_record_is_an_event_or_a_rejection_never_an_exception(raw: bytes, key: bytes) -> None:
    result = parse_event(raw, record_timestamp_ms=NOW, now_ms=NOW, horizon_ms=HORIZON, key=key)
    assert isinstance(result, UsageEvent | Rejection)
    if isinstance(result, Rejection):
        import orjson

        orjson.dumps(result.to_dlq(NOW))  # the dead letter can always be written


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {"event_name": st.text(min_size=1, max_size=5), "customer_id": st.text(max_size=5)},
        optional={"properties": st.dictionaries(st.text(max_size=6), _JSON, max_size=4),
                  "timestamp": _JSON, "idempotency_key": _JSON},
    )
)  # fmt: skip
def test_any_event_shaped_document_parses_or_is_rejected(doc: dict[str, object]) -> None:
    try:
        raw = canonical_json(doc).encode()
    except UnicodeEncodeError:  # not UTF-8 text: cannot be a Kafka record as such
        return
    result = parse_event(raw, record_timestamp_ms=NOW, now_ms=NOW, horizon_ms=HORIZON)
    assert isinstance(result, UsageEvent | Rejection)


def test_the_hot_path_builds_the_same_event_as_the_dataclass() -> None:
    # validate_document builds accepted events through their slots (accepted_event);
    # every field, those left out of == included, must be what UsageEvent(...) sets.
    parsed = parse_event(
        b'{"event_name":"ai","customer_id":"c1","idempotency_key":"k1",'
        b'"timestamp":1700000000000,"properties":{"tokens":1.50}}',
        record_timestamp_ms=0,
        now_ms=1700000000000,
        horizon_ms=86_400_000,
    )
    assert isinstance(parsed, UsageEvent)
    built = UsageEvent(
        event_name="ai",
        customer_id="c1",
        idempotency_key="k1",
        timestamp_ms=1700000000000,
        properties={"tokens": Decimal("1.50")},
        key_derived=False,
        fingerprint=parsed.fingerprint,
        properties_json='{"tokens":1.50}',
    )
    assert parsed == built
    for f in dataclasses.fields(UsageEvent):
        assert getattr(parsed, f.name) == getattr(built, f.name), f.name
    assert parsed.fingerprint and parsed.refused_meters == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.customer_id = "other"  # type: ignore[misc]
