from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meterstream.errors import ConfigError, InvalidValue
from meterstream.events import UsageEvent, loads_exact
from meterstream.meters.config import (
    Filter,
    Meter,
    MetersConfig,
    StripeBlock,
    load_meters,
    parse_meters,
    yaml_load_exact,
)

EXAMPLE = Path(__file__).resolve().parents[3] / "meters.example.yaml"


def event(properties: dict[str, Any] | None = None, **fields: Any) -> UsageEvent:
    base: dict[str, Any] = {
        "event_name": "call",
        "customer_id": "cus_1",
        "idempotency_key": "k1",
        "timestamp_ms": 1_700_000_000_000,
        "properties": properties or {},
    }
    base.update(fields)
    return UsageEvent(**base)


def meter(**fields: Any) -> Meter:
    doc: dict[str, Any] = {"name": "m", "event_name": "call", "aggregation": "sum"}
    doc["value"] = "properties.v"
    doc.update(fields)
    return Meter.model_validate(doc)


# -- loading -------------------------------------------------------------------


def test_example_file_loads() -> None:
    config = load_meters(EXAMPLE)
    assert [m.name for m in config.meters] == [
        "ai_tokens",
        "api_requests",
        "active_servers",
        "compute_units",
        "local_calls",
        "international_calls",
        "active_users",
    ]
    tokens = config.by_name("ai_tokens")
    assert tokens.aggregation == "sum"
    assert tokens.value == "properties.tokens"
    assert tokens.group_by == ("properties.model",)
    assert tokens.unit == "tokens"
    assert tokens.stripe is not None
    assert tokens.stripe.event_name == "ai_tokens"
    assert tokens.stripe.interval_seconds == 15
    assert tokens.stripe.grace_seconds == 5
    assert tokens.stripe.customer_id_from == "mapping"
    assert tokens.stripe.rounding == "carry"
    assert [m.name for m in config.for_event_name("api_request")] == [
        "api_requests",
        "active_users",
    ]
    assert [m.name for m in config.for_event_name("call")] == ["local_calls", "international_calls"]
    assert config.for_event_name("nope") == ()
    assert config.by_name("active_users").window == "day"
    with pytest.raises(KeyError):
        config.by_name("nope")


def test_meter_profiles_split_calls() -> None:
    config = load_meters(EXAMPLE)
    local, international = config.for_event_name("call")
    us, fr, none = event({"country": "US"}), event({"country": "FR"}), event({})
    assert (local.matches(us), international.matches(us)) == (True, False)
    assert (local.matches(fr), international.matches(fr)) == (False, True)
    assert (local.matches(none), international.matches(none)) == (False, False)
    assert not local.matches(event({"country": "US"}, event_name="other"))


def test_stripe_defaults() -> None:
    block = StripeBlock(event_name="x")
    assert (block.customer_key, block.value_key, block.rounding) == (
        "stripe_customer_id",
        "value",
        "carry",
    )
    assert (block.interval_seconds, block.grace_seconds) == (3600, 300)
    # Which Stripe customer pays is the operator's mapping unless a meter opts in to a property.
    assert block.customer_id_from == "mapping"
    assert (
        StripeBlock(event_name="x", customer_id_from="properties.stripe_customer_id")
    ).customer_id_from == "properties.stripe_customer_id"
    assert StripeBlock(event_name="x", interval=90, grace="2m").interval_seconds == 90
    assert StripeBlock(event_name="x", customer_id_from="mapping").customer_id_from == "mapping"


BAD_FILE = """\
meters:
  - name: api_calls
    event_name: api_call
    aggregation: count
    stripe: {event_name: api_calls, interval: 10x, grace: -1}
  - name: api_calls
    event_name: ""
    aggregation: avg
    value: tokens
    group_by: [properties.model, properties.model]
    window: week
    color: blue
  - name: Bad Name
    event_name: y
    aggregation: count
    value: properties.z
    filters:
      - {property: x, operator: like, value: 1}
      - {property: properties.q, operator: in, value: 3}
      - {property: properties.q, operator: exists, value: 1}
      - {property: properties.q, operator: gt, value: true}
      - {property: properties.q, operator: eq}
      - {property: properties.q, operator: eq, value: [1, 2]}
  - name: tokens
    event_name: ai_chat
    aggregation: sum
    stripe: {rounding: sideways, interval: 0, customer_id_from: customer}
  - 5
extra: 1
"""


def test_bad_file_reports_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "meters.yaml"
    path.write_text(BAD_FILE)
    with pytest.raises(ConfigError) as caught:
        load_meters(path)
    path_help = (
        "is not a valid path: use 'properties.<name>' (nested: 'properties.<name>.<name>')"
        " or one of event_name, customer_id, idempotency_key"
    )
    assert caught.value.source == str(path)
    assert caught.value.problems == [
        "extra: unknown field",
        "meters[0].stripe.interval: '10x' is not a duration: use seconds (30) or '30s', '5m',"
        " '1h', '1d'",
        "meters[0].stripe.grace: must not be negative",
        "meters[1].event_name: must be a string of 1-100 characters",
        "meters[1].aggregation: 'avg' is not one of sum, count, max, min, unique_count, latest",
        f"meters[1].value: 'tokens' {path_help}",
        "meters[1].group_by: duplicate path(s): properties.model",
        "meters[1].window: 'week' is not one of minute, hour, day",
        "meters[1].color: unknown field",
        "meters[2].name: 'Bad Name' is not a valid meter name: lowercase letters, digits and"
        " underscores, starting with a letter, at most 63 characters",
        "meters[2].value: must be absent for aggregation 'count'",
        f"meters[2].filters[0].property: 'x' {path_help}",
        "meters[2].filters[0].operator: 'like' is not one of in, not_in, eq, neq, gt, gte, lt,"
        " lte, exists, not_exists",
        "meters[2].filters[1].value: must be a non-empty list for operator 'in'",
        "meters[2].filters[2].value: must be absent for operator 'exists'",
        "meters[2].filters[3].value: a boolean cannot be compared with 'gt'; use eq, neq, in or"
        " not_in",
        "meters[2].filters[4].value: required for operator 'eq'",
        "meters[2].filters[5].value: must be a single string, number or boolean for operator 'eq'",
        "meters[3].value: required for aggregation 'sum'",
        "meters[3].stripe.event_name: required",
        "meters[3].stripe.interval: must be at least 1s",
        f"meters[3].stripe.customer_id_from: 'customer' {path_help}",
        "meters[3].stripe.rounding: 'sideways' is not one of carry, up, down",
        "meters[4]: must be a mapping",
        "meters[1].name: duplicate meter name 'api_calls' (also meters[0])",
    ]
    assert str(caught.value).startswith(f"{path} has 25 problem(s):\n  - extra: unknown field")


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        (None, "meters: required (the document must be a mapping with a 'meters' list)"),
        ([1], "meters: required (the document must be a mapping with a 'meters' list)"),
        ({}, "meters: required"),
        ({"meters": {}}, "meters: must be a list of meters"),
        ({"meters": []}, "meters: at least one meter is required"),
        ({"meters": [{}]}, "meters[0].name: required"),
    ],
)
def test_document_shape(doc: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_meters(doc, "doc")
    assert caught.value.problems[0] == problem


def test_missing_file_and_yaml_syntax_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_meters(tmp_path / "absent.yaml")
    assert caught.value.problems == ["file not found"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("meters:\n  - name: [unclosed\n")
    with pytest.raises(ConfigError) as caught:
        load_meters(bad)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("YAML syntax error at line 3, column 1:")


def test_duplicate_names_rejected_when_built_directly() -> None:
    with pytest.raises(ValueError, match="duplicate meter name 'm'"):
        MetersConfig(meters=(meter(), meter()))


def test_yaml_numbers_are_exact_and_booleans_are_yaml_1_2() -> None:
    doc = yaml_load_exact(
        "a: 0.1\nb: 1_000.50\nc: 1e3\nd: 7\ne: NO\nf: yes\ng: true\nh: .inf\ni: '0.1'\n"
    )
    assert doc == {
        "a": Decimal("0.1"),
        "b": Decimal("1000.50"),
        "c": Decimal("1e3"),
        "d": 7,
        "e": "NO",
        "f": "yes",
        "g": True,
        "h": Decimal("Infinity"),
        "i": "0.1",
    }
    assert str(doc["a"]) == "0.1"
    assert type(doc["a"]) is Decimal
    config = parse_meters(
        yaml_load_exact(
            "meters:\n  - name: m\n    event_name: e\n    aggregation: count\n"
            "    filters: [{property: properties.x, operator: eq, value: 0.1}]\n"
        )
    )
    assert config.meters[0].filters[0].value == Decimal("0.1")
    assert str(config.meters[0].filters[0].value) == "0.1"


def test_non_finite_filter_value_rejected() -> None:
    with pytest.raises(ValueError, match="Infinity is not a finite number"):
        Filter(property="properties.x", operator="gt", value=Decimal("Infinity"))
    with pytest.raises(ValueError, match="is a float"):
        Filter(property="properties.x", operator="gt", value=0.5)


# -- filters -------------------------------------------------------------------

D = Decimal

FILTER_TABLE: list[tuple[dict[str, Any], str, Any, bool]] = [
    # eq / neq: strings by exact text
    ({"c": "US"}, "eq", "US", True),
    ({"c": "us"}, "eq", "US", False),
    ({"c": "US"}, "neq", "US", False),
    ({"c": "FR"}, "neq", "US", True),
    ({}, "eq", "US", False),
    ({}, "neq", "US", False),  # missing: every filter false except not_exists
    ({"c": None}, "neq", "US", False),  # null counts as missing
    # numbers compare numerically; numeric strings on the event side too
    ({"c": 1}, "eq", 1, True),
    ({"c": D("1.0")}, "eq", 1, True),
    ({"c": "1.00"}, "eq", 1, True),
    ({"c": "1e0"}, "eq", 1, True),
    ({"c": "one"}, "eq", 1, False),
    ({"c": "NaN"}, "eq", 1, False),
    ({"c": " 1"}, "eq", 1, False),
    ({"c": 1}, "eq", "1", False),  # a string in the filter only equals text
    ({"c": "1"}, "eq", "1", True),
    ({"c": "1.0"}, "eq", "1", False),
    ({"c": 2}, "neq", 1, True),
    ({"c": "x"}, "neq", 1, True),  # present and not equal
    # booleans only equal booleans
    ({"c": True}, "eq", True, True),
    ({"c": True}, "eq", 1, False),
    ({"c": 1}, "eq", True, False),
    ({"c": "true"}, "eq", True, False),
    ({"c": False}, "neq", True, True),
    # objects and arrays equal nothing
    ({"c": {"a": 1}}, "eq", "x", False),
    ({"c": [1]}, "eq", 1, False),
    ({"c": [1]}, "neq", 1, True),
    # in / not_in
    ({"c": "US"}, "in", ["US", "CA"], True),
    ({"c": "MX"}, "in", ["US", "CA"], False),
    ({"c": "MX"}, "not_in", ["US", "CA"], True),
    ({"c": "US"}, "not_in", ["US", "CA"], False),
    ({}, "in", ["US"], False),
    ({}, "not_in", ["US"], False),
    ({"c": D("2.0")}, "in", [1, 2], True),
    ({"c": "2"}, "in", [1, 2], True),
    ({"c": 2}, "in", ["1", "2"], False),
    ({"c": True}, "in", [1, 2], False),
    ({"c": 1}, "in", [True], False),
    ({"c": True}, "in", [True, "x"], True),
    ({"c": "x"}, "in", [True, "x", 3], True),
    ({"c": 3}, "not_in", [True, "x"], True),
    # ordering: numbers numerically, strings by code point
    ({"c": 10}, "gt", 9, True),
    ({"c": 9}, "gt", 9, False),
    ({"c": 9}, "gte", 9, True),
    ({"c": D("8.99")}, "lt", 9, True),
    ({"c": D("9.00")}, "lte", 9, True),
    ({"c": "10"}, "gt", 9, True),  # numeric string vs number: numerically
    ({"c": "abc"}, "gt", 9, False),
    ({"c": True}, "gt", 0, False),
    ({"c": 10}, "gt", "9", False),  # number vs string: incomparable
    ({"c": "b"}, "gt", "a", True),
    ({"c": "10"}, "gt", "9", False),  # strings compare as text
    ({"c": "a"}, "lte", "a", True),
    ({"c": "B"}, "gte", "a", False),
    ({}, "gt", 0, False),
    ({"c": None}, "lt", 0, False),
    ({"c": D("0.1")}, "gte", D("0.1"), True),
    ({"c": D("0.1000000000000000000000000000001")}, "gt", D("0.1"), True),
    # exists / not_exists: null counts as missing
    ({"c": 0}, "exists", None, True),
    ({"c": ""}, "exists", None, True),
    ({"c": False}, "exists", None, True),
    ({"c": {}}, "exists", None, True),
    ({"c": None}, "exists", None, False),
    ({}, "exists", None, False),
    ({}, "not_exists", None, True),
    ({"c": None}, "not_exists", None, True),
    ({"c": 0}, "not_exists", None, False),
]


@pytest.mark.parametrize(("properties", "op", "value", "expected"), FILTER_TABLE)
def test_filter_golden_table(
    properties: dict[str, Any], op: str, value: Any, expected: bool
) -> None:
    spec: dict[str, Any] = {"property": "properties.c", "operator": op}
    if value is not None:
        spec["value"] = value
    f = Filter.model_validate(spec)
    assert f.holds(event(properties)) is expected
    assert meter(filters=[spec]).matches(event(properties)) is expected


def test_filters_on_nested_and_top_level_paths() -> None:
    nested = Filter(property="properties.model.name", operator="eq", value="gpt")
    assert nested.holds(event({"model": {"name": "gpt"}}))
    assert not nested.holds(event({"model": "gpt"}))  # not an object: missing
    assert not nested.holds(event({}))
    top = Filter(property="customer_id", operator="in", value=["cus_1", "cus_2"])
    assert top.holds(event())
    assert not top.holds(event(customer_id="cus_3"))


def test_all_filters_must_hold() -> None:
    m = meter(
        filters=[
            {"property": "properties.c", "operator": "eq", "value": "US"},
            {"property": "properties.n", "operator": "gte", "value": 10},
        ]
    )
    assert m.matches(event({"c": "US", "n": 10}))
    assert not m.matches(event({"c": "US", "n": 9}))
    assert not m.matches(event({"c": "FR", "n": 10}))


def test_filters_on_events_parsed_from_json() -> None:
    props = loads_exact('{"n": 2.50, "big": 12345678901234567890123456789.5}')
    assert Filter(property="properties.n", operator="eq", value=D("2.5")).holds(event(props))
    big = Filter(property="properties.big", operator="gt", value=D("12345678901234567890123456789"))
    assert big.holds(event(props))


# -- extract -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (5, D(5)),
        (D("12.5"), D("12.5")),
        ("12.5", D("12.5")),
        ("-3", D(-3)),
        ("1e3", D("1e3")),
        (D("0.10"), D("0.10")),
        (0, D(0)),
    ],
)
def test_extract_number(raw: Any, expected: Decimal) -> None:
    value = meter().extract(event({"v": raw}))
    assert isinstance(value, Decimal)
    assert value == expected
    assert str(value) == str(expected)


@pytest.mark.parametrize(
    ("properties", "detail"),
    [
        ({}, "meter 'm': properties.v is missing"),
        ({"v": None}, "meter 'm': properties.v is null"),
        ({"v": "abc"}, "meter 'm': properties.v is not a number: 'abc'"),
        ({"v": ""}, "meter 'm': properties.v is not a number: ''"),
        ({"v": True}, "meter 'm': properties.v is not a number: true"),
        ({"v": D("NaN")}, "meter 'm': properties.v is not a number: NaN"),
        ({"v": "Infinity"}, "meter 'm': properties.v is not a number: 'Infinity'"),
        ({"v": {"a": 1}}, "meter 'm': properties.v is not a number: an object"),
        ({"v": [1]}, "meter 'm': properties.v is not a number: an array"),
        ({"v": 1.5}, "meter 'm': properties.v is not a number: 1.5"),
        (
            {"v": "1e40"},
            "meter 'm': properties.v '1e40' is out of range: values and totals of this meter"
            " (hour windows) stay strictly within ±10^23",
        ),
        (
            {"v": D("-1E+23")},
            "meter 'm': properties.v -1E+23 is out of range: values and totals of this meter"
            " (hour windows) stay strictly within ±10^23",
        ),
        (
            {"v": "1e-39"},
            "meter 'm': properties.v is out of range (at most 38 digits each side of the point)",
        ),
    ],
)
def test_extract_invalid(properties: dict[str, Any], detail: str) -> None:
    with pytest.raises(InvalidValue) as caught:
        meter().extract(event(properties))
    assert caught.value.detail == detail
    assert str(caught.value) == detail


def test_extract_count_is_one_without_reading() -> None:
    m = meter(aggregation="count", value=None)
    assert m.extract(event({})) == Decimal(1)


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("u_1", "u_1"),
        ("", ""),
        ("1.0", "1.0"),  # strings as-is
        (1, "1"),
        (D("1.0"), "1"),
        (D("1E+3"), "1000"),
        (D("-0.0"), "0"),
        (D("12.50"), "12.5"),
        (True, "true"),
        (False, "false"),
    ],
)
def test_extract_unique_canonical(raw: Any, canonical: str) -> None:
    m = meter(aggregation="unique_count", value="properties.v")
    assert m.extract(event({"v": raw})) == canonical


@pytest.mark.parametrize(
    ("properties", "detail"),
    [
        ({}, "meter 'm': properties.v is missing"),
        ({"v": None}, "meter 'm': properties.v is null"),
        ({"v": {}}, "meter 'm': properties.v is not a single value: an object"),
        ({"v": [1]}, "meter 'm': properties.v is not a single value: an array"),
        ({"v": D("NaN")}, "meter 'm': properties.v is not a number: NaN"),
    ],
)
def test_extract_unique_invalid(properties: dict[str, Any], detail: str) -> None:
    m = meter(aggregation="unique_count", value="properties.v")
    with pytest.raises(InvalidValue) as caught:
        m.extract(event(properties))
    assert caught.value.detail == detail


def test_extract_top_level_path() -> None:
    m = meter(aggregation="unique_count", value="customer_id")
    assert m.extract(event()) == "cus_1"


# -- group key and windows -----------------------------------------------------------


def test_group_key_canonical_text() -> None:
    m = meter(group_by=["properties.region", "properties.model", "customer_id"])
    e = event({"model": "gpt-4o", "region": "eu", "other": 1})
    assert m.group_key(e) == (
        '{"customer_id":"cus_1","properties.model":"gpt-4o","properties.region":"eu"}'
    )
    assert m.group_key(event({"model": "é", "region": D("1.50")})) == (
        '{"customer_id":"cus_1","properties.model":"é","properties.region":1.50}'
    )
    assert meter(group_by=["properties.model"]).group_key(event({})) == '{"properties.model":null}'
    assert meter().group_key(e) == "{}"


def test_meter_window_bounds() -> None:
    assert meter(window="minute").window_bounds(125_000) == (120_000, 180_000)
    assert meter().window_bounds(3_600_000 * 5 + 1) == (3_600_000 * 5, 3_600_000 * 6)
    assert meter(window="day").window_bounds(86_400_000 - 1) == (0, 86_400_000)
