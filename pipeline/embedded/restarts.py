"""``meterstream run`` restarts a worker that dies, as Kubernetes restarts a pod's container.

A worker process that ends without being asked to (SIGKILL, the OOM killer, a
crash, the lifeline's exit 69 when the broker stopped answering) is started
again with the same environment, so it serves the same web port and resumes
from its committed offsets and changelogs. Before each restart the supervisor
waits a backoff, doubling from ``first_backoff`` to ``max_backoff``, and logs
one line saying how the worker ended and when it comes back. A worker that had
been up for ``stable_after`` seconds starts the backoff afresh.

A worker that keeps dying at start-up is a crash loop, and restarting it again
cannot help: ``startup_deaths`` deaths in a row of a worker that never answered
``/healthz`` (bad meters or keys file, a migration that fails, a broker that is
gone) stop the stack with :class:`WorkerCrashLoop`, whose message gives the
reason: the last exit and the worker's last log lines of its last life.

Everything runs on the caller's thread in :meth:`WorkerRestarts.poll`, which
never blocks for long (a refused connection, or a health probe of at most
``probe_timeout``): call it from the thread that started the stack (the main
thread), because a child started with ``PR_SET_PDEATHSIG`` gets its signal
when the *thread* that forked it ends (pipeline/embedded/processes.py).

:class:`RestartPolicy` is the pure part (which backoff, whether a death makes a
crash loop), apart from the processes.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meterstream.errors import MeterstreamError

log = logging.getLogger("meterstream.run")

LOG_TAIL_LINES = 30


class WorkerCrashLoop(MeterstreamError):
    """The worker of ``meterstream run`` keeps dying at start-up: the stack stops."""


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a dead worker, and when to give up (pure: no processes, no clock)."""

    first_backoff: float = 1.0
    max_backoff: float = 30.0
    # A life at least this long (seconds) resets the backoff to ``first_backoff``.
    stable_after: float = 60.0
    # This many deaths in a row before the worker answered /healthz: a crash loop.
    startup_deaths: int = 3

    def backoff(self, deaths_in_a_row: int) -> float:
        """Seconds to wait before the restart that follows the n-th death in a row (n >= 1)."""
        return min(self.max_backoff, self.first_backoff * 2 ** max(0, deaths_in_a_row - 1))

    def in_a_row(self, previous: int, lived: float) -> int:
        """Deaths in a row, counting this one, after a life of ``lived`` seconds."""
        return 1 if lived >= self.stable_after else previous + 1

    def crash_loop(self, startup_deaths_in_a_row: int) -> bool:
        return startup_deaths_in_a_row >= self.startup_deaths


def describe_exit(returncode: int) -> str:
    """``killed by SIGKILL`` or ``exited with code 2``."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _healthz_answers(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


class WorkerRestarts:
    """Watches the stack's worker and restarts it (see the module docstring).

    ``spawn`` starts a worker process (same command and environment each time);
    ``log_path`` is the worker's log, which every life appends to.
    """

    def __init__(
        self,
        spawn: Callable[[], subprocess.Popen[bytes]],
        first: subprocess.Popen[bytes],
        *,
        healthz_url: str,
        log_path: Path,
        policy: RestartPolicy | None = None,
        probe: Callable[[str, float], bool] = _healthz_answers,
        clock: Callable[[], float] = time.monotonic,
        probe_timeout: float = 0.5,
    ) -> None:
        self.spawn = spawn
        self.proc = first
        self.healthz_url = healthz_url
        self.log_path = log_path
        self.policy = policy or RestartPolicy()
        self.probe = probe
        self.clock = clock
        self.probe_timeout = probe_timeout
        self.restarts = 0
        self._started = clock()
        self._healthy = True  # the stack waited for the first worker's /healthz
        self._log_from = self._log_size()
        self._in_a_row = 0
        self._startup_in_a_row = 0
        self._restart_at: float | None = None
        self._next_probe = 0.0

    @property
    def waiting(self) -> bool:
        """The worker died and its restart is pending (there is no worker process now)."""
        return self._restart_at is not None

    @property
    def starting(self) -> bool:
        """A restart is pending, or the restarted worker has not answered /healthz yet."""
        return self.waiting or not self._healthy

    def poll(self) -> subprocess.Popen[bytes]:
        """Notice a death, restart when its backoff is over; returns the current process
        (the dead one while a restart is pending). Raises :class:`WorkerCrashLoop`."""
        now = self.clock()
        if self._restart_at is not None:
            if now >= self._restart_at:
                self._restart(now)
            return self.proc
        code = self.proc.poll()
        if code is None:
            if not self._healthy and now >= self._next_probe:
                self._next_probe = now + 1.0
                self._healthy = self.probe(self.healthz_url, self.probe_timeout)
            return self.proc
        self._died(code, now)
        return self.proc

    def _died(self, code: int, now: float) -> None:
        lived = now - self._started
        self._in_a_row = self.policy.in_a_row(self._in_a_row, lived)
        self._startup_in_a_row = 0 if self._healthy else self._startup_in_a_row + 1
        how = describe_exit(code)
        if self.policy.crash_loop(self._startup_in_a_row):
            tail = self.last_lines()
            raise WorkerCrashLoop(
                f"the worker keeps dying at start-up: {self._startup_in_a_row} times in a row "
                f"it ended before answering /healthz; last {how} after {lived:.1f} s "
                f"(pid {self.proc.pid}); not restarting it. Its last lines "
                f"({self.log_path}):\n{tail}"
            )
        wait = self.policy.backoff(self._in_a_row)
        self._restart_at = now + wait
        log.warning(
            "the worker (pid %s) %s after %.1f s of life%s: restarting it in %.0f s "
            "(restart %d; see %s)",
            self.proc.pid,
            how,
            lived,
            "" if self._healthy else ", before it was healthy",
            wait,
            self.restarts + 1,
            self.log_path,
        )

    def _restart(self, now: float) -> None:
        self._restart_at = None
        self._log_from = self._log_size()
        self.proc = self.spawn()
        self.restarts += 1
        self._started = now
        self._healthy = False
        self._next_probe = now
        log.warning("the worker restarted (pid %s, restart %d)", self.proc.pid, self.restarts)

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def last_lines(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines the worker logged in its latest life."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_from)
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(nothing logged)"
