"""ClickHouse calls from the event loop: one executor thread, retried until they succeed.

clickhouse-connect (and chdb behind it) is synchronous, so every call runs in
one dedicated thread, which also serialises access to the embedded engine.
A failed call is a broken dependency, not bad data: it is retried with
backoff and nothing after it (offset commits included) happens until it
succeeds, so an outage delays data but never loses it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from meterstream.errors import ClickHouseError
from meterstream.metrics import Metrics
from meterstream.sinks.clickhouse.client import ClickHouse

T = TypeVar("T")
log = logging.getLogger("meterstream.clickhouse")


class ClickHouseIO:
    def __init__(
        self,
        ch: ClickHouse,
        metrics: Metrics,
        max_backoff: float = 5.0,
        down_file: Path | None = None,
        name: str = "clickhouse",
    ) -> None:
        self.ch = ch
        self.down_file = down_file
        self.metrics = metrics
        self.max_backoff = max_backoff
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._lanes: dict[str, ClickHouseIO] = {}

    def lane(self, name: str) -> ClickHouseIO:
        """Calls of their own: a thread and a (writable) connection of their own, with
        the same retries and injected outage. For writes that need not queue behind the
        batch's inserts on this thread, nor hold them up (the credit ledger); closed
        with this one."""
        if name not in self._lanes:
            self._lanes[name] = ClickHouseIO(
                self.ch.reader({}),
                self.metrics,
                self.max_backoff,
                self.down_file,
                name=f"clickhouse-{name}",
            )
        return self._lanes[name]

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(ch, *args, **kwargs)`` in the ClickHouse thread; retry until it succeeds."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                return await loop.run_in_executor(
                    self._executor, lambda: self._guarded(fn, *args, **kwargs)
                )
            except ClickHouseError as exc:
                attempt += 1
                delay = random.uniform(0, min(self.max_backoff, 0.1 * 2**attempt))
                self.metrics.sink_retries.inc()
                log.warning(
                    "ClickHouse call %s failed (attempt %d), retrying in %.2fs: %s",
                    getattr(fn, "__name__", fn),
                    attempt,
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)

    async def call_once(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(ch, ...)`` in the ClickHouse thread once; errors go to the caller."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, lambda: self._guarded(fn, *args, **kwargs)
        )

    def _guarded(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self.down_file is not None and self.down_file.exists():
            raise ClickHouseError(f"injected outage: {self.down_file} exists", code=210)
        return fn(self.ch, *args, **kwargs)

    def close(self) -> None:
        for lane in self._lanes.values():
            lane.close()
        self._executor.shutdown(wait=True)
        self.ch.close()
