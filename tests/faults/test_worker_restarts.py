"""Under ``meterstream run``, a worker that dies comes back, exact; one that keeps dying at
start-up stops the stack with the reason (pipeline/embedded/restarts.py).

Real processes, as a user starts them: ``meterstream run`` with its own embedded broker
(Apache Kafka where this machine has Java 17+ and the jars, and Tansu), Stripe emulator
and worker. The worker is found in /proc under the run's process and SIGKILLed while the
record is growing; every window's total, and what Stripe received, is then compared
with an oracle computed from the produced events in plain Decimal arithmetic
(tests/faults/fault_load.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meterstream.embedded.demo.totals import stripe_totals
from meterstream.events import canonical_json
from meterstream.meters.config import load_meters
from tests.faults.fault_load import METERS, make_load, reference, stripe_reference
from tests.faults.test_nothing_outlives_run import Proc, descendants, recorded
from tests.harness import REPO, http_json, wait_until

pytestmark = pytest.mark.faults

CUSTOMERS = 30
# An operator's bad edit: the worker refuses this file at start-up.
BROKEN_METERS = METERS.replace("aggregation: count", "aggregation: counting")


def windows(web_url: str) -> dict[tuple[str, str, int], Decimal]:
    """(meter, customer, window start ms) -> the latest version of every window."""
    result = http_json(
        f"{web_url}/v1/sql",
        {"sql": "SELECT meter, customer_id, toUnixTimestamp64Milli(window_start) AS ws,"
                " toString(argMax(value, version)) AS v FROM meter_windows"
                " GROUP BY meter, customer_id, group_key, window_start"},
    )  # fmt: skip
    return {(m, c, int(ws)): Decimal(v) for m, c, ws, v in result["rows"]}


def stripe(api_base: str, meters_file: Path) -> dict[tuple[str, str], Decimal]:
    """What the emulator received per (meter, customer): the load's Stripe customer is
    ``cus_<customer>``."""
    customers = {f"cust-{i:03d}" for i in range(CUSTOMERS)}
    got = stripe_totals(
        api_base, load_meters(meters_file), None, {c: f"cus_{c}" for c in customers}
    )
    return {k: v for k, v in got.items() if v}


def differences(got: dict[Any, Decimal], want: dict[Any, Decimal]) -> list[str]:
    keys = sorted(set(got) | set(want))
    return [f"{k}: got {got.get(k)} want {want.get(k)}" for k in keys if got.get(k) != want.get(k)]


class Producer(threading.Thread):
    """Sends the stream at about ``rate`` records per second (so a kill lands mid-stream)."""

    def __init__(self, bootstrap: str, stream: list[dict[str, Any]], rate: int) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.stream, self.rate = bootstrap, stream, rate
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        from aiokafka import AIOKafkaProducer

        async def send() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
            await producer.start()
            try:
                chunk = max(1, self.rate // 10)
                for at in range(0, len(self.stream), chunk):
                    started = time.monotonic()
                    for event in self.stream[at : at + chunk]:
                        await producer.send(
                            "usage-events",
                            key=event["customer_id"].encode(),
                            value=canonical_json(event).encode(),
                        )
                    await producer.flush()
                    self.sent = min(len(self.stream), at + chunk)
                    await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - started)))
            finally:
                await producer.stop()

        try:
            asyncio.run(send())
        except BaseException as exc:  # reported by the test
            self.error = exc


def start_run(
    tmp: Path, meters_file: Path, *extra: str, **env: str
) -> tuple[subprocess.Popen[bytes], dict[str, str], Path]:
    """``meterstream run`` (no demo) with a state dir of its own; its output to a file."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    clean.update(env)
    state = tmp / "state"
    out_path = tmp / "run.out"
    args = [sys.executable, "-m", "meterstream.cli", "run", "--meters", str(meters_file),
            "--state-dir", str(state), *extra]  # fmt: skip
    out = open(out_path, "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        args, cwd=REPO, env=clean, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    endpoints = state / "endpoints.json"

    def started() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"run exited {proc.returncode}: {out_path.read_text()[-3000:]}")
        return endpoints.exists()

    wait_until(started, timeout=240, what="endpoints.json")
    return proc, json.loads(endpoints.read_text()), out_path


def the_worker(run: subprocess.Popen[bytes]) -> Proc:
    workers = [p for p in descendants(run.pid) if "meterstream.cli worker" in p.cmdline]
    assert len(workers) == 1, workers
    return workers[0]


def healthy(web_url: str) -> bool:
    try:
        http_json(f"{web_url}/healthz", timeout=2)
    except OSError:
        return False
    return True


def stop_run(run: subprocess.Popen[bytes], children: list[Proc]) -> int | None:
    """SIGTERM (a clean stop), then every child must be gone; returns the exit code."""
    rc = None
    if run.poll() is None:
        run.send_signal(signal.SIGTERM)
        try:
            rc = run.wait(120)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait(10)
    else:
        rc = run.returncode
    wait_until(lambda: not [c for c in children if c.alive()], timeout=60, what="every child gone")
    return rc


BROKERS = ["kafka", "tansu"]


@pytest.mark.parametrize("broker", BROKERS)
def test_a_sigkilled_worker_comes_back_and_every_window_is_exact(
    tmp_path: Path, broker: str
) -> None:
    if broker == "kafka":
        from meterstream.embedded.kafka import kafka_unavailable
        from meterstream.settings import Settings

        problem = kafka_unavailable(Settings())
        if problem is not None:
            pytest.skip(f"the embedded Apache Kafka cannot run here: {problem}")
    meters_file = tmp_path / "meters.yaml"
    meters_file.write_text(METERS)
    stream, counted = make_load(unique=30_000, duplicates=1_500, seed=23, customers=CUSTOMERS)
    want = reference(counted)
    want_stripe = {
        (event_name.removeprefix("fault_"), customer.removeprefix("cus_")): Decimal(value)
        for (event_name, customer), value in stripe_reference(want).items()
    }
    unique = len(counted)
    run, endpoints, out_path = start_run(tmp_path, meters_file, "--broker", broker)
    children: list[Proc] = []
    try:
        assert endpoints["broker"] == broker
        web = endpoints["web_url"]
        children = descendants(run.pid)
        first = the_worker(run)
        producer = Producer(endpoints["kafka_bootstrap"], stream, rate=1500)
        producer.start()
        # The kill lands on a worker with work in flight: the record is growing.
        wait_until(lambda: recorded(web) >= 4000, timeout=180, what="4,000 events recorded")
        before = recorded(web)
        wait_until(lambda: recorded(web) > before, timeout=60, what="the record growing")
        at_kill = recorded(web)
        os.kill(first.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert at_kill < unique, at_kill  # not done yet

        second = wait_until(
            lambda: [w for w in [the_worker_or_none(run)] if w and w.pid != first.pid],
            timeout=60,
            what="a new worker process",
        )[0]
        wait_until(lambda: healthy(web), timeout=180, what="the restarted worker's /healthz")
        back_after = time.monotonic() - killed_at
        children += [second]
        output = out_path.read_text()
        assert f"the worker (pid {first.pid}) killed by SIGKILL" in output, output[-3000:]
        assert f"the worker restarted (pid {second.pid}, restart 1)" in output, output[-3000:]

        producer.join(300)
        assert producer.error is None, producer.error
        assert producer.sent == len(stream)
        wait_until(lambda: recorded(web) >= unique, timeout=300, what="every event recorded")
        assert recorded(web) == unique
        # The windows land right after the record; then every one must be exact.
        deadline = time.monotonic() + 120
        while (got := windows(web)) != want and time.monotonic() < deadline:
            time.sleep(2)
        diff = differences(got, want)
        assert not diff, "\n".join(diff[:30])
        # Stripe: every window is closed (the load's last hour ended), so all is due.
        api_base = endpoints["stripe_api_base"]
        deadline = time.monotonic() + 120
        while (
            sent := stripe(api_base, meters_file)
        ) != want_stripe and time.monotonic() < deadline:
            time.sleep(2)
        diff = differences(sent, want_stripe)
        assert not diff, "\n".join(diff[:30])
        print(
            f"{broker}: {len(stream):,} records ({unique:,} unique), worker killed at "
            f"{at_kill:,} recorded, healthy again after {back_after:.1f} s; "
            f"{len(want):,} windows and {len(want_stripe)} Stripe totals exact"
        )
        assert run.poll() is None  # the stack carried on
    finally:
        rc = stop_run(run, children + descendants(run.pid))
    assert rc == 0, out_path.read_text()[-3000:]


def the_worker_or_none(run: subprocess.Popen[bytes]) -> Proc | None:
    workers = [p for p in descendants(run.pid) if "meterstream.cli worker" in p.cmdline]
    return workers[0] if len(workers) == 1 else None


def test_a_worker_that_dies_at_every_start_stops_the_stack_with_the_reason(
    tmp_path: Path,
) -> None:
    """The meters file is broken after the stack started (an operator's bad edit); the
    worker is killed; every restart fails on the file: crash loop, the stack stops."""
    meters_file = tmp_path / "meters.yaml"
    meters_file.write_text(METERS)
    run, _, out_path = start_run(tmp_path, meters_file)
    children = descendants(run.pid)
    try:
        first = the_worker(run)
        meters_file.write_text(BROKEN_METERS)
        os.kill(first.pid, signal.SIGKILL)
        rc = run.wait(240)
        output = out_path.read_text()
        assert rc == 1, output[-3000:]
        assert "the worker keeps dying at start-up: 3 times in a row" in output, output[-3000:]
        # the reason: the worker's own words about the file, from its last life
        assert "counting" in output.split("keeps dying at start-up", 1)[1], output[-3000:]
        assert output.count("restarting it in") == 3, output[-3000:]
    finally:
        stop_run(run, children)
    commands = " | ".join(c.cmdline for c in children)
    assert "kafka.Kafka" in commands or "tansu" in commands, commands
    assert not [c for c in children if c.alive()]  # the broker included


def test_demo_with_its_worker_sigkilled_ends_with_clickhouse_and_stripe_exact(
    tmp_path: Path,
) -> None:
    """``meterstream run --demo --duration``: the demo's own check (its generator's totals
    against ClickHouse and the Stripe emulator) passes with the worker SIGKILLed mid-run
    on this machine's default broker."""
    state = tmp_path / "state"
    env = {"PYTHONUNBUFFERED": "1"}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    args = [sys.executable, "-m", "meterstream.cli", "run", "--meters", "meters.example.yaml",
            "--demo", "--duration", "30", "--rate", "1000", "--state-dir", str(state)]  # fmt: skip
    out_path = tmp_path / "run.out"
    state.mkdir()
    with out_path.open("wb") as out:
        run = subprocess.Popen(
            args, cwd=REPO, env={**clean, **env}, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    children: list[Proc] = []
    try:
        wait_until(lambda: (state / "endpoints.json").exists() or run.poll() is not None,
                   timeout=240, what="endpoints.json")  # fmt: skip
        assert run.poll() is None, out_path.read_text()[-3000:]
        web = json.loads((state / "endpoints.json").read_text())["web_url"]
        up = time.monotonic()
        children = descendants(run.pid)
        wait_until(lambda: recorded(web) >= 4000, timeout=120, what="the demo load recorded")
        before = recorded(web)
        wait_until(lambda: recorded(web) > before, timeout=60, what="the record growing")
        first = the_worker(run)
        os.kill(first.pid, signal.SIGKILL)
        killed_at = time.monotonic() - up
        second = wait_until(
            lambda: [w for w in [the_worker_or_none(run)] if w and w.pid != first.pid],
            timeout=60,
            what="a new worker process",
        )[0]
        children.append(second)
        print(f"killed {killed_at:.1f} s into the 30 s demo, restarted after"
              f" {time.monotonic() - up - killed_at:.1f} s")  # fmt: skip
        rc = run.wait(600)
        output = out_path.read_text()
        assert rc == 0, output[-4000:]
        assert f"the worker (pid {first.pid}) killed by SIGKILL" in output, output[-4000:]
        assert "the worker restarted" in output, output[-4000:]
        assert "ClickHouse equals the generator's totals: yes" in output, output[-4000:]
        assert "Stripe equals the generator's closed windows (rounded): yes" in output, output[
            -4000:
        ]
    finally:
        stop_run(run, children)
