"""``meterstream run --demo`` as a newcomer runs it: twice on one state dir, then with
something in the demo's customers that the generator never sent, then Ctrl-C in a
real terminal under ``make run``.

Each run starts its own embedded stack (broker, chdb, Stripe emulator, worker) in
its own state dir, so these tests do not use the session fixtures.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.harness import REPO, wait_until
from tests.support.terminal import readable

pytestmark = pytest.mark.integration

YES_CLICKHOUSE = re.compile(r"ClickHouse equals the generator's totals: yes \((\d+) of \1\)")
YES_STRIPE = re.compile(
    r"Stripe equals the generator's closed windows \(rounded\): yes \((\d+) of \1 due\)"
)


def _env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    return {**env, "METERSTREAM_STATE_DIR": str(state)}


def _demo(state: Path, duration: int, **popen: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "meterstream.cli", "run", "--meters", "meters.example.yaml",
         "--demo", "--duration", str(duration), "--rate", "100"],
        cwd=REPO, env=_env(state), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        **popen,  # type: ignore[call-overload]
    )  # fmt: skip


def _finish(proc: subprocess.Popen[str], state: Path) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=300)
    log = (state / "worker.log").read_text(errors="replace")[-3000:]
    return proc.returncode, out + "\n--- worker.log ---\n" + log


def _summary(out: str) -> str:
    return out[out.rindex("final summary") :]


def _stripe_rows(summary: str) -> dict[str, list[str]]:
    block = summary[summary.index("Stripe (due)") :].splitlines()[1:5]
    return {line.split()[0]: line.split()[1:] for line in block}


def test_two_demo_runs_on_one_state_dir_match_and_a_real_difference_fails(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    # 5 s of live load is enough: what is checked comes from the 2,000 history events
    # (closed windows for Stripe, conflicting copies) and the open hour's live ones.
    first_code, first = _finish(_demo(state, 5), state)
    assert first_code == 0, first
    # The refused InitProducerId of the transaction probe is not an ERROR line (Tansu);
    # Apache Kafka grants one (the machine's default broker where Java 17+ is found).
    log = (state / "worker.log").read_text()
    assert '"level":"error"' not in log, first
    if '"broker": "kafka"' in first:
        assert "processing guarantee: exactly_once" in log
    else:
        assert '"broker": "tansu"' in first and "the broker has no transactions" in log
    summary = _summary(first)
    assert YES_CLICKHOUSE.search(summary), summary
    stripe_yes = YES_STRIPE.search(summary)
    assert stripe_yes and int(stripe_yes[1]) >= 16, summary  # 4 meters x 5 customers due
    assert "1 demo run in this state dir" in summary
    # The history (two hours back) has closed windows: Stripe got real totals.
    first_stripe = _stripe_rows(summary)
    assert all(int(v.replace(",", "")) > 0 for v in first_stripe["ai_tokens"]), summary
    assert "not due yet: window" in summary  # the open hour, with when it will be due

    # The second run: the old demo reused its keys (every event a conflict) and its
    # emulator forgot what the ledger remembered (0 in every Stripe cell).
    second_code, second = _finish(_demo(state, 5), state)
    assert second_code == 0, second
    summary = _summary(second)
    assert YES_CLICKHOUSE.search(summary) and YES_STRIPE.search(summary), summary
    assert "2 demo runs in this state dir" in summary
    assert "conflicting copies" in summary and "idempotency_conflict" not in summary
    second_stripe = _stripe_rows(summary)
    for meter in ("ai_tokens", "api_requests", "compute_units"):
        for before, after in zip(first_stripe[meter], second_stripe[meter], strict=True):
            assert int(after.replace(",", "")) > int(before.replace(",", "")), summary
    ledger = json.loads((state / "demo" / "ledger.json").read_text())
    assert len(ledger["runs"]) == 2
    assert not list((state / "demo" / "runs").glob("*.jsonl"))  # both confirmed

    # Someone else sends usage for a demo customer into a closed window: both
    # ClickHouse and (after the next forward) Stripe hold 1,000 tokens more than
    # the generator sent. The summary must say so and fail.
    proc = _demo(state, 15)
    wait_until(lambda: (state / "endpoints.json").exists(), timeout=120, what="the stack")
    intruder = {
        "event_name": "ai_chat", "customer_id": "demo-acme", "idempotency_key": "not-the-demo-1",
        "timestamp": time.time_ns() // 1_000_000 - 90 * 60_000,
        "properties": {"model": "gpt-4o", "tokens": 1000,
                       "stripe_customer_id": "cus_demo_demo-acme"},
    }  # fmt: skip
    produced = subprocess.run(
        [sys.executable, "-m", "meterstream.cli", "produce", "-"], input=json.dumps(intruder),
        cwd=REPO, env=_env(state), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert produced.returncode == 0, produced.stderr
    third_code, third = _finish(proc, state)
    assert third_code == 1, third
    summary = _summary(third)
    assert "ClickHouse equals the generator's totals: NO (1 of " in summary, summary
    assert re.search(
        r"ClickHouse ai_tokens demo-acme: [\d,]+; the generator's total is [\d,]+ \(\+1,000\)",
        summary,
    ), summary
    assert re.search(
        r"Stripe ai_tokens demo-acme: [\d,]+; the generator's due total \(rounded\) is "
        r"[\d,]+ \(\+1,000\)",
        summary,
    ), summary
    assert "Stripe equals the generator's closed windows (rounded): NO (1 of " in summary


def _read_pty(master: int, until: float, stop: re.Pattern[bytes] | None = None) -> bytes:
    out = b""
    while time.monotonic() < until:
        if not readable(master, 1):
            continue
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal's other side closed: every process exited
            break
        if not chunk:
            break
        out += chunk
        if stop is not None and stop.search(out):
            break
    return out


def test_ctrl_c_in_a_terminal_ends_make_run_with_status_0(tmp_path: Path) -> None:
    """As a person does it: `make run` in a terminal, then Ctrl-C (the terminal sends
    SIGINT to its foreground process group). make used to report `Error 130`."""
    state = tmp_path / "state"
    venv = Path(sys.prefix)
    master, slave = pty.openpty()

    def controlling_terminal() -> None:
        os.setsid()
        import fcntl

        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        # -o: the venv is installed already; never reinstall it from a test.
        ["make", "-o", f"{venv}/.installed", "run", f"VENV={venv}"],
        cwd=REPO, env={**_env(state), "TERM": "xterm", "COLUMNS": "80", "LINES": "24"},
        stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_terminal,
    )  # fmt: skip
    os.close(slave)
    try:
        # Until the worker has recorded some of the run (it is busy, mid-run).
        recording = re.compile(rb", [1-9][\d,]* in the record")
        screen = _read_pty(master, time.monotonic() + 240, stop=recording)
        assert recording.search(screen), screen.decode(errors="replace")
        os.write(master, b"\x03")  # the terminal's VINTR character
        rest = _read_pty(master, time.monotonic() + 180)
        code = proc.wait(60)
    finally:
        with contextlib.suppress(OSError):
            os.close(master)
        if proc.poll() is None:
            proc.kill()
    text = (screen + rest).decode(errors="replace")
    assert code == 0, text
    assert "Error 130" not in text and "Interrupt" not in text and "Traceback" not in text, text
    assert "stopped: the record holds all" in text, text
    # The screen is redrawn in place: cursor up over the previous frame, not a scroll.
    assert re.search(r"\x1b\[\d+F", text), text
    ledger = json.loads((state / "demo" / "ledger.json").read_text())
    assert len(ledger["runs"]) == 1
    assert not (state / "endpoints.json").exists()  # the stack stopped


def test_the_demo_refuses_meters_it_cannot_check(tmp_path: Path) -> None:
    meters = (REPO / "meters.example.yaml").read_text()
    changed = tmp_path / "meters.yaml"
    changed.write_text(meters.replace("aggregation: max", "aggregation: min"))
    result = subprocess.run(
        [sys.executable, "-m", "meterstream.cli", "run", "--demo", "--duration", "5",
         "--meters", str(changed)],
        cwd=REPO, env=_env(tmp_path / "state"), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--demo needs the example meters" in result.stderr
    assert "meter active_servers: aggregation is 'min', the demo needs 'max'" in result.stderr
    assert not (tmp_path / "state" / "endpoints.json").exists()
