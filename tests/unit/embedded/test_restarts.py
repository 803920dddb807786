"""The restart policy of ``meterstream run``'s worker: backoff, crash-loop detection, the
reason given. A fake clock and stand-in process objects (pure logic; the real processes
are in tests/faults/test_worker_restarts.py)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any, cast

import pytest

from meterstream.embedded.restarts import (
    RestartPolicy,
    WorkerCrashLoop,
    WorkerRestarts,
    describe_exit,
)


class FakeProc:
    _pids = iter(range(1000, 2000))

    def __init__(self) -> None:
        self.pid = next(self._pids)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


class Rig:
    """A WorkerRestarts with a clock, a /healthz answer and a log the test controls."""

    def __init__(self, tmp: Path, policy: RestartPolicy | None = None) -> None:
        self.now = 0.0
        self.healthy = False
        self.spawned: list[FakeProc] = []
        self.log = tmp / "worker.log"
        self.log.write_text("first life\n")
        self.restarts = WorkerRestarts(
            self._spawn,
            cast(Any, FakeProc()),
            healthz_url="http://127.0.0.1:1/healthz",
            log_path=self.log,
            policy=policy,
            probe=lambda url, timeout: self.healthy,
            clock=lambda: self.now,
        )

    def _spawn(self) -> Any:
        proc = FakeProc()
        self.spawned.append(proc)
        return proc

    @property
    def proc(self) -> FakeProc:
        return cast(FakeProc, self.restarts.proc)

    def die(self, code: int, after: float, logged: str = "") -> None:
        """The current worker lives ``after`` more seconds, logs ``logged`` and ends."""
        self.now += after
        if logged:
            with self.log.open("a") as f:
                f.write(logged)
        self.proc.returncode = code
        self.restarts.poll()

    def wait_restart(self) -> float:
        """Advance the clock until the pending restart happens; returns the wait."""
        waited = 0.0
        before = len(self.spawned)
        while len(self.spawned) == before:
            self.now += 0.25
            waited += 0.25
            self.restarts.poll()
            assert waited < 3600
        return waited


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RestartPolicy(first_backoff=1, max_backoff=30)
    assert [policy.backoff(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_exit_is_described_by_signal_or_code() -> None:
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(2) == "exited with code 2"
    assert describe_exit(69) == "exited with code 69"


def test_a_killed_worker_comes_back_after_the_first_backoff_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = Rig(tmp_path)
    alive = rig.restarts.poll()
    assert alive is rig.proc and not rig.spawned  # alive: nothing to do
    first_pid = rig.proc.pid
    with caplog.at_level(logging.WARNING, logger="meterstream.run"):
        rig.die(-signal.SIGKILL, after=120)
        assert rig.restarts.waiting
        assert rig.wait_restart() == pytest.approx(1.0)
    assert rig.restarts.restarts == 1 and rig.proc is rig.spawned[0]
    said = caplog.text
    assert f"the worker (pid {first_pid}) killed by SIGKILL after 120.0 s of life" in said
    assert "restarting it in 1 s" in said
    assert f"the worker restarted (pid {rig.proc.pid}, restart 1)" in said


def test_deaths_in_quick_succession_back_off_and_a_stable_life_resets_it(tmp_path: Path) -> None:
    rig = Rig(tmp_path, RestartPolicy(first_backoff=1, max_backoff=30, stable_after=60))
    waits = []
    for _ in range(4):  # each becomes healthy, then is killed 10 s later
        rig.healthy = True
        rig.restarts.poll()
        rig.die(-signal.SIGKILL, after=10)
        waits.append(rig.wait_restart())
    assert waits == [1, 2, 4, 8]
    rig.restarts.poll()
    rig.die(-signal.SIGKILL, after=61)  # a stable life: the backoff starts afresh
    assert rig.wait_restart() == 1


def test_a_worker_dying_at_start_up_every_time_is_a_crash_loop_with_its_reason(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, RestartPolicy(startup_deaths=3))
    rig.die(-signal.SIGKILL, after=30, logged="killed in its first life\n")
    rig.healthy = False  # from now on every worker fails before /healthz answers
    for n in range(2):
        rig.wait_restart()
        rig.die(2, after=3, logged=f"meterstream worker: bad meters file ({n})\n")
    rig.wait_restart()
    with pytest.raises(WorkerCrashLoop) as caught:
        rig.die(2, after=3, logged="meterstream worker: bad meters file (2)\n")
    message = str(caught.value)
    assert "keeps dying at start-up: 3 times in a row" in message
    assert "exited with code 2 after 3.0 s" in message
    # the reason: the log of its last life only
    assert message.endswith("meterstream worker: bad meters file (2)")
    assert "(1)" not in message and "first life" not in message
    assert len(rig.spawned) == 3  # no restart after the verdict


def test_a_worker_that_became_healthy_between_start_up_deaths_is_no_crash_loop(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, RestartPolicy(startup_deaths=2, max_backoff=2))
    for _ in range(5):
        rig.die(2, after=1)  # dies at start-up ...
        rig.wait_restart()
        rig.healthy = True
        rig.restarts.poll()  # ... the next life answers /healthz, then dies
        rig.healthy = False
        rig.die(-signal.SIGKILL, after=1)
        rig.wait_restart()
    assert rig.restarts.restarts == 10


def test_a_restarted_worker_counts_as_starting_until_healthz_answers(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    assert not rig.restarts.starting
    rig.die(-signal.SIGKILL, after=5)
    assert rig.restarts.starting and rig.restarts.waiting
    rig.wait_restart()
    assert rig.restarts.starting and not rig.restarts.waiting
    rig.healthy = True
    rig.now += 1
    rig.restarts.poll()
    assert not rig.restarts.starting
