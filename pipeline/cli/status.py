"""``meterstream status``: the running stack on one screen.

Reads where the stack is from ``<state dir>/endpoints.json`` (written by
``meterstream run``) or ``--worker URL``, then the worker's ``/readyz`` (broker and
ClickHouse) and two reads of ``/metrics`` ``--interval`` seconds apart (consumer
lag, events per second, the last Stripe forward per meter, Stripe rows in error,
customers held, events dead-lettered). ``--json`` prints the same as one JSON
object for scripts. Exit 0 when the worker answers and is ready, 1 otherwise.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from meterstream.endpoints import read_endpoints
from meterstream.settings import Settings

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_metrics(text: str) -> Samples:
    """Sample name -> [(labels, value)], read by prometheus_client's own parser."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def _sum(samples: Samples, name: str, **match: str) -> float:
    return sum(
        v
        for labels, v in samples.get(name, [])
        if all(labels.get(k) == x for k, x in match.items())
    )


def _by(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {labels.get(label, ""): v for labels, v in samples.get(name, [])}


@dataclass
class Status:
    """What ``meterstream status`` shows (and prints with ``--json``)."""

    web_url: str | None
    broker: str
    bootstrap: str
    clickhouse: str
    ready: bool
    checks: dict[str, str] = field(default_factory=dict)
    consumer_lag: int | None = None
    lag_by_partition: dict[str, int] = field(default_factory=dict)
    events_per_second: float | None = None
    events_in: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    stripe_last_forward: dict[str, float] = field(default_factory=dict)
    stripe_error_rows: dict[str, int] = field(default_factory=dict)
    stripe_request_errors: int = 0
    stripe_waiting: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "web_url": self.web_url,
            "ready": self.ready,
            "broker": {"name": self.broker, "bootstrap": self.bootstrap,
                       "check": self.checks.get("broker")},
            "clickhouse": {"dsn": self.clickhouse, "check": self.checks.get("clickhouse")},
            "consumer_lag": {"total": self.consumer_lag, "by_partition": self.lag_by_partition},
            "events_per_second": self.events_per_second,
            "events_in_total": self.events_in,
            "events_accepted_total": self.accepted,
            "events_rejected_total": self.rejected,
            "stripe": {
                "last_forward": self.stripe_last_forward,
                "error_rows": self.stripe_error_rows,
                "request_errors_total": self.stripe_request_errors,
                "waiting_customers": self.stripe_waiting,
            },
            "problems": self.problems,
        }  # fmt: skip


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:  # /readyz answers 503 with its checks
        return exc.code, exc.read()


def collect(
    settings: Settings, worker_url: str | None, interval: float, timeout: float = 10.0
) -> Status:
    """Read the running stack (never writes anything)."""
    endpoints = read_endpoints(settings.state_dir) or {}
    url = (worker_url or endpoints.get("web_url") or "").rstrip("/") or None
    status = Status(
        web_url=url,
        broker=endpoints.get("broker", "configured" if settings.kafka_bootstrap_servers else "?"),
        bootstrap=settings.kafka_bootstrap_servers or endpoints.get("kafka_bootstrap", ""),
        clickhouse=endpoints.get("clickhouse_dsn", settings.clickhouse_dsn or ""),
        ready=False,
    )
    if url is None:
        status.problems.append(
            f"no running stack: {settings.state_dir / 'endpoints.json'} names no worker "
            "(start `meterstream run`, or pass --worker URL)"
        )
        return status
    try:
        code, body = _get(f"{url}/readyz", timeout)
        ready = json.loads(body)
        status.checks = {str(k): str(v) for k, v in ready.get("checks", {}).items()}
        status.ready = code == 200 and bool(ready.get("ready"))
        started = time.monotonic()
        _, first = _get(f"{url}/metrics", timeout)
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
        _, second = _get(f"{url}/metrics", timeout)
        elapsed = time.monotonic() - started
    except (OSError, ValueError) as exc:
        status.ready = False
        status.problems.append(f"the worker at {url} does not answer ({exc})")
        return status
    before, after = parse_metrics(first.decode()), parse_metrics(second.decode())
    events_in = "meterstream_events_in_total"
    status.events_in = int(_sum(after, events_in))
    status.accepted = int(_sum(after, "meterstream_events_accepted_total"))
    status.events_per_second = round((status.events_in - _sum(before, events_in)) / elapsed, 1)
    lag = _by(after, "meterstream_consumer_lag", "partition")
    status.lag_by_partition = {p: int(v) for p, v in sorted(lag.items())}
    status.consumer_lag = int(sum(lag.values())) if lag else None
    status.rejected = {
        r: int(v) for r, v in _by(after, "meterstream_events_rejected_total", "reason").items()
    }
    status.stripe_last_forward = _by(after, "meterstream_stripe_last_forward_seconds", "meter")
    status.stripe_error_rows = {
        m: int(v) for m, v in _by(after, "meterstream_stripe_error_rows", "meter").items()
    }
    status.stripe_request_errors = int(
        _sum(after, "meterstream_stripe_requests_total", outcome="error")
    )
    status.stripe_waiting = {
        m: int(v) for m, v in _by(after, "meterstream_stripe_waiting_customers", "meter").items()
    }
    for name, check in status.checks.items():
        if check != "ok":
            status.problems.append(f"{name}: {check}")
    if any(status.stripe_error_rows.values()):
        status.problems.append(
            f"{sum(status.stripe_error_rows.values())} Stripe meter event(s) in error: "
            "see `meterstream stripe retry`"
        )
    return status


def _ago(epoch_s: float, now: float) -> str:
    if epoch_s <= 0:
        return "never"
    seconds = max(0.0, now - epoch_s)
    when = time.strftime("%H:%M:%S", time.gmtime(epoch_s))
    return f"{when} UTC ({seconds:.0f} s ago)"


def render(status: Status, now: float | None = None) -> Any:
    """The one-screen view (a rich renderable)."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    now = time.time() if now is None else now

    def mark(check: str | None) -> str:
        if check is None:
            return "[yellow]?[/]"
        return "[green]ok[/]" if check == "ok" else f"[red]{check}[/]"

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("worker", f"{status.web_url or '-'}  " + ("[green]ready[/]" if status.ready
                                                             else "[red]not ready[/]"))  # fmt: skip
    table.add_row(
        "broker", f"{status.broker} {status.bootstrap}  {mark(status.checks.get('broker'))}"
    )
    table.add_row("ClickHouse", f"{status.clickhouse}  {mark(status.checks.get('clickhouse'))}")
    lag = "-" if status.consumer_lag is None else f"{status.consumer_lag:,} record(s)"
    if len(status.lag_by_partition) > 1:
        lag += "  (" + ", ".join(f"p{p}: {n:,}" for p, n in status.lag_by_partition.items()) + ")"
    table.add_row("consumer lag", lag)
    eps = "-" if status.events_per_second is None else f"{status.events_per_second:,.1f}"
    table.add_row("events/s", f"{eps}  (read {status.events_in:,}, accepted {status.accepted:,})")
    rejected = sum(status.rejected.values())
    table.add_row(
        "dead-lettered",
        f"{rejected:,}"
        + (
            "  (" + ", ".join(f"{r}: {n:,}" for r, n in sorted(status.rejected.items())) + ")"
            if rejected
            else ""
        ),
    )
    if status.stripe_last_forward:
        for meter, at in sorted(status.stripe_last_forward.items()):
            errors = status.stripe_error_rows.get(meter, 0)
            waiting = status.stripe_waiting.get(meter, 0)
            extra = f"  [red]{errors} in error[/]" if errors else ""
            extra += f"  {waiting} customer(s) waiting for a mapping" if waiting else ""
            table.add_row(f"Stripe {meter}", f"last forward {_ago(at, now)}{extra}")
    else:
        table.add_row("Stripe", "no forward yet")
    table.add_row("Stripe errors", f"{sum(status.stripe_error_rows.values()):,} pending retry, "
                  f"{status.stripe_request_errors:,} refused request(s) since start")  # fmt: skip
    parts: list[Any] = [table]
    if status.problems:
        parts.append("")
        parts.extend(f"[red]![/] {p}" for p in status.problems)
    return Panel(Group(*parts), title="meterstream status", expand=False)


def status_command(
    settings: Settings, worker_url: str | None, interval: float, as_json: bool
) -> int:
    status = collect(settings, worker_url, interval)
    if as_json:
        print(json.dumps(status.as_json(), sort_keys=True))
    else:
        from rich.console import Console

        Console().print(render(status))
    if not status.ready:
        print("meterstream status: " + "; ".join(status.problems or ["not ready"]), file=sys.stderr)
    return 0 if status.ready else 1
