"""Identifiers, whole-number rounding and formulas for Stripe meter events (pure, no I/O)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterstream.sinks.stripe.payloads import (
    MAX_IDENTIFIER_LENGTH,
    Rounding,
    build_meter_event,
    formula_for,
    meter_event_identifier,
    next_delta,
    period_value,
)

names = st.text(min_size=1, max_size=150)
sequences = st.integers(min_value=0, max_value=10**12)
identifier_inputs = st.tuples(names, names, names, sequences)
# Increments with up to 6 decimal places, positive or negative (a total may go down).
increments = st.decimals(
    min_value=Decimal("-1000"), max_value=Decimal("1000"), places=6, allow_nan=False
)


# ---------------------------------------------------------------- identifiers


@given(identifier_inputs)
def test_identifier_is_deterministic_and_at_most_100_chars(args: tuple[str, str, str, int]) -> None:
    first = meter_event_identifier(*args)
    assert first == meter_event_identifier(*args)
    assert 0 < len(first) <= MAX_IDENTIFIER_LENGTH
    assert first.startswith("ms_")


@given(identifier_inputs, identifier_inputs)
def test_identifiers_differ_when_inputs_differ(
    a: tuple[str, str, str, int], b: tuple[str, str, str, int]
) -> None:
    if a != b:
        assert meter_event_identifier(*a) != meter_event_identifier(*b)


@given(identifier_inputs, st.integers(min_value=0, max_value=3), names)
def test_changing_any_single_input_changes_the_identifier(
    args: tuple[str, str, str, int], position: int, other: str
) -> None:
    changed: list[str | int] = list(args)
    if position == 3:
        changed[3] = args[3] + 1
    elif other == args[position]:
        return
    else:
        changed[position] = other
    assert meter_event_identifier(*args) != meter_event_identifier(*changed)  # type: ignore[arg-type]


def test_identifier_is_readable_when_short() -> None:
    ident = meter_event_identifier("api_calls", "cus_123", "2025-01-01T10:00", 3)
    assert ident.startswith("ms_api_calls_2025-01-01T10:00_3_")
    assert "cus_123" not in ident  # the customer is only in the digest
    assert len(ident) <= MAX_IDENTIFIER_LENGTH


def test_long_inputs_are_truncated_but_stay_unique() -> None:
    a = meter_event_identifier("m" * 200, "cus_1", "p", 1)
    b = meter_event_identifier("m" * 201, "cus_1", "p", 1)
    assert len(a) == len(b) == MAX_IDENTIFIER_LENGTH
    assert a != b


def test_separator_ambiguity_does_not_collide() -> None:
    assert meter_event_identifier("a_b", "c", "d", 1) != meter_event_identifier("a", "b_c", "d", 1)
    assert meter_event_identifier("a", "b", "c_1", 1) != meter_event_identifier("a", "b", "c", 11)


def test_sequence_must_be_int() -> None:
    with pytest.raises(TypeError):
        meter_event_identifier("m", "c", "p", True)


# ---------------------------------------------------------------- rounding


def _forward_all(steps: list[Decimal], rounding: Rounding) -> tuple[Decimal, int, list[int]]:
    exact, sent, deltas = Decimal(0), 0, []
    for step in steps:
        exact += step
        delta = next_delta(exact, sent, rounding)
        assert isinstance(delta, int)
        deltas.append(delta)
        sent += delta
    return exact, sent, deltas


@given(st.lists(increments, max_size=60), st.sampled_from(list(Rounding)))
def test_running_sum_of_deltas_never_drifts_a_unit(
    steps: list[Decimal], rounding: Rounding
) -> None:
    exact = Decimal(0)
    sent = 0
    for step in steps:
        exact += step
        sent += next_delta(exact, sent, rounding)
        drift = sent - exact
        assert abs(drift) < 1
        if rounding is Rounding.CARRY:
            assert abs(drift) <= Decimal("0.5")
        elif rounding is Rounding.UP:
            assert 0 <= drift < 1
        else:
            assert -1 < drift <= 0


@given(st.lists(increments, min_size=1, max_size=60), st.sampled_from(list(Rounding)))
def test_fraction_is_carried_not_lost(steps: list[Decimal], rounding: Rounding) -> None:
    """Whatever the path, what was sent equals the rounded final total: nothing lost."""
    exact, sent, _ = _forward_all(steps, rounding)
    assert sent == period_value(exact, rounding)


@given(st.integers(min_value=1, max_value=1000))
def test_small_fractions_accumulate_into_units(n: int) -> None:
    """n forwards of 0.1 send exactly the rounded total of n * 0.1 (not zero each time)."""
    exact, sent, _ = _forward_all([Decimal("0.1")] * n, Rounding.CARRY)
    assert exact == Decimal("0.1") * n
    assert sent == (n + 5) // 10  # round half up of n / 10
    _, sent_down, _ = _forward_all([Decimal("0.1")] * n, Rounding.DOWN)
    assert sent_down == n // 10
    _, sent_up, _ = _forward_all([Decimal("0.1")] * n, Rounding.UP)
    assert sent_up == -(-n // 10)


def test_rounding_examples() -> None:
    assert next_delta(Decimal("2.5"), 0, Rounding.CARRY) == 3
    assert next_delta(Decimal("2.49"), 0, Rounding.CARRY) == 2
    assert next_delta(Decimal("-2.5"), 0, Rounding.CARRY) == -3
    assert next_delta(Decimal("2.01"), 2, Rounding.UP) == 1
    assert next_delta(Decimal("2.99"), 2, Rounding.DOWN) == 0
    assert next_delta(Decimal("3.4"), 4, Rounding.CARRY) == -1  # a total that went down
    assert period_value(Decimal("7.5"), Rounding.CARRY) == 8
    assert period_value(Decimal("7.5"), Rounding.DOWN) == 7
    assert period_value(Decimal("7.01"), Rounding.UP) == 8
    assert period_value(Decimal("-7.01"), Rounding.UP) == -7
    assert Rounding("carry") is Rounding.CARRY


def test_rounding_refuses_floats_and_non_finite() -> None:
    with pytest.raises(TypeError):
        next_delta(1.5, 0, Rounding.CARRY)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        period_value(Decimal("NaN"), Rounding.CARRY)


# ---------------------------------------------------------------- formulas and params


@pytest.mark.parametrize(
    ("aggregation", "formula"),
    [
        ("sum", "sum"),
        ("count", "sum"),
        ("max", "last"),
        ("min", "last"),
        ("unique_count", "last"),
        ("latest", "last"),
    ],
)
def test_formula_for(aggregation: str, formula: str) -> None:
    assert formula_for(aggregation) == formula


def test_formula_for_unknown() -> None:
    with pytest.raises(ValueError, match="unknown aggregation"):
        formula_for("avg")


def test_build_meter_event_is_exact_v1_params() -> None:
    assert build_meter_event("tokens", "ms_x", "cus_1", -12, 1_700_000_000) == {
        "event_name": "tokens",
        "identifier": "ms_x",
        "timestamp": 1_700_000_000,
        "payload": {"stripe_customer_id": "cus_1", "value": "-12"},
    }
    custom = build_meter_event("t", "i", "cus_1", 3, 1, customer_key="customer", value_key="n")
    assert custom["payload"] == {"customer": "cus_1", "n": "3"}


@pytest.mark.parametrize("value", [1.5, Decimal("2"), True, "3"])
def test_build_meter_event_refuses_non_int_values(value: object) -> None:
    with pytest.raises(TypeError):
        build_meter_event("t", "i", "c", value, 1)  # type: ignore[arg-type]


def test_build_meter_event_refuses_bad_identifier() -> None:
    with pytest.raises(ValueError):
        build_meter_event("t", "x" * 101, "c", 1, 1)
    with pytest.raises(ValueError):
        build_meter_event("t", "", "c", 1, 1)
