"""``meterstream run``: the dev stack (pipeline/embedded/stack.py) until a signal, the
worker's end or ``--duration``; optionally with the demo (pipeline/embedded/demo/).

Ctrl-C, SIGTERM and SIGHUP (the terminal closed) stop the stack in order (demo,
worker, emulator, broker); a second signal while stopping ends the supervisor at
once, and the kernel then stops the children (pipeline/embedded/stack.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any

from meterstream.embedded.demo.load import check_meters
from meterstream.embedded.demo.runner import run_demo
from meterstream.embedded.stack import Stack
from meterstream.embedded.terminal import own_foreground
from meterstream.errors import ConfigError
from meterstream.logs import configure_logging
from meterstream.meters.config import MetersConfig, load_meters, meters_path
from meterstream.settings import Settings


def run_stack(settings: Settings, *, demo: bool, duration: float | None, rate: float) -> int:
    configure_logging(settings.log_format)
    path = meters_path(settings)
    meters = load_meters(path)  # a bad file stops here, before anything starts
    if demo:
        problems = check_meters(meters)
        if problems:
            raise ConfigError(problems, f"{path} (--demo needs the example meters)")
    with own_foreground():  # Ctrl-C under `make run` reaches meterstream only
        return _run(settings, meters, path, demo=demo, duration=duration, rate=rate)


def _run(
    settings: Settings,
    meters: MetersConfig,
    path: Path,
    *,
    demo: bool,
    duration: float | None,
    rate: float,
) -> int:
    stack = Stack(settings, settings.state_dir)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)  # the terminal closed
    # Installed explicitly: a parent may have started us with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stack.start(path)
        print(f"meterstream is running: {json.dumps(stack.endpoints)}", flush=True)
        print(f"logs in {settings.state_dir}/ (worker.log, broker.log, emulator.log)", flush=True)
        print(
            f"events API: POST {stack.endpoints['web_url']}/v1/events with a key from "
            f"`meterstream keys create NAME --state-dir {settings.state_dir}`",
            flush=True,
        )
        if demo:
            return asyncio.run(run_demo(stack, meters, duration, rate))
        deadline = time.monotonic() + duration if duration else None
        while deadline is None or time.monotonic() < deadline:
            stack.check_worker()  # a dead worker is restarted; a crash loop raises
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
            print("\nstopping ...", flush=True)
        return 0
    finally:
        # A second signal while stopping ends this process at once; the kernel
        # then signals the children that are left, and the worker, already
        # stopping, exits at once on it.
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        stack.stop()
