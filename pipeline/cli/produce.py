"""``meterstream produce``: validate JSON-lines events, report bad lines, send the good ones."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from meterstream.endpoints import kafka_bootstrap
from meterstream.events import (
    MAX_PROPERTIES_DEPTH,
    loads_exact,
    repeated_key_problems,
    validate_document,
)
from meterstream.kafka import client_options
from meterstream.settings import Settings
from meterstream.topics import USAGE_EVENTS


def check_lines(lines: Iterable[bytes]) -> tuple[list[tuple[bytes, bytes]], list[str]]:
    """(key, value) of each valid line, and one message per bad line (1-based line numbers)."""
    good: list[tuple[bytes, bytes]] = []
    bad: list[str] = []
    now = time.time_ns() // 1_000_000
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        try:
            doc = loads_exact(line)
        except ValueError as exc:
            bad.append(f"line {number}: invalid JSON: {exc}")
            continue
        except RecursionError:
            bad.append(f"line {number}: nested deeper than {MAX_PROPERTIES_DEPTH} levels")
            continue
        event, problems = validate_document(doc, record_timestamp_ms=now)
        repeated = repeated_key_problems(line, doc, event)
        if repeated:
            event, problems = None, problems + repeated
        if event is None:
            bad.append(f"line {number}: " + "; ".join(problems))
            continue
        good.append((event.customer_id.encode(), line))
    return good, bad


async def send_events(
    bootstrap: str, topic: str, events: list[tuple[bytes, bytes]], **options: Any
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, **options)
    await producer.start()
    try:
        for key, value in events:
            await producer.send(topic, key=key, value=value)
        await producer.flush()
    finally:
        await producer.stop()


async def produce_file(settings: Settings, file: str) -> int:
    """Exit code 0 when every line was valid and sent, 1 when some lines were bad."""
    lines = (
        sys.stdin.buffer.read().splitlines()
        if file == "-"
        else Path(file).read_bytes().splitlines()
    )
    good, bad = check_lines(lines)
    for message in bad:
        print(message, file=sys.stderr)
    if good:
        await send_events(
            kafka_bootstrap(settings),
            settings.topic(USAGE_EVENTS.name),
            good,
            **client_options(settings),
        )
    print(f"sent {len(good)} event(s); {len(bad)} bad line(s) not sent", file=sys.stderr)
    return 1 if bad else 0
