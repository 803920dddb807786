"""One synchronous ClickHouse wrapper for both targets: a server and embedded chdb.

``connect("http(s)://host:8123", database=...)`` talks to a ClickHouse server;
``connect("chdb:///abs/path", database=...)`` runs the embedded engine in this
process (one data path per process, one process per path). The same SQL runs
on both: every table is addressed unqualified and resolved through the
client's database, which clickhouse-connect selects on either backend.

What differs on chdb, measured with chdb 4.4 / engine 26.9 and clickhouse-connect 1.12:

- ``DateTime64(3, 'UTC')`` comes back as a *naive* datetime holding UTC wall
  time (also with ``TZ`` set to another zone); we return aware UTC datetimes.
  A naive datetime *written* to chdb is read as process-local time, so the
  row builders always write aware UTC datetimes (see writer.py).
- Per-call ``settings`` reach chdb as a ``SETTINGS`` clause for SELECTs and
  inserts, but as ``SET`` then restore for commands and INSERT statements
  sent as queries. With ``readonly=1`` the restore is itself refused, so the
  session stays read-only forever. Read-only work therefore runs on clients
  of its own (:meth:`ClickHouse.reader`: own chdb handle / HTTP session,
  settings fixed when it is created), never on the writer's client.
- chdb runs queries of different handles at the same time (measured: an
  insert on one handle takes 10-20 ms while a 5 s query runs on another), so
  reads on their own handles and threads do not wait for inserts or the
  other way round.
- ``readonly=1`` is enforced by chdb for INSERT, CREATE, DROP, ALTER, SET and
  most table functions, but not for the scalar ``file()`` nor for
  ``SELECT ... INTO OUTFILE`` (chdb is clickhouse-local, which reads and
  writes files itself, anywhere: ``user_files_path`` does not bind it).
  Analyst SQL goes through :mod:`meterstream.sinks.clickhouse.analyst`, which checks
  ClickHouse's parse of it first (:mod:`meterstream.sinks.clickhouse.sqlpolicy`).
- An insert on chdb is one engine call with the block inline after ``FORMAT``
  (:meth:`ClickHouse._inline_insert`), not the driver's temporary file and ``INSERT
  ... FROM INFILE``: each system call of the file's round trip gave the GIL away and
  waited for it back while the event loop computed (1,000 rows: 31 ms against 9 ms
  with another thread busy, bench/README.md).
- An empty result on chdb carries no column names (chdb emits no Native
  block for zero rows), so a read may return ``([], [])``.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import clickhouse_connect
import orjson
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import Error as DriverError
from pydantic import SecretStr

from meterstream.errors import ClickHouseError, NotEncodable
from meterstream.settings import Settings
from meterstream.sinks.clickhouse import columns

T = TypeVar("T")
# (session settings, as the analyst user?) -> a new driver client on the same database
ClientFactory = Callable[[Mapping[str, Any], bool], Client]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CODE_IN_MESSAGE = re.compile(r"Code: (\d+)")


def quote_identifier(name: str) -> str:
    """Backtick-quote a plain identifier (letters, digits, underscore); refuse anything else."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"{name!r} is not a plain identifier ([A-Za-z_][A-Za-z0-9_]*)")
    return f"`{name}`"


_SETTING_VALUE = re.compile(r"[A-Za-z0-9_.:-]*")


def inline_insert(
    table: str, column_names: Sequence[str], settings: Mapping[str, Any], block: bytes
) -> bytes:
    """``INSERT INTO table (columns) [SETTINGS ...] FORMAT JSONCompactColumns`` with
    ``block`` as its data. Identifiers and setting names must be plain, setting values
    plain words (numbers, tokens): anything else is refused, never quoted into SQL."""
    clause = ""
    if settings:
        pairs = []
        for name, value in settings.items():
            text = str(value)
            if not _SETTING_VALUE.fullmatch(text):
                raise ValueError(f"setting {name}={text!r} is not a plain value")
            pairs.append(f"{quote_identifier(name)[1:-1]} = '{text}'")
        clause = " SETTINGS " + ", ".join(pairs)
    cols = ", ".join(quote_identifier(name) for name in column_names)
    head = f"INSERT INTO {quote_identifier(table)} ({cols}){clause} FORMAT {columns.FORMAT}\n"
    return head.encode() + block


def _error_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    if isinstance(code, str) and code.isdigit():
        return int(code)
    match = _CODE_IN_MESSAGE.search(str(exc))
    return int(match.group(1)) if match else None


def as_clickhouse_error(exc: BaseException) -> ClickHouseError:
    """A driver/network exception as ClickHouseError, keeping the ClickHouse error code."""
    if isinstance(exc, ClickHouseError):
        return exc
    message = str(exc).strip() or type(exc).__name__
    return ClickHouseError(message, _error_code(exc))


def values_size(rows: Sequence[Sequence[Any]]) -> int:
    """About how many bytes ``rows`` take as text: strings and bytes by length, nested
    values as JSON, anything else 8 bytes (column by column, so it stays cheap)."""
    total = 0
    for column in zip(*rows, strict=True):
        first = next((v for v in column if v is not None), None)
        if isinstance(first, str | bytes | bytearray):
            total += sum(map(len, filter(None, column)))
        elif isinstance(first, list | tuple | dict):
            total += len(orjson.dumps(column, default=str))
        else:
            total += 8 * len(column)
    return total


def _utc(value: Any) -> Any:
    """Naive datetimes from the driver hold UTC wall time (every column is declared 'UTC')."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class ClickHouse:
    """A clickhouse-connect client with a lock, UTC datetimes and ClickHouseError errors.

    Every method is synchronous and serialised by one lock: the worker calls it
    from a single executor thread, and the lock keeps accidental concurrent use
    safe (a chdb handle must not be used by two threads at once).
    """

    def __init__(
        self,
        client: Client,
        *,
        database: str,
        backend: str,
        factory: ClientFactory | None = None,
    ) -> None:
        self._client = client
        self._factory = factory
        self._lock = threading.RLock()
        self.database = database
        self.backend = backend  # "chdb" or "server"
        self._types: dict[str, dict[str, str]] = {}  # table -> column types; DDL clears it

    def _call(self, fn: Callable[[], T]) -> T:
        with self._lock:
            try:
                return fn()
            except (DriverError, OSError) as exc:
                raise as_clickhouse_error(exc) from exc

    def command(self, sql: str, settings: Mapping[str, Any] | None = None) -> Any:
        """Run one statement that returns no rows (DDL, INSERT ... SELECT, OPTIMIZE)."""
        self._types.clear()  # it may have changed a table's columns
        return self._call(lambda: self._client.command(sql, settings=dict(settings or {})))

    def query_rows(
        self,
        sql: str,
        parameters: Mapping[str, Any] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> list[tuple[Any, ...]]:
        result = self._call(
            lambda: self._client.query(
                sql, parameters=dict(parameters or {}) or None, settings=dict(settings or {})
            )
        )
        return [tuple(_utc(v) for v in row) for row in result.result_rows]

    def query_table(
        self, sql: str, max_bytes: int | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """(column names, rows) with UTC datetimes; chdb gives no names for zero rows.

        With ``max_bytes`` the answer is read block by block and the query stopped
        (ClickHouseError 396) once its values pass that size as Python holds them:
        ClickHouse's own ``max_result_bytes`` counts a constant column once, so
        ``SELECT repeat('x', 1000000) FROM numbers(300)`` passes it as 1 MB and
        arrives as 300 MB.
        """

        def whole() -> tuple[list[str], Sequence[Sequence[Any]]]:
            result = self._client.query(sql)
            if max_bytes is not None and values_size(result.result_rows) > max_bytes:
                raise ClickHouseError(f"Limit for result exceeded, max bytes: {max_bytes}", 396)
            return list(result.column_names), result.result_rows

        def run() -> tuple[list[str], Sequence[Sequence[Any]]]:
            if max_bytes is None:
                return whole()
            try:
                stream = self._client.query_row_block_stream(sql)
            except DriverError as exc:  # chdb streams SELECTs only, not EXPLAIN, SHOW...
                if "Streaming query is not supported" not in str(exc):
                    raise
                return whole()
            names = list(getattr(stream.source, "column_names", ()))
            rows: list[Sequence[Any]] = []
            size = 0
            with stream:
                for block in stream:
                    size += values_size(block)
                    if size > max_bytes:
                        raise ClickHouseError(
                            f"Limit for result exceeded, max bytes: {max_bytes},"
                            f" current bytes: at least {size} (TOO_MANY_ROWS_OR_BYTES)",
                            396,
                        )
                    rows.extend(block)
            return names, rows

        names, rows = self._call(run)
        return names, [tuple(_utc(v) for v in row) for row in rows]

    def query_plain_rows(self, sql: str) -> list[Sequence[Any]]:
        """Rows as the driver returns them, for queries that select no DateTime column
        (nothing to make timezone-aware): large reads skip a conversion per value."""
        return self._call(lambda: list(self._client.query(sql).result_rows))

    def query_dicts(
        self,
        sql: str,
        parameters: Mapping[str, Any] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        def run() -> tuple[Sequence[str], list[Any]]:
            result = self._client.query(
                sql, parameters=dict(parameters or {}) or None, settings=dict(settings or {})
            )
            return result.column_names, list(result.result_rows)

        names, rows = self._call(run)
        return [{k: _utc(v) for k, v in zip(names, row, strict=True)} for row in rows]

    def insert(
        self,
        table: str,
        rows: Sequence[Sequence[Any]],
        column_names: Sequence[str],
        dedup_token: str | None = None,
    ) -> None:
        """One INSERT of all ``rows``. With ``dedup_token`` a retry of the same insert is dropped

        by ClickHouse (tables carry ``non_replicated_deduplication_window``), on a
        server and on chdb alike (measured).

        The rows go as one ``JSONCompactColumns`` block written by orjson
        (:mod:`meterstream.sinks.clickhouse.columns`); rows it cannot carry exactly go through
        the driver's Native serialization, as before.
        """
        if not rows:
            return
        settings: dict[str, Any] = {}
        if dedup_token is not None:
            settings = {"insert_deduplicate": 1, "insert_deduplication_token": dedup_token}
        names = list(column_names)

        def run() -> None:
            try:
                block = columns.encode(rows, names, self._column_types(table))
            except NotEncodable:
                self._client.insert(table, list(rows), column_names=names, settings=settings)
                return
            engine_call = self._inline_insert()
            if engine_call is not None:
                engine_call(inline_insert(table, names, settings, block))
                return
            self._client.raw_insert(
                table, names, insert_block=block, settings=settings, fmt=columns.FORMAT
            )

        self._call(run)

    def _inline_insert(self) -> Callable[[bytes], Any] | None:
        """On chdb, one engine call that runs an INSERT with its data inline.

        clickhouse-connect's chdb ``raw_insert`` writes the block to a temporary file
        and inserts ``FROM INFILE``: creating, writing, closing and removing the file
        and the insert are each a blocking call that releases the GIL, and each time
        this thread waits up to the switch interval (5 ms) to take it back while the
        event loop's thread computes. Measured with 1,000 rows against a thread that
        keeps the GIL busy: 31 ms an insert that way, 9 ms inline (3.6 and 3.2 ms
        idle); in the worker, the record and ``meter_windows`` inserts are awaited by
        every batch. None on a server (the driver streams the block over HTTP), or
        if the driver's chdb backend lacks the call.
        """
        if self.backend != "chdb":
            return None
        run = getattr(getattr(self._client, "_backend", None), "_run", None)
        if run is None:
            return None
        database = self.database
        return lambda sql: run(sql, "TabSeparated", database=database)

    def _column_types(self, table: str) -> dict[str, str]:
        """Column name -> type of ``table`` in this database, read once (under the lock)."""
        types = self._types.get(table)
        if types is None:
            result = self._client.query(
                "SELECT name, type FROM system.columns"
                " WHERE database = {database:String} AND table = {table:String}",
                parameters={"database": self.database, "table": table},
            )
            types = self._types[table] = {name: typ for name, typ in result.result_rows}
        return types

    def reader(self, settings: Mapping[str, Any], *, analyst: bool = False) -> ClickHouse:
        """A new connection (own chdb handle / HTTP session) to the same database whose

        session settings are ``settings``, applied in order when it opens (put
        ``readonly`` last: once it is 1 nothing else can change). ``analyst``
        connects as the analyst user when one is configured. The caller closes it.
        """
        if self._factory is None:
            raise ClickHouseError("this connection cannot open readers", 164)
        try:
            client = self._factory(settings, analyst)
        except (DriverError, OSError) as exc:
            raise as_clickhouse_error(exc) from exc
        return ClickHouse(client, database=self.database, backend=self.backend)

    def close(self) -> None:
        with self._lock, contextlib.suppress(Exception):  # closing is best effort
            self._client.close()

    def __enter__(self) -> ClickHouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    dsn: str,
    *,
    database: str,
    user: str | None = None,
    password: SecretStr | None = None,
    create_database: bool = True,
    client_options: Mapping[str, Any] | None = None,
    analyst_user: str | None = None,
    analyst_password: SecretStr | None = None,
) -> ClickHouse:
    """Connect to ``dsn`` (``chdb:///abs/path``, ``http://host:8123``, ``https://host:8443``).

    ``database`` is created when missing (``create_database``) and selected on
    the client, so unqualified table names resolve to it on both targets.
    ``user``/``password`` (and TLS options in ``client_options``, e.g.
    ``verify``/``ca_cert``) apply to servers; chdb has no authentication.
    ``analyst_user``/``analyst_password``: the server user that readers opened
    with ``analyst=True`` log in as (default: ``user``).
    """
    quoted = quote_identifier(database)
    is_chdb = dsn.startswith("chdb:")
    if not is_chdb and not dsn.startswith(("http://", "https://")):
        raise ClickHouseError(
            f"unsupported ClickHouse DSN {dsn!r}: use chdb://, http:// or https://"
        )
    base: dict[str, Any] = dict(client_options or {})
    if not is_chdb:
        if user is not None:
            base["username"] = user
        if password is not None:
            base["password"] = password.get_secret_value()

    def make(
        db: str | None, settings: Mapping[str, Any] | None = None, analyst: bool = False
    ) -> Client:
        kwargs = dict(base)
        if analyst and not is_chdb and analyst_user is not None:
            kwargs["username"] = analyst_user
            kwargs.pop("password", None)
            if analyst_password is not None:
                kwargs["password"] = analyst_password.get_secret_value()
        if settings:
            kwargs["settings"] = dict(settings)
        return clickhouse_connect.get_client(dsn=dsn, database=db, **kwargs)

    try:
        if create_database:
            bootstrap = make(None)
            try:
                bootstrap.command(f"CREATE DATABASE IF NOT EXISTS {quoted}")
            finally:
                bootstrap.close()
        client = make(database)
    except (DriverError, OSError) as exc:
        raise as_clickhouse_error(exc) from exc
    return ClickHouse(
        client,
        database=database,
        backend="chdb" if is_chdb else "server",
        factory=lambda settings, analyst: make(database, settings, analyst),
    )


def open_clickhouse(settings: Settings) -> ClickHouse:
    dsn = settings.clickhouse_dsn or settings.embedded_clickhouse_dsn
    if dsn.startswith("chdb://"):
        Path(dsn.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
    return connect(
        dsn,
        database=settings.clickhouse_database,
        user=settings.clickhouse_user,
        password=settings.clickhouse_password,
        analyst_user=settings.sql_clickhouse_user,
        analyst_password=settings.sql_clickhouse_password,
    )
