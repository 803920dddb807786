"""``meterstream run``: start what is not configured, then the worker; optionally a demo.

Children (broker, Stripe emulator, worker) run in their own sessions, so a
Ctrl-C reaches only this supervisor, which then stops them in order: demo,
worker (drains and commits), emulator, broker. SIGTERM and SIGHUP (the
terminal closed) do the same; a second signal while stopping ends the
supervisor at once, and with it the children (below).

A worker that dies on its own (SIGKILL, OOM, a crash) is restarted after a
backoff, with a log line; one that keeps dying at start-up stops the stack with
the reason and exit code 1: see pipeline/embedded/restarts.py.

Nothing outlives meterstream, however it dies (SIGKILL included) and under
load: each child gets a signal from the kernel when this process dies
(``PR_SET_PDEATHSIG``; Tansu SIGINT, the others SIGTERM), and the worker,
which knows this process's pid (``METERSTREAM_SUPERVISOR_PID``), then exits
within a few seconds even if its graceful stop cannot finish (its broker went
with us): see pipeline/worker/lifeline.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from meterstream.embedded.kafka import KafkaBroker, broker_name, embedded_broker
from meterstream.embedded.processes import die_with_parent, free_port, stop_process, wait_for_port
from meterstream.embedded.restarts import WorkerRestarts
from meterstream.embedded.tansu import EmbeddedBroker
from meterstream.endpoints import write_endpoints
from meterstream.errors import ConfigError, MeterstreamError
from meterstream.logs import configure_logging
from meterstream.meters.config import MetersConfig, load_meters, meters_path
from meterstream.settings import Settings

TOTALS_SQL = """
SELECT meter, customer_id, any(aggregation) AS aggregation,
       sum(value) AS total, max(value) AS maximum, min(value) AS minimum,
       length(groupUniqArrayArray(distinct_values)) AS distinct_count,
       argMax(value, (latest_ts, latest_key)) AS latest
FROM (
    SELECT meter, customer_id, group_key, window_start,
           argMax(aggregation, version) AS aggregation, argMax(value, version) AS value,
           argMax(distinct_values, version) AS distinct_values,
           argMax(latest_ts, version) AS latest_ts, argMax(latest_key, version) AS latest_key,
           argMax(window_end, version) AS window_end
    FROM meter_windows
    GROUP BY meter, customer_id, group_key, window_start
)
{where}
GROUP BY meter, customer_id
ORDER BY meter, customer_id
"""


def period_totals(rows: list[dict[str, Any]]) -> dict[tuple[str, str], Decimal]:
    """(meter, customer) -> total, picking the column that fits each aggregation."""
    pick = {
        "sum": "total",
        "count": "total",
        "max": "maximum",
        "min": "minimum",
        "unique_count": "distinct_count",
        "latest": "latest",
    }
    return {(r["meter"], r["customer_id"]): Decimal(str(r[pick[r["aggregation"]]])) for r in rows}


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 30) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read(), parse_float=Decimal)


def sql_rows(web_url: str, sql: str) -> list[dict[str, Any]]:
    result = http_json(f"{web_url}/v1/sql", {"sql": sql})
    return [dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]


def map_demo_customers(settings: Settings) -> None:
    """Map the demo's customers to their Stripe customers (through the running worker;
    idempotent: a mapping already in place is left as it is)."""
    from meterstream.billing.customers import set_mapping
    from meterstream.embedded.demo.load import STRIPE_CUSTOMERS

    for customer, stripe_id in sorted(STRIPE_CUSTOMERS.items()):
        set_mapping(settings, customer, stripe_id)


def stripe_totals(
    api_base: str,
    meters: MetersConfig,
    period: str | None = None,
    mapping: Mapping[str, str] | None = None,
) -> dict[tuple[str, str], Decimal]:
    """What the emulator received, per (meter, meterstream customer), by the meter's formula.

    ``period`` (``YYYY-MM``): only meter events stamped in that month (the
    forwarder stamps each with a time inside its billing period). Cancelled
    events do not count, as in Stripe's summaries. Stripe customers are mapped
    back to meterstream customers through ``mapping`` (customer -> Stripe id;
    default: the demo's); one no customer maps to is shown under its Stripe id.
    """
    from meterstream.embedded.demo.load import STRIPE_CUSTOMERS
    from meterstream.meters.windows import month_bounds
    from meterstream.sinks.stripe.payloads import formula_for

    owner = {stripe_id: c for c, stripe_id in (mapping or STRIPE_CUSTOMERS).items()}
    events = http_json(f"{api_base}/_emulator/events")
    if isinstance(events, dict):
        events = events.get("data", [])
    lo, hi = (None, None)
    if period:
        start_ms, end_ms = month_bounds(period)
        lo, hi = start_ms // 1000, end_ms // 1000
    by_name = {m.stripe.event_name: m for m in meters.meters if m.stripe}
    totals: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    last: dict[tuple[str, str], tuple[Any, ...]] = {}
    for i, ev in enumerate(events):
        meter = by_name.get(ev["event_name"])
        if meter is None or meter.stripe is None or ev.get("cancelled"):
            continue
        if lo is not None and not lo <= ev["timestamp"] < hi:
            continue
        stripe_customer = ev["payload"][meter.stripe.customer_key]
        customer = owner.get(stripe_customer, stripe_customer)
        value = Decimal(ev["payload"][meter.stripe.value_key])
        key = (meter.name, customer)
        if formula_for(meter.aggregation) == "sum":
            totals[key] += value
        elif key not in last or (ev["timestamp"], i) >= last[key][:2]:
            last[key] = (ev["timestamp"], i, value)
            totals[key] = value
    return dict(totals)


@dataclass
class Stack:
    settings: Settings
    state_dir: Path
    broker: EmbeddedBroker | KafkaBroker | None = None
    emulator: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    restarts: WorkerRestarts | None = None
    endpoints: dict[str, str] = field(default_factory=dict)

    def start(self, meters_file: Path) -> None:
        s = self.settings
        self.state_dir.mkdir(parents=True, exist_ok=True)
        bootstrap = s.kafka_bootstrap_servers
        if not bootstrap:
            self.broker = embedded_broker(
                s, state_dir=self.state_dir, log_path=self.state_dir / "broker.log"
            ).start()
            bootstrap = self.broker.bootstrap
        api_base = s.stripe_api_base
        if not api_base and s.stripe_api_key is None:
            port = free_port()
            state_file = self.state_dir / "stripe-emulator.jsonl"  # Stripe does not forget
            self.emulator = self._spawn(
                ["stripe-emulator", "--port", str(port), "--state-file", str(state_file)],
                "emulator.log",
                {},
            )
            wait_for_port("127.0.0.1", port, 30, self.emulator)
            api_base = f"http://127.0.0.1:{port}"
        dsn = s.clickhouse_dsn or s.embedded_clickhouse_dsn
        web_port = free_port()
        env = {
            "METERSTREAM_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "METERSTREAM_CLICKHOUSE_DSN": dsn,
            "METERSTREAM_WEB_PORT": str(web_port),
            "METERSTREAM_STATE_DIR": str(self.state_dir),
            "METERSTREAM_METERS_FILE": str(meters_file.resolve()),
            "METERSTREAM_SUPERVISOR_PID": str(os.getpid()),
        }
        if api_base:
            env["METERSTREAM_STRIPE_API_BASE"] = api_base
            env["METERSTREAM_STRIPE_METER_EVENTS_BASE"] = s.stripe_meter_events_base or api_base
        self.worker = self._spawn(["worker"], "worker.log", env)
        web_url = f"http://127.0.0.1:{web_port}"
        self._wait_healthy(web_url, timeout=120)
        self.restarts = WorkerRestarts(  # a worker that dies comes back (restarts.py)
            lambda: self._spawn(["worker"], "worker.log", env),
            self.worker,
            healthz_url=f"{web_url}/healthz",
            log_path=self.state_dir / "worker.log",
        )
        self.endpoints = {
            "kafka_bootstrap": bootstrap,
            "broker": broker_name(self.broker) if self.broker else "configured",
            "clickhouse_dsn": dsn,
            "stripe_api_base": api_base or "https://api.stripe.com",
            "web_url": web_url,
        }
        write_endpoints(self.state_dir, self.endpoints)

    def _spawn(
        self, args: list[str], log_name: str, env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        log = open(self.state_dir / log_name, "ab")  # noqa: SIM115
        return subprocess.Popen(
            [sys.executable, "-m", "meterstream.cli", *args],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )

    def _wait_healthy(self, web_url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.worker is not None
            if self.worker.poll() is not None:
                raise MeterstreamError(
                    f"the worker exited with code {self.worker.returncode} while starting:\n"
                    + self.log_tail("worker.log")
                )
            with contextlib.suppress(OSError):
                http_json(f"{web_url}/healthz", timeout=2)
                return
            time.sleep(0.2)
        raise MeterstreamError("the worker did not become healthy:\n" + self.log_tail("worker.log"))

    def check_worker(self) -> None:
        """Restart the worker if it died (after a backoff); raises
        :class:`~meterstream.embedded.restarts.WorkerCrashLoop` when it keeps dying at
        start-up. Call from the main thread, often (pipeline/embedded/restarts.py)."""
        if self.restarts is not None:
            self.worker = self.restarts.poll()

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            text = (self.state_dir / name).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.worker is not None:
            stop_process(self.worker, signal.SIGTERM, timeout=60)
        if self.emulator is not None:
            stop_process(self.emulator, signal.SIGTERM)
        if self.broker is not None:
            self.broker.stop()
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "endpoints.json").unlink()


def run_stack(settings: Settings, *, demo: bool, duration: float | None, rate: float) -> int:
    from meterstream.embedded.terminal import own_foreground

    configure_logging(settings.log_format)
    path = meters_path(settings)
    meters = load_meters(path)  # a bad file stops here, before anything starts
    if demo:
        from meterstream.embedded.demo.load import check_meters

        problems = check_meters(meters)
        if problems:
            raise ConfigError(problems, f"{path} (--demo needs the example meters)")
    with own_foreground():  # Ctrl-C under `make run` reaches meterstream only
        return _run(settings, meters, path, demo=demo, duration=duration, rate=rate)


def _run(
    settings: Settings,
    meters: MetersConfig,
    path: Path,
    *,
    demo: bool,
    duration: float | None,
    rate: float,
) -> int:
    stack = Stack(settings, settings.state_dir)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)  # the terminal closed
    # Installed explicitly: a parent may have started us with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stack.start(path)
        print(f"meterstream is running: {json.dumps(stack.endpoints)}", flush=True)
        print(f"logs in {settings.state_dir}/ (worker.log, broker.log, emulator.log)", flush=True)
        print(
            f"events API: POST {stack.endpoints['web_url']}/v1/events with a key from "
            f"`meterstream keys create NAME --state-dir {settings.state_dir}`",
            flush=True,
        )
        if demo:
            from meterstream.embedded.demo.runner import run_demo

            return asyncio.run(run_demo(stack, meters, duration, rate))
        deadline = time.monotonic() + duration if duration else None
        while deadline is None or time.monotonic() < deadline:
            stack.check_worker()
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
            print("\nstopping ...", flush=True)
        return 0
    finally:
        # A second signal while stopping ends this process at once; the kernel
        # then signals the children that are left, and the worker, already
        # stopping, exits at once on it.
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        stack.stop()
