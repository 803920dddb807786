"""Reads off the insert path: analyst SQL and the usage endpoint, on threads of their own.

The record inserts run on :class:`meterstream.sinks.clickhouse.calls.ClickHouseIO`'s one thread and
connection. Reads never use either:

- analyst SQL (``POST /v1/sql``) runs on ``concurrency`` threads
  (``METERSTREAM_SQL_MAX_CONCURRENT``), each with its own read-only
  connection and the operator's limits (:mod:`meterstream.sinks.clickhouse.analyst`).
  The check (ClickHouse's parse) and ``KILL QUERY`` run on a control thread,
  so a refusal or a cancel never waits behind a running query. A request
  that cannot start within ``METERSTREAM_SQL_MAX_SECONDS`` gets
  :class:`SqlBusy`;
- while a query runs (or waits for a thread) its caller is watched: when the
  HTTP client has gone away, or the query outlives its time limit by
  ``GRACE_SECONDS`` (the engine checks the limit between blocks), the query
  is killed and :class:`QueryCancelled` raised;
- the usage endpoint's reads run on one more thread and read-only connection, and the
  credit burn's on one of its own (:meth:`ReadIO.lane`).

chdb runs queries of different connections at the same time, so none of
these waits for an insert, and an insert does not wait for them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from typing import Any, TypeVar

from meterstream.errors import (
    ClickHouseError,
    MeterstreamError,
    QueryCancelled,
    QueryLimitExceeded,
    QueryRefused,
)
from meterstream.metrics import Metrics
from meterstream.settings import Settings
from meterstream.sinks.clickhouse.analyst import AnalystSQL, SqlLimits
from meterstream.sinks.clickhouse.client import ClickHouse

T = TypeVar("T")
log = logging.getLogger("meterstream.sql")
POLL_SECONDS = 0.1
GRACE_SECONDS = 5.0


def sql_limits(settings: Settings) -> SqlLimits:
    """The METERSTREAM_SQL_* limits: each field of :class:`SqlLimits` from the setting
    ``sql_<field>``."""
    return SqlLimits(**{f.name: getattr(settings, f"sql_{f.name}") for f in fields(SqlLimits)})


class SqlBusy(MeterstreamError):
    """Every analyst SQL thread stayed busy for the whole wait: retry later."""


class ReadIO:
    def __init__(
        self,
        ch: ClickHouse,
        limits: SqlLimits,
        metrics: Metrics,
        *,
        concurrency: int = 2,
        analyst_user: bool = False,
    ) -> None:
        self.analyst = AnalystSQL(ch, limits, analyst_user=analyst_user)
        self.limits = limits
        self.metrics = metrics
        self.concurrency = concurrency
        self._ch = ch
        self._sql = ThreadPoolExecutor(concurrency, thread_name_prefix="clickhouse-sql")
        self._control = ThreadPoolExecutor(1, thread_name_prefix="clickhouse-sql-control")
        self._main = ReadLane(ch, limits, "clickhouse-reads")
        self._lanes: dict[str, ReadLane] = {}
        self._slots: asyncio.Semaphore | None = None

    # -- analyst SQL -----------------------------------------------------------------

    async def sql(
        self, sql: str, client_gone: Callable[[], bool] = lambda: False
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Check and run one analyst statement; (column names, rows).

        Raises QueryRefused, QueryLimitExceeded, QueryCancelled, SqlBusy or the
        ClickHouseError of a bad statement.
        """
        loop = asyncio.get_running_loop()
        tag = uuid.uuid4().hex
        started = time.monotonic()
        try:
            text = await loop.run_in_executor(self._control, self.analyst.check, sql, tag)
        except ClickHouseError as exc:
            outcome = "refused" if isinstance(exc, QueryRefused) else "error"
            self.metrics.sql_queries.inc(outcome=outcome)
            raise
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        slots = self._slots
        await self._acquire(slots, started, client_gone)
        try:
            future = loop.run_in_executor(self._sql, self.analyst.run, text)
        except BaseException:
            slots.release()
            raise
        # The slot is free when the thread is, not when this request gives up on it.
        future.add_done_callback(lambda _: slots.release())
        return await self._watch(future, tag, client_gone)

    async def _acquire(
        self, slots: asyncio.Semaphore, started: float, client_gone: Callable[[], bool]
    ) -> None:
        """A slot, or QueryCancelled (client gone) / SqlBusy (none within the time limit)."""
        waiting = asyncio.ensure_future(slots.acquire())
        acquired = False
        try:
            while True:
                await asyncio.wait({waiting}, timeout=POLL_SECONDS)
                if waiting.done():
                    acquired = True
                    return
                if client_gone():
                    self.metrics.sql_queries.inc(outcome="cancelled")
                    raise QueryCancelled("the client went away before the query started")
                if time.monotonic() - started > self.limits.max_seconds:
                    self.metrics.sql_queries.inc(outcome="busy")
                    raise SqlBusy(
                        f"{self.concurrency} analyst queries ran for the whole"
                        f" {self.limits.max_seconds:g} s wait; retry later"
                    )
        finally:
            if not acquired:
                waiting.cancel()
                if waiting.done() and not waiting.cancelled() and waiting.exception() is None:
                    slots.release()  # acquired just as we gave up

    async def _watch(
        self, future: asyncio.Future[Any], tag: str, client_gone: Callable[[], bool]
    ) -> Any:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.limits.max_seconds + GRACE_SECONDS
        reason = ""
        while not reason:
            done, _ = await asyncio.wait({future}, timeout=POLL_SECONDS)
            if done:
                try:
                    result = future.result()
                except ClickHouseError as exc:
                    self.metrics.sql_queries.inc(outcome=_outcome(exc))
                    raise
                self.metrics.sql_queries.inc(outcome="ok")
                return result
            if client_gone():
                reason = "the client went away"
            elif time.monotonic() > deadline:
                reason = f"it ran past METERSTREAM_SQL_MAX_SECONDS={self.limits.max_seconds:g}"
        log.warning("stopping analyst query %s: %s", tag, reason)
        try:
            await loop.run_in_executor(self._control, self.analyst.kill, tag)
        except ClickHouseError as exc:
            log.error("KILL QUERY for analyst query %s failed: %s", tag, exc)
        self.metrics.sql_queries.inc(outcome="cancelled")
        raise QueryCancelled(f"the query was stopped: {reason}")

    # -- other reads -----------------------------------------------------------------

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(reader, *args, **kwargs)`` on the reads thread with its read-only
        connection (the usage endpoint, pricing runs, the forwarder's reads)."""
        return await self._main.read(fn, *args, **kwargs)

    def lane(self, name: str) -> ReadLane:
        """A reads thread and read-only connection of their own, for reads that must not
        queue behind the others (the credit burn behind a pricing run of every customer)."""
        if name not in self._lanes:
            self._lanes[name] = ReadLane(self._ch, self.limits, f"clickhouse-reads-{name}")
        return self._lanes[name]

    def close(self) -> None:
        for executor in (self._sql, self._control):
            executor.shutdown(wait=True, cancel_futures=True)
        for lane in (self._main, *self._lanes.values()):
            lane.close()
        self.analyst.close()


class ReadLane:
    """One thread and its read-only connection (opened at the first read): the reads given
    to it run one after another, beside every other lane (chdb runs the queries of
    different connections at the same time)."""

    def __init__(self, ch: ClickHouse, limits: SqlLimits, name: str) -> None:
        self._ch = ch
        self.limits = limits
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._reader: ClickHouse | None = None

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(reader, *args, **kwargs)`` on this lane's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: self._read(fn, *args, **kwargs))

    def _read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._reader is None:
            self._reader = self._ch.reader(
                {"max_execution_time": self.limits.max_seconds, "readonly": 1}
            )
        return fn(self._reader, *args, **kwargs)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._reader is not None:
            self._reader.close()


def _outcome(exc: ClickHouseError) -> str:
    if isinstance(exc, QueryLimitExceeded):
        return "limit"
    return "cancelled" if exc.code == 394 else "error"
