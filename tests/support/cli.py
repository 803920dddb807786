"""The ``meterstream keys`` command, a command through a running worker and a port probe,
as several test files use them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from meterstream.endpoints import write_endpoints
from tests.support import REPO


def keys_cli(state_dir: Path, *args: str) -> str:
    """``meterstream keys ARGS --state-dir STATE_DIR``; its stdout, stripped (raises if the
    command fails)."""
    out = subprocess.run(
        [sys.executable, "-m", "meterstream.cli", "keys", *args, "--state-dir", str(state_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def port_open(address: str) -> bool:
    """Whether ``host:port`` (or ``http://host:port``) accepts a TCP connection now."""
    host, port = address.removeprefix("http://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def worker_cli(
    state_dir: Path, web_url: str, api_key: str, *command: str
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``meterstream COMMAND ARGS --state-dir STATE_DIR`` as a function of ARGS, through the
    running worker at ``web_url`` (written to the state dir's endpoints.json) with
    ``api_key``; the environment's other METERSTREAM_* settings left out."""
    write_endpoints(state_dir, {"web_url": web_url})
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    env["METERSTREAM_API_KEY"] = api_key

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meterstream.cli", *command, *args,
             "--state-dir", str(state_dir)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    return run
