"""The Stripe emulator's state on disk: an append-only journal of JSON lines.

A real Stripe account does not forget what it was sent, and neither must the
emulator that ``meterstream run`` starts: the forwarding ledger in ClickHouse
remembers every meter event it delivered, so an emulator that started empty
would hold only what was sent after its restart.

The file holds one JSON object per line, each a change the emulator made
(``{"op": ...}``; the emulator decides what they mean). The order of side
effects, and what each guarantees:

1. :meth:`Journal.open` takes an exclusive lock (``<file>.lock``), so a second
   emulator cannot share the file.
2. :meth:`Journal.read` returns every complete line. A last line without its
   newline is a write the process did not finish; the request that made it was
   never answered, so its client retries it: the line is ignored.
3. :meth:`Journal.compact` rewrites the file as the records the emulator gives
   for its current state: a temporary file, flushed and fsynced, then renamed
   over the journal (atomic: a crash leaves the old file or the new one).
4. :meth:`Journal.append` writes one change and flushes it to the operating
   system before the emulator answers the request that made it. A process that
   dies after that keeps the change; a machine that loses power may lose the
   last changes (no fsync per request: this is a development emulator).

The file and its lock are created private to the user (mode 0600).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from meterstream.errors import JournalLocked


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._out: IO[str] | None = None

    def open(self) -> Journal:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise JournalLocked(
                f"{self.path} is in use by another Stripe emulator (lock {lock_path})"
            ) from None
        self._lock_fd = fd
        return self

    def read(self) -> list[dict[str, Any]]:
        """Every complete record, in order (a torn last line is skipped)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        lines = text.split("\n")
        complete = lines[:-1]  # the part after the last newline is empty or torn
        records = []
        for number, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise ValueError(f"{self.path}:{number}: not a JSON record") from None
            if not isinstance(record, dict) or "op" not in record:
                raise ValueError(f"{self.path}:{number}: not a journal record")
            records.append(record)
        return records

    def compact(self, records: Iterable[dict[str, Any]]) -> None:
        """Replace the journal by ``records`` atomically; later appends follow them."""
        self._close_out()
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for record in records:
                out.write(_line(record))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        self._out = self._append_handle()

    def append(self, record: dict[str, Any]) -> None:
        if self._out is None:
            self._out = self._append_handle()
        self._out.write(_line(record))
        self._out.flush()

    def close(self) -> None:
        self._close_out()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _append_handle(self) -> IO[str]:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")

    def _close_out(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"
