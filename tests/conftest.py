"""Session-wide real components: the session broker (Tansu, Apache Kafka or both, chosen
by ``--broker``), one Stripe emulator, one chdb path.

Options (each also an environment variable, for ``make test PYTEST_ARGS=...`` or CI):

- ``--broker tansu|kafka|both`` (``METERSTREAM_TEST_BROKER``, default ``tansu``): the
  broker behind the ``broker`` fixture, and so behind ``stack`` and every suite that
  uses them. ``both`` runs each such test once per broker (ids ``[tansu]``,
  ``[kafka]``), as quix-streams runs its state tests over every store; with one broker
  the test ids are unchanged.
- ``--guarantee auto|at_least_once|exactly_once`` (``METERSTREAM_TEST_GUARANTEE``) and
  ``--store memory|rocksdb`` (``METERSTREAM_TEST_STORE``): the workers' default
  ``METERSTREAM_PROCESSING_GUARANTEE`` and ``METERSTREAM_STORE`` in ``stack``; a
  test's own setting wins. Unset: on Tansu the worker's own defaults (``auto``, which
  is at_least_once there, and ``memory``); on Apache Kafka the production
  configuration of docker-compose.yml and deploy/k8s, ``exactly_once`` and
  ``rocksdb`` (where the rocksdb extra is installed).

Which tests run on which broker: ``@pytest.mark.brokers("session", "kafka")`` runs a
test on each broker named ("session": the ``--broker`` choice) whatever ``--broker``
says, with the broker in its id. ``make test`` (the default ``--broker tansu``) runs
every suite on Tansu and the tests so marked on Apache Kafka too: the fault tests of
what only Apache Kafka has (transactions, a durable log) and one end-to-end run each
of the pipeline and the meters (README, "Development").
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from meterstream.embedded.kafka import KafkaBroker, jars_dir, java_command, kafka_unavailable
from meterstream.embedded.tansu import EmbeddedBroker
from meterstream.settings import Settings
from meterstream.sinks.stripe.emulator.server import BackgroundEmulator
from tests.harness import StackSlice, http_json

BROKERS = ("tansu", "kafka")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("meterstream", "meterstream's real stack")
    group.addoption(
        "--broker",
        default=os.environ.get("METERSTREAM_TEST_BROKER", "tansu"),
        choices=(*BROKERS, "both"),
        help="the session broker the suites run on (env METERSTREAM_TEST_BROKER)",
    )
    group.addoption(
        "--guarantee",
        default=os.environ.get("METERSTREAM_TEST_GUARANTEE", ""),
        choices=("", "auto", "at_least_once", "exactly_once"),
        help="the workers' METERSTREAM_PROCESSING_GUARANTEE (env METERSTREAM_TEST_GUARANTEE)",
    )
    group.addoption(
        "--store",
        default=os.environ.get("METERSTREAM_TEST_STORE", ""),
        choices=("", "memory", "rocksdb"),
        help="the workers' METERSTREAM_STORE (env METERSTREAM_TEST_STORE)",
    )


def selected_brokers(config: pytest.Config) -> tuple[str, ...]:
    chosen = str(config.getoption("--broker"))
    return BROKERS if chosen == "both" else (chosen,)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "brokers(*names): run on each broker named ('session': the --broker choice),"
        " whatever --broker says (tests/conftest.py)",
    )


def brokers_of(metafunc: pytest.Metafunc) -> tuple[str, ...]:
    """The brokers a test runs on: its ``brokers`` marker's, else ``--broker``'s."""
    session = selected_brokers(metafunc.config)
    marker = metafunc.definition.get_closest_marker("brokers")
    if marker is None:
        return session
    named = (b for arg in marker.args for b in (session if arg == "session" else (arg,)))
    chosen = tuple(dict.fromkeys(named))
    unknown = set(chosen) - set(BROKERS)
    if unknown:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: unknown brokers {unknown}")
    return chosen


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "broker" not in metafunc.fixturenames:
        return
    brokers = brokers_of(metafunc)
    marked = metafunc.definition.get_closest_marker("brokers") is not None
    if len(brokers) > 1 or marked:
        metafunc.parametrize("broker", brokers, indirect=True, scope="session")


def worker_defaults(config: pytest.Config, broker: str) -> dict[str, str]:
    """The settings every worker of ``stack`` gets unless the test sets them:
    ``--guarantee`` and ``--store``; unset, on Apache Kafka, its production
    configuration (exactly_once, RocksDB where the rocksdb extra is installed)."""
    out = {}
    if broker == "kafka":
        out["METERSTREAM_PROCESSING_GUARANTEE"] = "exactly_once"
        if importlib.util.find_spec("rocksdict") is not None:
            out["METERSTREAM_STORE"] = "rocksdb"
    if guarantee := config.getoption("--guarantee"):
        out["METERSTREAM_PROCESSING_GUARANTEE"] = str(guarantee)
    if store := config.getoption("--store"):
        out["METERSTREAM_STORE"] = str(store)
    return out


@pytest.fixture(scope="session")
def broker(request: pytest.FixtureRequest) -> EmbeddedBroker | KafkaBroker:
    """The session broker of ``--broker`` (with ``both``: this test's parameter)."""
    name = getattr(request, "param", None) or selected_brokers(request.config)[0]
    running: EmbeddedBroker | KafkaBroker = request.getfixturevalue(
        "kafka_broker" if name == "kafka" else "tansu_broker"
    )
    return running


@pytest.fixture(scope="session")
def tansu_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """Tansu, whatever ``--broker`` says (for tests of Tansu's own behaviour)."""
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(log=log) as running:
        yield running


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """Apache Kafka (one KRaft node from Kafka's jars, pipeline/embedded/kafka.py) with its
    data in a session state dir; skips with the reason where Java 17+ or the jars
    (`make kafka-jars`) are missing. ``broker`` is this one with ``--broker kafka``."""
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
    broker: EmbeddedBroker | KafkaBroker,
    stripe_emulator: str,
    chdb_path: Path,
    tmp: Path,
    config: pytest.Config,
) -> Iterator[StackSlice]:
    """A slice of the session stack in ``tmp``, with the broker's worker defaults
    (:func:`worker_defaults`); its workers are stopped when it ends."""
    name = "kafka" if isinstance(broker, KafkaBroker) else "tansu"
    test_stack = StackSlice(
        broker.bootstrap,
        chdb_path,
        stripe_emulator,
        tmp,
        broker_name=name,
        worker_defaults=worker_defaults(config, name),
    )
    try:
        yield test_stack
    finally:
        test_stack.stop_all()


@pytest.fixture
def stack(
    request: pytest.FixtureRequest,
    broker: EmbeddedBroker | KafkaBroker,
    stripe_emulator: str,
    worker_chdb_path: Path,
    tmp_path: Path,
) -> Iterator[StackSlice]:
    http_json(f"{stripe_emulator}/_emulator/reset", {})
    yield from stack_slice(broker, stripe_emulator, worker_chdb_path, tmp_path, request.config)


@pytest.fixture(scope="module")
def module_stack(
    request: pytest.FixtureRequest,
    broker: EmbeddedBroker | KafkaBroker,
    stripe_emulator: str,
    worker_chdb_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[StackSlice]:
    """One slice of the session stack for a whole module (a worker its tests share); its
    workers are stopped after the module's last test. The emulator is not reset."""
    module_tmp = tmp_path_factory.mktemp("module")
    yield from stack_slice(broker, stripe_emulator, worker_chdb_path, module_tmp, request.config)


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The one chdb data path this pytest process opens itself (chdb allows one path per
    process). Defined here, once: a session fixture defined in every module that star-imports
    tests/integration/clickhouse_fixtures.py would be one fixture per module, each with its
    own path, and the second module's would fail to open."""
    return f"chdb://{tmp_path_factory.mktemp('chdb').resolve()}"
