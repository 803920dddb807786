"""The dev stack of ``meterstream run`` (pipeline/embedded/run.py): start what is not
configured (broker, Stripe emulator), then the worker; stop them in order.

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

import contextlib
import os
import secrets
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from meterstream.credits.purchases import STRIPE_EVENT_TYPES
from meterstream.embedded.harness import WorkerProcess, spawn_cli
from meterstream.embedded.kafka import KafkaBroker, broker_name, embedded_broker
from meterstream.embedded.processes import free_port, log_tail, stop_process, wait_for_port
from meterstream.embedded.restarts import WorkerRestarts
from meterstream.embedded.tansu import EmbeddedBroker
from meterstream.endpoints import write_endpoints
from meterstream.settings import Settings
from meterstream.sinks.stripe.emulator.options import WEBHOOK_SECRET_ENV


@dataclass
class Stack:
    settings: Settings
    state_dir: Path
    broker: EmbeddedBroker | KafkaBroker | None = None
    emulator: subprocess.Popen[bytes] | None = None
    worker: WorkerProcess | None = None
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
        web_port = free_port()
        webhook_secret: str | None = None
        if not api_base and s.stripe_api_key is None:
            port = free_port()
            state_file = self.state_dir / "stripe-emulator.jsonl"  # Stripe does not forget
            # the emulator sends its payment webhooks to the worker, signed with a secret
            # both get at start (in the environment: never on a command line)
            webhook_secret = f"whsec_{secrets.token_hex(24)}"
            hook = f"http://127.0.0.1:{web_port}/v1/stripe/webhooks"
            self.emulator = self._spawn(
                ["stripe-emulator", "--port", str(port), "--state-file", str(state_file),
                 "--webhook-url", hook, "--webhook-events", ",".join(STRIPE_EVENT_TYPES)],
                "emulator.log",
                {WEBHOOK_SECRET_ENV: webhook_secret},
            )  # fmt: skip
            wait_for_port("127.0.0.1", port, 30, self.emulator)
            api_base = f"http://127.0.0.1:{port}"
        dsn = s.clickhouse_dsn or s.embedded_clickhouse_dsn
        env = {
            "METERSTREAM_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "METERSTREAM_CLICKHOUSE_DSN": dsn,
            "METERSTREAM_WEB_PORT": str(web_port),
            "METERSTREAM_STATE_DIR": str(self.state_dir),
            "METERSTREAM_METERS_FILE": str(meters_file.resolve()),
            "METERSTREAM_SUPERVISOR_PID": str(os.getpid()),
        }
        if s.plans_file is not None:
            env["METERSTREAM_PLANS_FILE"] = str(s.plans_file.resolve())
        if webhook_secret is not None:
            env["METERSTREAM_STRIPE_WEBHOOK_SECRET"] = webhook_secret
        if api_base:
            env["METERSTREAM_STRIPE_API_BASE"] = api_base
            env["METERSTREAM_STRIPE_METER_EVENTS_BASE"] = s.stripe_meter_events_base or api_base
        # Kept before it is healthy: stop() stops a worker that never became healthy too.
        self.worker = WorkerProcess.spawn(
            {**os.environ, **env}, self.state_dir / "worker.log", supervised=True
        )
        self.worker.wait_healthy(timeout=120)
        web_url = self.worker.web_url
        self.restarts = WorkerRestarts(  # a worker that dies comes back (restarts.py)
            lambda: (
                WorkerProcess.spawn(
                    {**os.environ, **env}, self.state_dir / "worker.log", supervised=True
                ).proc
            ),
            self.worker.proc,
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
        return spawn_cli(args, {**os.environ, **env}, self.state_dir / log_name, supervised=True)

    def check_worker(self) -> None:
        """Restart the worker if it died (after a backoff); raises
        :class:`~meterstream.embedded.restarts.WorkerCrashLoop` when it keeps dying at
        start-up. Call from the main thread, often (pipeline/embedded/restarts.py)."""
        if self.restarts is not None and self.worker is not None:
            self.worker.proc = self.restarts.poll()

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The last lines of ``name`` in the state dir (``worker.log``, ...)."""
        return log_tail(self.state_dir / name, lines)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop(signal.SIGTERM, timeout=60)
        if self.emulator is not None:
            stop_process(self.emulator, signal.SIGTERM)
        if self.broker is not None:
            self.broker.stop()
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "endpoints.json").unlink()
