"""Session-wide real components: one embedded broker (and, for the tests that ask for it,
one Apache Kafka), one Stripe emulator, one chdb path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meterstream.embedded.kafka import KafkaBroker, jars_dir, java_command, kafka_unavailable
from meterstream.embedded.tansu import EmbeddedBroker
from meterstream.settings import Settings
from meterstream.sinks.stripe.emulator.server import BackgroundEmulator
from tests.harness import StackSlice, http_json


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(log=log) as running:
        yield running


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """Apache Kafka (one KRaft node from Kafka's jars, pipeline/embedded/kafka.py) with its
    data in a session state dir; skips with the reason where Java 17+ or the jars
    (`make kafka-jars`) are missing. The suites themselves run on ``broker`` (Tansu)."""
    settings = Settings()
    problem = kafka_unavailable(settings)
    if problem is not None:
        pytest.skip(f"the embedded Apache Kafka cannot run here: {problem}")
    state = tmp_path_factory.mktemp("kafka-state")
    with KafkaBroker(state, java=java_command(settings), jars=jars_dir(settings)) as running:
        yield running


@pytest.fixture(scope="session")
def stripe_emulator() -> Iterator[str]:
    emulator = BackgroundEmulator().start()
    try:
        yield emulator.url
    finally:
        emulator.stop()


@pytest.fixture(scope="session")
def worker_chdb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chdb path worker processes use (one at a time); not opened by pytest itself."""
    return tmp_path_factory.mktemp("worker-clickhouse")


def stack_slice(
    broker: EmbeddedBroker, stripe_emulator: str, chdb_path: Path, tmp: Path
) -> Iterator[StackSlice]:
    """A slice of the session stack in ``tmp``; its workers are stopped when it ends."""
    test_stack = StackSlice(broker.bootstrap, chdb_path, stripe_emulator, tmp)
    try:
        yield test_stack
    finally:
        test_stack.stop_all()


@pytest.fixture
def stack(
    broker: EmbeddedBroker, stripe_emulator: str, worker_chdb_path: Path, tmp_path: Path
) -> Iterator[StackSlice]:
    http_json(f"{stripe_emulator}/_emulator/reset", {})
    yield from stack_slice(broker, stripe_emulator, worker_chdb_path, tmp_path)


@pytest.fixture(scope="module")
def module_stack(
    broker: EmbeddedBroker,
    stripe_emulator: str,
    worker_chdb_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[StackSlice]:
    """One slice of the session stack for a whole module (a worker its tests share); its
    workers are stopped after the module's last test. The emulator is not reset."""
    module_tmp = tmp_path_factory.mktemp("module")
    yield from stack_slice(broker, stripe_emulator, worker_chdb_path, module_tmp)


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The one chdb data path this pytest process opens itself (chdb allows one path per
    process). Defined here, once: a session fixture defined in every module that star-imports
    tests/integration/clickhouse_fixtures.py would be one fixture per module, each with its
    own path, and the second module's would fail to open."""
    return f"chdb://{tmp_path_factory.mktemp('chdb').resolve()}"
