"""ClickHouse fixtures: embedded chdb (always) and a testcontainers server (where Docker runs).

chdb allows one data path per process and one process per path, so the whole
pytest session shares ONE chdb path (a tmp dir) and each test gets its own
database ``t_<uuid8>``, dropped afterwards.

Use from a test module with ``from tests.integration.clickhouse_fixtures import *``.
The ``ch`` fixture is parametrized over ``chdb`` and ``server``; the server
variant skips with a clear reason when no Docker engine is reachable.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from pydantic import SecretStr

from meterstream.sinks.clickhouse.client import ClickHouse, connect

NO_DOCKER_REASON = (
    "no Docker engine: testcontainers cannot start ClickHouse here; "
    "the same tests ran on embedded chdb"
)
CLICKHOUSE_IMAGE = "clickhouse/clickhouse-server:25.3"

__all__ = [
    "ClickHouseTarget",
    "ch",
    "ch_factory",
    "clickhouse_server",
    "clickhouse_target",
]


@dataclass(frozen=True)
class ClickHouseTarget:
    """Where to connect: a DSN plus credentials (none for chdb)."""

    backend: str
    dsn: str
    user: str | None = None
    password: SecretStr | None = None


def docker_available() -> str | None:
    """None when a Docker engine answers, else why not."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="session")
def clickhouse_server() -> Iterator[ClickHouseTarget]:
    """A ClickHouse server in a container, or skip when Docker is unreachable."""
    problem = docker_available()
    if problem is not None:
        pytest.skip(f"{NO_DOCKER_REASON} ({problem})")
    from testcontainers.community.clickhouse import ClickHouseContainer

    container = ClickHouseContainer(CLICKHOUSE_IMAGE)
    container.start()
    try:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(8123)
        yield ClickHouseTarget(
            "server",
            f"http://{host}:{port}",
            container.username,
            SecretStr(container.password),
        )
    finally:
        container.stop()


@pytest.fixture(params=["chdb", "server"])
def clickhouse_target(request: pytest.FixtureRequest) -> ClickHouseTarget:
    if request.param == "chdb":
        return ClickHouseTarget("chdb", request.getfixturevalue("chdb_dsn"))
    target: ClickHouseTarget = request.getfixturevalue("clickhouse_server")
    return target


@pytest.fixture
def ch_factory(
    clickhouse_target: ClickHouseTarget,
) -> Iterator[Callable[..., ClickHouse]]:
    """Connect to a database (fresh ``t_<uuid8>`` by default); all are dropped afterwards."""
    opened: list[ClickHouse] = []
    databases: set[str] = set()

    def make(database: str | None = None) -> ClickHouse:
        name = database or f"t_{uuid.uuid4().hex[:8]}"
        client = connect(
            clickhouse_target.dsn,
            database=name,
            user=clickhouse_target.user,
            password=clickhouse_target.password,
        )
        opened.append(client)
        databases.add(name)
        return client

    yield make
    if opened:
        for name in databases:
            opened[0].command(f"DROP DATABASE IF EXISTS `{name}` SYNC")
    for client in opened:
        client.close()


@pytest.fixture
def ch(ch_factory: Callable[..., ClickHouse]) -> ClickHouse:
    """A connection to a fresh, empty database (dropped after the test)."""
    return ch_factory()
