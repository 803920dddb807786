"""Analyst SQL: checked on ClickHouse's own parse, run read-only within limits, cancellable.

Three kinds of connection, none of them the writer's (:meth:`ClickHouse.reader`):

- the **checker** (``readonly=1``, 5 s): ``EXPLAIN AST <statement>`` and
  ``formatQuerySingleLine(<statement>)``, which only parse;
  :mod:`meterstream.sinks.clickhouse.sqlpolicy` walks the tree (and looks for an output
  file in the formatted text) and refuses anything it does not allow
  (:class:`QueryRefused`, nothing ran);
- **runners** (one per calling thread): the session settings are the
  operator's limits, engine guards and ``readonly=1`` last, fixed when the
  connection opens, so no statement can change them; a query over a limit
  fails with :class:`QueryLimitExceeded` naming the ``METERSTREAM_`` setting;
- **control**: ``KILL QUERY`` for a query whose caller went away. Every
  query's text starts with ``/* meterstream-sql <id> */``, which is how the
  kill finds it in ``system.processes`` (chdb ignores a client's query_id).

Engine guards, in case a check ever misses something: ``readonly=1`` (no
writes, no table functions but generated rows), introspection functions off,
``sleep``/``sleepEachRow`` fail (at most 1 us per block), and on chdb the
query threads run at nice 10 so ingestion keeps the CPU (ClickHouse applies it
only with CAP_SYS_NICE; otherwise it is a no-op). What chdb cannot refuse by
itself is exactly what the checker is for: the scalar ``file()`` and ``INTO
OUTFILE`` (chdb is clickhouse-local: it reads and writes files anywhere).

On a ClickHouse server with a dedicated analyst user (``analyst_user=True``),
``readonly`` and the guards come from that user's settings profile (a client
may not change ``readonly`` there; deploy/README.md), the limits are sent as
session settings within the profile's constraints, and every connection checks
``readonly`` is set before its first query.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any

from meterstream.errors import (
    AstDumpError,
    ClickHouseError,
    QueryLimitExceeded,
    QueryRefused,
    StatementError,
)
from meterstream.sinks.clickhouse.client import ClickHouse, as_clickhouse_error
from meterstream.sinks.clickhouse.sqlpolicy import (
    OUTFILE_REFUSED,
    Policy,
    check_ast,
    into_outfile,
    parse_ast,
    single_statement,
)

MARK = "/* meterstream-sql {tag} */ "
CHECK_SECONDS = 5
BLOCK_ROWS = 8192


@dataclass(frozen=True)
class SqlLimits:
    """The operator's limits for one analyst query (METERSTREAM_SQL_*)."""

    max_seconds: float = 30.0
    max_memory_mb: int = 512
    max_rows_read: int = 100_000_000
    max_result_rows: int = 100_000
    max_result_bytes: int = 32 * 1024 * 1024
    max_threads: int = 1

    def settings(self) -> dict[str, Any]:
        return {
            "max_execution_time": self.max_seconds,
            "timeout_overflow_mode": "throw",
            "max_memory_usage": self.max_memory_mb * 1024 * 1024,
            "max_rows_to_read": self.max_rows_read,
            "read_overflow_mode": "throw",
            "max_result_rows": self.max_result_rows,
            "max_result_bytes": self.max_result_bytes,
            "result_overflow_mode": "throw",
            "max_threads": self.max_threads,
            # Smaller blocks than the default 65,409 rows: less memory per block
            # (bench.analyst's heavy query needs ~390 MB a block at the default,
            # over the 512 MB limit with the sum; ~49 MB at 8,192) and the time
            # limit checked more often. KILL QUERY took ~0.05 s either way.
            "max_block_size": BLOCK_ROWS,
        }

    def setting_for(self, code: int | None, message: str) -> str | None:
        """The METERSTREAM_ setting (with its value) a ClickHouse limit error is about."""
        if code == 159:  # TIMEOUT_EXCEEDED
            return f"METERSTREAM_SQL_MAX_SECONDS={self.max_seconds:g}"
        if code in (158, 307):  # TOO_MANY_ROWS, TOO_MANY_BYTES (read)
            return f"METERSTREAM_SQL_MAX_ROWS_READ={self.max_rows_read}"
        if code == 396:  # TOO_MANY_ROWS_OR_BYTES (result)
            if "max bytes" in message:
                return f"METERSTREAM_SQL_MAX_RESULT_BYTES={self.max_result_bytes}"
            return f"METERSTREAM_SQL_MAX_RESULT_ROWS={self.max_result_rows}"
        if code == 241:  # MEMORY_LIMIT_EXCEEDED
            return f"METERSTREAM_SQL_MAX_MEMORY_MB={self.max_memory_mb}"
        return None


ENGINE_GUARDS: dict[str, Any] = {
    "allow_introspection_functions": 0,
    "function_sleep_max_microseconds_per_block": 1,
}
CHDB_GUARDS: dict[str, Any] = {"os_threads_nice_value_query": 10}


class AnalystSQL:
    """Check, run and cancel analyst statements on connections of their own.

    ``check`` and ``kill`` share one lock (the checker and control
    connections); ``run`` uses the calling thread's own runner connection, so
    several threads may run queries at once.
    """

    def __init__(self, ch: ClickHouse, limits: SqlLimits, *, analyst_user: bool = False) -> None:
        self.ch = ch
        self.limits = limits
        self.analyst_user = analyst_user
        self.policy = Policy(ch.database)
        self._lock = threading.Lock()
        self._checker: ClickHouse | None = None
        self._control: ClickHouse | None = None
        self._local = threading.local()
        self._runners: list[ClickHouse] = []

    # -- connections -----------------------------------------------------------------

    def _session(self, settings: dict[str, Any], nice: bool = True) -> dict[str, Any]:
        session = dict(settings)
        if self.analyst_user:
            return session  # readonly and the guards come from the user's profile
        session.update(ENGINE_GUARDS)
        if self.ch.backend == "chdb" and nice:
            session.update(CHDB_GUARDS)
        session["readonly"] = 1  # last: after it, nothing can be changed
        return session

    def _open(self, settings: dict[str, Any]) -> ClickHouse:
        try:
            conn = self.ch.reader(self._session(settings), analyst=True)
        except ClickHouseError as exc:
            if exc.code != 115:  # UNKNOWN_SETTING: an older engine without the nice setting
                raise
            conn = self.ch.reader(self._session(settings, nice=False), analyst=True)
        if self.analyst_user:
            rows = conn.query_plain_rows("SELECT getSetting('readonly')")
            if not rows or int(rows[0][0]) < 1:
                conn.close()
                raise ClickHouseError(
                    "the analyst user (METERSTREAM_SQL_CLICKHOUSE_USER) must be read-only:"
                    " give it a settings profile with readonly = 2 (see deploy/README.md)",
                    164,
                )
        return conn

    def _runner(self) -> ClickHouse:
        runner: ClickHouse | None = getattr(self._local, "runner", None)
        if runner is None:
            runner = self._local.runner = self._open(self.limits.settings())
            with self._lock:
                self._runners.append(runner)
        return runner

    # -- the three operations --------------------------------------------------------

    def check(self, sql: str, tag: str) -> str:
        """The text to run (``sql``'s one statement, named by ``tag``), or QueryRefused.

        ClickHouse's syntax errors come back as ClickHouseError with its message.
        """
        try:
            statement = single_statement(sql)
        except StatementError as exc:
            raise QueryRefused([str(exc)]) from None
        text = MARK.format(tag=tag) + statement
        with self._lock:
            if self._checker is None:
                self._checker = self._open({"max_execution_time": CHECK_SECONDS})
            try:
                lines = [
                    str(row[0]) for row in self._checker.query_plain_rows(f"EXPLAIN AST {text}")
                ]
                canonical = self._checker.query_rows(
                    "SELECT formatQuerySingleLine({q:String})", parameters={"q": text}
                )[0][0]
            except ClickHouseError as exc:
                if exc.code == 164:  # a SETTINGS clause, refused by the checker's readonly
                    raise QueryRefused(
                        ["a SETTINGS clause is not allowed: limits are the operator's"]
                    ) from None
                raise
        try:
            root = parse_ast(lines)
        except AstDumpError as exc:
            raise QueryRefused([f"ClickHouse's parse of it is not a plain tree ({exc})"]) from None
        problems = check_ast(root, self.policy)
        if into_outfile(str(canonical)) and not any("OUTFILE" in p for p in problems):
            problems.append(OUTFILE_REFUSED)
        if problems:
            raise QueryRefused(problems)
        return text

    def run(self, text: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run a checked text on this thread's runner; (column names, rows)."""
        try:
            return self._runner().query_table(text, max_bytes=self.limits.max_result_bytes)
        except ClickHouseError as exc:
            raise self._limit(exc) from None
        except Exception as exc:  # analyst SQL: any driver failure is a ClickHouse error
            raise as_clickhouse_error(exc) from exc

    def kill(self, tag: str) -> None:
        """Ask ClickHouse to stop the query named ``tag`` (returns at once)."""
        mark = MARK.format(tag=tag)
        assert tag.isalnum(), tag  # goes into the statement as text
        with self._lock:
            if self._control is None:
                self._control = self._open({})
            self._control.query_plain_rows(f"KILL QUERY WHERE startsWith(query, '{mark}') ASYNC")

    def query(self, sql: str, tag: str = "cli") -> tuple[list[str], list[tuple[Any, ...]]]:
        """Check and run in one go (the CLI without a worker)."""
        return self.run(self.check(sql, tag))

    def _limit(self, exc: ClickHouseError) -> ClickHouseError:
        message = str(exc)
        setting = self.limits.setting_for(exc.code, message)
        if setting is None:
            return exc
        detail = message.split("DB::Exception: ", 1)[-1]
        return QueryLimitExceeded(
            f"the query went over {setting} and was stopped: {detail}", exc.code, setting
        )

    def close(self) -> None:
        with self._lock:
            conns = [self._checker, self._control, *self._runners]
            self._checker = self._control = None
            self._runners = []
        for conn in conns:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
