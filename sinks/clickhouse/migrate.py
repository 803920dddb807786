"""Versioned SQL migrations for the ClickHouse schema.

Files ``migrations/NNNN_name.sql`` are applied in version order and recorded
in ``schema_migrations`` (version, name, checksum, applied_at). A file may hold
several statements separated by ``;``. Statements use unqualified table names:
the client has the target database selected (chdb and servers alike).

ClickHouse DDL is not transactional: if statement 2 of 3 fails, statement 1
stays applied and the migration is not recorded. Migrations are therefore
written to be re-runnable (``CREATE TABLE IF NOT EXISTS``, ``CREATE OR REPLACE
VIEW``), so fixing the cause and running ``migrate`` again completes them.
Two workers migrating at once may both apply and record the same version;
that is harmless for re-runnable statements and the duplicate record is
ignored (``LIMIT 1 BY version``).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from meterstream.errors import ClickHouseError, MigrationError
from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.sinks.clickhouse.sqltext import split_statements

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

SCHEMA_MIGRATIONS_DDL = """\
CREATE TABLE IF NOT EXISTS schema_migrations
(
    version UInt32,
    name String,
    checksum String,
    applied_at DateTime64(3, 'UTC')
)
ENGINE = MergeTree
ORDER BY version"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str  # file stem, e.g. "0001_usage_events"
    sql: str
    checksum: str

    @property
    def statements(self) -> list[str]:
        return split_statements(self.sql)


def _detail(exc: ClickHouseError) -> str:
    """The driver's message without ClickHouseError's "[ClickHouse N]" prefix."""
    return str(exc.__cause__ or exc)


def checksum(sql: str) -> str:
    """sha256 of the file text with line endings normalised."""
    return hashlib.sha256(sql.replace("\r\n", "\n").encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Every ``NNNN_name.sql`` in ``directory``, by version; duplicate versions are an error."""
    migrations: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"migration file {path.name!r} is not named NNNN_name.sql")
        version = int(match.group(1))
        if version in migrations:
            raise MigrationError(
                f"migrations {migrations[version].name} and {path.stem} share version {version}"
            )
        sql = path.read_text(encoding="utf-8")
        migrations[version] = Migration(version, path.stem, sql, checksum(sql))
    return [migrations[v] for v in sorted(migrations)]


def applied_migrations(ch: ClickHouse) -> dict[int, tuple[str, str]]:
    """version -> (name, checksum) of every recorded migration."""
    rows = ch.query_rows(
        "SELECT version, name, checksum FROM schema_migrations"
        " ORDER BY version, applied_at LIMIT 1 BY version"
    )
    return {int(version): (name, digest) for version, name, digest in rows}


def migrate(
    ch: ClickHouse,
    directory: Path = MIGRATIONS_DIR,
    on_pending: Callable[[list[str]], Callable[[str], None]] | None = None,
) -> list[str]:
    """Apply pending migrations in order; return the names applied ([] when none is pending).

    ``on_pending`` (a progress display) is told the names of the pending migrations
    and returns what to call with each name once it is applied.

    Raises MigrationError when an applied migration's file changed (checksum)
    or a statement fails (with the ClickHouse error code); nothing after the
    failing migration is applied.
    """
    migrations = load_migrations(directory)
    try:
        ch.command(SCHEMA_MIGRATIONS_DDL)
        applied = applied_migrations(ch)
    except ClickHouseError as exc:
        raise MigrationError(f"cannot read schema_migrations: {_detail(exc)}", exc.code) from exc

    for migration in migrations:
        recorded = applied.get(migration.version)
        if recorded is not None and recorded[1] != migration.checksum:
            raise MigrationError(
                f"migration {migration.name} was applied with checksum {recorded[1][:12]} but the "
                f"file now has {migration.checksum[:12]}; applied migrations must not change — "
                "add a new migration instead"
            )

    done: list[str] = []
    pending = [m for m in migrations if m.version not in applied]
    applied_one = on_pending([m.name for m in pending]) if on_pending and pending else None
    for migration in pending:
        for index, statement in enumerate(migration.statements, start=1):
            try:
                ch.command(statement)
            except ClickHouseError as exc:
                raise MigrationError(
                    f"migration {migration.name} statement {index} failed: {_detail(exc)}", exc.code
                ) from exc
        now = datetime.fromtimestamp(time.time(), tz=UTC)
        try:
            ch.insert(
                "schema_migrations",
                [(migration.version, migration.name, migration.checksum, now)],
                ["version", "name", "checksum", "applied_at"],
            )
        except ClickHouseError as exc:
            raise MigrationError(
                f"migration {migration.name} applied but not recorded: {_detail(exc)}", exc.code
            ) from exc
        done.append(migration.name)
        if applied_one is not None:
            applied_one(migration.name)
    return done
