"""A meter that changes from an effective date, through the real worker, broker and chdb:
windows before the date keep the old definition, later ones use the new; and
``meterstream meters diff`` on the record equals totals worked out here from the events
(independently of the meter code) under both definitions."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import urllib.error
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from meterstream.api.keys import KeyStore
from meterstream.settings import Settings
from tests.harness import REPO, StackSlice, wait_until
from tests.support.cli import worker_cli
from tests.support.http import request_json, status_of
from tests.support.kafka import group_offsets

pytestmark = pytest.mark.integration

HOUR = 3_600_000
OLD_DEF = """    value: properties.legacy
    filters: [{property: properties.kind, operator: eq, value: chat}]"""
NEW_DEF = """    value: properties.tokens
    filters: [{property: properties.kind, operator: in, value: [chat, embed]}]"""


def meters(tokens: str) -> str:
    return f"""
meters:
  - name: tokens
    event_name: llm
    aggregation: sum
    window: hour
{tokens}
  - name: calls
    event_name: llm
    aggregation: count
    window: hour
"""


def versioned(cut: str) -> str:
    return meters(
        NEW_DEF
        + f"""
    versions:
      - effective_until: {cut}
        value: properties.legacy
        filters: [{{property: properties.kind, operator: eq, value: chat}}]"""
    )


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def old_counts(p: dict[str, Any]) -> Decimal | None:
    return p["legacy"] if p["kind"] == "chat" else None


def new_counts(p: dict[str, Any]) -> Decimal | None:
    return p["tokens"] if p["kind"] in ("chat", "embed") else None


def reference(
    events: list[dict[str, Any]], definition: Any, per: str
) -> dict[tuple[str, str], tuple[Decimal, int]]:
    """(customer, hour start ms or YYYY-MM) -> (sum, events) under ``definition``
    (a function of the event: the value it counts, or None)."""
    out: dict[tuple[str, str], list[Any]] = defaultdict(lambda: [Decimal(0), 0])
    for e in events:
        value = definition(e)
        if value is None:
            continue
        ts = e["timestamp"]
        key = str(ts - ts % HOUR) if per == "hour" else iso(ts)[:7]
        out[(e["customer_id"], key)][0] += value
        out[(e["customer_id"], key)][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


@pytest.mark.brokers("session")
def test_effective_date_and_diff_against_a_reference(stack: StackSlice) -> None:
    now = time.time_ns() // 1_000_000
    cut = now - now % HOUR - 2 * HOUR
    rng = random.Random(26)
    events = []
    for i in range(240):
        events.append(
            {
                "event_name": "llm",
                "customer_id": rng.choice(["c1", "c2"]),
                "idempotency_key": f"e{i:03d}",
                "timestamp": min(cut - 2 * HOUR + rng.randrange(4 * HOUR), now - 1000),
                "properties": {
                    "kind": rng.choice(["chat", "embed", "other"]),
                    "legacy": Decimal(rng.randrange(1, 1000)) / 10,
                    "tokens": rng.randrange(1, 5000),
                },
            }
        )
    old_file = stack.meters_file(meters(OLD_DEF))
    new_file = stack.meters_file(meters(NEW_DEF))
    versioned_file = stack.meters_file(versioned(iso(cut)))

    keys = KeyStore(stack.tmp / "state" / "api_keys.json")
    _, operator = keys.create("operator")
    _, customer_key = keys.create("c1 only", "c1")
    stack.produce(events + events[:20])  # with exact duplicates
    worker = stack.start_worker(versioned_file)
    wait_until(
        lambda: worker.sql("SELECT count() AS n FROM usage_events FINAL")[0]["n"] == len(events),
        what="record complete",
    )

    # windows before the date keep the old definition, the later ones use the new
    def at_time(e: dict[str, Any]) -> Decimal | None:
        return (old_counts if e["timestamp"] < cut else new_counts)(e["properties"])

    expected = {k: v[0] for k, v in reference(events, lambda e: at_time(e), "hour").items()}
    assert any(int(h) < cut for _, h in expected) and any(int(h) >= cut for _, h in expected)

    def hourly() -> dict[tuple[str, str], Decimal]:
        rows = worker.sql(
            "SELECT customer_id, toString(toUnixTimestamp64Milli(period_start)) AS h, value"
            " FROM meter_usage_hourly WHERE meter = 'tokens'"
        )
        return {(r["customer_id"], r["h"]): Decimal(str(r["value"])) for r in rows}

    wait_until(lambda: hourly() == expected, timeout=60, what="windows equal the reference")

    # `meterstream meters diff`, through the running worker (an operator key)
    meters_cli = worker_cli(stack.tmp / "cli-state", worker.web_url, operator, "meters")
    span = ["--from", iso(cut - 3 * HOUR), "--to", iso(now + 1000)]

    def diff(old: Any, new: Any, *more: str) -> subprocess.CompletedProcess[str]:
        return meters_cli("diff", str(old), str(new), *span, *more)

    def totals(answer: dict[str, Any], side: str) -> dict[tuple[str, str], tuple[Decimal, int]]:
        got = {}
        for row in answer["rows"]:
            if row["meter"] == "tokens" and row[side] is not None:
                key = row["period"] if row["window_start_ms"] is None else row["window_start_ms"]
                total = row[side]
                got[(row["customer_id"], str(key))] = (
                    Decimal(total["value"]),
                    total["event_count"],
                )
        return got

    # the old file against the new one applied to all history (what a recompute would do)
    run = diff(old_file, new_file, "--format", "json")
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["meters"] == {"calls": "unchanged", "tokens": "changed"}
    old_ref = reference(events, lambda e: old_counts(e["properties"]), "period")
    new_ref = reference(events, lambda e: new_counts(e["properties"]), "period")
    assert totals(answer, "old") == old_ref
    assert totals(answer, "new") == new_ref
    for row in answer["rows"]:
        if row["meter"] == "tokens":
            key = (row["customer_id"], row["period"])
            want = new_ref.get(key, (Decimal(0), 0))[0] - old_ref.get(key, (Decimal(0), 0))[0]
            assert Decimal(row["difference"]) == want

    # per window, the old file against the versioned one: before the date nothing changes
    run = diff(old_file, versioned_file, "--format", "json", "--window", "--customer", "c1")
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    hour_old = reference(events, lambda e: old_counts(e["properties"]), "hour")
    hour_new = reference(events, at_time, "hour")
    assert totals(answer, "old") == {k: v for k, v in hour_old.items() if k[0] == "c1"}
    assert totals(answer, "new") == {k: v for k, v in hour_new.items() if k[0] == "c1"}
    for row in answer["rows"]:
        if row["window_start_ms"] < cut:
            assert Decimal(row["difference"]) == 0, row

    # the table says the same for a person
    run = diff(old_file, versioned_file, "--meter", "tokens")
    assert run.returncode == 0, run.stderr
    assert "tokens: changed" in run.stdout and "calls" not in run.stdout

    # both files are validated first: every problem with its path, exit 2
    bad = stack.meters_file(versioned(iso(cut + 60_000)).replace("count", "x"))
    bad_old = stack.meters_file(meters(OLD_DEF).replace("window: hour", "window: week", 1))
    run = diff(bad_old, bad)
    assert run.returncode == 2
    assert f"{bad_old}: meters[0].window: 'week' is not one of" in run.stderr
    assert f"{bad}: meters[0].versions[0].effective_until: " in run.stderr
    assert f"{bad}: meters[1].aggregation: 'x' is not one of" in run.stderr

    # the route is an operator's: a customer's key cannot, a bad document is a 400
    body = {"old": old_file.read_text(), "new": "meters: [1]", "from": cut, "to": now}
    url = f"{worker.web_url}/v1/meters/diff"
    assert status_of(url, customer_key, "POST", body) == 403
    with pytest.raises(urllib.error.HTTPError) as refused:
        request_json(url, operator, "POST", body)
    assert refused.value.code == 400
    assert json.loads(refused.value.read())["problems"] == ["new: meters[0]: must be a mapping"]


def window_totals(answer: dict[str, Any]) -> dict[str, dict[tuple[str, str], Any]]:
    """A diff's per-window rows: each side's (customer, window start) -> (value, events)."""
    return {
        side: {
            (r["customer_id"], str(r["window_start_ms"])): (
                Decimal(r[side]["value"]),
                r[side]["event_count"],
            )
            for r in answer["rows"]
            if r[side] is not None
        }
        for side in ("old", "new")
    }


@pytest.mark.brokers("session")
def test_recompute_applies_the_new_definition_to_history(stack: StackSlice) -> None:
    now = time.time_ns() // 1_000_000
    start = now - now % HOUR - 3 * HOUR
    rng = random.Random(27)
    events = [
        {
            "event_name": "llm",
            "customer_id": rng.choice(["c1", "c2"]),
            "idempotency_key": f"r{i:03d}",
            "timestamp": min(start + rng.randrange(3 * HOUR), now - 1000),
            "properties": {
                "kind": rng.choice(["chat", "embed", "other"]),
                "legacy": Decimal(rng.randrange(1, 1000)) / 10,
                "tokens": rng.randrange(1, 5000),
            },
        }
        for i in range(150)
    ]
    keys = KeyStore(stack.tmp / "state" / "api_keys.json")
    _, operator = keys.create("operator")
    stack.produce(events)
    old_file, new_file = stack.meters_file(meters(OLD_DEF)), stack.meters_file(meters(NEW_DEF))
    worker = stack.start_worker(old_file)

    def hourly(w: Any) -> dict[tuple[str, str], tuple[Decimal, int]]:
        rows = w.sql(
            "SELECT customer_id, toString(toUnixTimestamp64Milli(period_start)) AS h, value,"
            " event_count FROM meter_usage_hourly WHERE meter = 'tokens'"
        )
        return {
            (r["customer_id"], r["h"]): (Decimal(str(r["value"])), int(r["event_count"]))
            for r in rows
        }

    old_ref = reference(events, lambda e: old_counts(e["properties"]), "hour")
    new_ref = reference(events, lambda e: new_counts(e["properties"]), "hour")
    wait_until(lambda: hourly(worker) == old_ref, what="windows under the old definition")
    # stopped once its offsets are committed: a replay after the restart would rebuild the
    # replayed events' windows from the record, under the new file
    group, partitions = f"{stack.prefix}meterstream", Settings.model_fields["partitions"].default

    def all_committed() -> bool:  # by records sent (Tansu's end offsets are not counts)
        _, committed = group_offsets(stack.bootstrap, stack.topic, partitions, group)
        return sum(offset or 0 for offset in committed.values()) == len(events)

    wait_until(all_committed, what="every offset committed")
    worker.stop()

    # the worker restarts with the changed file: history keeps what it was counted with
    worker = stack.start_worker(new_file)
    # past its start-up rebalance: a rebuild record sent while the worker was starting was
    # seen left unprocessed (3 runs in ~9; the usage-corrections agent has no gap check as
    # usage-events has, pipeline/worker/gaps.py); an event no meter counts, recorded
    ping = {"event_name": "ping", "customer_id": "c1", "timestamp": now - 1000, "properties": {}}
    stack.produce([ping])

    def recorded() -> int:
        return int(worker.sql("SELECT count() AS n FROM usage_events FINAL")[0]["n"])

    wait_until(lambda: recorded() == len(events) + 1, what="the worker consuming")
    assert hourly(worker) == old_ref
    meters_cli = worker_cli(stack.tmp / "cli-state", worker.web_url, operator, "meters")

    def recompute(*more: str) -> subprocess.CompletedProcess[str]:
        since = iso(start - HOUR)
        return meters_cli("recompute", "tokens", "--from", since, "--format", "json", *more)

    # the dry run: the windows as stored against the record under the file now
    run = recompute("--dry-run", "--window")
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["status"] == "dry_run"
    assert window_totals(answer) == {"old": old_ref, "new": new_ref}
    assert hourly(worker) == old_ref  # nothing written

    run = recompute()  # no reason: refused
    assert run.returncode == 2 and "--reason" in run.stderr
    run = recompute("--reason", "tokens counted as in the contract", "--author", "ops")
    assert run.returncode == 0, run.stderr
    done = json.loads(run.stdout)
    assert done["kind"] == "recompute" and done["author"].startswith("ops (key ")
    assert done["events_affected"] == sum(n for _, n in new_ref.values())
    wait_until(lambda: hourly(worker) == new_ref, what="windows under the new definition")
    log = worker.sql("SELECT kind, reason, windows_affected FROM corrections FINAL")
    assert log == [
        {
            "kind": "recompute",
            "reason": "tokens counted as in the contract",
            "windows_affected": len(set(old_ref) | set(new_ref)),
        }
    ]
    # a repeat with the same correction_id: the same windows again, one log row
    again = recompute("--reason", "again", "--correction-id", done["correction_id"])
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["repeated"] is True
    time.sleep(2)
    assert hourly(worker) == new_ref
    assert len(worker.sql("SELECT correction_id FROM corrections FINAL")) == 1

    # without a worker: straight from ClickHouse (the DSN), the same totals
    worker.stop()
    offline_state = stack.tmp / "offline"
    env = stack.env(new_file, state_dir=offline_state)

    def offline(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meterstream.cli", "meters", *args,
             "--state-dir", str(offline_state)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    since = ["--from", iso(start - HOUR), "--window", "--format", "json"]
    run = offline("diff", str(old_file), str(new_file), *since)
    assert run.returncode == 0, run.stderr
    assert window_totals(json.loads(run.stdout)) == {"old": old_ref, "new": new_ref}
    run = offline("recompute", "tokens", "--dry-run", *since)
    assert run.returncode == 0, run.stderr
    assert window_totals(json.loads(run.stdout)) == {"old": new_ref, "new": new_ref}
    run = offline("recompute", "tokens", "--from", iso(start), "--reason", "offline")
    assert run.returncode == 1 and "needs the running worker" in run.stderr
