"""The events API on a real worker (embedded broker, chdb): all-or-nothing batches,
idempotent resends, API keys (hash-only storage, revocation, customer restriction),
body limits. What reaches ClickHouse is read back through the worker's SQL endpoint.

Proving that something was *not* written: after the refused request, a marker event
for the same customer (so the same partition, processed in order) is accepted; once
the marker is in ClickHouse, anything the refused request had written would be too.
"""

from __future__ import annotations

import json
import time
import uuid
from decimal import Decimal
from typing import Any

import pytest
import requests

from tests.harness import StackSlice, Worker, wait_until
from tests.support.cli import keys_cli
from tests.support.meters import meter_entry, meters_yaml

pytestmark = pytest.mark.integration

METERS = meters_yaml(
    meter_entry("calls", "api_call", "count", window="hour"),
    meter_entry("tokens", "ai_tokens", "sum", "properties.tokens", window="hour"),
)
BODY_LIMIT = 64 * 1024


class Api:
    def __init__(self, worker: Worker, stack: StackSlice) -> None:
        self.url = worker.web_url
        self.state_dir = stack.tmp / "state"
        self.admin = keys_cli(self.state_dir, "create", "admin")

    def post(
        self, path: str, body: Any, key: str | None = None, **headers: str
    ) -> requests.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **headers}
        if key:
            hdrs["Authorization"] = f"Bearer {key}"
        return requests.post(f"{self.url}{path}", data=data, headers=hdrs, timeout=60)

    def get(self, path: str, key: str | None = None) -> requests.Response:
        hdrs = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.get(f"{self.url}{path}", headers=hdrs, timeout=60)

    def sql(self, query: str) -> list[dict[str, Any]]:
        response = self.post("/v1/sql", {"sql": query}, self.admin)
        response.raise_for_status()
        result = response.json()
        return [dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]

    def keys_in_record(self, keys: list[str]) -> set[str]:
        quoted = ",".join("'" + k.replace("'", "''") + "'" for k in keys)
        rows = self.sql(
            f"SELECT idempotency_key FROM usage_events WHERE idempotency_key IN ({quoted}) "
            f"UNION ALL SELECT idempotency_key FROM rejected_events "
            f"WHERE idempotency_key IN ({quoted})"
        )
        return {r["idempotency_key"] for r in rows}

    def barrier(self, customer: str) -> None:
        """Send a marker for ``customer`` and wait until the record has it."""
        marker = f"marker-{uuid.uuid4().hex}"
        sent = self.post("/v1/events", event(customer, key=marker), self.admin)
        assert sent.status_code == 202, sent.text
        wait_until(lambda: self.keys_in_record([marker]), timeout=60, what="marker recorded")


def event(customer: str, *, key: str | None = None, name: str = "api_call", **extra: Any) -> dict:
    doc: dict[str, Any] = {"event_name": name, "customer_id": customer, **extra}
    if key is not None:
        doc["idempotency_key"] = key
    doc.setdefault("timestamp", time.time_ns() // 1_000_000 - 60_000)
    return doc


@pytest.fixture(scope="module")
def api(module_stack: StackSlice) -> Api:
    worker = module_stack.start_worker(
        module_stack.meters_file(METERS),
        METERSTREAM_API_READ_AUTH="required",
        METERSTREAM_API_MAX_BODY_BYTES=str(BODY_LIMIT),
    )
    return Api(worker, module_stack)


def test_batch_with_one_bad_event_is_rejected_whole(api: Api) -> None:
    customer = f"c-{uuid.uuid4().hex[:8]}"
    keys = [f"bad-batch-{uuid.uuid4().hex}" for _ in range(3)]
    batch = {
        "events": [
            event(customer, key=keys[0]),
            event(customer, key=keys[1], timestmp=1),  # a typo'd field: invalid
            {**event(customer, key=keys[2]), "timestamp": "yesterday"},
        ]
    }
    response = api.post("/v1/events", batch, api.admin)
    assert response.status_code == 422
    body = response.json()
    assert "nothing was written" in body["error"]
    assert [e["index"] for e in body["errors"]] == [1, 2]
    assert "timestmp: unknown field" in body["errors"][0]["problems"]
    assert body["errors"][1]["problems"][0].startswith("timestamp:")
    api.barrier(customer)
    assert api.keys_in_record(keys) == set()


def test_batch_sent_twice_counts_once(api: Api) -> None:
    customer = f"c-{uuid.uuid4().hex[:8]}"
    now = time.time_ns() // 1_000_000
    keyed = [event(customer, key=f"twice-{uuid.uuid4().hex}") for _ in range(60)]
    # keyless but timestamped: the derived key is the same on every resend
    keyless = [
        event(customer, name="ai_tokens", timestamp=now - 120_000 + i, properties={"tokens": i})
        for i in range(40)
    ]
    batch = {"events": keyed + keyless}
    first = api.post("/v1/events", batch, api.admin)
    second = api.post("/v1/events", batch, api.admin)
    assert first.status_code == second.status_code == 202, (first.text, second.text)
    assert first.json() == second.json()
    returned = first.json()["events"]
    assert first.json()["accepted"] == 100
    assert [e["generated"] for e in returned] == [False] * 60 + [True] * 40
    assert [e["idempotency_key"] for e in returned[:60]] == [e["idempotency_key"] for e in keyed]
    all_keys = [e["idempotency_key"] for e in returned]

    def recorded() -> list[dict[str, Any]]:
        rows = api.sql(
            "SELECT event_name, count() AS n, sum(JSONExtractInt(properties, 'tokens')) AS tokens "
            f"FROM usage_events FINAL WHERE customer_id = '{customer}' "
            "GROUP BY event_name ORDER BY event_name"
        )
        return rows if sum(int(r["n"]) for r in rows) >= 100 else []  # + the barrier's marker

    rows = wait_until(recorded, timeout=90, what="100 events recorded")
    api.barrier(customer)  # both copies processed
    rows = recorded()
    assert [(r["event_name"], int(r["n"])) for r in rows] == [("ai_tokens", 40), ("api_call", 61)]
    assert int(rows[0]["tokens"]) == sum(range(40))
    assert api.keys_in_record(all_keys) == set(all_keys)
    usage = api.get(f"/v1/customers/{customer}/usage", api.admin).json()["usage"]
    totals = {u["meter"]: (Decimal(str(u["value"])), int(u["event_count"])) for u in usage}
    assert totals["calls"][1] == 60 + 1  # the barrier's marker is a call too
    assert totals["tokens"] == (Decimal(sum(range(40))), 40)


def test_keyless_event_gets_the_key_the_worker_uses(api: Api) -> None:
    customer = f"c-{uuid.uuid4().hex[:8]}"
    doc = {"event_name": "api_call", "customer_id": customer}  # no key, no timestamp
    response = api.post("/v1/events", doc, api.admin)
    assert response.status_code == 202, response.text
    (returned,) = response.json()["events"]
    assert returned["generated"] is True and returned["idempotency_key"].startswith("drv_")
    wait_until(
        lambda: api.keys_in_record([returned["idempotency_key"]]), timeout=60, what="recorded"
    )


def test_requests_without_a_valid_key_get_401_and_write_nothing(api: Api) -> None:
    customer = f"c-{uuid.uuid4().hex[:8]}"
    revoked = keys_cli(api.state_dir, "create", "soon-revoked")
    ok = api.post("/v1/events", event(customer, key=f"before-{uuid.uuid4().hex}"), revoked)
    assert ok.status_code == 202, ok.text
    key_id = revoked.split("_")[1]
    keys_cli(api.state_dir, "revoke", key_id)
    listing = keys_cli(api.state_dir, "list")
    assert key_id in listing and revoked.split("_", 2)[2] not in listing

    refused_keys = []
    for token in [None, "", "msk_nope_nope", revoked[:-1] + "x", revoked, "Basic abc"]:
        key = f"refused-{uuid.uuid4().hex}"
        refused_keys.append(key)
        basic = token == "Basic abc"
        headers = {"Authorization": "Basic abc"} if basic else {}
        response = api.post(
            "/v1/events", event(customer, key=key), None if basic else token, **headers
        )
        assert response.status_code == 401, (token, response.text)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # the key file holds hashes only
    stored = (api.state_dir / "api_keys.json").read_text()
    assert revoked not in stored and revoked.split("_", 2)[2] not in stored
    # reads need a key too on this worker (METERSTREAM_API_READ_AUTH=required)
    assert api.post("/v1/sql", {"sql": "SELECT 1"}).status_code == 401
    assert api.get(f"/v1/customers/{customer}/usage", revoked).status_code == 401
    api.barrier(customer)
    assert api.keys_in_record(refused_keys) == set()


def test_key_restricted_to_a_customer(api: Api) -> None:
    mine, other = f"c-{uuid.uuid4().hex[:8]}", f"c-{uuid.uuid4().hex[:8]}"
    key = keys_cli(api.state_dir, "create", "tenant", "--customer", mine)
    theirs = f"theirs-{uuid.uuid4().hex}"
    batch = {"events": [event(mine, key=f"mine-{uuid.uuid4().hex}"), event(other, key=theirs)]}
    response = api.post("/v1/events", batch, key)
    assert response.status_code == 403
    assert [e["index"] for e in response.json()["errors"]] == [1]
    assert api.post("/v1/events", event(mine, key=f"ok-{uuid.uuid4().hex}"), key).status_code == 202
    assert api.get(f"/v1/customers/{mine}/usage", key).status_code == 200
    assert api.get(f"/v1/customers/{other}/usage", key).status_code == 403
    assert api.post("/v1/sql", {"sql": "SELECT 1"}, key).status_code == 403
    api.barrier(other)
    assert api.keys_in_record([theirs]) == set()


def test_body_limits_and_content_type(api: Api) -> None:
    customer = f"c-{uuid.uuid4().hex[:8]}"
    big = event(customer, key=f"big-{uuid.uuid4().hex}", properties={"pad": "x" * BODY_LIMIT})
    assert api.post("/v1/events", big, api.admin).status_code == 413
    plain = api.post("/v1/events", event(customer), api.admin, **{"Content-Type": "text/plain"})
    assert plain.status_code == 415
    assert api.post("/v1/events", b"{not json", api.admin).status_code == 400
    too_many = {"events": [event(customer) for _ in range(101)]}
    response = api.post("/v1/events", too_many, api.admin)
    assert response.status_code == 422 and "1-100 events" in response.json()["error"]
    empty = api.post("/v1/events", {"events": []}, api.admin)
    assert empty.status_code == 422
    future = event(customer, timestamp=time.time_ns() // 1_000_000 + 3_600_000)
    response = api.post("/v1/events", future, api.admin)
    assert response.status_code == 422
    assert "future" in response.json()["errors"][0]["problems"][0]


def test_openapi_document_is_served(api: Api) -> None:
    doc = api.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert {"/v1/events", "/v1/sql", "/v1/customers/{customer_id}/usage"} <= set(doc["paths"])
    assert doc["paths"]["/v1/events"]["post"]["security"] == [{"apiKey": []}]
