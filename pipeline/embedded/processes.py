"""The embedded dev stack's processes: free ports, children that die with us, a
worker's isolated environment. The Tansu broker is in pipeline/embedded/tansu.py, the
endpoints file in pipeline/endpoints.py.

A child process never outlives meterstream: it is started with
``PR_SET_PDEATHSIG`` so the kernel signals it if we die (even by SIGKILL).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
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


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a child's log ("" when there is none yet)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


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
    slice_settings = {
        "kafka_bootstrap_servers": bootstrap,
        "clickhouse_dsn": clickhouse_dsn,
        "clickhouse_database": database,
        "topic_prefix": prefix,
        "app_id": app_id,
        "stripe_api_base": stripe_url,
        "stripe_meter_events_base": stripe_url,
        "meters_file": str(meters_file),
        "state_dir": str(state_dir),
        "log_format": "text",
    }
    env.update({f"METERSTREAM_{name.upper()}": value for name, value in slice_settings.items()})
    env.update(extra)
    return env
