"""What the commands print: a result as a table or JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any


def add_format(parser: argparse.ArgumentParser) -> None:
    """``--format table|json`` (default table)."""
    parser.add_argument("--format", choices=["table", "json"], default="table")


def format_table(columns: list[str], rows: list[list[Any]]) -> str:
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def print_result(columns: list[str], rows: list[list[Any]], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=str))
    else:
        print(format_table(columns, rows))


def print_doc(doc: Any, fmt: str, text: Callable[[Any], None]) -> None:
    """A worker's answer: as JSON (``--format json``), else as ``text`` prints it."""
    if fmt == "json":
        print(json.dumps(doc, sort_keys=True, default=str))
    else:
        text(doc)
