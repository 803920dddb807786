"""What every demo run put into a state dir, so the next run knows what to expect.

ClickHouse and the Stripe emulator keep every run's usage (a real Stripe
account does not forget), so a run's expected totals for the billing period
are those of every demo run in this state dir, not only its own. The demo keeps
its own account of them in ``<state dir>/demo/`` (independent of the pipeline):

* ``runs/<run id>.jsonl``: a write-ahead log. Every new event of a run is
  appended (and flushed) *before* it is sent to Kafka, so an event the broker
  may hold is always on disk, even if the run is killed.
* ``ledger.json``: the expected state per (meter, customer, window) of every
  run whose events the record was seen to hold (:class:`meterstream.embedded.demo.load.Expected`),
  and the ids of those runs. Written atomically (temporary file, fsync,
  rename); windows before the previous month are dropped.

The order of side effects, and why the expectation stays exact:

1. A run reads the ledger and the logs of runs not in it (runs stopped before
   the record held all their events: the embedded broker keeps topics in
   memory, so a stopped broker loses what the worker had not read yet). It
   resends those events first, with their idempotency keys: whatever the record
   already holds counts once (a duplicate), the rest counts now. Their log
   files stay until step 3.
2. The run logs and sends its own events. Expected = the ledger + the resent
   events + the run's own.
3. Once the record holds every event of the run and of the resent logs (a
   count by key prefix), :meth:`DemoLedger.fold` writes the ledger with them
   and only then deletes their logs. A crash between the two leaves a log
   whose run is already in the ledger; the next load deletes it unread.

A log older than the dedup horizon cannot be resent (the worker refuses events
that old as ``too_late``); :meth:`DemoLedger.load` sets such logs aside
(``expired``) and the summary says so.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from meterstream.embedded.demo.load import Expected
from meterstream.events import canonical_json, loads_exact

LEDGER_VERSION = 1


@dataclass
class PendingRun:
    """A run whose events the record was not seen to hold: resent by the next run."""

    run_id: str
    events: list[dict[str, Any]]


@dataclass
class DemoLedger:
    directory: Path
    expected: Expected = field(default_factory=Expected)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # folded: run id -> facts
    pending: list[PendingRun] = field(default_factory=list)
    expired: list[PendingRun] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.directory / "ledger.json"

    @property
    def logs(self) -> Path:
        return self.directory / "runs"

    @classmethod
    def load(cls, directory: Path, *, oldest_resendable_ms: int) -> DemoLedger:
        ledger = cls(Path(directory))
        try:
            data = json.loads(ledger.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            data = {}
        except ValueError as exc:
            raise ValueError(f"{ledger.path}: not a demo ledger ({exc})") from None
        if data and data.get("version") != LEDGER_VERSION:
            raise ValueError(f"{ledger.path}: unknown version {data.get('version')!r}")
        ledger.expected = Expected.from_json(data.get("expected", {}))
        ledger.runs = dict(data.get("runs", {}))
        for log in sorted(ledger.logs.glob("*.jsonl")) if ledger.logs.is_dir() else []:
            run_id = log.stem
            if run_id in ledger.runs:  # folded; the crash came before the delete
                log.unlink()
                continue
            run = PendingRun(run_id, read_log(log))
            if any(int(e["timestamp"]) < oldest_resendable_ms for e in run.events):
                ledger.expired.append(run)
            elif run.events:
                ledger.pending.append(run)
            else:
                log.unlink()
        return ledger

    def open_log(self, run_id: str) -> RunLog:
        return RunLog(self.logs / f"{run_id}.jsonl")

    def fold(
        self, runs: dict[str, dict[str, Any]], expected: Expected, *, keep_from_ms: int
    ) -> None:
        """Add runs the record holds in full; then delete their logs (see the module doc)."""
        self.expected.merge(expected)
        self.expected.drop_before(keep_from_ms)
        self.runs.update(runs)
        self.runs = {
            r: facts for r, facts in self.runs.items() if facts.get("last_ms", 0) >= keep_from_ms
        }
        self._write()
        for run_id in runs:
            with contextlib.suppress(FileNotFoundError):
                (self.logs / f"{run_id}.jsonl").unlink()

    def _write(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = {"version": LEDGER_VERSION, "runs": self.runs, "expected": self.expected.to_json()}
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(data, out, separators=(",", ":"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)


class RunLog:
    """A run's write-ahead log: one canonical JSON event per line, flushed per batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._out: IO[str] | None = None

    def write(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        if self._out is None:
            self.path.parent.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # demo/
            self.path.parent.mkdir(exist_ok=True, mode=0o700)  # demo/runs/
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._out = os.fdopen(fd, "a", encoding="utf-8")
        self._out.write("".join(canonical_json(e) + "\n" for e in events))
        self._out.flush()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def read_log(path: Path) -> list[dict[str, Any]]:
    """A run log's events (a torn last line, from a killed run, was never sent)."""
    text = path.read_text(encoding="utf-8")
    events = []
    for line in text.split("\n")[:-1]:
        if line.strip():
            event = loads_exact(line)
            if isinstance(event, dict):
                events.append(event)
    return events
