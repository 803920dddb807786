"""Which processing guarantee the windows run with: exactly_once needs broker transactions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

from aiokafka import AIOKafkaProducer

from meterstream.settings import Settings

log = logging.getLogger("meterstream.worker")


async def broker_supports_transactions(bootstrap: str, **options: Any) -> bool:
    """True when the broker grants a transactional producer id (Apache Kafka does;
    the embedded broker answers InitProducerId with an error)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        transactional_id=f"meterstream-probe-{uuid.uuid4().hex[:8]}",
        **options,
    )
    try:
        # A refusal is the answer we are asking for, not an error: aiokafka's sender
        # logs it at ERROR ("Unexpected error during InitProducerIdRequest"), so its
        # logger is quiet during the probe only.
        with _quiet(_SENDER_LOGGER):
            await asyncio.wait_for(producer.start(), timeout=15)
    except Exception as exc:  # any refusal means: no transactions here
        log.debug("InitProducerId refused (%s: %s)", type(exc).__name__, exc)
        return False
    finally:
        try:
            with _quiet(_SENDER_LOGGER):
                await producer.stop()
        except Exception:  # the probe's own cleanup; nothing to report
            log.debug("probe producer stop failed", exc_info=True)
    return True


_SENDER_LOGGER = "aiokafka.producer.sender"


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Drop ``name``'s records below CRITICAL for the duration (restored after)."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


def describe(settings: Settings, guarantee: str) -> str:
    """One log line: the guarantee and, when ``auto`` chose at_least_once, why."""
    if settings.processing_guarantee == "auto" and guarantee == "at_least_once":
        return (
            "processing guarantee: at_least_once (the broker has no transactions: "
            "InitProducerId refused; the record keeps the totals exact)"
        )
    return f"processing guarantee: {guarantee}"


def choose(settings: Settings, supports_transactions: bool) -> str:
    """auto: exactly_once when the broker supports it, else at_least_once.

    The windows stay exact either way (the record is written first and a
    window without trustworthy state is recomputed from it); transactions add
    atomic changelog + offset commits on Apache Kafka.
    """
    if settings.processing_guarantee == "auto":
        return "exactly_once" if supports_transactions else "at_least_once"
    return settings.processing_guarantee
