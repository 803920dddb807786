"""The pure decision of an event's fate (pipeline/api/fate.py) from hand-made rows."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from meterstream.api.fate import fate, iso, windows_of
from meterstream.events import UsageEvent
from meterstream.meters.config import MetersConfig

METERS = MetersConfig.model_validate(
    {
        "meters": [
            {"name": "tokens", "event_name": "ai", "aggregation": "sum",
             "value": "properties.tokens", "window": "hour"},
            {"name": "big", "event_name": "ai", "aggregation": "max",
             "value": "properties.tokens", "window": "day",
             "filters": [{"property": "properties.tier", "operator": "eq", "value": "pro"}]},
        ]
    }
)  # fmt: skip
TS = 1_767_225_600_000 + 90 * 60_000  # 2026-01-01T01:30Z


def row(tokens: Any = 5, meters: list[str] | None = None, refused: tuple[str, ...] = (),
        ingested: int = TS + 500, **props: Any) -> dict[str, Any]:  # fmt: skip
    event = {"event_name": "ai", "customer_id": "c", "idempotency_key": "k", "timestamp_ms": TS,
             "properties": {"tokens": tokens, **props}, "key_derived": False,
             "fingerprint": "f", "refused_meters": refused}  # fmt: skip
    return {"event": event, "meters": ["tokens"] if meters is None else meters,
            "ingested_at_ms": ingested}  # fmt: skip


def dead(reason: str, detail: str = "why", meter: str = "", at: int = TS + 900) -> dict[str, Any]:
    return {"received_at_ms": at, "reason": reason, "detail": detail, "raw": "{}", "meter": meter}


def test_never_seen_when_nothing_knows_the_key() -> None:
    answer = fate("c", "k", [], [], 0, METERS, {})
    assert answer["fate"] == "never_seen"
    assert "event" not in answer


def test_rejected_lists_every_reason() -> None:
    rejected = [dead("invalid_event", "timestamp: bad; customer_id: too long"), dead("too_late")]
    answer = fate("c", "k", [], rejected, 2, METERS, {})
    assert answer["fate"] == "rejected"
    assert answer["summary"] == "not counted: invalid_event, too_late"
    assert [r["reason"] for r in answer["rejections"]] == ["invalid_event", "too_late"]
    assert answer["rejections"][0]["detail"] == "timestamp: bad; customer_id: too long"
    assert answer["rejections"][0]["received_at"] == iso(TS + 900)


def test_counted_says_window_value_taken_and_window_now() -> None:
    record = [row(tokens=12)]
    event = UsageEvent(**record[0]["event"])
    [ref] = windows_of(event, METERS, ["tokens"])
    hour = TS - TS % 3_600_000
    assert ref == ("tokens", "{}", hour)
    answer = fate("c", "k", record, [], 0, METERS, {ref: (Decimal("40.5"), 4)})
    assert answer["fate"] == "counted"
    [line] = answer["counted"]
    assert line["value_taken"] == "12"
    assert line["window_start"] == "2026-01-01T01:00:00.000+00:00"
    assert line["window_end"] == "2026-01-01T02:00:00.000+00:00"
    assert (line["window_value"], line["window_event_count"]) == ("40.5", 4)
    assert answer["not_counted"] == [
        {"meter": "big", "reason": "filter", "detail": "the meter's filter does not hold"}
    ]


def test_a_refused_meter_is_not_counted_and_says_why() -> None:
    record = [row(tokens=10**40, meters=["tokens", "big"], refused=("big",), tier="pro")]
    rejected = [dead("invalid_value", "meter 'big': out of range", meter="big")]
    answer = fate("c", "k", record, rejected, 1, METERS, {})
    assert [line["meter"] for line in answer["counted"]] == ["tokens"]
    assert answer["not_counted"] == [
        {"meter": "big", "reason": "invalid_value", "detail": "meter 'big': out of range"}
    ]
    assert answer["rejections"][0]["meter"] == "big"


def test_set_aside_as_unprocessable_is_rejected_though_recorded() -> None:
    mark = row(meters=[], refused=("*",), ingested=0)
    answer = fate("c", "k", [mark, row()], [dead("unprocessable")], 1, METERS, {})
    assert answer["fate"] == "rejected"
    assert answer["rejections"][0]["reason"] == "unprocessable"
    assert "counted" not in answer


def test_duplicates_and_conflicts_keep_the_first_copy() -> None:
    rejected = [dead("duplicate", at=TS + 1_000), dead("idempotency_conflict", at=TS + 2_000)]
    answer = fate("c", "k", [row(tokens=3)], rejected, 2, METERS, {})
    assert answer["fate"] == "conflicting"
    assert answer["event"]["properties"]["tokens"] == 3
    assert answer["duplicates"] == [iso(TS + 1_000)]
    assert [c["reason"] for c in answer["conflicting_copies"]] == ["idempotency_conflict"]
    only_resent = fate("c", "k", [row()], rejected[:1], 1, METERS, {})
    assert only_resent["fate"] == "duplicate"


def test_no_meter_reads_the_event_name_and_a_meter_gone_from_the_file() -> None:
    gone = row(meters=["old_meter"])
    gone["event"]["event_name"] = "renamed"
    answer = fate("c", "k", [gone], [], 0, METERS, {})
    assert answer["fate"] == "counted"
    assert answer["counted"] == [
        {"meter": "old_meter", "note": "this meter is no longer in the meters file"}
    ]
    nothing = row(meters=[])
    nothing["event"]["event_name"] = "unmetered"
    answer = fate("c", "k", [nothing], [], 0, METERS, {})
    assert answer["fate"] == "uncounted"
    assert answer["summary"] == "in the record, but no meter counts it"
    assert answer["not_counted"] == [
        {"meter": "", "reason": "no_meter", "detail": "no meter reads 'unmetered'"}
    ]


def fix(action: str, cid: str, props: str = "") -> dict[str, Any]:
    return {"correction_id": cid, "action": action, "properties_json": props,
            "properties": None, "corrected_at_ms": TS + 5000, "author": "ops (key k1 (a))",
            "reason": "a bug"}  # fmt: skip


def test_a_voided_event_says_who_voided_it_and_why() -> None:
    answer = fate("c", "k", [row()], [], 0, METERS, {}, [fix("amend", "cor_1", '{"tokens":9}'),
                                                          fix("void", "cor_2")])  # fmt: skip
    assert answer["fate"] == "voided"
    assert answer["summary"].startswith("voided by correction cor_2 (ops (key k1 (a)): a bug)")
    assert [c["correction_id"] for c in answer["corrections"]] == ["cor_1", "cor_2"]
    assert "counted" not in answer


def test_an_amended_event_is_answered_with_its_new_properties() -> None:
    refs = {("tokens", "{}", TS - 30 * 60_000): (Decimal(9), 1)}
    answer = fate("c", "k", [row()], [], 0, METERS, refs, [fix("amend", "cor_1", '{"tokens":9}')])
    assert answer["fate"] == "counted"
    assert answer["summary"] == "counted by tokens; amended by correction cor_1"
    assert answer["event"]["properties"] == {"tokens": 9}
    assert answer["counted"][0]["value_taken"] == "9"
