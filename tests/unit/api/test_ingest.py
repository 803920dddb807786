"""The events API's pure parts: the batch check and API keys."""

from __future__ import annotations

import json
import os
from decimal import Decimal
from pathlib import Path

import pytest

from meterstream.api.ingest import IngestCheck, check_body
from meterstream.api.keys import KeyStore, split_key
from meterstream.errors import ConfigError, MalformedBody
from meterstream.events import derive_idempotency_key, loads_exact, parse_event

NOW = 1_800_000_000_000
HORIZON = 7 * 86_400_000


def check(body: object, customer: str | None = None) -> tuple[IngestCheck, list[str]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return check_body(raw, now_ms=NOW, horizon_ms=HORIZON, customer_id=customer)


def ev(**extra: object) -> dict[str, object]:
    return {"event_name": "api_call", "customer_id": "acme", "timestamp": NOW - 1000, **extra}


def test_one_event_or_a_batch() -> None:
    single, problems = check(ev(idempotency_key="k1"))
    assert not problems and single.ok and [r.idempotency_key for r in single.records] == ["k1"]
    batch, problems = check({"events": [ev(idempotency_key=f"k{i}") for i in range(100)]})
    assert not problems and len(batch.records) == 100


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"events": []}, "1-100 events, not 0"),
        ({"events": [ev()] * 101}, "1-100 events, not 101"),
        ({"events": "x"}, "must be an array"),
        ([ev()], "body must be one event object"),
        ("text", "body must be one event object"),
    ],
)
def test_body_shape_problems(body: object, problem: str) -> None:
    result, problems = check(body)
    assert not result.records and problem in problems[0]


def test_every_bad_event_is_listed_by_index() -> None:
    result, problems = check(
        {
            "events": [
                ev(),
                ev(customer_id=""),
                ev(timestamp=NOW + 600_000),
                ev(timestamp=NOW - HORIZON - 1),
                ev(properties={"x": [[[]]] * 2, "pad": "y" * 70_000}),
                ev(timestamp=10**20),
            ]
        }
    )
    assert not problems and not result.ok
    by_index = {e["index"]: e["problems"] for e in result.errors}
    assert sorted(by_index) == [1, 2, 3, 4, 5]
    assert by_index[1][0].startswith("customer_id:")
    assert "future" in by_index[2][0] and "dedup horizon" in by_index[3][0]
    assert "65536 limit" in by_index[4][0]
    assert "outside 1970-01-01" in by_index[5][0]


def test_malformed_json_is_not_a_batch() -> None:
    with pytest.raises(MalformedBody):
        check(b"{nope")


def test_nesting_too_deep_to_decode_is_an_invalid_body_not_malformed_json() -> None:
    """Deeper than the decoder's recursion limit is refused for its depth (422, the
    contract's 32 levels), not as "not JSON" (400): nothing that deep can be an event."""
    for body in (b"[" * 100_000, b'{"events": [' + b"[" * 5_000 + b"]" * 5_000 + b"]}"):
        result, problems = check(body)
        assert not result.records
        assert problems and "nested deeper than 32 levels" in problems[0]


def test_gaps_filled_as_the_worker_would() -> None:
    """No timestamp: receipt time. No key: the worker's own derived key, returned."""
    result, _ = check({"event_name": "api_call", "customer_id": "acme", "properties": {"n": 1.5}})
    (record,) = result.records
    written = loads_exact(record.value)
    assert written["timestamp"] == NOW and "idempotency_key" not in written
    assert written["properties"]["n"] == Decimal("1.5")  # exact, not a float
    assert record.generated
    assert record.idempotency_key == derive_idempotency_key(
        "api_call", "acme", NOW, {"n": Decimal("1.5")}
    )
    worker_view = parse_event(
        record.value, record_timestamp_ms=NOW + 5, now_ms=NOW + 5, horizon_ms=HORIZON
    )
    assert getattr(worker_view, "idempotency_key", None) == record.idempotency_key
    assert record.key == b"acme"


def test_customer_restriction() -> None:
    result, _ = check({"events": [ev(), ev(customer_id="globex")]}, customer="acme")
    assert not result.errors and [f["index"] for f in result.forbidden] == [1]
    assert not result.ok


def test_keys_are_stored_as_hashes_and_revocable(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    key, text = store.create("billing", customer_id="acme")
    key_id, secret = split_key(text) or ("", "")
    assert key_id == key.id
    stored = (tmp_path / "keys.json").read_text()
    assert secret not in stored and text not in stored
    assert os.stat(tmp_path / "keys.json").st_mode & 0o777 == 0o600
    reader = KeyStore(tmp_path / "keys.json")  # another process, e.g. the worker
    verified = reader.verify(text)
    assert verified is not None and verified.customer_id == "acme"
    for wrong in ["", text[:-1], text + "x", f"msk_{key.id}_", "msk_x_y", secret]:
        assert reader.verify(wrong) is None, wrong
    store.revoke(key.id)
    assert reader.verify(text) is None  # picked up without a restart
    assert [k.revoked_at is not None for k in reader.listing()] == [True]
    assert "hash" not in reader.listing()[0].public()


def test_key_file_problems_are_reported(tmp_path: Path) -> None:
    (tmp_path / "keys.json").write_text("not json")
    with pytest.raises(ConfigError, match="not a meterstream key file"):
        KeyStore(tmp_path / "keys.json").check()
    assert KeyStore(tmp_path / "keys.json").verify("msk_a_b") is None  # never raises
    with pytest.raises(ConfigError, match="no key with id"):
        KeyStore(tmp_path / "other.json").revoke("abc")
    with pytest.raises(ConfigError, match="must not be empty"):
        KeyStore(tmp_path / "other.json").create(" ")


def test_lone_surrogates_are_a_problem_not_a_crash() -> None:
    """JSON may escape half a UTF-16 pair (\\ud800); it is not text ClickHouse can store."""
    body = rb'{"events": [{"event_name": "a", "customer_id": "\ud800"},'
    body += rb' {"event_name": "a", "customer_id": "b", "properties": {"x": "\udfff"}}]}'
    result, problems = check(body)
    assert not problems and [e["index"] for e in result.errors] == [0, 1]
    assert "lone UTF-16 surrogate" in result.errors[0]["problems"][0]


def test_repeated_keys_are_refused_by_body_or_by_event() -> None:
    a = f'{{"event_name":"api_call","customer_id":"acme","timestamp":{NOW - 1000}}}'

    def batch(*events: str) -> bytes:
        return ('{"events":[' + ",".join(events) + "]}").encode()

    # the body's own key: nothing may be half-kept
    result, problems = check(batch(a)[:-1] + b',"events":[' + a.encode() + b"]}")
    assert problems == ["duplicate key 'events' (keys must be unique)"]
    # one event's keys: that event, by index
    twice = a.replace('"customer_id":"acme"', '"customer_id":"acme","customer_id":"evil"')
    result, problems = check(batch(a, twice))
    assert not problems
    assert result.errors == [
        {"index": 1, "problems": ["duplicate key 'customer_id' (keys must be unique)"]}
    ]
    # a single event body, and a repeated property
    result, _ = check(a.replace("}", ',"properties":{"n":1,"n":2}}').encode())
    assert result.errors == [
        {"index": 0, "problems": ["properties: duplicate key 'n' (keys must be unique)"]}
    ]
    assert check(batch(a, a))[0].ok  # no repeat, no problem
