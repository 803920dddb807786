"""The ``meterstream keys`` command and a port probe, as several test files use them."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

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
