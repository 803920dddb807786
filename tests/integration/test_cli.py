"""The ``meterstream`` commands a newcomer uses, run as real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meterstream.endpoints import write_endpoints
from tests.harness import REPO, StackSlice, wait_until
from tests.support.cli import port_open

pytestmark = pytest.mark.integration

COUNT_METER = """
meters:
  - name: calls
    event_name: call
    aggregation: count
"""


def cli(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    return subprocess.run(
        [sys.executable, "-m", "meterstream.cli", *args],
        cwd=REPO, input=stdin.decode() if stdin else None, capture_output=True, text=True,
        env={**clean, **(env or {})}, timeout=timeout,
    )  # fmt: skip


def test_produce_reports_bad_lines_and_sends_good_ones(stack: StackSlice) -> None:
    worker = stack.start_worker(stack.meters_file(COUNT_METER))
    now = time.time_ns() // 1_000_000
    lines = [
        json.dumps(
            {"event_name": "call", "customer_id": "c1", "idempotency_key": "a", "timestamp": now}
        ),
        "{broken",
        json.dumps({"event_name": "call", "customer_id": "c2", "idempotency_key": "b"}),
        json.dumps({"event_name": "call"}),
    ]  # fmt: skip
    result = cli(
        "produce", "-", stdin="\n".join(lines).encode(),
        env={"METERSTREAM_KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap,
             "METERSTREAM_TOPIC_PREFIX": stack.prefix},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "line 2: invalid JSON" in result.stderr
    assert "line 4: customer_id: required" in result.stderr
    assert "sent 2 event(s); 2 bad line(s) not sent" in result.stderr
    rows = wait_until(
        lambda: worker.sql("SELECT customer_id FROM usage_events ORDER BY customer_id") or None,
        what="produced events recorded",
    )
    assert [r["customer_id"] for r in rows] == ["c1", "c2"]

    # `meterstream sql` goes through the running worker (it holds the embedded engine).
    state = stack.tmp / "cli-state"
    write_endpoints(state, {"web_url": worker.web_url, "kafka_bootstrap": stack.bootstrap})
    as_json = cli("sql", "SELECT customer_id FROM usage_events ORDER BY 1", "--format", "json",
                  "--state-dir", str(state))  # fmt: skip
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == [{"customer_id": "c1"}, {"customer_id": "c2"}]
    table = cli("sql", "SELECT count() AS n FROM usage_events", "--state-dir", str(state))
    assert table.stdout.split() == ["n", "-", "2", "(1", "row)"]
    refused = cli("sql", "DROP TABLE usage_events", "--state-dir", str(state))
    assert refused.returncode != 0 and "read-only" in refused.stderr


def test_meters_check_lists_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "meters:\n"
        "  - {name: a, event_name: e, aggregation: sum}\n"
        "  - {name: a, event_name: e, aggregation: count,\n"
        "     filters: [{property: properties.x, operator: like, value: 1}]}\n"
    )
    result = cli("meters", "check", str(bad))
    assert result.returncode == 2
    assert "meters[0].value: required for aggregation 'sum'" in result.stderr
    assert "meters[1].name: duplicate meter name 'a'" in result.stderr
    assert "meters[1].filters[0].operator: 'like' is not one of" in result.stderr
    ok = cli("meters", "check", "meters.example.yaml")
    assert ok.returncode == 0 and "no problems" in ok.stdout

    # `run` refuses the same file before starting anything.
    run = cli("run", "--meters", str(bad), "--state-dir", str(tmp_path / "state"), timeout=60)
    assert run.returncode == 2
    assert "meters[1].filters[0].operator" in run.stderr
    assert not (tmp_path / "state" / "endpoints.json").exists()


def test_migrate_twice_applies_nothing_the_second_time(tmp_path: Path) -> None:
    first = cli("migrate", "--state-dir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert "applied 0001_usage_events" in first.stdout
    second = cli("migrate", "--state-dir", str(tmp_path))
    assert second.returncode == 0
    assert second.stdout.strip() == "nothing pending: the schema is up to date"


def _start_run(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meterstream.cli", "run", "--meters", "meters.example.yaml",
         "--state-dir", str(tmp_path), *extra],
        cwd=REPO, env=clean, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    endpoints = tmp_path / "endpoints.json"

    def started() -> bool:
        if proc.poll() is not None:
            raise AssertionError(
                f"run exited {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}"
            )
        return endpoints.exists()

    wait_until(started, timeout=120, what="endpoints.json")
    return proc, json.loads(endpoints.read_text())


def _assert_all_gone(endpoints: dict[str, str]) -> None:
    web = endpoints["web_url"].removeprefix("http://")
    stripe = endpoints["stripe_api_base"].removeprefix("http://")
    for address in (endpoints["kafka_bootstrap"], web, stripe):
        wait_until(lambda a=address: not port_open(a), timeout=30, what=f"{address} closed")


def test_run_ctrl_c_leaves_nothing_behind(tmp_path: Path) -> None:
    proc, endpoints = _start_run(tmp_path)
    assert set(endpoints) == {
        "kafka_bootstrap", "broker", "clickhouse_dsn", "stripe_api_base", "web_url"
    }  # fmt: skip
    assert endpoints["broker"] in ("kafka", "tansu")
    assert endpoints["clickhouse_dsn"] == f"chdb://{tmp_path.resolve()}/clickhouse"
    assert port_open(endpoints["kafka_bootstrap"])
    proc.send_signal(signal.SIGINT)
    assert proc.wait(90) == 0
    _assert_all_gone(endpoints)
    assert not (tmp_path / "endpoints.json").exists()
