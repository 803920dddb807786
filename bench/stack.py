"""Processes and probes for the benchmark: worker env, HTTP, /proc memory, metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from meterstream.embedded.processes import free_port, isolated_worker_env, stop_process

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def http_json(url: str, body: Any = None, timeout: float = 60) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read(), parse_float=Decimal)


def http_text(url: str, timeout: float = 30) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


def wait_until(fn: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
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
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}: last={last!r}")


class BenchError(Exception):
    """The benchmark could not measure or its self-check failed."""


def proc_memory_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon (heap and other private memory) and RssFile
    (mapped files: shared libraries' code, chdb's included) of a process, in kB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {metric name: value summed over labels}."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            totals[name] = totals.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return totals


@dataclass
class StackEnv:
    bootstrap: str
    chdb_path: Path
    stripe_url: str
    tmp: Path
    prefix: str
    partitions: int
    meters_file: Path
    database: str = "bench"

    @property
    def topic(self) -> str:
        return f"{self.prefix}usage-events"

    def env(self, name: str, **extra: str) -> dict[str, str]:
        """The worker's environment; pipeline defaults otherwise."""
        return isolated_worker_env(
            bootstrap=self.bootstrap,
            clickhouse_dsn=f"chdb://{self.chdb_path}",
            database=self.database,
            prefix=self.prefix,
            app_id=f"{self.prefix}{name}",
            stripe_url=self.stripe_url,
            meters_file=self.meters_file,
            state_dir=self.tmp / f"state-{name}",
            **{
                "METERSTREAM_PARTITIONS": str(self.partitions),
                "METERSTREAM_WEB_PORT": str(free_port()),
                **extra,
            },
        )


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    web_url: str
    log_path: Path

    @classmethod
    def start(cls, stack: StackEnv, name: str = "meterstream", **extra_env: str) -> Worker:
        env = stack.env(name, **extra_env)
        log_path = stack.tmp / f"{name}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "meterstream.cli", "worker"],
            cwd=REPO,
            env=env,
            stdout=open(log_path, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        worker = cls(proc, f"http://127.0.0.1:{env['METERSTREAM_WEB_PORT']}", log_path)

        def healthy() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"worker exited {proc.returncode}:\n{worker.log_tail()}")
            http_json(f"{worker.web_url}/healthz", timeout=2)
            return True

        wait_until(healthy, timeout=120, what="worker /healthz")
        return worker

    def sql(self, query: str) -> list[dict[str, Any]]:
        result = http_json(f"{self.web_url}/v1/sql", {"sql": query})
        if "error" in result:
            raise BenchError(f"SQL failed: {result['error']}\n{query}")
        return [dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]

    def metrics(self) -> dict[str, float]:
        return parse_metrics(http_text(f"{self.web_url}/metrics"))

    def memory_kb(self) -> dict[str, int]:
        return proc_memory_kb(self.proc.pid)

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"worker exited {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM, 60)
