"""The one process harness: worker processes started, probed and stopped one way, by
``meterstream run`` (pipeline/embedded/stack.py), the tests (tests/harness.py) and the
benchmark (bench/stack.py).

- :func:`spawn_cli`: a ``python -m meterstream.cli`` child with its log file;
  ``supervised`` for the children of ``meterstream run`` (their own session, so a
  Ctrl-C reaches only the supervisor; signalled by the kernel when it dies;
  their logs kept across runs).
- :class:`WorkerProcess`: a running worker: healthy (``/healthz``), its read-only
  SQL, metrics and log, stopped (SIGTERM, then SIGKILL).
- :class:`WorkerSlice`: a worker confined to one slice of a shared stack (topic
  prefix, consumer group, ClickHouse database): tests and the benchmark.
- :func:`http_json`, :func:`wait_until`: the probes they share.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Self, TypeVar

from meterstream.embedded.processes import (
    die_with_parent,
    isolated_worker_env,
    log_tail,
    stop_process,
)
from meterstream.errors import MeterstreamError

T = TypeVar("T")
Failure = Callable[[str], Exception]


def http_json(url: str, body: Any = None, timeout: float = 30) -> Any:
    """GET (or POST ``body`` as JSON) ``url``; the answer's JSON, numbers exact (Decimal)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read(), parse_float=Decimal)


def http_text(url: str, timeout: float = 30) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


def sql_rows(web_url: str, sql: str) -> list[dict[str, Any]]:
    """A worker's read-only SQL (``POST /v1/sql``), as one dict a row."""
    result = http_json(f"{web_url}/v1/sql", {"sql": sql})
    return [dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]


def wait_until(
    fn: Callable[[], T],
    timeout: float = 60,
    interval: float = 0.3,
    what: str = "",
    *,
    failure: Failure = MeterstreamError,
) -> T:
    """``fn()``'s first true answer, polled every ``interval`` seconds (network errors
    count as false); ``failure`` with the last answer after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (OSError, urllib.error.URLError, ConnectionError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise failure(f"timed out after {timeout:g}s waiting for {what or fn}: last={last!r}")


def spawn_cli(
    args: list[str],
    env: dict[str, str],
    log_path: Path,
    *,
    cwd: Path | None = None,
    supervised: bool = False,
) -> subprocess.Popen[bytes]:
    """``python -m meterstream.cli ARGS`` with ``env`` (the whole environment), its
    output in ``log_path``. ``supervised``: a child of ``meterstream run``: its own
    session, SIGTERM from the kernel when this process dies, the log appended to."""
    log = open(log_path, "ab" if supervised else "wb")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "meterstream.cli", *args],
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=supervised,
        preexec_fn=die_with_parent(signal.SIGTERM) if supervised else None,
    )


@dataclass
class WorkerProcess:
    """A ``meterstream worker`` child and its web server."""

    proc: subprocess.Popen[bytes]
    web_url: str
    log_path: Path

    @classmethod
    def spawn(
        cls,
        env: dict[str, str],
        log_path: Path,
        *,
        cwd: Path | None = None,
        supervised: bool = False,
    ) -> Self:
        """A worker started with ``env`` (the whole environment), its web server on
        ``METERSTREAM_WEB_PORT`` (loopback); :meth:`wait_healthy` waits for it."""
        proc = spawn_cli(["worker"], env, log_path, cwd=cwd, supervised=supervised)
        return cls(proc, f"http://127.0.0.1:{env['METERSTREAM_WEB_PORT']}", log_path)

    def wait_healthy(
        self, timeout: float, failure: Failure = MeterstreamError, interval: float = 0.2
    ) -> None:
        """Until ``/healthz`` answers; ``failure`` (with the log's tail) if the worker
        exits first or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise failure(
                    f"the worker exited with code {self.proc.returncode} while starting:\n"
                    + self.log_tail()
                )
            with contextlib.suppress(OSError):
                http_json(f"{self.web_url}/healthz", timeout=2)
                return
            time.sleep(interval)
        raise failure("the worker did not become healthy:\n" + self.log_tail())

    def sql(self, query: str) -> list[dict[str, Any]]:
        return sql_rows(self.web_url, query)

    def get(self, path: str) -> Any:
        return http_json(f"{self.web_url}{path}")

    def metrics(self) -> str:
        """``/metrics``: Prometheus text."""
        return http_text(f"{self.web_url}/metrics", timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """``sig``, then SIGKILL after ``timeout`` seconds; the exit code."""
        stop_process(self.proc, sig, timeout)
        return int(self.proc.returncode)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@dataclass
class WorkerSlice:
    """A slice of a shared stack (broker, chdb path, Stripe emulator): its own topic
    prefix, consumer groups and ClickHouse database."""

    bootstrap: str
    chdb_path: Path
    stripe_url: str
    tmp: Path
    prefix: str
    database: str = field(kw_only=True)

    @property
    def topic(self) -> str:
        return f"{self.prefix}usage-events"

    def env(
        self,
        meters_file: Path,
        *,
        name: str = "meterstream",
        state_dir: Path | None = None,
        **extra: str,
    ) -> dict[str, str]:
        """A worker's environment: consumer group ``PREFIX + name``; defaults otherwise."""
        return isolated_worker_env(
            bootstrap=self.bootstrap,
            clickhouse_dsn=f"chdb://{self.chdb_path}",
            database=self.database,
            prefix=self.prefix,
            app_id=f"{self.prefix}{name}",
            stripe_url=self.stripe_url,
            meters_file=meters_file,
            state_dir=state_dir or self.tmp / "state",
            **extra,
        )
