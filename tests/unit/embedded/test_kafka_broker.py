"""The embedded Apache Kafka's pure parts: Java's version, its configuration against
docker-compose.yml's Kafka, the pinned version, the cluster id."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from meterstream.embedded.kafka import new_cluster_id, parse_java_major, server_properties

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("output", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment', 17),
        ('openjdk version "21" 2023-09-19', 21),
        ('openjdk version "11.0.2" 2019-01-15', 11),
        ('java version "1.8.0_292"', 8),
        ('openjdk version "25-ea" 2025-09-16', 25),
        ("Error: could not find libjava.so", None),
        ("", None),
    ],
)
def test_java_major_version(output: str, major: int | None) -> None:
    assert parse_java_major(output) == major


def _compose_kafka() -> dict[str, object]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return dict(compose["services"]["kafka"])


def test_the_pom_pins_the_kafka_version_docker_compose_runs() -> None:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    pom = ET.parse(ROOT / "deploy" / "kafka" / "pom.xml").getroot()
    version = pom.find("m:properties/m:kafka.version", ns)
    assert version is not None and version.text
    image = str(_compose_kafka()["image"])
    assert image == f"apache/kafka:{version.text}"
    artifacts = {a.text for a in pom.iterfind("m:dependencies/m:dependency/m:artifactId", ns)}
    assert "kafka_2.13" in artifacts


def _properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line and line[0] != "#")
    return {key: value for key, value in pairs}


def test_the_embedded_node_is_configured_like_compose_where_it_matters(tmp_path: Path) -> None:
    """Topic creation, durability and transactions behave as in production: the keys
    docker-compose.yml sets for those have the same values in the embedded node."""
    props = _properties(
        server_properties(host="127.0.0.1", port=1234, controller_port=1235, data_dir=tmp_path)
    )
    env = {str(k): str(v) for k, v in dict(_compose_kafka()["environment"]).items()}  # type: ignore[call-overload]
    same = [
        "auto.create.topics.enable",
        "default.replication.factor",
        "min.insync.replicas",
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "log.retention.hours",
        "message.max.bytes",
        "process.roles",
    ]
    for key in same:
        assert props[key] == env["KAFKA_" + key.upper().replace(".", "_")], key
    # One node on loopback only, its data where it was told.
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:1234,CONTROLLER://127.0.0.1:1235"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:1234"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:1235"
    assert props["log.dirs"] == str(tmp_path)


def test_cluster_ids_are_kafkas_format_and_new_each_time() -> None:
    ids = {new_cluster_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", i) for i in ids)


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kafka-storage format -t <id>` takes an id starting with '-' for an option (the
    format failed for 1 in 64 new state dirs): such ids are drawn again, as Kafka does."""
    import uuid

    drawn = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x01" * 16)])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(drawn))
    assert new_cluster_id() == "AQEBAQEBAQEBAQEBAQEBAQ"


def test_the_default_jars_folder_is_next_to_the_pom_make_kafka_jars_uses() -> None:
    from meterstream.embedded.kafka import DEFAULT_JARS_DIR

    assert DEFAULT_JARS_DIR == ROOT / "deploy" / "kafka" / "jars"
    assert (DEFAULT_JARS_DIR.parent / "pom.xml").is_file()
