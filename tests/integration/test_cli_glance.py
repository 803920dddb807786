"""At a glance: ``meterstream status`` against ``meterstream run``, ``--json`` for scripts,
and progress bars that appear on a terminal only."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from meterstream.sinks.clickhouse.migrate import load_migrations
from tests.harness import REPO, wait_until
from tests.integration.test_cli import _start_run, cli
from tests.support.terminal import readable

pytestmark = pytest.mark.integration

METERS = """
meters:
  - name: calls
    event_name: call
    aggregation: count
    window: hour
"""


def test_migrate_json_then_nothing_pending(tmp_path: Path) -> None:
    first = cli("migrate", "--json", "--state-dir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"applied": [m.name for m in load_migrations()]}
    second = cli("migrate", "--json", "--state-dir", str(tmp_path))
    assert json.loads(second.stdout) == {"applied": []}
    assert "\x1b" not in first.stderr + second.stderr  # no bar into a pipe


def test_migrate_shows_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    """Standard error a terminal, standard output a pipe: the bar goes to the terminal."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "meterstream.cli", "migrate", "--state-dir", str(tmp_path)],
        cwd=REPO, env={**clean, "TERM": "xterm", "COLUMNS": "100"},
        stdout=subprocess.PIPE, stderr=slave, text=True,
    )  # fmt: skip
    os.close(slave)
    seen = b""
    while True:
        if not readable(master, 60):
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "applied 0001_usage_events" in out and "\x1b" not in out
    text = seen.decode(errors="replace")
    assert "migrations" in text or "applied 0001" in text, text
    assert "━" in text, text  # rich's bar


def test_reconcile_json_lists_differences_with_exact_values(tmp_path: Path) -> None:
    meters = tmp_path / "meters.yaml"
    meters.write_text(METERS)
    state = ["--state-dir", str(tmp_path / "state")]
    assert cli("migrate", *state).returncode == 0
    # A window the record does not back: stored 2.5 calls for a customer with no events.
    insert = (
        "from meterstream.settings import load_settings\n"
        "from meterstream.sinks.clickhouse.client import open_clickhouse\n"
        f"s = load_settings(state_dir={str(tmp_path / 'state')!r})\n"
        "ch = open_clickhouse(s)\n"
        'ch.command("INSERT INTO meter_windows (meter, aggregation, customer_id, group_key, '
        "window_start, window_end, value, event_count, version, updated_at) VALUES ('calls', "
        "'count', 'ghost', '{}', toStartOfHour(now64(3)), toStartOfHour(now64(3)) + "
        'INTERVAL 1 HOUR, 2.5, 3, 1, now64(3))")\n'
        "ch.close()\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    done = subprocess.run(
        [sys.executable, "-c", insert], cwd=REPO, env=clean, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = cli("reconcile", "--json", "--meters", str(meters), *state)
    assert found.returncode == 1, found.stderr
    result = json.loads(found.stdout)
    assert result["repaired"] is False
    [diff] = result["differences"]
    assert diff["meter"] == "calls" and diff["customer_id"] == "ghost"
    assert (diff["stored_value"], diff["stored_count"]) == ("2.500000000", 3)
    assert (diff["record_value"], diff["record_count"]) == ("0", 0)
    assert "1 difference(s) found" in found.stderr
    repaired = cli("reconcile", "--json", "--repair", "--meters", str(meters), *state)
    assert repaired.returncode == 0 and json.loads(repaired.stdout)["repaired"] is True
    again = cli("reconcile", "--json", "--meters", str(meters), *state)
    assert again.returncode == 0 and json.loads(again.stdout)["differences"] == []


def test_status_against_meterstream_run(tmp_path: Path) -> None:
    proc, endpoints = _start_run(tmp_path, "--broker", "tansu")
    try:
        state = ["--state-dir", str(tmp_path)]
        events = "".join(
            json.dumps({"event_name": "api_request", "customer_id": f"c{i % 3}",
                        "idempotency_key": f"glance-{i}", "properties": {}}) + "\n"
            for i in range(25)
        )  # fmt: skip
        sent = cli("produce", "-", *state, stdin=events.encode())
        assert sent.returncode == 0, sent.stderr

        def status() -> dict[str, object] | None:
            done = cli("status", "--json", "--interval", "0.5", *state)
            assert done.returncode in (0, 1), done.stderr
            got = json.loads(done.stdout)
            return got if got["events_in_total"] == 25 else None

        got = wait_until(status, timeout=120, what="status shows the 25 events")
        assert got["ready"] is True and got["web_url"] == endpoints["web_url"]
        assert got["broker"] == {  # type: ignore[comparison-overlap]
            "name": "tansu", "bootstrap": endpoints["kafka_bootstrap"], "check": "ok"
        }  # fmt: skip
        assert got["clickhouse"] == {"dsn": endpoints["clickhouse_dsn"], "check": "ok"}  # type: ignore[comparison-overlap]
        assert got["events_accepted_total"] == 25 and got["problems"] == []

        # The screen: one panel with every line, from the same numbers.
        screen = cli("status", "--interval", "0.5", *state)
        assert screen.returncode == 0, screen.stderr
        for line in ("broker", "ClickHouse", "consumer lag", "events/s", "Stripe", "tansu"):
            assert line in screen.stdout, screen.stdout
        assert "25" in screen.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(90)
    # Nothing running: status says so, exit 1.
    gone = cli("status", "--json", "--state-dir", str(tmp_path))
    assert gone.returncode == 1
    assert json.loads(gone.stdout)["ready"] is False and "no running stack" in gone.stderr
