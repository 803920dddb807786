"""SQL text before ClickHouse sees it: statements split on ``;`` outside quotes and
comments (migrations, and read-only SQL's one-statement rule)."""

from __future__ import annotations


def quote_end(sql: str, i: int) -> int:
    """Where the quoted token that starts at ``sql[i]`` (' " or `) ends: the index of its
    closing quote (``len(sql)`` or beyond when unclosed). Backslash escapes and doubled
    quotes stay inside."""
    quote, j, n = sql[i], i + 1, len(sql)
    while j < n:
        if sql[j] == "\\":
            j += 2
            continue
        if sql[j] == quote:
            if j + 1 < n and sql[j + 1] == quote:  # doubled quote
                j += 2
                continue
            break
        j += 1
    return j


def split_statements(sql: str) -> list[str]:
    """Split SQL text on ``;`` outside quotes and comments; drop empty / comment-only parts.

    Handles '...', "...", `...` (with backslash escapes and doubled quotes),
    ``-- ...`` / ``# ...`` line comments and ``/* ... */`` block comments.
    Each returned statement keeps its own comments and is stripped.
    """
    statements: list[str] = []
    current: list[str] = []
    has_code = False
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in "'\"`":
            j = quote_end(sql, i)
            current.append(sql[i : j + 1])
            has_code = True
            i = j + 1
        elif sql.startswith("--", i) or ch == "#":
            j = sql.find("\n", i)
            j = n if j < 0 else j
            current.append(sql[i:j])
            i = j
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            j = n if j < 0 else j + 2
            current.append(sql[i:j])
            i = j
        elif ch == ";":
            if has_code:
                statements.append("".join(current).strip())
            current, has_code = [], False
            i += 1
        else:
            current.append(ch)
            if not ch.isspace():
                has_code = True
            i += 1
    if has_code:
        statements.append("".join(current).strip())
    return statements
