"""The one process harness (pipeline/embedded/harness.py): its waits and log tails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meterstream.embedded.harness import WorkerProcess, wait_until
from meterstream.errors import MeterstreamError


def test_wait_until_returns_the_first_true_answer() -> None:
    answers = iter([0, None, ConnectionError("not yet"), 7, 8])

    def poll() -> object:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_until(poll, timeout=10, interval=0) == 7


@pytest.mark.parametrize("failure", [MeterstreamError, AssertionError])
def test_wait_until_raises_its_failure_with_the_last_answer(failure: type[Exception]) -> None:
    with pytest.raises(failure, match=r"waiting for the answer: last=0"):
        wait_until(lambda: 0, timeout=0.05, interval=0.01, what="the answer", failure=failure)


def test_a_worker_that_exits_while_starting_fails_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait(30)
    worker = WorkerProcess(proc, "http://127.0.0.1:9", log)
    with pytest.raises(MeterstreamError) as failed:
        worker.wait_healthy(timeout=10)
    message = str(failed.value)
    assert message.startswith("the worker exited with code 3 while starting:\n")
    assert message.endswith("\n".join(f"line {i}" for i in range(70, 100)))
    assert "line 69" not in message
    assert WorkerProcess(proc, "", tmp_path / "missing.log").log_tail() == ""
