"""Finding the records that make a batch fail, by bisection (pure: no I/O of its own).

A batch that raised is split in halves and each half is run again; a half that raises
is split again; a single record that still raises alone is set aside. Halves run in
order, so what is counted keeps the batch's arrival order. With ``k`` bad records among
``n``, that is at most about ``2 k log2(n)`` runs, and a batch with one bad record in
5,000 is settled in 26.

The caller's ``run(lo, hi)`` processes records ``[lo, hi)`` (raising if they fail) and
``set_aside(index, error)`` is told each bad record as soon as it is known, before any
later record runs (so later runs can leave it out). An exception that ``fatal`` says is
not about the data (a broken dependency) stops the bisection and propagates.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable


async def bisect(
    count: int,
    error: Exception,
    run: Callable[[int, int], Awaitable[None]],
    set_aside: Callable[[int, Exception], Awaitable[None] | None],
    fatal: Callable[[BaseException], bool],
) -> None:
    """Records ``[0, count)`` failed with ``error``: run them again in halves."""

    async def split(lo: int, hi: int, failed: Exception | None) -> None:
        if failed is None:
            try:
                await run(lo, hi)
                return
            except Exception as exc:
                if fatal(exc):
                    raise
                failed = exc
        if hi - lo == 1:
            result = set_aside(lo, failed)
            if result is not None:
                await result
            return
        mid = (lo + hi) // 2
        await split(lo, mid, None)
        await split(mid, hi, None)

    if count:
        await split(0, count, error)
