"""The state dir is private to the user running meterstream.

It holds customer data and secrets: the record and the windows (embedded
ClickHouse, ``clickhouse/``), the Faust tables (``faust/``), key hashes
(``api_keys.json``), the CLI's key (``cli.key``), the logs and ``endpoints.json``.

- ``meterstream`` sets its umask to 077 before anything else (``pipeline/cli/main.py``),
  so whatever it creates, and whatever its children create (the broker, the Stripe
  emulator, the worker, chdb, RocksDB: a child inherits the umask), is 0700 (dirs)
  or 0600 (files), wherever it is written (also ``STORE_PATH`` or a ``chdb://`` path
  outside the state dir).
- A state dir made earlier with looser modes (an older meterstream, or files copied
  in) is tightened when ``run``, ``worker`` or ``keys`` start: group and other bits
  are removed from the dir and every entry in it this user owns, with one line on
  stderr saying so. Symbolic links in it are not followed.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

PRIVATE_UMASK = 0o077


def private_umask() -> None:
    """New files 0600, new directories 0700, in this process and its children."""
    os.umask(PRIVATE_UMASK)


@dataclass
class Tightened:
    changed: int = 0
    problems: list[str] = field(default_factory=list)


def make_private(path: Path) -> Tightened:
    """Remove group and other permissions from ``path`` and everything in it (``path``
    itself may be a symbolic link to the state dir; links inside are not followed)."""
    result = Tightened()
    path = path.resolve()
    if not path.is_dir():
        return result
    uid = os.getuid()

    def tighten(entry: str) -> None:
        try:
            st = os.lstat(entry)
            if stat.S_ISLNK(st.st_mode) or st.st_uid != uid or not st.st_mode & 0o077:
                return
            os.chmod(entry, stat.S_IMODE(st.st_mode) & 0o700)
            result.changed += 1
        except OSError as exc:
            result.problems.append(f"{entry}: {exc.strerror or exc}")

    tighten(str(path))
    for root, dirs, files in os.walk(path, onerror=lambda exc: None):
        for name in (*dirs, *files):
            tighten(os.path.join(root, name))
    return result


def notice(path: Path, result: Tightened) -> str | None:
    """The one line to print after :func:`make_private`, if there is anything to say."""
    if result.problems:
        shown = "; ".join(result.problems[:3])
        more = f" (and {len(result.problems) - 3} more)" if len(result.problems) > 3 else ""
        return f"meterstream: could not make everything in {path} private: {shown}{more}"
    if result.changed:
        return (
            f"meterstream: {path} was open to other users; made it and what is in it "
            f"private to this user ({result.changed} entries now 0700/0600)"
        )
    return None
