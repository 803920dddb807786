"""canonical_json (msgspec) gives byte-identical text to the simplejson encoder it
replaced, so fingerprints, derived keys, group keys and stored properties do not
change; and the fingerprint built from the reused properties text is unchanged."""

from __future__ import annotations

import hashlib
from decimal import Decimal
from typing import Any

import simplejson
from hypothesis import given, settings
from hypothesis import strategies as st

from meterstream.events import (
    Reason,
    Rejection,
    UsageEvent,
    canonical_json,
    content_fingerprint,
    loads_exact,
    parse_event,
)


def reference(obj: Any) -> str:
    """The previous implementation."""
    return str(
        simplejson.dumps(
            obj, use_decimal=True, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
    )


def reference_fingerprint(event_name: str, timestamp_ms: int, properties: dict[str, Any]) -> str:
    text = reference([event_name, timestamp_ms, properties])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


TRICKY: list[Any] = [
    {"b": Decimal("1.10"), "a": [1, "é"]},
    {"a": Decimal("-0.000"), "b": Decimal("1E+5"), "c": Decimal("1e-7"), "d": Decimal("0E-10")},
    {"big": Decimal("123456789012345678901234567890.123456789"), "n": 10**30, "m": -(10**40)},
    {"s": Decimal("-1.5E-3"), "t": Decimal("2.50E+3"), "u": Decimal("-0"), "v": Decimal("1E+1000")},
    {"ü": 'é\u2028\u2029\x7f\x00\x1f"\\/\t\n\r\b\f', "🙂": "\U0001f642 中文"},
    ["x", 1, {"B": 1, "a": 2, "Á": 3, "b": 4, "": 0, "a\u0000": 1}, True, False, None],
    {"nested": {"deep": {"deeper": [Decimal("0.1"), [], {}]}}},
]


def test_tricky_values_match_the_previous_encoder() -> None:
    for value in TRICKY:
        assert canonical_json(value) == reference(value)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_value_matches_the_previous_encoder(value: Any) -> None:
    try:
        expected = reference(value)
        expected.encode()
    except UnicodeEncodeError:  # lone surrogates: both refuse (we at encode time)
        return
    assert canonical_json(value) == expected


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=20), st.integers(0, 2**45), json_values)
def test_fingerprint_unchanged(name: str, ts: int, props: Any) -> None:
    properties = {"p": props}
    try:
        expected = reference_fingerprint(name, ts, properties)
    except UnicodeEncodeError:
        return
    assert content_fingerprint(name, ts, properties) == expected
    assert content_fingerprint(name, ts, properties, canonical_json(properties)) == expected


def test_parsed_event_carries_its_canonical_properties() -> None:
    raw = (
        b'{"event_name":"e","customer_id":"c","idempotency_key":"k","timestamp":1000,'
        b'"properties":{"z":1.50,"a":{"y":"\\u00e9","x":-2E-3}}}'
    )
    event = parse_event(raw, record_timestamp_ms=1000, now_ms=2000, horizon_ms=10**9)
    assert isinstance(event, UsageEvent)
    props = loads_exact(raw)["properties"]
    assert event.properties_json == reference(props) == '{"a":{"x":-0.002,"y":"é"},"z":1.50}'
    assert event.fingerprint == reference_fingerprint("e", 1000, props)


def test_lone_surrogate_is_dead_lettered_not_a_crash() -> None:
    for raw in (
        b'{"event_name":"e","customer_id":"c","idempotency_key":"k","properties":{"a":"\\ud83d"}}',
        b'{"event_name":"e","customer_id":"c\\udc00","idempotency_key":"k"}',
        b'{"event_name":"e","customer_id":"c","idempotency_key":"\\ud800"}',
    ):
        result = parse_event(raw, record_timestamp_ms=1000, now_ms=2000, horizon_ms=10**9)
        assert isinstance(result, Rejection)
        assert result.reason == Reason.INVALID_JSON


def reference_loads(raw: bytes | str) -> Any:
    return simplejson.loads(raw, use_decimal=True)


def outcome(fn: Any, raw: bytes | str) -> tuple[str, str]:
    """The value's repr (types included), or the error's class."""
    try:
        return "ok", repr(fn(raw))
    except Exception as exc:
        return "error", type(exc).__name__


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from([(",", ":"), (", ", ": "), (" ,", " :  ")]))
def test_decoding_matches_simplejson(value: Any, separators: tuple[str, str]) -> None:
    text = simplejson.dumps(value, use_decimal=True, separators=separators, ensure_ascii=False)
    for raw in (text, text.encode("utf-8", errors="surrogatepass")):
        assert outcome(loads_exact, raw) == outcome(reference_loads, raw)


@settings(max_examples=500, deadline=None)
@given(
    st.binary(max_size=40)
    | st.text(alphabet='{}[]":,.-+eE0123456789 \\u\\tnulltruefalse', max_size=40)
)
def test_any_input_is_accepted_or_refused_like_simplejson(raw: bytes | str) -> None:
    assert outcome(loads_exact, raw) == outcome(reference_loads, raw)


def test_decoding_edge_cases_match_simplejson() -> None:
    for raw in (
        b'{"a":1,"a":2}', b"123456789012345678901234567890", b"-0", b"-0.0", b"1E400",
        b"[1.10, 2.50E+3]", b'"\\ud83d\\ude42"', b'"\\ud83d"', b'{"x": NaN}', b" [1]x",
        b'"\xff"', b'{"k":"\\u0000"}', b"-9223372036854775809", b"1.0e+2", b'"\\/"',
    ):  # fmt: skip
        assert outcome(loads_exact, raw) == outcome(reference_loads, raw), raw
