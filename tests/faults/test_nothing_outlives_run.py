"""Nothing outlives ``meterstream run``, under load, however it dies; a worker that
loses its broker stops loudly within its bound; a second SIGTERM ends a stuck worker.

Real processes: ``meterstream run --demo`` as a user starts it, and workers
against a broker of the test's own (it is killed). The process tree is read
from /proc before the signal, and every process in it must be gone after.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
import threading
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import pytest

from meterstream.embedded.tansu import EmbeddedBroker
from meterstream.worker.lifeline import EXIT_BROKER_LOST, PARENT_GONE_GRACE_SECONDS
from tests.harness import REPO, StackSlice, Worker, http_json, wait_until
from tests.support.cli import port_open, run_endpoints
from tests.support.terminal import readable

pytestmark = pytest.mark.faults

COUNT_METER = """
meters:
  - name: calls
    event_name: call
    aggregation: count
"""


@dataclass(frozen=True)
class Proc:
    pid: int
    start: str  # start time in clock ticks since boot: a reused pid has another
    cmdline: str

    def alive(self) -> bool:
        """Still running. Exited but not yet reaped (a zombie) counts as gone, once
        every thread is: threads still exiting hold the process's sockets."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            threads = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return False
        if stat.rsplit(")", 1)[1].split()[19] != self.start:
            return False  # the pid was reused
        for tid in threads:
            try:
                state = Path(f"/proc/{self.pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            if state.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                return True
        return False


def descendants(root: int) -> list[Proc]:
    """Every process under ``root`` (children, their children, ...), from /proc."""
    parent_of: dict[int, int] = {}
    start_of: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent_of[int(entry)] = int(fields[1])
        start_of[int(entry)] = fields[19]
    found: list[Proc] = []
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parent_of.items():
            if ppid == parent:
                try:
                    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                found.append(Proc(pid, start_of[pid], raw.replace(b"\0", b" ").decode()))
                frontier.append(pid)
    return found


def recorded(web_url: str) -> int:
    result = http_json(f"{web_url}/v1/sql", {"sql": "SELECT count() AS n FROM usage_events"})
    return int(result["rows"][0][0])


def readiness(web_url: str) -> dict[str, str]:
    """/readyz's checks, from a 200 or a 503."""
    try:
        body = http_json(f"{web_url}/readyz", timeout=5)
    except urllib.error.HTTPError as exc:
        assert exc.code == 503
        body = json.loads(exc.read())
    else:
        assert body["ready"] is True
    return dict(body["checks"])


def log_size(path: Path) -> int:
    return path.stat().st_size


def children_under_load(proc: subprocess.Popen[bytes], web: str) -> tuple[list[Proc], str]:
    """Once the demo's load is recorded: the run's descendants and their command lines."""
    wait_until(lambda: recorded(web) >= 4000, timeout=120, what="the demo load recorded")
    children = descendants(proc.pid)
    return children, " | ".join(c.cmdline for c in children)


def work_in_flight(web: str, worker_log: Path) -> int:
    """Waits until the record is still growing, so the fault lands on work in flight;
    returns the worker log's size at that moment."""
    before = recorded(web)
    wait_until(lambda: recorded(web) > before, timeout=30, what="the record growing")
    return log_size(worker_log)


def kill_leftovers(proc: subprocess.Popen[bytes], children: list[Proc]) -> None:
    """SIGKILL whatever a failed test left running: the children, then the run."""
    for child in children:
        if child.alive():
            os.kill(child.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def log_lines_since(path: Path, offset: int) -> list[str]:
    """The lines written to a log after it had ``offset`` bytes."""
    with path.open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace").splitlines()


class Terminal(threading.Thread):
    """A pseudo-terminal whose output is drained to a file, as a terminal window shows
    it; ``close`` is the window closed: the kernel hangs the terminal up (SIGHUP to
    the session's leader) and writes to it fail."""

    def __init__(self, out: Path) -> None:
        super().__init__(daemon=True)
        self.master, self.slave = os.openpty()
        self.out = out
        self.closing = threading.Event()

    def run(self) -> None:
        with self.out.open("ab") as sink:
            while not self.closing.is_set():
                if readable(self.master, 0.1):
                    try:
                        sink.write(os.read(self.master, 65536))
                    except OSError:
                        return

    def close(self) -> None:
        self.closing.set()
        self.join(5)
        os.close(self.master)


def start_demo(
    state: Path, rate: int, terminal: Terminal | None = None, **env: str
) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """``meterstream run --demo`` with its output to a file, or in ``terminal`` as its
    controlling terminal (it leads a session of its own, as in a terminal window)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    clean.update(env)
    state.mkdir(parents=True, exist_ok=True)
    out_path = state.parent / "run.out"
    args = [sys.executable, "-m", "meterstream.cli", "run", "--meters", "meters.example.yaml",
            "--demo", "--rate", str(rate), "--state-dir", str(state)]  # fmt: skip
    if terminal is None:
        out = open(out_path, "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            args, cwd=REPO, env=clean, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    else:
        proc = subprocess.Popen(
            args, cwd=REPO, env=clean, stdin=terminal.slave, stdout=terminal.slave,
            stderr=terminal.slave, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )  # fmt: skip
        os.close(terminal.slave)
        terminal.start()
    return proc, run_endpoints(proc, state, out_path, timeout=180)


# How long after the signal every child must be gone. SIGKILL: the worker's
# bound after its supervisor died, plus slack for a loaded machine. Otherwise a
# graceful stop of the worker (the batch in flight, the commit), then the
# emulator and the broker.
ENDINGS = ["SIGKILL", "SIGHUP", "SIGTERM", "terminal-closed"]
GONE_WITHIN = {"SIGKILL": PARENT_GONE_GRACE_SECONDS + 7}


@pytest.mark.parametrize("ending", ENDINGS)
def test_nothing_outlives_run_under_load(tmp_path: Path, ending: str) -> None:
    state = tmp_path / "state"
    terminal = Terminal(tmp_path / "run.out") if ending == "terminal-closed" else None
    proc, endpoints = start_demo(state, rate=2000, terminal=terminal)
    children: list[Proc] = []
    try:
        web = endpoints["web_url"]
        children, commands = children_under_load(proc, web)
        broker = endpoints["broker"]  # this machine's default: Kafka with Java 17+, else Tansu
        started = {"kafka": "kafka.Kafka", "tansu": "tansu"}[broker]
        assert started in commands, commands
        assert "meterstream.cli stripe-emulator" in commands, commands
        assert "meterstream.cli worker" in commands, commands
        worker_log = state / "worker.log"
        log_at_signal = work_in_flight(web, worker_log)

        signalled = time.monotonic()
        if terminal is not None:
            terminal.close()
        else:
            proc.send_signal(signal.Signals[ending])
        wait_until(
            lambda: not [c for c in children if c.alive()],
            timeout=120,
            interval=0.05,
            what=f"every child of meterstream run gone after {ending}",
        )
        gone_after = time.monotonic() - signalled
        assert gone_after < GONE_WITHIN.get(ending, 30.0), f"{gone_after:.1f} s"
        rc = proc.wait(30)
        print(f"{ending}: {len(children)} children gone after {gone_after:.2f} s; run exit {rc}")
        if ending == "SIGKILL":
            assert rc == -signal.SIGKILL
        elif ending != "terminal-closed":  # there, nobody is left to read it
            # a clean stop (130 when the demo noticed the interrupt first)
            assert rc in (0, 130), rc

        for address in (endpoints["kafka_bootstrap"], web, endpoints["stripe_api_base"]):
            assert not port_open(address), f"{address} still open"
        after = log_lines_since(worker_log, log_at_signal)
        assert len(after) < 50, "\n".join(after[-20:])  # no flood of connection errors
        if ending == "SIGKILL":
            assert any(f"the supervisor (pid {proc.pid}) is gone" in line for line in after), after
        else:  # stopped by the supervisor, cleanly
            assert any("SIGTERM received: stopping" in line for line in after), after
            assert not any("CRITICAL" in line.upper() for line in after), after
    finally:
        kill_leftovers(proc, children)


def test_worker_of_a_killed_run_with_an_external_broker_stops_within_the_grace(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """The broker is configured, not a child: it stays up, and the worker, whose
    graceful stop can finish, still ends within the grace after its supervisor died."""
    state = tmp_path / "state"
    prefix = f"run{os.getpid()}-{time.monotonic_ns()}-"
    proc, endpoints = start_demo(
        state,
        rate=2000,
        METERSTREAM_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
        METERSTREAM_TOPIC_PREFIX=prefix,
        METERSTREAM_APP_ID=f"{prefix}meterstream",
    )
    children: list[Proc] = []
    try:
        web = endpoints["web_url"]
        children, commands = children_under_load(proc, web)
        assert "tansu" not in commands and "kafka.Kafka" not in commands, commands
        assert "meterstream.cli worker" in commands, commands
        worker_log = state / "worker.log"
        log_at_signal = work_in_flight(web, worker_log)

        killed = time.monotonic()
        proc.kill()
        wait_until(lambda: not [c for c in children if c.alive()], timeout=120, interval=0.05,
                   what="every child gone")  # fmt: skip
        gone_after = time.monotonic() - killed
        print(f"SIGKILL, external broker: {len(children)} children gone after {gone_after:.2f} s")
        assert gone_after < PARENT_GONE_GRACE_SECONDS + 7, gone_after
        assert port_open(broker.bootstrap)  # not ours to stop
        after = log_lines_since(worker_log, log_at_signal)
        assert any(f"the supervisor (pid {proc.pid}) is gone" in line for line in after), after
        assert len(after) < 50, "\n".join(after[-20:])
    finally:
        kill_leftovers(proc, children)


class Load(threading.Thread):
    """Sends ``total`` events to the slice's topic until done or stopped (the broker is
    killed under it: short timeouts, errors end it quietly)."""

    def __init__(self, stack: StackSlice, total: int, chunk: int = 2000) -> None:
        super().__init__(daemon=True)
        self.stack, self.total, self.chunk = stack, total, chunk
        self.stopped = threading.Event()

    def run(self) -> None:
        import asyncio

        from aiokafka import AIOKafkaProducer

        now = time.time_ns() // 1_000_000

        async def send() -> None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.stack.bootstrap, linger_ms=5, request_timeout_ms=3000
            )
            await producer.start()
            try:
                for i in range(self.total):
                    if self.stopped.is_set():
                        return
                    event = {"event_name": "call", "customer_id": f"c{i % 50}",
                             "idempotency_key": f"k{i}", "timestamp": now}  # fmt: skip
                    sent = await producer.send(
                        self.stack.topic, key=event["customer_id"].encode(),
                        value=json.dumps(event).encode(),
                    )  # fmt: skip
                    sent.add_done_callback(lambda f: f.cancelled() or f.exception())
                    if i % self.chunk == 0:
                        await producer.flush()
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.stop(), 5)

        with contextlib.suppress(Exception):
            asyncio.run(send())


def kill_broker_mid_load(
    stack: StackSlice, broker: EmbeddedBroker, worker: Worker
) -> tuple[float, int]:
    """Kill the broker while the worker has events in flight; returns when (monotonic)
    and the worker log's size then."""
    load = Load(stack, total=200_000)
    load.start()
    try:
        wait_until(lambda: recorded(worker.web_url) >= 3000, timeout=120, what="events recorded")
        log_at_kill = log_size(worker.log_path)
        assert broker.proc is not None
        broker.proc.kill()
        killed = time.monotonic()
        broker.proc.wait(10)
    finally:
        load.stopped.set()
    in_record = recorded(worker.web_url)  # the worker's own engine answers without Kafka
    assert 0 < in_record < load.total, in_record  # the kill landed with work in flight
    load.join(15)
    return killed, log_at_kill


def test_worker_that_loses_its_broker_exits_loudly_within_the_bound(
    stripe_emulator: str, worker_chdb_path: Path, tmp_path: Path
) -> None:
    bound = 8
    with EmbeddedBroker(log=tmp_path / "own-broker.log") as own:
        stack = StackSlice(own.bootstrap, worker_chdb_path, stripe_emulator, tmp_path)
        try:
            worker = stack.start_worker(
                stack.meters_file(COUNT_METER), METERSTREAM_BROKER_LOST_SECONDS=str(bound)
            )
            # Idle for longer than the bound, with the broker up: still in contact.
            time.sleep(bound + 4)
            assert worker.proc.poll() is None, worker.log()[-3000:]
            assert readiness(worker.web_url)["broker"] == "ok"

            killed, log_at_kill = kill_broker_mid_load(stack, own, worker)
            # Meanwhile not ready: /readyz says why (a load balancer stops sending).
            wait_until(
                lambda: readiness(worker.web_url)["broker"].startswith("no answer for"),
                timeout=bound,
                interval=0.2,
                what="/readyz reporting the broker",
            )
            rc = worker.proc.wait(bound + 30)
            exited_after = time.monotonic() - killed
            print(f"broker killed: the worker exited {rc} after {exited_after:.1f} s")
            after = log_lines_since(worker.log_path, log_at_kill)
            assert rc == EXIT_BROKER_LOST, "\n".join(after[-20:])
            assert bound - 2 <= exited_after <= bound + 15, exited_after
            critical = [line for line in after if "CRITICAL" in line]
            assert len(critical) == 1, critical
            assert "lost the Kafka broker" in critical[0]
            assert f"METERSTREAM_BROKER_LOST_SECONDS={bound}" in critical[0]
            # Connection errors rate-limited: the old worker logged ~100 lines a second.
            assert len(after) < 60, "\n".join(after[-30:])
        finally:
            stack.stop_all()


def test_second_sigterm_ends_a_stuck_worker_at_once(
    stripe_emulator: str, worker_chdb_path: Path, tmp_path: Path
) -> None:
    with EmbeddedBroker(log=tmp_path / "own-broker.log") as own:
        stack = StackSlice(own.bootstrap, worker_chdb_path, stripe_emulator, tmp_path)
        try:
            worker = stack.start_worker(
                stack.meters_file(COUNT_METER), METERSTREAM_BROKER_LOST_SECONDS="600"
            )
            kill_broker_mid_load(stack, own, worker)
            worker.proc.send_signal(signal.SIGTERM)
            # Stuck: its graceful stop cannot commit to a broker that is gone.
            time.sleep(5)
            assert worker.proc.poll() is None, worker.log()[-3000:]

            again = time.monotonic()
            worker.proc.send_signal(signal.SIGTERM)
            rc = worker.proc.wait(30)
            exited_after = time.monotonic() - again
            print(f"second SIGTERM: the worker exited {rc} after {exited_after:.2f} s")
            assert rc == 128 + signal.SIGTERM
            assert exited_after < 3, exited_after
            assert "SIGTERM received again while stopping: exiting now" in worker.log()
        finally:
            stack.stop_all()


def test_clickhouse_outage_longer_than_the_broker_bound_is_not_a_lost_broker(
    stack: StackSlice,
) -> None:
    """A ClickHouse outage holds the batch (retried until it succeeds) but not the
    broker's answers: the worker waits it out instead of exiting."""
    bound = 6
    down = stack.tmp / "clickhouse-down"
    worker = stack.start_worker(
        stack.meters_file(COUNT_METER),
        METERSTREAM_BROKER_LOST_SECONDS=str(bound),
        METERSTREAM_FAULT_CLICKHOUSE_DOWN_FILE=str(down),
    )
    now = time.time_ns() // 1_000_000
    batch = [{"event_name": "call", "customer_id": f"c{i % 7}", "idempotency_key": f"k{i}",
              "timestamp": now} for i in range(500)]  # fmt: skip
    down.touch()
    stack.produce(batch)
    time.sleep(3 * bound)
    assert worker.proc.poll() is None, worker.log()[-3000:]
    retries = [
        ln for ln in worker.metrics().splitlines() if ln.startswith("meterstream_sink_retries")
    ]
    assert retries and float(retries[0].split()[-1]) > 0, retries  # the outage landed
    down.unlink()
    wait_until(lambda: recorded(worker.web_url) == len(batch), timeout=60, what="recorded")
    assert "CRITICAL" not in worker.log()
