"""Which Stripe customer pays (pipeline/billing/stripe_ids.py): the operator's mapping, or a
property pinned per customer whose changes and foreign claims are refused."""

from __future__ import annotations

import pytest

from meterstream.billing.customers import decode_record
from meterstream.billing.stripe_ids import Pin, Refusal, check_stripe_customer_id, resolve
from meterstream.errors import BadRecord

PROP = "properties.stripe_customer_id"


def test_mapping_is_all_that_counts_by_default() -> None:
    got = resolve("mapping", ["a", "b"], {"a": "cus_a", "x": "cus_x"})
    assert got.ids == {"a": "cus_a"}
    assert got.refusals == [] and got.new_pins == {}
    assert got.waiting(["a", "b"]) == ["b"]


def test_customer_id_source_and_the_mapping_wins() -> None:
    assert resolve("customer_id", ["a", "b"], {"a": "cus_a"}).ids == {"a": "cus_a", "b": "b"}


def test_property_first_value_is_pinned() -> None:
    got = resolve(PROP, ["a"], {}, {}, {"a": [("cus_a", 10)]})
    assert got.ids == {"a": "cus_a"} and got.new_pins == {"a": "cus_a"}
    assert got.refusals == []


def test_property_pinned_id_is_used_without_new_values() -> None:
    got = resolve(PROP, ["a"], {}, {"a": Pin("cus_a", 5)}, {})
    assert got.ids == {"a": "cus_a"} and got.new_pins == {}


def test_a_change_is_refused_and_holds_the_customer() -> None:
    got = resolve(PROP, ["a"], {}, {"a": Pin("cus_a", 5)}, {"a": [("cus_a", 10), ("cus_v", 20)]})
    assert got.ids == {}
    assert got.refusals == [Refusal("a", "cus_v", "changed", "cus_a")]
    assert got.refused == {"a"} and got.waiting(["a"]) == []
    assert "cus_v" in got.refusals[0].describe() and "cus_a" in got.refusals[0].describe()


def test_before_any_pin_the_first_is_pinned_and_a_later_one_refused() -> None:
    got = resolve(PROP, ["a"], {}, {}, {"a": [("cus_a", 10), ("cus_v", 20)]})
    assert got.new_pins == {"a": "cus_a"}
    assert got.ids == {}
    assert got.refusals == [Refusal("a", "cus_v", "changed", "cus_a")]


def test_several_ids_at_once_before_a_pin_are_ambiguous() -> None:
    got = resolve(PROP, ["a"], {}, {}, {"a": [("cus_v", 10), ("cus_a", 10)]})
    assert got.ids == {} and got.new_pins == {}
    assert {(r.claimed, r.reason) for r in got.refusals} == {
        ("cus_a", "ambiguous"),
        ("cus_v", "ambiguous"),
    }


def test_an_id_mapped_to_another_customer_is_refused() -> None:
    got = resolve(PROP, ["tenant"], {"victim": "cus_v"}, {}, {"tenant": [("cus_v", 10)]})
    assert got.ids == {} and got.new_pins == {}
    assert got.refusals == [Refusal("tenant", "cus_v", "claimed", "", "victim")]


def test_an_id_pinned_by_another_customer_is_refused() -> None:
    got = resolve(PROP, ["tenant"], {}, {"victim": Pin("cus_v", 1)}, {"tenant": [("cus_v", 10)]})
    assert got.ids == {} and got.new_pins == {}
    assert got.refusals == [Refusal("tenant", "cus_v", "claimed", "", "victim")]


def test_of_two_customers_pinned_to_one_id_the_later_is_refused() -> None:
    pins = {"victim": Pin("cus_v", 1), "tenant": Pin("cus_v", 2)}
    got = resolve(PROP, ["tenant", "victim"], {}, pins, {})
    assert got.ids == {"victim": "cus_v"}
    assert got.refusals == [Refusal("tenant", "cus_v", "claimed", "", "victim")]


def test_a_pin_mapped_to_another_customer_later_is_refused() -> None:
    got = resolve(PROP, ["tenant"], {"victim": "cus_v"}, {"tenant": Pin("cus_v", 1)}, {})
    assert got.ids == {}
    assert got.refusals == [Refusal("tenant", "cus_v", "claimed", "", "victim")]


def test_two_unpinned_customers_naming_one_id_get_neither() -> None:
    values = {"a": [("cus_x", 10)], "b": [("cus_x", 11)], "c": [("cus_c", 12)]}
    got = resolve(PROP, ["a", "b", "c"], {}, {}, values)
    assert got.ids == {"c": "cus_c"} and got.new_pins == {"c": "cus_c"}
    assert sorted((r.customer_id, r.other_customer) for r in got.refusals) == [
        ("a", "b"),
        ("b", "a"),
    ]


def test_an_explicit_mapping_always_wins() -> None:
    values = {"a": [("cus_a", 10), ("cus_v", 20)]}
    got = resolve(PROP, ["a"], {"a": "cus_new"}, {"a": Pin("cus_a", 5)}, values)
    assert got.ids == {"a": "cus_new"} and got.refusals == []
    # and the operator may map two customers to one Stripe customer on purpose
    both = resolve(PROP, ["a", "b"], {"a": "cus_p", "b": "cus_p"}, {}, {})
    assert both.ids == {"a": "cus_p", "b": "cus_p"} and both.refusals == []


def test_what_is_not_a_stripe_id_is_refused_and_never_pinned() -> None:
    spellings = [" cus_v", "cus_v ", "cus_v\u200b", "cus/v", "cus_v\n"]
    got = resolve(PROP, ["a"], {"victim": "cus_v"}, {}, {"a": [(v, 10) for v in spellings]})
    assert got.ids == {} and got.new_pins == {}
    assert sorted((r.claimed, r.reason) for r in got.refusals) == sorted(
        (v, "invalid") for v in spellings
    )
    # next to a valid first id: that one is pinned, the customer is held
    mixed = resolve(PROP, ["a"], {}, {}, {"a": [("cus_a", 10), (" cus_a", 20)]})
    assert mixed.new_pins == {"a": "cus_a"} and mixed.ids == {}
    assert mixed.refusals == [Refusal("a", " cus_a", "invalid")]


def test_no_value_no_pin_is_waiting_not_refused() -> None:
    got = resolve(PROP, ["a"], {}, {}, {})
    assert got.ids == {} and got.refusals == [] and got.waiting(["a"]) == ["a"]


def test_topic_records_are_decoded_strictly() -> None:
    assert decode_record(b"acme", b'{"stripe_customer_id": "cus_1"}') == ("acme", "cus_1")
    assert decode_record(b"acme", None) == ("acme", None)
    assert decode_record(b"acme", b'{"stripe_customer_id": null}') == ("acme", None)
    for key, value in [
        (b"", b'{"stripe_customer_id": "cus_1"}'),
        (b"acme", b"not json"),
        (b"acme", b'{"customer": "cus_1"}'),
        (b"acme", b'{"stripe_customer_id": "cus 1"}'),
        (b"acme", b'{"stripe_customer_id": 5}'),
        (b"\xff", b'{"stripe_customer_id": "cus_1"}'),
    ]:
        with pytest.raises(BadRecord):
            decode_record(key, value)


def test_stripe_customer_ids_are_checked() -> None:
    assert check_stripe_customer_id("cus_Q3xAbc-1") == "cus_Q3xAbc-1"
    for bad in ["", " cus_1", "cus_1\n", "cus/1", "x" * 256, None, 5]:
        with pytest.raises(ValueError):
            check_stripe_customer_id(bad)
