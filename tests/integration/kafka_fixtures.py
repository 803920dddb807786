"""Kafka fixtures: the embedded Tansu broker (always) and Apache Kafka in a container.

``kafka_backend`` is parametrized over ``embedded`` (the session ``broker`` fixture of
tests/conftest.py) and ``container`` (``KafkaContainer`` from testcontainers, KRaft
mode, one broker configured like docker-compose.yml: auto-create off, min ISR 1, and
a transaction log that fits on one broker so ``exactly_once`` works). Both give a
bootstrap string. The container variant skips with a clear reason when no Docker
engine is reachable, so the same tests run on the embedded broker alone.

Use from a test module with ``from tests.integration.kafka_fixtures import *``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.clickhouse_fixtures import docker_available

NO_DOCKER_REASON = (
    "no Docker engine: testcontainers cannot start Kafka here; "
    "the same tests ran on the embedded Tansu broker"
)
# testcontainers' KafkaContainer drives Confluent's image scripts (cp-kafka 7.6 =
# Apache Kafka 3.6); docker-compose.yml runs the apache/kafka image itself.
KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"
KAFKA_BROKER_ENV = {
    "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
    "KAFKA_NUM_PARTITIONS": "8",
    "KAFKA_MIN_INSYNC_REPLICAS": "1",
    "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
    "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
}

__all__ = ["kafka_backend", "kafka_container"]


@pytest.fixture(scope="session")
def kafka_container() -> Iterator[str]:
    """Bootstrap of Apache Kafka in a container, or skip when Docker is unreachable."""
    problem = docker_available()
    if problem is not None:
        pytest.skip(f"{NO_DOCKER_REASON} ({problem})")
    from testcontainers.community.kafka import KafkaContainer

    container = KafkaContainer(KAFKA_IMAGE).with_kraft()
    for key, value in KAFKA_BROKER_ENV.items():
        container.with_env(key, value)
    container.start(timeout=120)
    try:
        yield container.get_bootstrap_server()
    finally:
        container.stop()


@pytest.fixture(params=["embedded", "container"])
def kafka_backend(request: pytest.FixtureRequest) -> str:
    """A Kafka bootstrap string: the embedded broker, then Apache Kafka in a container."""
    if request.param == "embedded":
        return str(request.getfixturevalue("broker").bootstrap)
    bootstrap: str = request.getfixturevalue("kafka_container")
    return bootstrap
