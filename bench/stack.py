"""The benchmark's processes and probes: its slice of the stack and workers (on
pipeline/embedded/harness.py, the one harness), /proc memory, metric totals."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from meterstream.embedded import harness
from meterstream.embedded.harness import WorkerProcess, WorkerSlice, http_json
from meterstream.embedded.processes import free_port

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def wait_until(fn: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    return harness.wait_until(fn, timeout, interval, what, failure=BenchError)


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
class StackEnv(WorkerSlice):
    """The benchmark's slice: ``partitions`` per topic, one meters file, database ``bench``."""

    partitions: int
    meters_file: Path
    database: str = field(default="bench", kw_only=True)

    def worker_env(self, name: str, **extra: str) -> dict[str, str]:
        """The environment of a process named ``name`` (its consumer group, state dir and
        web port of its own); pipeline defaults otherwise."""
        return self.env(
            self.meters_file,
            name=name,
            state_dir=self.tmp / f"state-{name}",
            **{
                "METERSTREAM_PARTITIONS": str(self.partitions),
                "METERSTREAM_WEB_PORT": str(free_port()),
                **extra,
            },
        )


class Worker(WorkerProcess):
    """A pipeline worker of the benchmark, with its memory and metric totals."""

    @classmethod
    def start(cls, stack: StackEnv, name: str = "meterstream", **extra_env: str) -> Worker:
        env = stack.worker_env(name, **extra_env)
        log_path = stack.tmp / f"{name}.log"
        worker = cls.spawn(env, log_path, cwd=REPO)
        worker.wait_healthy(120, failure=BenchError)
        return worker

    def sql(self, query: str) -> list[dict[str, Any]]:
        result = http_json(f"{self.web_url}/v1/sql", {"sql": query})
        if "error" in result:
            raise BenchError(f"SQL failed: {result['error']}\n{query}")
        return [dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]

    def metric_totals(self) -> dict[str, float]:
        """``/metrics``, each metric summed over its labels."""
        return parse_metrics(self.metrics())

    def memory_kb(self) -> dict[str, int]:
        return proc_memory_kb(self.proc.pid)

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"worker exited {self.proc.returncode}:\n{self.log_tail()}")
