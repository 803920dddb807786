"""Which processing guarantee the windows run with: exactly_once needs broker transactions."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from aiokafka import AIOKafkaProducer

from pipeline.settings import Settings

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
        await asyncio.wait_for(producer.start(), timeout=15)
    except Exception as exc:  # any refusal means: no transactions here
        log.info("broker has no transactions (%s: %s)", type(exc).__name__, exc)
        return False
    finally:
        try:
            await producer.stop()
        except Exception:  # the probe's own cleanup; nothing to report
            log.debug("probe producer stop failed", exc_info=True)
    return True


def choose(settings: Settings, supports_transactions: bool) -> str:
    """auto: exactly_once when the broker supports it, else at_least_once.

    The windows stay exact either way (the record is written first and a
    window without trustworthy state is recomputed from it); transactions add
    atomic changelog + offset commits on Apache Kafka.
    """
    if settings.processing_guarantee == "auto":
        return "exactly_once" if supports_transactions else "at_least_once"
    return settings.processing_guarantee
